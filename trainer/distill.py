"""One Flash-DMD (or DMD2-baseline) iteration, split into the phases of Algorithm 1.

`Distiller.step(batch, step)` runs, in Alg. 1's order:
  1. backward simulation to the generator's input x_{tau_i}          (lines 5-8)
  2. every TTUR-th step: the generator update and EMA injection      (lines 12-19)
  3. the fake-score update on x.detach()                             (lines 20-24)
  4. the discriminator update                                        (lines 25-26)
Each phase is a method so the tests can check the wiring phase by phase.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.config import DEFAULT_REAL_GUIDANCE, DistillJob
from trainer.gan import LatentHead, mid_features
from trainer.losses import GAN_LOSSES, diffusion_loss, dm_loss, ema_inject_, matching_parameters
from trainer.models import Cond, Teacher, predict, predict_x0, trainable_copy
from trainer.optim import build_optimizer
from trainer.schedules import backward_simulate, rollout_to_clean, sample_dm_timesteps


@contextlib.contextmanager
def frozen(*modules: nn.Module | None):
    """Temporarily stop parameter grads (grads still flow to inputs), restoring the flags after."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class Update:
    """What one optimiser update did: applied (finite) or skipped, and the pre-clip grad norm."""

    applied: bool
    grad_norm: float


