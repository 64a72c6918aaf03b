"""Train the digits teacher: a real, small SDXL-format pipeline (issue #5, part 1).

Data: sklearn's 8x8 digits (`trainer.data.DigitsDataset`), bilinearly upsampled to 32x32 RGB in [-1, 1], with the
caption `digit_prompt(label)` ("a handwritten digit seven").

Architecture (chosen for the distillation demo, which runs many UNet forwards per step on 2 CPU cores):
- VAE: `AutoencoderKL`, three encoder/decoder blocks (8, 16, 32 channels) -> factor 4: 32x32x3 images,
  8x8x4 latents. The digits are 8x8 images at heart, so an 8x8x4 latent loses nothing visible, and every UNet
  forward costs a quarter of what a 16x16 latent would. Trained first, alone, with MSE reconstruction plus a small
  KL term (`kl_weight`, on the per-element mean) on posterior samples. The KL keeps the posterior noise at ~0.4 of
  the latent spread, so the decoder is robust to small latent errors. `scaling_factor` is then set to 1/std of
  posterior samples over the whole dataset (unit-std latents, no shift, as SDXL).
- Text encoders: `trainer.tiny`'s tiny CLIPTextModel (quick_gelu) and CLIPTextModelWithProjection (gelu), hidden 32,
  2 layers, with the locally built CLIP BPE tokenizer (`build_clip_tokenizer`). They are trained jointly with the
  UNet, end to end through `StableDiffusionXLPipeline.encode_prompt` itself (penultimate hidden states of both,
  concatenated to 64 dims; pooled projection 32), so training and inference encode prompts by one code path.
- UNet: `UNet2DConditionModel`, `addition_embed_type="text_time"`, blocks (48, 96) (DownBlock2D at 8x8,
  CrossAttnDownBlock2D at 4x4, cross-attention mid block), 1 layer per block: ~2.3M parameters.
- Scheduler saved with the pipeline: SDXL's `EulerDiscreteScheduler` (scaled_linear 0.00085-0.012, 1000 steps,
  epsilon, leading spacing, steps_offset 1).

UNet training: epsilon prediction on that DDPM schedule (`trainer.schedules.EpsDDPM`, t ~ U{0..999}), min-SNR-5
loss weighting (Hang et al. 2023; it speeds up convergence, and is still epsilon prediction), AdamW with warmup and
cosine decay, and an EMA (0.999) of the UNet and both text encoders, which is what gets saved. Latents are fresh
posterior samples every step (as `Teacher.encode_images` draws them). Micro-conditioning time_ids are
[32, 32, 0, 0, 32, 32], what both the stock pipeline and `Teacher.time_ids` pass at 32 px.

Unconditional branch (CFG): the pipeline is saved with `force_zeros_for_empty_prompt=True` (the SDXL default), so
the stock pipeline without a negative prompt and `trainer.models.Teacher.uncond` both feed *zero* embeddings and a
zero pooled vector. Training therefore replaces the conditioning with zeros for `p_zero` (10%) of the samples. A
further `p_empty` (5%) get the encoded empty prompt "", so `negative_prompt=""` is unconditional as well.

Reproducibility: everything is seeded from `seed` (component initialisation, batches, noise). With a fixed
`--steps` the result is a function of the seed, the torch build and the thread count; `--minutes` makes it stop
(and its LR schedule progress) by wall time instead, which is machine-dependent. The shipped folder was rebuilt
twice with `--threads 1` and came out bitwise identical. On a busy 2-core machine use `--threads 1`: a second
OpenMP thread mostly spin-waits there (we measured 5-10x more CPU per step with 2 threads under load).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainer.data import DigitsDataset
from trainer.toy import RESOLUTION
from trainer.toy.prompts import DIGIT_WORDS, digit_prompt

VAE_CHANNELS = (8, 16, 32)  # three blocks -> VAE factor 4 (32 px images, 8x8 latents)
LATENT_CHANNELS = 4
UNET_CHANNELS = (48, 96)
TEXT_HIDDEN = 32  # each CLIP encoder's width (trainer.tiny._text_encoder); cross-attention sees 32 + 32
TEXT_PROJECTION = 32  # text_encoder_2's pooled projection
TIME_EMBED = 8  # per SDXL time id (6 of them)
PROMPTS = [digit_prompt(i) for i in range(len(DIGIT_WORDS))] + [""]  # index 10: the empty prompt
EMPTY = len(DIGIT_WORDS)


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


# --------------------------------------------------------------------------------------------------- components


def build_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # set from the trained encoder's latent std
        force_upcast=False,  # fp32 weights; nothing to upcast
    )


def build_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2 ** (len(VAE_CHANNELS) - 1),  # 8: the pipeline's default is 8 x 4 = 32 px
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=(4, 8),
        norm_num_groups=8,
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' penultimate states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_PROJECTION,
        use_linear_projection=True,
    )


def build_pipeline(tok_dir: Path, seed: int) -> Any:
    """A freshly initialised (untrained) digits pipeline; each component has its own seed."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from trainer.tiny import _SD_BETAS, _text_encoder, build_clip_tokenizer

    def seeded(offset: int) -> None:
        torch.default_generator.manual_seed(seed * 1000 + offset)

    tokenizer = build_clip_tokenizer(tok_dir)
    seeded(1)
    te1 = _text_encoder(tokenizer, projection=False, hidden_act="quick_gelu")
    seeded(2)
    te2 = _text_encoder(tokenizer, projection=True, hidden_act="gelu")
    seeded(3)
    vae = build_vae()
    seeded(4)
    unet = build_unet()
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, prediction_type="epsilon", timestep_spacing="leading",
                                       steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def encode_prompts(pipe: Any) -> tuple[Tensor, Tensor]:
    """`PROMPTS` through the pipeline's own encode_prompt, with grad: ([11, 77, 64] embeds, [11, 32] pooled)."""
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


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


