"""One Flash-DMD (or DMD2-baseline) iteration, split into the phases of Algorithm 1.

`Distiller.step(micro_batches, step)` is one optimiser update of every network, in Alg. 1's order:
  1. backward simulation to the generator's input x_{tau_i}          (lines 5-8)
  2. every TTUR-th step: the generator update and EMA injection      (lines 12-19)
  3. the fake-score update on x.detach()                             (lines 20-24)
  4. the discriminator update                                        (lines 25-26)
A step takes `train.grad_accum` micro-batches: each phase accumulates its gradients over all of them (no
all-reduce until the last) before its one optimiser step, so a step sees world x grad_accum x batch_size
samples, exactly like one process with that batch (noise is keyed by the global sample index, trainer/rng.py).
One micro-batch is the case grad_accum = 1 of the same path; the tests call the phases as training does.
Stage 1's training method for the loop is trainer/distill_method.py; distributed seams: trainer/parallel.py.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainer.gan import LatentHead, latent_head_for, mid_features
from trainer.jobspec import DEFAULT_REAL_GUIDANCE
from trainer.losses import GAN_LOSSES, diffusion_loss, dm_loss, ema_inject_, matching_parameters
from trainer.micro import latent_shape, make_micro
from trainer.micro import real_latents as micro_real_latents
from trainer.models import Cond, Teacher, copy_trainable_, predict, predict_x0, teacher_x0, trainable_copy
from trainer.optim import build_optimizer
from trainer.parallel import gathered, no_sync, wrap
from trainer.rng import Gen, SampleRNG, mix_seed, randint, randn, shared_choice
from trainer.schedules import backward_simulate, rollout_to_clean, sample_dm_timesteps
from trainer.updates import Micro, Update, cat_rng, finish_update, frozen, mean_logs, spectral_power

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.jobspec import (
        DistillJob,
        DistillSpec,
        LoraSpec,
        MemorySpec,
        OptimSpec,
        ScheduleSpec,
        TrainSpec,
    )


def job_sections(job: DistillJob) -> dict[str, Any]:
    """The Distiller's keyword arguments: the sections of a stage-1 (or stage-2) job it reads."""
    return {"distill": job.distill, "schedule": job.schedule, "optim": job.optim, "train": job.train,
            "memory": job.memory, "lora": job.model.lora, "real_images": job.data.has_real_images}