class Distiller:
    def __init__(self, cfg: DistillJob, teacher: Teacher, accelerator) -> None:  # noqa: ANN001
        self.cfg, self.teacher, self.acc = cfg, teacher, accelerator
        self.device = accelerator.device
        self.param = teacher.param
        self.S = list(cfg.schedule.timesteps)
        d = cfg.distill
        self.flash = d.mode == "flash"
        self.real_guidance = d.real_guidance or DEFAULT_REAL_GUIDANCE[teacher.family]
        kind = teacher.denoiser_name
        self.generator = trainable_copy(teacher.denoiser, cfg.model.lora, kind).to(self.device)
        self.fake = trainable_copy(teacher.denoiser, cfg.model.lora, kind).to(self.device)
        if cfg.train.gradient_checkpointing:
            for net in (self.generator, self.fake):
                net.enable_gradient_checkpointing()
        if cfg.train.mixed_precision == "bf16":
            teacher.denoiser.to(torch.bfloat16)  # the frozen real score runs in bf16, as in DMD2
        # EMA injection (Eq. 11) pairs trainable parameters of equal name: all weights, or LoRA adapters.
        self.ema_pairs = [(p, q) for p, q in matching_parameters(self.fake, self.generator) if q.requires_grad]
        self.d_loss, self.g_loss = GAN_LOSSES[d.gan_loss]
        self.disc: nn.Module | None = None
        self.latent_head: LatentHead | None = None
        self.use_gan = bool(d.gan_weight) and cfg.data.has_real_images
        if self.use_gan and self.flash:
            from trainer.discriminator import build_discriminator

            self.disc = build_discriminator(d.discriminator, sdpa=cfg.memory.sam_sdpa).to(self.device)
            if cfg.memory.vae_decode_checkpointing:  # the generator's decode on the GAN path (trainer/memory.py)
                from trainer.memory import checkpoint_vae_decoder

                checkpoint_vae_decoder(teacher.vae)
            self.disc.gradient_checkpointing = cfg.train.gradient_checkpointing
        elif self.use_gan:
            self.latent_head = self._build_latent_head().to(self.device)
        self.opt_g = self._adamw(self.generator, cfg.optim.generator)
        fake_params = [*self.fake.parameters(), *(self.latent_head.parameters() if self.latent_head else [])]
        self.opt_f = self._adamw(fake_params, cfg.optim.fake_score)
        self.opt_d = self._adamw(self.disc.trainable_parameters(), cfg.optim.discriminator) if self.disc else None
        self.opt_g, self.opt_f = accelerator.prepare(self.opt_g, self.opt_f)
        if self.opt_d is not None:
            self.opt_d = accelerator.prepare(self.opt_d)

    # ---------------------------------------------------------------- setup helpers
    def _adamw(self, params, spec) -> torch.optim.Optimizer:  # noqa: ANN001
        return build_optimizer(params, spec, self.cfg.optim.optimizer)

    def _build_latent_head(self) -> LatentHead:
        # A dry run on one latent tells the head its input channels and spatial size.
        t = self.teacher
        x = torch.zeros(t.latent_shape(1), device=self.device)
        cond = t.encode([""])
        with torch.no_grad():
            feat = mid_features(self.fake, x, torch.zeros(1, dtype=torch.long, device=self.device), cond, self.param)
        return LatentHead(feat.shape[1], feat.shape[-1])

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods = {"generator": self.generator, "fake_score": self.fake}
        if self.disc is not None:
            mods["discriminator"] = self.disc.heads
        if self.latent_head is not None:
            mods["latent_head"] = self.latent_head
        return mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"generator": self.opt_g, "fake_score": self.opt_f}
        if self.opt_d is not None:
            opts["discriminator"] = self.opt_d
        return opts

    def set_learning_rates(self, step: int) -> float:
        """Linear warm-up as a pure function of the step (EDM2 style), so resuming needs no scheduler state."""
        warm = self.cfg.optim.warmup_steps
        scale = min(1.0, (step + 1) / warm) if warm else 1.0
        specs = {"generator": self.cfg.optim.generator, "fake_score": self.cfg.optim.fake_score,
                 "discriminator": self.cfg.optim.discriminator}
        for name, opt in self.optimizers().items():
            for group in opt.param_groups:
                group["lr"] = specs[name].lr * scale
        return scale

    # ---------------------------------------------------------------- small pieces
    def rng(self, step: int, salt: int = 0) -> torch.Generator:
        """Per-step randomness, identical on every rank for the step choice (DMD2 broadcasts k)."""
        return torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + step * 7919 + salt) % 2**63)

    def randn(self, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=gen).to(self.device)

    def gen_x0(self, x_t: Tensor, t: Tensor | int, cond: Cond) -> Tensor:
        tt = torch.as_tensor(t, device=self.device, dtype=torch.long).expand(x_t.shape[0])
        with self.acc.autocast():
            return predict_x0(self.generator, x_t, tt, cond, self.param).float()

    def pick_step(self, step: int, generator_turn: bool) -> int:
        """Index k into S. Flash: only high-noise (DM) steps; dmd2: any step (DESIGN §3)."""
        choices = [self.S.index(t) for t in self.cfg.schedule.dm_steps] if self.flash else list(range(len(self.S)))
        g = self.rng(step, salt=1)  # rank-independent, so every rank trains the same k
        return choices[int(torch.randint(len(choices), (1,), generator=g))]

    def _apply(self, loss: Tensor, params: list[Tensor], opt: torch.optim.Optimizer) -> Update:
        """backward + clip + step, skipping the update when the loss or the grads are not finite."""
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return Update(False, float("nan"))
        self.acc.backward(loss)
        if self.acc.num_processes > 1:  # models are not DDP-wrapped (several forwards per step): sync by hand
            for p in params:
                if p.grad is not None:
                    p.grad = self.acc.reduce(p.grad, reduction="mean")
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = float(self.acc.clip_grad_norm_(params, clip))
        if not torch.isfinite(torch.tensor(norm)):
            opt.zero_grad(set_to_none=True)
            return Update(False, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return Update(True, norm)

    # ---------------------------------------------------------------- Alg. 1 phases
    def dm_term(self, x: Tensor, cond: Cond, uncond: Cond, gen: torch.Generator) -> tuple[Tensor, dict]:
        """Eq. (4) on the generator output x (DMD2's normalisation; teacher with CFG, fake score without)."""
        d = self.cfg.distill
        b = x.shape[0]
        t = sample_dm_timesteps(b, d.dm_min, d.dm_max, gen, self.device)
        x_t = self.param.add_noise(x.detach(), self.randn(x.shape, gen), t)
        with torch.no_grad():
            x0_fake = predict_x0(self.fake, x_t, t, cond, self.param, d.fake_guidance, uncond)
            real = self.teacher.denoiser
            with self.acc.autocast():
                x0_real = predict_x0(real, x_t.to(real.dtype), t, cond.map(lambda v: v.to(real.dtype)), self.param,
                                     self.real_guidance, uncond.map(lambda v: v.to(real.dtype)))
        return dm_loss(x, x0_real.float(), x0_fake.float())

    def generator_update(self, x: Tensor, k: int, cond: Cond, uncond: Cond, gen: torch.Generator) -> tuple[dict, Tensor | None]:
        """Alg. 1 lines 12-17. Returns logs and (flash) the detached decoded fake for D."""
        # The other networks stay frozen through the backward too: with gradient checkpointing their
        # forward is recomputed during backward, and must see the same requires_grad flags.
        with frozen(self.fake, self.latent_head, self.disc):
            logs, fake_img, upd = self._generator_loss_and_step(x, k, cond, uncond, gen)
        if upd.applied and self.flash and self.cfg.distill.ema:
            ema_inject_(self.ema_pairs, self.cfg.distill.ema)  # Eq. (11), Alg. 1 line 18
        return logs, fake_img

    def _generator_loss_and_step(self, x: Tensor, k: int, cond: Cond, uncond: Cond,
                                 gen: torch.Generator) -> tuple[dict, Tensor | None, Update]:
        d = self.cfg.distill
        logs: dict[str, float] = {"dm/step_index": float(k), "dm/timestep": float(self.S[k])}
        loss_dm, dm_logs = self.dm_term(x, cond, uncond, gen)
        logs.update(dm_logs)
        loss = d.dm_weight * loss_dm
        fake_img = None
        if self.disc is not None:
            # Eq. (8): roll x out to a clean x0 (detached), re-noise at t_hat in the low-noise set;
            # Eq. (9): the generator's x0 at t_hat, decoded, judged by the Pixel-GAN.
            x_clean = rollout_to_clean(lambda z, t: self.gen_x0(z, t, cond), x, self.S, k, self.param, gen)
            gan_steps = self.cfg.schedule.gan_steps
            t_hat = gan_steps[int(torch.randint(len(gan_steps), (1,), generator=gen))]
            x_hat = self.param.add_noise(x_clean, self.randn(x.shape, gen), t_hat)
            x0_hat = self.gen_x0(x_hat, t_hat, cond)
            with self.acc.autocast():
                img = self.teacher.decode(x0_hat)
                adv, adv_logs = self.g_loss(self.disc(img, grad_through_encoder=True))
            fake_img = img.detach()
            loss = loss + d.gan_weight * adv
            logs.update(adv_logs, **{"gan/timestep": float(t_hat)})
        elif self.latent_head is not None:
            # DMD2: latent GAN head on the fake score's mid-block features of noised x, summed at every step.
            adv, adv_logs = self.g_loss(self.latent_logits(x, cond, gen))
            loss = loss + d.gan_weight * adv
            logs.update(adv_logs)
        upd = self._apply(loss, [p for p in self.generator.parameters() if p.requires_grad], self.opt_g)
        logs.update({"loss/generator": loss.item(), "grad_norm/generator": upd.grad_norm,
                     "skipped/generator": float(not upd.applied)})
        return logs, fake_img, upd

    def latent_logits(self, latents: Tensor, cond: Cond, gen: torch.Generator) -> Tensor:
        """DMD2's diffusion-GAN: noise at t_D ~ U{0..999}, mid-block features, conv head -> [B, 1]."""
        b = latents.shape[0]
        t = torch.randint(0, 1000, (b,), generator=gen).to(self.device)
        x_t = self.param.add_noise(latents, self.randn(latents.shape, gen), t)
        with self.acc.autocast():
            feats = mid_features(self.fake, x_t, t, cond, self.param)
        return self.latent_head(feats.float())

    def fake_score_update(self, x: Tensor, cond: Cond, gen: torch.Generator,
                          real_latents: Tensor | None = None, real_cond: Cond | None = None) -> dict:
        """Alg. 1 lines 20-24: Eq. (6) on detached generator samples (+ DMD2's D loss in dmd2 mode)."""
        x = x.detach()
        b = x.shape[0]
        t = torch.randint(0, 1000, (b,), generator=gen).to(self.device)
        noise = self.randn(x.shape, gen)
        x_t = self.param.add_noise(x, noise, t)
        with self.acc.autocast():
            pred = predict(self.fake, x_t, t, cond, self.param)
        loss, logs = diffusion_loss(pred, self.param.target(x, noise, t))
        if self.latent_head is not None and real_latents is not None:
            d_loss, d_logs = self.d_loss(self.latent_logits(real_latents, real_cond, gen),
                                         self.latent_logits(x, cond, gen))
            loss = loss + self.cfg.distill.disc_weight * d_loss
            logs.update(d_logs)
        params = [p for p in self.fake.parameters() if p.requires_grad]
        if self.latent_head is not None:
            params += list(self.latent_head.parameters())
        upd = self._apply(loss, params, self.opt_f)
        logs.update({"grad_norm/fake_score": upd.grad_norm, "skipped/fake_score": float(not upd.applied)})
        return logs

    def discriminator_update(self, real_images: Tensor, fake_images: Tensor) -> dict:
        """Alg. 1 lines 25-26: hinge (or Eq. 10 logistic) loss; only the heads omega move."""
        with self.acc.autocast():
            real_logits = self.disc(real_images.to(self.device), grad_through_encoder=False)
            fake_logits = self.disc(fake_images.detach(), grad_through_encoder=False)
        loss, logs = self.d_loss(real_logits.float(), fake_logits.float())
        upd = self._apply(loss, list(self.disc.trainable_parameters()), self.opt_d)
        logs.update({"grad_norm/discriminator": upd.grad_norm, "skipped/discriminator": float(not upd.applied)})
        return logs

    def decoded_fake(self, x: Tensor, k: int, cond: Cond, gen: torch.Generator) -> Tensor:
        """Off generator turns, D still needs fakes: the same Eq. (8)-(9) path, without grad."""
        with torch.no_grad():
            x_clean = rollout_to_clean(lambda z, t: self.gen_x0(z, t, cond), x, self.S, k, self.param, gen)
            t_hat = self.cfg.schedule.gan_steps[-1]
            x0_hat = self.gen_x0(self.param.add_noise(x_clean, self.randn(x.shape, gen), t_hat), t_hat, cond)
            with self.acc.autocast():
                return self.teacher.decode(x0_hat)

    # ---------------------------------------------------------------- one iteration
    def step(self, batch: dict, step: int) -> dict[str, float]:
        self.set_learning_rates(step)
        gen = self.rng(step, salt=2 + self.acc.process_index)
        prompts = list(batch["caption"])
        b = len(prompts)
        cond = self.teacher.encode(prompts)
        uncond = self.teacher.uncond(b)
        generator_turn = step % self.cfg.distill.ttur == 0
        k = self.pick_step(step, generator_turn)
        x_in = backward_simulate(lambda z, t: self.gen_x0(z, t, cond), self.randn(self.teacher.latent_shape(b), gen),
                                 self.S, k, self.param, gen)
        with torch.set_grad_enabled(generator_turn):
            x = self.gen_x0(x_in, self.S[k], cond)  # Alg. 1 line 10: x = G(x_{tau_i}, tau_i)
        logs: dict[str, float] = {"generator_turn": float(generator_turn)}
        fake_img = None
        if generator_turn:
            g_logs, fake_img = self.generator_update(x, k, cond, uncond, gen)
            logs.update(g_logs)
        real = batch.get("image")
        real_latents = self.teacher.encode_images(real.to(self.device)) if (
            real is not None and self.latent_head is not None) else None
        logs.update(self.fake_score_update(x, cond, gen, real_latents, cond if real_latents is not None else None))
        if self.disc is not None and real is not None:
            if fake_img is None:
                fake_img = self.decoded_fake(x, k, cond, gen)
            logs.update(self.discriminator_update(real, fake_img))
        return logs