# ----------------------------------------------------------------------------------------------------- driver


def save_pipeline(pipe: Any, out: Path, tok_dir: Path) -> None:
    pipe.save_pretrained(out, safe_serialization=True)
    # As trainer.tiny does: keep CLIP's vocab.json/merges.txt next to tokenizer.json (transformers 4 readers).
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, out / sub / name)


def train_teacher(out_dir: str | Path, recipe: Recipe | None = None, progress: bool = True,
                  command: str | None = None) -> dict[str, Any]:
    """Train the VAE, then the UNet and text encoders, and save the pipeline to `out_dir` (replaced atomically).

    Returns the summary also written to `out_dir/training.json` (recipe, times, losses, parameter counts).
    """
    recipe = recipe or Recipe()
    out = Path(out_dir)
    old_threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
            tok_dir = Path(tmp) / "clip"
            pipe = build_pipeline(tok_dir, recipe.seed)
            gen = torch.Generator().manual_seed(recipe.seed)
            data = DigitsDataset(RESOLUTION)
            images, labels = data.images[:recipe.subset], torch.tensor(data.labels[:recipe.subset])

            t0 = time.monotonic()
            logs = train_vae(pipe.vae, images, recipe, gen, progress)
            logs["vae_minutes"] = (time.monotonic() - t0) / 60
            mean, std = encode_posterior(pipe.vae, images)
            samples = mean + std * torch.randn(mean.shape, generator=gen)
            scaling = round(1.0 / samples.std().item(), 5)
            pipe.vae.register_to_config(scaling_factor=scaling)
            logs.update(scaling_factor=scaling, latent_posterior_std=(std * scaling).mean().item())

            t0 = time.monotonic()
            logs.update(train_denoiser(pipe, mean * scaling, std * scaling, labels, recipe, gen, progress))
            logs["unet_minutes"] = (time.monotonic() - t0) / 60
            logs["unet_eval_eps_mse"] = eval_denoiser_loss(pipe, mean * scaling, std * scaling, labels,
                                                           n=recipe.eval_samples)

            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".digits-teacher-", dir=out.parent))
            save_pipeline(pipe, staging, tok_dir)
            summary = {
                "command": command,
                "recipe": asdict(recipe),
                "metrics": logs,
                "total_minutes": (time.monotonic() - t_start) / 60,
                "params": {"unet": count_params(pipe.unet), "vae": count_params(pipe.vae),
                           "text_encoder": count_params(pipe.text_encoder),
                           "text_encoder_2": count_params(pipe.text_encoder_2)},
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
            }
            (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            shutil.move(str(staging), str(out))
    finally:
        torch.set_num_threads(old_threads)
    return summary