class Distiller:
    """Stage 1's networks and Alg. 1's phases. It takes the spec sections it reads, not the whole job, so
    what it depends on is visible at the call (`for_job` picks them out of a job). nonfinite_at:
    {(rank, step)} whose generator loss is made infinite (the test hook of trainer/hooks.py: every rank must
    skip that update together)."""

    def __init__(self, teacher: Teacher, accelerator: Accelerator, *, distill: DistillSpec,
                 schedule: ScheduleSpec, optim: OptimSpec, train: TrainSpec, memory: MemorySpec,
                 lora: LoraSpec | None, real_images: bool,
                 nonfinite_at: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.teacher, self.acc = teacher, accelerator
        self.distill, self.schedule, self.optim, self.train, self.memory = distill, schedule, optim, train, memory
        self.lora = lora
        self.device = accelerator.device
        self.param = teacher.param
        self.S = list(schedule.timesteps)
        d = distill
        self.flash = d.mode == "flash"
        self.real_guidance = d.real_guidance or DEFAULT_REAL_GUIDANCE[teacher.family]
        kind = teacher.denoiser_name
        self.generator = trainable_copy(teacher.denoiser, lora, kind).to(self.device)
        self.fake = trainable_copy(teacher.denoiser, lora, kind).to(self.device)
        copy_trainable_(self.fake, self.generator)  # LoRA: matching adapter factors for Eq. (11)
        if train.gradient_checkpointing:
            for net in (self.generator, self.fake):
                net.enable_gradient_checkpointing()
        if train.mixed_precision == "bf16":
            teacher.denoiser.to(torch.bfloat16)  # the frozen real score runs in bf16, as in DMD2
        self.d_loss, self.g_loss = GAN_LOSSES[d.gan_loss]
        self.disc: nn.Module | None = None
        self.latent_head: LatentHead | None = None
        self.use_gan = bool(d.gan_weight) and real_images
        if self.use_gan and self.flash:
            from trainer.discriminator import build_discriminator

            self.disc = build_discriminator(d.discriminator, sdpa=memory.sam_sdpa).to(self.device)
            if memory.vae_decode_checkpointing:  # the generator's decode on the GAN path (trainer/memory.py)
                from trainer.memory import checkpoint_vae_decoder

                checkpoint_vae_decoder(teacher.vae)
            self.disc.gradient_checkpointing = train.gradient_checkpointing
        elif self.use_gan:
            self.latent_head = latent_head_for(self.fake, teacher, self.device).to(self.device)
        # The wrapped networks: called once per micro-batch by their own loss (trainer/parallel.py). FSDP
        # shards the two denoisers; the small D heads / latent head stay DDP replicas. The spec allows fsdp
        # for full-weight stage 1 only (trainer/jobspec DistillJob).
        self.sharded = train.sharding == "fsdp" and accelerator.num_processes > 1
        sharding = train.sharding
        self.generator_w = wrap(accelerator, self.generator, sharding)
        self.fake_w = wrap(accelerator, self.fake, sharding)
        self.disc_w = wrap(accelerator, self.disc, "ddp") if self.disc is not None else None
        self.latent_head_w = wrap(accelerator, self.latent_head, "ddp") if self.latent_head else None
        # EMA injection (Eq. 11) pairs trainable parameters of equal name: all weights, or LoRA adapters.
        self.ema_pairs = [(p, q) for p, q in matching_parameters(self.fake, self.generator) if q.requires_grad]
        self.opt_g = self._adamw(self.generator, optim.generator)
        fake_params = [*self.fake.parameters(), *(self.latent_head.parameters() if self.latent_head else [])]
        self.opt_f = self._adamw(fake_params, optim.fake_score)
        self.opt_d = self._adamw(self.disc.trainable_parameters(), optim.discriminator) if self.disc else None
        self.opt_g, self.opt_f = accelerator.prepare(self.opt_g, self.opt_f)
        if self.opt_d is not None:
            self.opt_d = accelerator.prepare(self.opt_d)
        self._poison = nonfinite_at

    @staticmethod
    def for_job(job: DistillJob, teacher: Teacher, accelerator: Accelerator, *,
                nonfinite_at: frozenset[tuple[int, int]] = frozenset()) -> Distiller:
        """A Distiller with the sections of `job` it reads (stage 2 passes its RLJob: the same sections)."""
        return Distiller(teacher, accelerator, **job_sections(job), nonfinite_at=nonfinite_at)

    # ---------------------------------------------------------------- setup helpers
    def _adamw(self, params: Any, spec: Any) -> torch.optim.Optimizer:
        return build_optimizer(params, spec, self.optim.optimizer, self.optim.adamw8bit_backend)

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
        warm = self.optim.warmup_steps
        scale = min(1.0, (step + 1) / warm) if warm else 1.0
        specs = {"generator": self.optim.generator, "fake_score": self.optim.fake_score,
                 "discriminator": self.optim.discriminator}
        for name, opt in self.optimizers().items():
            for group in opt.param_groups:
                group["lr"] = specs[name].lr * scale
        return scale

    # ---------------------------------------------------------------- small pieces
    def rng(self, step: int, salt: int = 0) -> torch.Generator:
        """Per-step randomness, identical on every rank (the step choice k: DMD2 broadcasts k)."""
        return torch.Generator().manual_seed(mix_seed(self.train.seed, step, salt))

    def sample_rng(self, step: int, salt: int, micro: int, batch: int) -> SampleRNG:
        """Per-sample randomness keyed by the global index of each sample in this step's global batch."""
        first = (micro * self.acc.num_processes + self.acc.process_index) * batch
        return SampleRNG(self.train.seed, step, salt, list(range(first, first + batch)))

    def randn(self, shape: tuple[int, ...], gen: Gen) -> Tensor:
        return randn(shape, gen, device=self.device)

    def gen_x0(self, x_t: Tensor, t: Tensor | int, cond: Cond, net: nn.Module | None = None) -> Tensor:
        tt = torch.as_tensor(t, device=self.device, dtype=torch.long).expand(x_t.shape[0])
        with self.acc.autocast():
            return predict_x0(net or self.generator, x_t, tt, cond, self.param).float()

    def pick_step(self, step: int, generator_turn: bool) -> int:
        """Index k into S. Flash: only high-noise (DM) steps; dmd2: any step (DESIGN §3)."""
        choices = [self.S.index(t) for t in self.schedule.dm_steps] if self.flash else list(range(len(self.S)))
        g = self.rng(step, salt=1)  # rank-independent, so every rank trains the same k
        return choices[int(torch.randint(len(choices), (1,), generator=g))]

    def backward(self, loss: Tensor, scale: float = 1.0) -> None:
        self.acc.backward(loss * scale if scale != 1.0 else loss)

    # ---------------------------------------------------------------- Alg. 1 phases
    def dm_term(self, x: Tensor, cond: Cond, uncond: Cond, gen: Gen) -> tuple[Tensor, dict]:
        """Eq. (4) on the generator output x (DMD2's normalisation; teacher with CFG, fake score without)."""
        d = self.distill
        b = x.shape[0]
        t = sample_dm_timesteps(b, d.dm_min, d.dm_max, gen, self.device)
        x_t = self.param.add_noise(x.detach(), self.randn(x.shape, gen), t)
        with torch.no_grad():
            x0_fake = predict_x0(self.fake, x_t, t, cond, self.param, d.fake_guidance, uncond)
            with self.acc.autocast():
                x0_real = teacher_x0(self.teacher.denoiser, x_t, t, cond, self.param, self.real_guidance, uncond)
        return dm_loss(x, x0_real.float(), x0_fake.float())

    def frozen_critics(self) -> contextlib.AbstractContextManager:
        """The other networks stay frozen through G's loss *and its backward*: with gradient checkpointing
        their forward is recomputed during backward and must see the same requires_grad flags.
        A sharded (FSDP2) fake score is not toggled: FSDP2 keeps the unsharded parameters' flags from when it
        first gathered them, so a toggle would leave them frozen for the fake score's own update. Its stray
        gradients from G's backward (dmd2's latent GAN only) are cleared before its update instead."""
        return frozen(None if self.sharded else self.fake, self.latent_head, self.disc)

    def sn_power(self, update: bool) -> contextlib.AbstractContextManager:
        return spectral_power(self.disc.heads if self.disc is not None else None, update)

    def finish(self, params: list[Tensor], opt: torch.optim.Optimizer, loss_finite: bool) -> Update:
        """After the (accumulated) backward: agree, unscale, clip, step -- or skip on every rank together."""
        return finish_update(self.acc, params, opt, loss_finite, self.optim.grad_clip)

    def generator_step(self, loss_finite: bool) -> dict[str, float]:
        upd = self.finish([p for p in self.generator.parameters() if p.requires_grad], self.opt_g, loss_finite)
        if upd.applied and self.flash and self.distill.ema:
            ema_inject_(self.ema_pairs, self.distill.ema)  # Eq. (11), Alg. 1 line 18
        return {"grad_norm/generator": upd.grad_norm, "skipped/generator": float(not upd.applied)}

    def generator_loss(self, x: Tensor, k: int, cond: Cond, uncond: Cond,
                       gen: Gen) -> tuple[Tensor, dict, Tensor | None]:
        """Alg. 1 lines 12-17: Eq. (4) (+ Eq. 9 or DMD2's latent GAN). Call it, and its backward, inside
        `self.frozen_critics()`."""
        d = self.distill
        logs: dict[str, float] = {"dm/step_index": float(k), "dm/timestep": float(self.S[k])}
        loss_dm, dm_logs = self.dm_term(x, cond, uncond, gen)
        logs.update(dm_logs)
        loss = d.dm_weight * loss_dm
        fake_img = None
        if self.disc is not None:
            # Eq. (8): roll x out to a clean x0 (detached), re-noise at t_hat in the low-noise set;
            # Eq. (9): the generator's x0 at t_hat, decoded, judged by the Pixel-GAN.
            x_clean = rollout_to_clean(lambda z, t: self.gen_x0(z, t, cond), x, self.S, k, self.param, gen)
            gan_steps = self.schedule.gan_steps
            t_hat = gan_steps[shared_choice(len(gan_steps), gen)]
            x_hat = self.param.add_noise(x_clean, self.randn(x.shape, gen), t_hat)
            x0_hat = self.gen_x0(x_hat, t_hat, cond)
            with self.acc.autocast():
                # Clamped like the real images, so D cannot tell them apart by range alone.
                img = self.teacher.decode(x0_hat).clamp(-1, 1)
                adv, adv_logs = self.g_loss(self.disc(img, grad_through_encoder=True))
            fake_img = img.detach()
            loss = loss + d.gan_weight * adv
            logs.update(adv_logs, **{"gan/timestep": float(t_hat)})
        elif self.latent_head is not None:
            # DMD2: latent GAN head on the fake score's mid-block features of noised x.
            adv, adv_logs = self.g_loss(self.latent_logits(x, cond, gen, self.latent_head))
            loss = loss + d.gan_weight * adv
            logs.update(adv_logs)
        logs["loss/generator"] = loss.item()
        return loss, logs, fake_img

    def latent_logits(self, latents: Tensor, cond: Cond, gen: Gen, head: nn.Module | None = None) -> Tensor:
        """DMD2's diffusion-GAN: noise at t_D ~ U{0..999}, mid-block features, conv head -> [B, 1]."""
        b = latents.shape[0]
        t = randint(0, 1000, b, gen, self.device)
        x_t = self.param.add_noise(latents, self.randn(latents.shape, gen), t)
        with self.acc.autocast():
            feats = mid_features(self.fake, x_t, t, cond, self.param)
        return (head or self.latent_head_w)(feats.float())

    def fake_score_loss(self, x: Tensor, cond: Cond, gen: Gen, real_latents: Tensor | None = None,
                        real_cond: Cond | None = None) -> tuple[Tensor, dict]:
        """Alg. 1 lines 20-24: Eq. (6) on detached generator samples (+ DMD2's D loss in dmd2 mode)."""
        x = x.detach()
        b = x.shape[0]
        t = randint(0, 1000, b, gen, self.device)
        noise = self.randn(x.shape, gen)
        x_t = self.param.add_noise(x, noise, t)
        with self.acc.autocast():
            pred = predict(self.fake_w, x_t, t, cond, self.param)
        loss, logs = diffusion_loss(pred, self.param.target(x, noise, t))
        if self.latent_head is not None and real_latents is not None:
            # One head call on real and fake features together: one DDP forward per backward.
            both = self.latent_logits(torch.cat([real_latents, x]), Cond.cat([real_cond, cond]),
                                      cat_rng(gen))
            d_loss, d_logs = self.d_loss(*both.chunk(2))
            loss = loss + self.distill.disc_weight * d_loss
            logs.update(d_logs)
        return loss, logs

    def fake_params(self) -> list[Tensor]:
        params = [p for p in self.fake.parameters() if p.requires_grad]
        return params + (list(self.latent_head.parameters()) if self.latent_head is not None else [])

    def discriminator_loss(self, real_images: Tensor, fake_images: Tensor) -> tuple[Tensor, dict]:
        """Alg. 1 lines 25-26: hinge (or Eq. 10 logistic) loss; only the heads omega move."""
        b = real_images.shape[0]
        with self.acc.autocast():  # one call on [real; fake]: one DDP forward per backward
            logits = self.disc_w(torch.cat([real_images.to(self.device), fake_images.detach().to(self.device)]),
                                 grad_through_encoder=False)
        return self.d_loss(logits[:b].float(), logits[b:].float())

    def decoded_fake(self, x: Tensor, k: int, cond: Cond, gen: Gen) -> Tensor:
        """Off generator turns, D still needs fakes: the same Eq. (8)-(9) path, without grad."""
        with torch.no_grad():
            x_clean = rollout_to_clean(lambda z, t: self.gen_x0(z, t, cond), x, self.S, k, self.param, gen)
            t_hat = self.schedule.gan_steps[-1]
            x0_hat = self.gen_x0(self.param.add_noise(x_clean, self.randn(x.shape, gen), t_hat), t_hat, cond)
            with self.acc.autocast():
                return self.teacher.decode(x0_hat).clamp(-1, 1)

    # ---------------------------------------------------------------- one iteration
    def micro_batches(self, batch: dict | list[dict], step: int, salt: int = 0) -> list[Micro]:
        """This rank's micro-batches of one step (a dict: grad_accum 1), each with its per-sample randomness."""
        batches = batch if isinstance(batch, list) else [batch]
        return [make_micro(self.teacher, mb, self.sample_rng(step, 2 + salt, m, len(mb["caption"])), self.device,
                           self.latent_head is not None) for m, mb in enumerate(batches)]

    def step(self, batch: dict | list[dict], step: int, *, train_generator: bool | None = None,
             salt: int = 0) -> dict[str, float]:
        """One update of every network over `batch` (a list: the grad_accum micro-batches of this rank).

        train_generator: None follows TTUR (step % ttur == 0); stage 2's critic-only iterations pass False.
        salt: keeps the randomness of stage 2's extra iterations apart from the distillation turns'.
        """
        micro = self.micro_batches(batch, step, salt)
        self.set_learning_rates(step)
        generator_turn = step % self.distill.ttur == 0 if train_generator is None else train_generator
        k = self.pick_step(step, generator_turn)
        logs: dict[str, float] = {"generator_turn": float(generator_turn)}
        g_logs, xs, fakes = self.generator_phase(micro, k, step, generator_turn)
        logs.update(g_logs)
        logs.update(self.fake_score_phase(micro, xs))
        if self.disc is not None and all(mb.real is not None for mb in micro):
            logs.update(self.discriminator_phase(micro, xs, fakes, k))
        return logs

    def generator_phase(self, micro: list[Micro], k: int, step: int,
                        generator_turn: bool) -> tuple[dict, list[Tensor], list[Tensor | None]]:
        """Alg. 1 lines 5-19 over the micro-batches: x = G(x_tau) for each, and on generator turns the
        accumulated generator update. Returns logs, the detached x per micro-batch and (flash) D's fakes."""
        self.opt_g.zero_grad(set_to_none=True)
        # FSDP: G's weights gathered once for the phase (simulation, rollouts, backward), not per forward;
        # resharded before the optimiser step, which updates the shards.
        with gathered(self.generator, through_backward=generator_turn):
            xs, fakes, rows, finite = self._generator_micro_batches(micro, k, step, generator_turn)
        logs = {**mean_logs(rows), **self.generator_step(finite)} if generator_turn else {}
        return logs, xs, fakes

    def _generator_micro_batches(self, micro: list[Micro], k: int, step: int, generator_turn: bool,
                                 ) -> tuple[list[Tensor], list[Tensor | None], list[dict], bool]:
        n, xs, fakes, rows, finite = len(micro), [], [], [], True
        for m, mb in enumerate(micro):
            x_in = backward_simulate(lambda z, t, c=mb.cond: self.gen_x0(z, t, c),
                                     self.randn(latent_shape(self.teacher, mb), mb.rng),
                                     self.S, k, self.param, mb.rng)
            if not generator_turn:
                with torch.no_grad():
                    xs.append(self.gen_x0(x_in, self.S[k], mb.cond))
                fakes.append(None)
                continue
            with no_sync(self.acc, self.generator_w, enabled=m + 1 < n), self.frozen_critics(), self.sn_power(m == 0):
                x = self.gen_x0(x_in, self.S[k], mb.cond, self.generator_w)  # Alg. 1 line 10: x = G(x_tau, tau)
                loss, row, fake_img = self.generator_loss(x, k, mb.cond, mb.uncond, mb.rng)
                if (self.acc.process_index, step) in self._poison:
                    loss = loss * float("inf")
                finite &= bool(torch.isfinite(loss))
                self.backward(loss, 1.0 / n)
            xs.append(x.detach())
            fakes.append(fake_img)
            rows.append(row)
        return xs, fakes, rows, finite

    def fake_score_phase(self, micro: list[Micro], xs: list[Tensor]) -> dict[str, float]:
        """Alg. 1 lines 20-24, accumulated over the micro-batches."""
        # Cleared first: a sharded (FSDP2) fake score used with grad while frozen may hold stray gradients.
        self.opt_f.zero_grad(set_to_none=True)
        with gathered(self.fake, through_backward=True):  # FSDP: one gather for all micro-batches
            rows, finite = self._fake_score_micro_batches(micro, xs)
        upd = self.finish(self.fake_params(), self.opt_f, finite)
        return {**mean_logs(rows), "grad_norm/fake_score": upd.grad_norm, "skipped/fake_score": float(not upd.applied)}

    def _fake_score_micro_batches(self, micro: list[Micro], xs: list[Tensor]) -> tuple[list[dict], bool]:
        n, rows, finite = len(micro), [], True
        for m, (mb, x) in enumerate(zip(micro, xs, strict=True)):
            real_latents = None
            if mb.real is not None and self.latent_head is not None:
                real_latents = micro_real_latents(self.teacher, mb)
            with no_sync(self.acc, self.fake_w, self.latent_head_w, enabled=m + 1 < n):
                loss, row = self.fake_score_loss(x, mb.cond, mb.rng, real_latents,
                                                 mb.cond if real_latents is not None else None)
                finite &= bool(torch.isfinite(loss))
                self.backward(loss, 1.0 / n)
            rows.append(row)
        return rows, finite

    def discriminator_phase(self, micro: list[Micro], xs: list[Tensor], fakes: list[Tensor | None],
                            k: int) -> dict[str, float]:
        """Alg. 1 lines 25-26, accumulated over the micro-batches."""
        n, rows, finite = len(micro), [], True
        self.opt_d.zero_grad(set_to_none=True)
        with gathered(self.generator if any(f is None for f in fakes) else None):  # FSDP: one gather
            fakes = [f if f is not None else self.decoded_fake(xs[m], k, mb.cond, mb.rng)
                     for m, (f, mb) in enumerate(zip(fakes, micro, strict=True))]
        for m, mb in enumerate(micro):
            fake_img = fakes[m]
            with no_sync(self.acc, self.disc_w, enabled=m + 1 < n), self.sn_power(m == 0):
                loss, row = self.discriminator_loss(mb.real, fake_img)
                finite &= bool(torch.isfinite(loss))
                self.backward(loss, 1.0 / n)
            rows.append(row)
        upd = self.finish(list(self.disc.trainable_parameters()), self.opt_d, finite)
        return {**mean_logs(rows), "grad_norm/discriminator": upd.grad_norm,
                "skipped/discriminator": float(not upd.applied)}
