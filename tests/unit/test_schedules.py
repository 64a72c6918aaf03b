"""Unit tests for trainer/schedules.py against stock diffusers schedulers and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from trainer.schedules import (
    EpsDDPM,
    Flow,
    backward_simulate,
    parameterisation_for,
    rollout_to_clean,
    sample_dm_timesteps,
)

# SDXL-base's scheduler_config.json (an EulerDiscreteScheduler); the extra keys must be ignored.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
DIFFUSERS_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
T_LIST = [0, 249, 499, 999]


@pytest.fixture(scope="module")
def eps() -> EpsDDPM:
    return EpsDDPM.from_scheduler_config(SDXL_SCHEDULER)


def _pair(seed: int = 0, batch: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, 3, 3, generator=g, dtype=dtype)
    noise = torch.randn(batch, 2, 3, 3, generator=g, dtype=dtype)
    return x0, noise


# ---------------------------------------------------------------------------------------------
# EpsDDPM (SDXL / SD1.5)
# ---------------------------------------------------------------------------------------------

def test_eps_first_step_coefficients_by_hand(eps: EpsDDPM) -> None:
    # scaled_linear: beta_0 = (sqrt(0.00085))^2 = 0.00085, so abar_0 = 1 - 0.00085 = 0.99915.
    # (diffusers builds the table in float32, as DMD2 uses it: agreement to ~1e-6, not 1e-12.)
    t0 = torch.tensor([0])
    assert eps.prediction_type == "epsilon" and eps.kind == "eps"
    assert eps.alphas_cumprod.dtype == torch.float64 and eps.alphas_cumprod.shape == (1000,)
    assert eps.x0_coef(t0).item() == pytest.approx(math.sqrt(0.99915), abs=1e-6)
    assert eps.std(t0).item() == pytest.approx(math.sqrt(0.00085), abs=1e-6)
    assert torch.equal(eps.model_time(torch.tensor(T_LIST)), torch.tensor(T_LIST))


def test_eps_add_noise_matches_ddpm_scheduler(eps: EpsDDPM) -> None:
    ddpm = DDPMScheduler(**{k: SDXL_SCHEDULER[k] for k in DIFFUSERS_KEYS})
    x0, noise = _pair()
    t = torch.tensor(T_LIST)
    torch.testing.assert_close(eps.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    # A scalar t applies to the whole batch.
    for ti in T_LIST:
        ref = ddpm.add_noise(x0, noise, torch.full((4,), ti))
        torch.testing.assert_close(eps.add_noise(x0, noise, ti), ref, atol=1e-6, rtol=0)


def test_eps_add_noise_matches_euler_alphas_cumprod(eps: EpsDDPM) -> None:
    # SDXL ships an EulerDiscreteScheduler: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with its alphas_cumprod.
    # Its own add_noise works in the "scaled" space x0 + sigma eps with sigma = sqrt((1 - abar) / abar),
    # i.e. x_t / sqrt(abar); check that route too.
    euler = EulerDiscreteScheduler(**{k: SDXL_SCHEDULER[k] for k in DIFFUSERS_KEYS})
    x0, noise = _pair(1)
    t = torch.tensor(T_LIST)
    abar = euler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    by_hand = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    ours = eps.add_noise(x0, noise, t)
    torch.testing.assert_close(ours, by_hand, atol=1e-6, rtol=0)
    scaled = euler.add_noise(x0, noise, t.float())
    torch.testing.assert_close(ours, scaled * abar.sqrt(), atol=1e-6, rtol=0)


def test_eps_to_x0_inverts_add_noise_at_high_noise(eps: EpsDDPM) -> None:
    # sqrt(abar_999) ~ 0.068, so the float64 inside keeps the error small.
    x0, noise = _pair(2)
    for ti in T_LIST:
        x_t = eps.add_noise(x0, noise, ti)
        rec = eps.to_x0(x_t, eps.target(x0, noise, ti), ti)
        assert rec.dtype == x0.dtype
        torch.testing.assert_close(rec, x0, atol=1e-5, rtol=0)
    # Target for eps models is the noise itself (Eq. 6).
    assert torch.equal(eps.target(x0, noise, 999), noise)


def test_eps_to_x0_formula_by_hand(eps: EpsDDPM) -> None:
    # t = 0: x0 = (x_t - sqrt(0.00085) eps) / sqrt(0.99915). With x_t = 1, eps = 2: 0.9420910
    # (up to the float32 rounding of diffusers' table, ~1e-6).
    x_t = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    pred = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    expected = (1 - 2 * math.sqrt(0.00085)) / math.sqrt(0.99915)
    assert eps.to_x0(x_t, pred, 0).item() == pytest.approx(expected, abs=2e-6)


def test_v_prediction_target_and_to_x0_consistent() -> None:
    # v = a eps - s x0; to_x0 = a x_t - s v = a (a x0 + s eps) - s (a eps - s x0) = (a^2 + s^2) x0 = x0.
    cfg = dict(SDXL_SCHEDULER, prediction_type="v_prediction")
    v = EpsDDPM.from_scheduler_config(cfg)
    assert v.prediction_type == "v_prediction"
    ddpm = DDPMScheduler(**{k: SDXL_SCHEDULER[k] for k in DIFFUSERS_KEYS})
    x0, noise = _pair(3, dtype=torch.float64)
    t = torch.tensor(T_LIST)
    abar = ddpm.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    by_hand_v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    target = v.target(x0, noise, t)
    torch.testing.assert_close(target, by_hand_v, atol=1e-6, rtol=0)
    # diffusers agrees on the v target.
    torch.testing.assert_close(target.float(), ddpm.get_velocity(x0.float(), noise.float(), t), atol=1e-6, rtol=0)
    x_t = v.add_noise(x0, noise, t)
    torch.testing.assert_close(v.to_x0(x_t, target, t), x0, atol=1e-10, rtol=0)
    # And in float32 at t = 999.
    x0f, noisef = _pair(4)
    rec = v.to_x0(v.add_noise(x0f, noisef, 999), v.target(x0f, noisef, 999), 999)
    torch.testing.assert_close(rec, x0f, atol=1e-5, rtol=0)


def test_parameterisation_for_families() -> None:
    assert isinstance(parameterisation_for("sdxl", SDXL_SCHEDULER), EpsDDPM)
    assert isinstance(parameterisation_for("sd15", SDXL_SCHEDULER), EpsDDPM)
    flow = parameterisation_for("sd3", {"num_train_timesteps": 1000, "shift": 3.0})
    assert isinstance(flow, Flow) and flow.shift == 3.0
    assert parameterisation_for("sd3", {"shift": 3.0}, shift=1.5).shift == 1.5  # explicit shift wins


# ---------------------------------------------------------------------------------------------
# Flow (SD3)
# ---------------------------------------------------------------------------------------------
#
# diffusers' FlowMatchEulerDiscreteScheduler.__init__ builds its training table from
# u_i = linspace(1, N, N)[::-1] / N, i.e. u_i = (N - i) / N for index i = 0 .. N-1 (descending),
# sigma_i = shift u_i / (1 + (shift - 1) u_i), timesteps_i = N sigma_i.
# Flow uses u = (t + 1) / N, so integer t sits at index i = N - 1 - t  (t = 999 -> i = 0, sigma 1).


@pytest.fixture(scope="module")
def fm() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def test_flow_sigma_by_hand() -> None:
    # shift 3: sigma = 3u / (1 + 2u)
    #   t = 999: u = 1     -> 3 / 3       = 1
    #   t = 499: u = 0.5   -> 1.5 / 2     = 0.75
    #   t = 249: u = 0.25  -> 0.75 / 1.5  = 0.5
    #   t = 124: u = 0.125 -> 0.375 / 1.25 = 0.3
    f = Flow(shift=3.0)
    sig = f.sigma(torch.tensor([999, 499, 249, 124]))
    # sigma is computed in float32 (as diffusers' table is), so 0.3 is exact only to float32 precision.
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.75, 0.5, 0.3], dtype=torch.float64), atol=1e-7, rtol=0)
    # x_t = (1 - s) x0 + s eps: at t = 499, 0.25 x0 + 0.75 eps; x0 = 4, eps = -4 -> 1 - 3 = -2.
    x_t = f.add_noise(torch.full((1, 1, 1, 1), 4.0), torch.full((1, 1, 1, 1), -4.0), 499)
    assert x_t.item() == pytest.approx(-2.0, abs=1e-6)
    torch.testing.assert_close(f.model_time(torch.tensor([499, 249])), torch.tensor([750.0, 500.0]))


def test_flow_sigma_matches_scheduler_table(fm: FlowMatchEulerDiscreteScheduler) -> None:
    f = Flow(shift=3.0)
    assert len(fm.sigmas) == 1000 and fm.sigmas[0].item() == pytest.approx(1.0, abs=1e-7)
    t = torch.arange(1000)
    idx = 999 - t
    torch.testing.assert_close(f.sigma(t).float(), fm.sigmas[idx], atol=1e-6, rtol=0)
    # model time is N sigma, the scheduler's timesteps, up to float32 rounding.
    torch.testing.assert_close(f.model_time(t), fm.timesteps[idx], atol=0, rtol=2e-6)
    for ti in T_LIST:
        assert f.sigma(torch.tensor(ti)).item() == pytest.approx(fm.sigmas[999 - ti].item(), abs=1e-6)


def test_flow_add_noise_matches_scale_noise(fm: FlowMatchEulerDiscreteScheduler) -> None:
    f = Flow(shift=3.0)
    x0, noise = _pair(5)
    t = torch.tensor(T_LIST)
    # The scheduler's own timestep value at the index of each integer t.
    ref = fm.scale_noise(x0, fm.timesteps[999 - t], noise)
    torch.testing.assert_close(f.add_noise(x0, noise, t), ref, atol=1e-6, rtol=0)


def test_flow_model_time_is_the_scheduler_timestep_exactly(fm: FlowMatchEulerDiscreteScheduler) -> None:
    f = Flow(shift=3.0)
    t = torch.arange(1000)
    mismatched = (f.model_time(t) != fm.timesteps[999 - t]).nonzero().flatten().tolist()
    assert mismatched == []
    x0, noise = _pair(6)
    tt = torch.tensor(T_LIST)
    ref = fm.scale_noise(x0, f.model_time(tt), noise)
    torch.testing.assert_close(f.add_noise(x0, noise, tt), ref, atol=1e-6, rtol=0)


def test_flow_target_and_to_x0_consistent() -> None:
    # v = eps - x0; to_x0 = x_t - s v = (1 - s) x0 + s eps - s eps + s x0 = x0.
    f = Flow(shift=3.0)
    x0, noise = _pair(7)
    assert torch.equal(f.target(x0, noise, 499), noise - x0)
    for ti in T_LIST:
        rec = f.to_x0(f.add_noise(x0, noise, ti), f.target(x0, noise, ti), ti)
        torch.testing.assert_close(rec, x0, atol=1e-5, rtol=0)
    t = torch.tensor(T_LIST)
    torch.testing.assert_close(f.to_x0(f.add_noise(x0, noise, t), f.target(x0, noise, t), t), x0, atol=1e-5, rtol=0)


def test_flow_from_scheduler_config() -> None:
    assert Flow.from_scheduler_config({"shift": 3.0}).shift == 3.0
    assert Flow.from_scheduler_config({}).shift == 1.0
    assert Flow.from_scheduler_config({"shift": 3.0}, shift=2.0).shift == 2.0


# ---------------------------------------------------------------------------------------------
# Backward simulation and rollout (DMD2 §4, Eq. 8)
# ---------------------------------------------------------------------------------------------

S = [999, 749, 499, 249]


class Recorder:
    """A denoiser that returns x_t * c and records (x_t, t, output) per call."""

    def __init__(self, c: float = 0.5) -> None:
        self.c = c
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = x_t * self.c + len(self.calls)  # distinct output per call
        self.calls.append((x_t.detach().clone(), t.clone(), out.detach().clone()))
        return out


def test_backward_simulate_k0_returns_noise(eps: EpsDDPM) -> None:
    noise = _pair(8)[1]
    den = Recorder()
    out = backward_simulate(den, noise, S, 0, eps, generator=torch.Generator().manual_seed(0))
    assert den.calls == []
    assert torch.equal(out, noise)


def test_backward_simulate_k2_by_hand(eps: EpsDDPM) -> None:
    noise = _pair(9)[1]
    den = Recorder(0.5)
    out = backward_simulate(den, noise, S, 2, eps, generator=torch.Generator().manual_seed(123))
    assert len(den.calls) == 2
    (in1, t1, _), (in2, t2, _) = den.calls
    assert t1.dtype == torch.long and t1.tolist() == [S[0]] * 4
    assert t2.tolist() == [S[1]] * 4
    # Reproduce: x0_1 = 0.5 noise + 0; x_749 = step_to(x0_1, 749, f1); x0_2 = 0.5 x_749 + 1;
    # result = step_to(x0_2, 499, f2), with f1, f2 the first two draws of an identically seeded generator.
    g = torch.Generator().manual_seed(123)
    f1 = torch.randn(noise.shape, generator=g)
    f2 = torch.randn(noise.shape, generator=g)
    assert torch.equal(in1, noise)
    x749 = eps.step_to(noise * 0.5, S[1], f1)
    torch.testing.assert_close(in2, x749, atol=1e-6, rtol=0)
    expected = eps.step_to(x749 * 0.5 + 1, S[2], f2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # step_to is plain re-noising at the next timestep: sqrt(abar) x0 + sqrt(1 - abar) f.
    abar = DDPMScheduler(**{k: SDXL_SCHEDULER[k] for k in DIFFUSERS_KEYS}).alphas_cumprod[S[2]]
    torch.testing.assert_close(out, abar.sqrt() * (x749 * 0.5 + 1) + (1 - abar).sqrt() * f2, atol=1e-5, rtol=0)


def test_backward_simulate_has_no_grad(eps: EpsDDPM) -> None:
    c = torch.nn.Parameter(torch.tensor(0.5))
    noise = _pair(10)[1].requires_grad_(True)
    out = backward_simulate(lambda x, t: x * c, noise, S, 3, eps, generator=torch.Generator().manual_seed(0))
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("k", [-1, 4, 10])
def test_backward_simulate_rejects_k_out_of_range(eps: EpsDDPM, k: int) -> None:
    den = Recorder()
    with pytest.raises(ValueError):
        backward_simulate(den, torch.zeros(1, 1, 2, 2), S, k, eps)
    assert den.calls == []


def test_rollout_to_clean_runs_remaining_steps_in_order(eps: EpsDDPM) -> None:
    base = _pair(11)[0]
    x0 = (base * 1.0).requires_grad_(True) * 2  # carries grad
    den = Recorder(0.5)
    out = rollout_to_clean(den, x0, S, 1, eps, generator=torch.Generator().manual_seed(7))
    assert [c[1].tolist() for c in den.calls] == [[499] * 4, [249] * 4]
    assert torch.equal(out, den.calls[-1][2])  # the last denoiser output
    assert not out.requires_grad and out.grad_fn is None
    # Inputs: re-noise the current x0 to each remaining timestep with fresh draws.
    g = torch.Generator().manual_seed(7)
    f1 = torch.randn(base.shape, generator=g)
    f2 = torch.randn(base.shape, generator=g)
    x499 = eps.step_to(base * 2, 499, f1)
    torch.testing.assert_close(den.calls[0][0], x499, atol=1e-6, rtol=0)
    x249 = eps.step_to(x499 * 0.5 + 0, 249, f2)
    torch.testing.assert_close(den.calls[1][0], x249, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, x249 * 0.5 + 1, atol=1e-6, rtol=0)


def test_rollout_to_clean_from_last_step_is_identity(eps: EpsDDPM) -> None:
    x0 = _pair(12)[0].requires_grad_(True)
    den = Recorder()
    out = rollout_to_clean(den, x0, S, len(S) - 1, eps)
    assert den.calls == []
    assert torch.equal(out, x0.detach()) and not out.requires_grad


# ---------------------------------------------------------------------------------------------
# DM timestep sampling
# ---------------------------------------------------------------------------------------------

def test_sample_dm_timesteps_range_and_ends() -> None:
    lo, hi = int(0.02 * 1000), int(0.98 * 1000)  # 20, 980 (DMD2: t in {20, ..., 980})
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_dm_timesteps(5000, 0.02, 0.98, generator=g) for _ in range(40)])
    assert t.dtype == torch.long and t.shape == (200_000,)
    assert t.min().item() == lo and t.max().item() == hi
    # 961 values, 200k draws: each value appears ~208 times; all of them must be reachable.
    assert torch.unique(t).numel() == hi - lo + 1


def test_sample_dm_timesteps_is_seeded() -> None:
    a = sample_dm_timesteps(64, 0.02, 0.98, generator=torch.Generator().manual_seed(3))
    b = sample_dm_timesteps(64, 0.02, 0.98, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
