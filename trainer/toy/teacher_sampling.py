"""Teacher samples for the digits metrics: `generate` draws images for prompted digits with one of three samplers.

"euler" is the pipeline's own EulerDiscreteScheduler (a fresh instance per call, so nothing mutable is shared);
"ddim" is deterministic DDIM written out on an explicit timestep list; "renoise" is our few-step sampler
`trainer.sampling.sample` (predict x0, re-noise with fresh noise). Each image's noise comes from its own seed, so
results do not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from trainer.toy.prompts import digit_prompt

EVAL_PER_CLASS = 100  # generated samples per digit for FD/diversity: N = 1000
# The teacher's CFG for its own evaluation (`flashdmd toy eval-teacher`). A student's reference must instead be sampled
# at the CFG the student was distilled with (`distill.real_guidance`): callers pass it as `guidance`.
DEFAULT_GUIDANCE = 2.0


def eval_labels(per_class: int = EVAL_PER_CLASS) -> Tensor:
    """[10 * per_class] labels 0..9, 0..9, ... (every batch sees every digit)."""
    return torch.arange(10).repeat(per_class)


def _per_image_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _cfg_eps(teacher: Any, x: Tensor, t: Tensor, cond: Any, uncond: Any, guidance: float) -> Tensor:
    from trainer.models import Cond, predict

    if guidance == 1.0:
        return predict(teacher.denoiser, x, t, cond, teacher.param)
    both = predict(teacher.denoiser, torch.cat([x, x]), torch.cat([t, t]), Cond.cat([uncond, cond]), teacher.param)
    e_u, e_c = both.chunk(2)
    return e_u + guidance * (e_c - e_u)


@torch.no_grad()
def _euler(teacher: Any, noise: Tensor, cond: Any, uncond: Any, steps: int, guidance: float) -> Tensor:
    """The pipeline's sampler: a fresh EulerDiscreteScheduler from the teacher's config (no shared state)."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(teacher.pipe.scheduler.config)
    sched.set_timesteps(steps, device="cpu")
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        eps = _cfg_eps(teacher, inp, t.long().expand(x.shape[0]), cond, uncond, guidance)
        x = sched.step(eps, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def _ddim(teacher: Any, noise: Tensor, cond: Any, uncond: Any, timesteps: Sequence[int], guidance: float) -> Tensor:
    """Deterministic DDIM (eta 0) over `timesteps` (high noise first), finishing with the last x0 estimate."""
    param = teacher.param
    x = noise
    x0 = x
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = _cfg_eps(teacher, x, tt, cond, uncond, guidance)
        x0 = param.to_x0(x, eps, tt)
        if i + 1 < len(timesteps):
            a, s = param.coefs(torch.full((x.shape[0],), int(timesteps[i + 1]), dtype=torch.long))
            x = (a.float().view(-1, 1, 1, 1) * x0 + s.float().view(-1, 1, 1, 1) * eps).to(x.dtype)
    return x0


def generate(teacher: Any, labels: Tensor | Sequence[int], *, method: str = "euler", steps: int = 50,
             timesteps: Sequence[int] | None = None, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
             batch: int = 250, progress: bool = False) -> Tensor:
    """Teacher samples for `labels` (prompted digits): images [N, 3, R, R] in [-1, 1].

    method: "euler" (the pipeline's scheduler, `steps`), "ddim" or "renoise" (on `timesteps`, default
    [999, 749, 499, 249]). Image i uses seed `seed * 1_000_003 + i` for all of its noise.
    """
    from trainer.sampling import sample

    labels = torch.as_tensor(labels)
    ts = list(timesteps or [999, 749, 499, 249])
    shape = teacher.latent_shape(1)[1:]
    prompts = [digit_prompt(int(c)) for c in range(10)]
    cond_all = teacher.encode(prompts)
    out = []
    for lo in tqdm(range(0, len(labels), batch), desc=f"sample {method}", disable=not progress, leave=False):
        lab = labels[lo:lo + batch]
        seeds = [seed * 1_000_003 + lo + j for j in range(len(lab))]
        cond = cond_all[lab]
        uncond = teacher.uncond(len(lab))
        if method == "renoise":
            lat = sample(teacher.denoiser, cond, ts, teacher.param, seeds=seeds, latent_shape=shape,
                         guidance=guidance, uncond=uncond)
        else:
            noise = _per_image_noise(seeds, shape)
            if method == "euler":
                lat = _euler(teacher, noise, cond, uncond, steps, guidance)
            elif method == "ddim":
                lat = _ddim(teacher, noise, cond, uncond, ts, guidance)
            else:
                raise ValueError(f"unknown sampler {method!r} (euler, ddim, renoise)")
        with torch.no_grad():
            out.append(teacher.decode(lat).clamp(-1, 1))
    return torch.cat(out)
