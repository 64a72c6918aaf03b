"""Training the digits teacher: the VAE alone first, then the UNet and both text encoders jointly, with an EMA
(trainer/toy/teacher.py describes the recipe and why)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainer.toy import RESOLUTION
from trainer.toy.teacher_nets import EMPTY, encode_prompts


@dataclass
class Recipe:
    """Everything `train_teacher` needs; the CLI's options map onto these fields."""

    seed: int = 0
    # VAE stage
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3
    # UNet + text encoder stage
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    p_zero: float = 0.10
    p_empty: float = 0.05
    minutes: float | None = None  # optional wall-clock cap on the UNet stage
    threads: int | None = None  # torch.set_num_threads for the run (None: leave as is)
    subset: int | None = None  # train on the first N digits only (smoke tests); None: all 1797
    eval_samples: int = 1024  # fixed draws for the final unweighted eps-MSE


# --------------------------------------------------------------------------------------------------------- VAE


def _kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, var) || N(0, 1)) per element, averaged."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def train_vae(vae: nn.Module, images: Tensor, recipe: Recipe, gen: torch.Generator,
              progress: bool = True) -> dict[str, float]:
    """MSE reconstruction + kl_weight * KL on posterior samples; cosine LR. images: [N, 3, R, R] in [-1, 1]."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    n = images.shape[0]
    logs: dict[str, float] = {}
    bar = tqdm(range(recipe.vae_steps), desc="vae", disable=not progress, dynamic_ncols=True)
    mse_avg = kl_avg = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = recipe.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, recipe.vae_steps)))
        x = images[torch.randint(0, n, (recipe.vae_batch,), generator=gen)]  # [B, 3, R, R]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = (rec - x).pow(2).mean()
        kl = _kl(post.mean, post.logvar)
        loss = mse + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse_avg = mse.item() if mse_avg is None else 0.95 * mse_avg + 0.05 * mse.item()
        kl_avg = kl.item() if kl_avg is None else 0.95 * kl_avg + 0.05 * kl.item()
        bar.set_postfix(mse=f"{mse_avg:.4f}", kl=f"{kl_avg:.3f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean, std = encode_posterior(vae, images)
        rec = torch.cat([vae.decode(m).sample for m in mean.split(256)])
        logs["vae_recon_mse"] = (rec - images).pow(2).mean().item()  # at the posterior mean, whole dataset
    logs["vae_train_mse_ema"] = float(mse_avg or 0.0)
    logs["vae_train_kl_ema"] = float(kl_avg or 0.0)
    return logs


@torch.no_grad()
def encode_posterior(vae: nn.Module, images: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Unscaled posterior mean and std, [N, 4, h, w] each."""
    means, stds = [], []
    for x in images.split(chunk):
        post = vae.encode(x).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------- UNet + text encoders


class _EMA:
    """Exponential moving average of a list of parameters (with the usual (1+n)/(10+n) warm-up)."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay, self.n = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


def train_denoiser(pipe: Any, lat_mean: Tensor, lat_std: Tensor, labels: Tensor, recipe: Recipe,
                   gen: torch.Generator, progress: bool = True) -> dict[str, float]:
    """Train the UNet and both text encoders jointly; the EMA weights end up in the pipeline's modules.

    lat_mean/lat_std: scaled posterior moments [N, 4, 8, 8]; labels: [N] digit classes.
    """
    from trainer.models import Cond, predict
    from trainer.schedules import EpsDDPM

    param = EpsDDPM.from_scheduler_config(dict(pipe.scheduler.config))
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.99))
    ema = _EMA(params, recipe.ema_decay)
    n, batch = labels.shape[0], recipe.batch
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    time_ids = time_ids.expand(batch, 6)
    deadline = None if recipe.minutes is None else time.monotonic() + 60.0 * recipe.minutes
    start = time.monotonic()
    bar = tqdm(total=recipe.steps, desc="unet", disable=not progress, dynamic_ncols=True)
    loss_avg, step = None, 0
    while step < recipe.steps:
        frac = step / recipe.steps
        if deadline is not None:
            elapsed = (time.monotonic() - start) / (deadline - start)
            if elapsed >= 1.0:
                break
            frac = max(frac, elapsed)
        lr = recipe.lr * min(1.0, (step + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr

        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)  # [B, 4, 8, 8]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, param.alphas_cumprod.shape[0], (batch,), generator=gen)
        x_t = param.add_noise(x0, noise, t)

        # Conditioning: the prompt of each sample's label; p_zero -> zeros (force_zeros uncond), p_empty -> "".
        u = torch.rand(batch, generator=gen)
        which = torch.where(u < recipe.p_zero + recipe.p_empty, EMPTY, labels[idx])  # [B] index into PROMPTS
        keep = (u >= recipe.p_zero).float()  # [B]; 0 -> zero embeddings and pooled
        all_embeds, all_pooled = encode_prompts(pipe)  # [11, 77, 64], [11, 32]
        cond = Cond(all_embeds[which] * keep[:, None, None], all_pooled[which] * keep[:, None], time_ids)

        pred = predict(pipe.unet, x_t, t, cond, param)  # [B, 4, 8, 8]
        a, s = param.coefs(t)
        snr = (a / s).pow(2)
        weight = (snr.clamp(max=recipe.snr_gamma) / snr).float()  # min-SNR-gamma for epsilon prediction
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # [B]
        loss = (weight * per_sample).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.1e}")
    bar.close()
    ema.copy_to_params()
    for m in modules:
        m.eval().requires_grad_(False)
    return {"unet_steps_done": step, "unet_train_loss_ema": float(loss_avg or 0.0)}


@torch.no_grad()
def eval_denoiser_loss(pipe: Any, lat_mean: Tensor, lat_std: Tensor, labels: Tensor, seed: int = 1234,
                       n: int = 1024) -> float:
    """Plain (unweighted) epsilon MSE of the saved weights on n fixed (x0, t, noise) draws."""
    from trainer.models import Cond, predict
    from trainer.schedules import EpsDDPM

    param = EpsDDPM.from_scheduler_config(dict(pipe.scheduler.config))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, labels.shape[0], (n,), generator=g)
    x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    embeds, pooled = encode_prompts(pipe)
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    cond = Cond(embeds[labels[idx]], pooled[labels[idx]], time_ids.expand(n, 6))
    x_t = param.add_noise(x0, noise, t)
    pred = torch.cat([predict(pipe.unet, x_t[i:i + 256], t[i:i + 256], cond[i:i + 256], param)
                      for i in range(0, n, 256)])
    return (pred - noise).pow(2).mean().item()
