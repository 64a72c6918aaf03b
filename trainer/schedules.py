"""Noise parameterisations, timestep sets and backward simulation (DESIGN §3).

Every loss works on x0-estimates, so one `Parameterisation` interface serves the
eps/DDPM families (SDXL, SD1.5) and flow matching with shift (SD3):

    add_noise(x0, noise, t)   x_t from a clean sample
    to_x0(x_t, pred, t)       the network's raw prediction -> x0
    target(x0, noise, t)      what the network is trained to predict (Eq. 6)
    step_to(x0, t, noise)     the sampler's transition: re-noise an x0 estimate to t
    x0_coef(t), std(t)        x_t = x0_coef * x0 + std * noise
    model_time(t)             the timestep value the network is called with

Timesteps `t` are integers in [0, T-1] (T = 1000), the same numbers for both
families, so timestep lists such as [999, 749, 499, 249] mean the same thing
everywhere. All functions are pure: no scheduler state is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.rng import Gen, randint, randn

NUM_TRAIN_TIMESTEPS = 1000


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] (or a scalar) to broadcast against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _as_t(t: Tensor | int | Sequence[int], batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device, dtype=torch.long)
    return t.expand(batch) if t.ndim == 0 else t


class Parameterisation:
    kind: str
    prediction_type: str

    # Subclasses provide the schedule as coefficients of x_t = a_t x0 + s_t eps.
    def coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:  # -> ([B], [B]) float64
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def x0_coef(self, t: Tensor) -> Tensor:
        return self.coefs(t)[0]

    def std(self, t: Tensor) -> Tensor:
        return self.coefs(t)[1]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        a, s = self.coefs(_as_t(t, x0.shape[0], x0.device))
        return _bcast(a, x0) * x0 + _bcast(s, x0) * noise  # [B, C, H, W]

    def step_to(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """The few-step sampler's transition (LCM/DMD2): fresh noise at the next timestep."""
        return self.add_noise(x0, noise, t)

    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor | int) -> Tensor:
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        raise NotImplementedError


@dataclass
class EpsDDPM(Parameterisation):
    """DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; prediction eps (or v)."""

    alphas_cumprod: Tensor  # [T] float64
    prediction_type: str = "epsilon"
    kind: str = "eps"

    @classmethod
    def from_scheduler_config(cls, config: dict) -> EpsDDPM:
        from diffusers import DDPMScheduler

        # DDPMScheduler computes alphas_cumprod for every beta_schedule diffusers knows.
        known = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                         "trained_betas", "prediction_type", "rescale_betas_zero_snr")
                 if k in config}
        sched = DDPMScheduler(**known)
        return cls(sched.alphas_cumprod.to(torch.float64), sched.config.prediction_type)

    def coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor | int) -> Tensor:
        # In float64, as DMD2 does: sqrt(abar) is ~0.068 at t=999, so errors would be amplified.
        a, s = self.coefs(_as_t(t, x_t.shape[0], x_t.device))
        x_t64, pred64 = x_t.double(), pred.double()
        a, s = _bcast(a, x_t64), _bcast(s, x_t64)
        x0 = a * x_t64 - s * pred64 if self.prediction_type == "v_prediction" else (x_t64 - s * pred64) / a
        return x0.to(x_t.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        if self.prediction_type == "v_prediction":
            a, s = self.coefs(_as_t(t, x0.shape[0], x0.device))
            return _bcast(a, x0) * noise - _bcast(s, x0) * x0
        return noise


@dataclass
class Flow(Parameterisation):
    """Rectified flow (SD3): x_s = (1 - s) x0 + s eps, v = eps - x0, sigma shifted.

    Integer t maps to sigma exactly as diffusers' FlowMatchEulerDiscreteScheduler builds
    its training table: sigma(t) = shift*u / (1 + (shift-1)*u) with u = (t+1)/T.
    """

    shift: float = 1.0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    prediction_type: str = "flow"
    kind: str = "flow"

    @classmethod
    def from_scheduler_config(cls, config: dict, shift: float | None = None) -> Flow:
        return cls(shift=float(shift if shift is not None else config.get("shift", 1.0)),
                   num_train_timesteps=int(config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)))

    def sigma(self, t: Tensor) -> Tensor:
        # float32 like diffusers' table, so model_time(t) equals the scheduler's timestep values exactly
        # (diffusers looks timesteps up by equality, e.g. in scale_noise).
        u = (t.to(torch.float32) + 1) / self.num_train_timesteps
        return (self.shift * u / (1 + (self.shift - 1) * u)).to(torch.float64)

    def coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self.sigma(t)
        return 1 - s, s

    def model_time(self, t: Tensor) -> Tensor:
        return (self.sigma(t).float() * self.num_train_timesteps)

    def to_x0(self, x_t: Tensor, pred: Tensor, t: Tensor | int) -> Tensor:
        s = _bcast(self.sigma(_as_t(t, x_t.shape[0], x_t.device)), x_t.double())
        return (x_t.double() - s * pred.double()).to(x_t.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        return noise - x0


def parameterisation_for(family: str, scheduler_config: dict, shift: float | None = None) -> Parameterisation:
    if family == "sd3":
        return Flow.from_scheduler_config(scheduler_config, shift)
    return EpsDDPM.from_scheduler_config(scheduler_config)


def sample_dm_timesteps(batch: int, lo: float, hi: float, generator: Gen = None,
                        device: torch.device | str = "cpu", T: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """t ~ U{lo*T, ..., hi*T} per sample (DMD2: [20, 980])."""
    lo_i, hi_i = int(lo * T), min(int(hi * T) + 1, T)
    return randint(lo_i, hi_i, batch, generator, device)


Denoise = Callable[[Tensor, Tensor], Tensor]  # (x_t [B,C,H,W], t [B]) -> x0 estimate


def backward_simulate(denoise: Denoise, noise: Tensor, timesteps: Sequence[int], k: int,
                      param: Parameterisation, generator: Gen = None) -> Tensor:
    """DMD2's backward simulation: the generator's own input at step k of S (DESIGN §3).

    Start from `noise` at tau_K = timesteps[0]; k times, predict x0 with no grad and
    re-noise it to the next timestep with fresh noise. k = 0 returns pure noise.
    Returns x_{timesteps[k]}: [B, C, H, W].
    """
    if not 0 <= k < len(timesteps):
        raise ValueError(f"step index {k} outside the {len(timesteps)}-step schedule")
    x = noise
    with torch.no_grad():
        for i in range(k):
            x0 = denoise(x, torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long))
            fresh = randn(x0.shape, generator, x0.dtype, x0.device)
            x = param.step_to(x0, timesteps[i + 1], fresh)
    return x


def rollout_to_clean(denoise: Denoise, x0: Tensor, timesteps: Sequence[int], k: int,
                     param: Parameterisation, generator: Gen = None) -> Tensor:
    """Eq. (8): continue from the x0 estimate made at step k to the sampler's final x0 (no grad)."""
    with torch.no_grad():
        x0 = x0.detach()
        for i in range(k + 1, len(timesteps)):
            fresh = randn(x0.shape, generator, x0.dtype, x0.device)
            x_t = param.step_to(x0, timesteps[i], fresh)
            x0 = denoise(x_t, torch.full((x0.shape[0],), timesteps[i], device=x0.device, dtype=torch.long))
    return x0
