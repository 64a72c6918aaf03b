"""Stage 2 (joint RL, Sec. 3.4): Eq. (12)-(13) on hand-computed values, candidates, pairs, the last step, wiring."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from trainer.distill import Distiller
from trainer.jobspec import SpecError, parse_spec
from trainer.losses import dpo_loss, gaussian_log_density
from trainer.models import load_teacher
from trainer.reward import LatentRewardModel, PixelReward, contrast_scorer
from trainer.rl import (
    JointRL,
    Pairs,
    choose_pairs,
    collect_pairs,
    pair_log_probs,
    pair_threshold,
    sample_candidates,
    stochastic_transitions,
)
from trainer.schedules import EpsDDPM, Flow

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
S4 = [999, 749, 499, 249]


def rl_spec(**rl) -> dict:
    return {"kind": "rl", "model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}, "rl": rl}


# ------------------------------------------------------------------ Eq. (12)-(13) by hand
def test_gaussian_log_density_by_hand():
    z = torch.tensor([[1.0, 2.0]]).reshape(1, 2, 1, 1)
    mean = torch.zeros_like(z)
    lp = gaussian_log_density(z, mean, torch.tensor([2.0]))
    c = -math.log(2.0) - 0.5 * math.log(2 * math.pi)
    expect = ((-0.5 * 0.25 + c) + (-0.5 * 1.0 + c)) / 2  # per-element mean, not the sum
    assert lp.shape == (1,) and lp.dtype == torch.float64
    assert lp.item() == pytest.approx(expect, abs=1e-12)


def test_dpo_loss_by_hand():
    # H = (-1.0 - -1.2) - (-2.0 - -1.9) = 0.2 + 0.1 = 0.3;  L = -log sigmoid(2 * 0.3) = log(1 + e^-0.6)
    loss, logs = dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.2]), torch.tensor([-2.0]), torch.tensor([-1.9]),
                          beta=2.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.6)), abs=1e-6)
    assert logs["rl/H"] == pytest.approx(0.3, abs=1e-6)
    # Two pairs average; a negative H costs more than log 2.
    loss, _ = dpo_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.1]), torch.tensor([0.0, 0.0]),
                       torch.tensor([0.0, 0.0]), beta=10.0)
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(1.0))) / 2, abs=1e-6)


def test_dpo_loss_ratio_clip():
    # log-ratios 0.5 and -0.5 clamp to log 1.1 and log 0.9 with c = 0.1.
    loss, logs = dpo_loss(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([-0.5]), torch.tensor([0.0]),
                          beta=3.0, ratio_clip=0.1)
    h = math.log(1.1) - math.log(0.9)
    assert logs["rl/H"] == pytest.approx(h, abs=1e-6)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.0 * h)), abs=1e-6)


def test_dpo_loss_is_log2_and_gradient_pushes_winner_up_at_h0():
    lp_w = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)  # float64, as gaussian_log_density returns
    lp_l = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(lp_w, lp_w.detach(), lp_l, lp_l.detach(), beta=500.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    loss.backward()
    assert lp_w.grad.item() == pytest.approx(-250.0) and lp_l.grad.item() == pytest.approx(250.0)  # -beta/2, +beta/2


def _pairs(s: int, seed: int = 0) -> tuple[Pairs, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 3, 3)
    z_w, z_l, x0t, x0r = (torch.randn(shape, generator=g) for _ in range(4))
    idx = torch.zeros(2, dtype=torch.long)
    pairs = Pairs(torch.zeros(shape), idx + 999, idx + s, z_w, z_l, idx, torch.zeros(2))
    return pairs, x0t, x0r


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_gaussian_log_ratio_eps_and_flow(kind):
    s = 749
    if kind == "eps":
        param = EpsDDPM.from_scheduler_config(SD_CONFIG)
        a, std = 0.2380, 0.9713  # sqrt(abar_749), sqrt(1 - abar_749): shared/reference/lrm_sam.md §A.6
        assert float(param.x0_coef(torch.tensor([s]))[0]) == pytest.approx(a, abs=1e-4)
        assert float(param.std(torch.tensor([s]))[0]) == pytest.approx(std, abs=1e-4)
        a, std = float(param.x0_coef(torch.tensor([s]))[0]), float(param.std(torch.tensor([s]))[0])
    else:
        param = Flow(shift=3.0)
        # u = 0.75: sigma = 3u / (1 + 2u) = 0.9; mean (1 - sigma) x0, std sigma (sigma is a float32 table value)
        assert float(param.x0_coef(torch.tensor([s]))[0]) == pytest.approx(0.1, abs=1e-6)
        assert float(param.std(torch.tensor([s]))[0]) == pytest.approx(0.9, abs=1e-6)
        a, std = float(param.x0_coef(torch.tensor([s]))[0]), float(param.std(torch.tensor([s]))[0])
    pairs, x0t, x0r = _pairs(s)
    lp_w, lr_w, lp_l, lr_l = pair_log_probs(pairs, x0t, x0r, param)
    n = x0t[0].numel()
    for z, lp, lr in ((pairs.z_w, lp_w, lr_w), (pairs.z_l, lp_l, lr_l)):
        sq_t = ((z.double() - a * x0t.double()) ** 2).flatten(1).sum(1)
        sq_r = ((z.double() - a * x0r.double()) ** 2).flatten(1).sum(1)
        torch.testing.assert_close(lp - lr, -(sq_t - sq_r) / (2 * std**2 * n), rtol=1e-9, atol=1e-12)
        # and the absolute density: the constant -log std - 0.5 log 2 pi per element
        torch.testing.assert_close(lp, -sq_t / (2 * std**2 * n) - math.log(std) - 0.5 * math.log(2 * math.pi))


# ------------------------------------------------------------------ candidates and pairs
def test_candidates_share_z_t_and_differ_only_by_the_noise():
    param = EpsDDPM.from_scheduler_config(SD_CONFIG)
    x0 = torch.randn(3, 4, 5, 5)
    cands, eps = sample_candidates(x0, 749, 4, param, torch.Generator().manual_seed(1))
    assert cands.shape == (3, 4, 4, 5, 5) and eps.shape == cands.shape
    a, std = float(param.x0_coef(torch.tensor([749]))[0]), float(param.std(torch.tensor([749]))[0])
    for j in range(4):  # every candidate is the same mean plus its own noise
        torch.testing.assert_close(cands[:, j] - std * eps[:, j], a * x0, rtol=0, atol=1e-5)
    assert not torch.allclose(cands[:, 0], cands[:, 1])


class RecordingReward:
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def score(self, latents, t, cond):
        self.calls.append((latents.clone(), t.clone(), list(cond)))
        return latents.flatten(1).mean(1) * 100  # decisive, deterministic


def test_collect_pairs_groups_share_z_t_and_the_last_step_never_gets_a_term():
    param = EpsDDPM.from_scheduler_config(SD_CONFIG)
    seen: list[int] = []

    def denoise(z, t):
        seen.extend(int(v) for v in t.unique())
        return 0.5 * z

    reward = RecordingReward()
    prompts = ["a", "b"]
    noise = torch.randn(2, 4, 3, 3)
    # Ask for every step including the deterministic last one: the sampler must still skip it.
    pairs, logs = collect_pairs(denoise, reward, prompts, noise, S4, S4, 4, param, {t: -1.0 for t in S4},
                                generator=torch.Generator().manual_seed(0))
    assert stochastic_transitions(S4) == [(999, 749), (749, 499), (499, 249)]
    assert 249 not in seen, "the last step is not even run: nothing after it is sampled"
    assert set(pairs.t.tolist()) == {999, 749, 499} and 249 not in pairs.t.tolist()
    assert len(pairs) == 2 * 3 and logs["rl/kept_frac"] == 1.0
    # Scored at the next timestep s (the default), with each prompt repeated k times.
    assert [int(c[1][0]) for c in reward.calls] == [749, 499, 249]
    assert reward.calls[0][2] == ["a"] * 4 + ["b"] * 4
    for i in range(len(pairs)):  # winner and loser come from the shared z_t's own candidates
        s = int(pairs.s[i])
        a, std = float(param.x0_coef(torch.tensor([s]))[0]), float(param.std(torch.tensor([s]))[0])
        mean = a * 0.5 * pairs.z_t[i]
        eps_w, eps_l = (pairs.z_w[i] - mean) / std, (pairs.z_l[i] - mean) / std
        assert eps_w.std() > 0.5 and eps_l.std() > 0.5 and not torch.allclose(eps_w, eps_l)
        assert (pairs.z_w[i].mean() > pairs.z_l[i].mean()), "the winner scores higher"
    first = pairs.t == 999
    torch.testing.assert_close(pairs.z_t[first], noise[pairs.prompt[first]])


def test_choose_pairs_normalised_gap_and_threshold():
    ch = choose_pairs(torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]]), threshold=0.5)
    assert ch.win.tolist()[0] == 1 and ch.lose.tolist()[0] == 3
    assert ch.gap[0].item() == pytest.approx(3.0)
    assert ch.norm_gap[0].item() == pytest.approx(math.tanh(1.5), abs=1e-6)  # softmax(3, 0): p_w - p_l
    assert ch.keep.tolist() == [True, False]  # a tie is never a pair
    assert not choose_pairs(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), threshold=0.95).keep.any()


def test_dynamic_threshold_follows_the_transition_std():
    stds = [0.97, 0.85, 0.57]
    assert pair_threshold(0.97, stds, 0.45, 0.6) == pytest.approx(0.6)
    assert pair_threshold(0.57, stds, 0.45, 0.6) == pytest.approx(0.45)
    assert pair_threshold(0.77, stds, 0.45, 0.6) == pytest.approx(0.525)
    assert pair_threshold(0.5, [0.5], 0.45, 0.6) == 0.6


# ------------------------------------------------------------------ the spec
def test_rl_spec_defaults_and_last_step():
    cfg = parse_spec(rl_spec())
    assert cfg.kind == "rl" and cfg.rl.timesteps == [999, 749] and cfg.rl.beta == 500 and cfg.rl.ratio == 5
    assert cfg.rl.num_candidates == 4 and cfg.rl.joint and cfg.distill.gan_weight > 0  # Pixel-GAN on by default
    assert parse_spec({**rl_spec(), "schedule": {"num_steps": 8}}).rl.timesteps == [999, 874]
    assert parse_spec(rl_spec(timesteps="all")).rl.timesteps == [999, 749, 499]
    with pytest.raises(SpecError, match="last step 249"):
        parse_spec(rl_spec(timesteps=[749, 249]))
    with pytest.raises(SpecError, match="num_steps >= 2"):
        parse_spec({**rl_spec(), "schedule": {"num_steps": 1}})
    with pytest.raises(SpecError, match="rl.reward.scorer"):
        parse_spec(rl_spec(reward={"kind": "pixel"}))
    with pytest.raises(SpecError, match="rl.ratoi"):
        parse_spec(rl_spec(ratoi=2))
    assert parse_spec({"model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}}).kind == "distill"


# ------------------------------------------------------------------ wiring on the tiny teacher
@pytest.fixture
def joint(make_cfg):
    def build(family: str = "sdxl", **rl):
        raw = make_cfg(family).model_dump(mode="json")
        raw.update(kind="rl", rl={"threshold_min": -1.0, "threshold_max": -1.0, "optimizer": {"lr": 1e-3}, **rl})
        cfg = parse_spec(raw)
        teacher = load_teacher(cfg.model)
        acc = Accelerator(cpu=True)
        if family == "sd3":  # no UNet for an LRM: the pixel fallback on the teacher's decoded x0
            reward = PixelReward(teacher.decode, contrast_scorer())
        else:
            reward = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution).eval()
            reward.requires_grad_(False)
        return JointRL(Distiller.for_job(cfg, teacher, acc), reward, acc, rl=cfg.rl)

    return build


def _snap(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _moved(m, before):
    return any(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_at_initialisation_h_is_zero_and_the_loss_is_log2(joint):
    rl = joint()
    g0, f0, r0, w0 = _snap(rl.generator), _snap(rl.distiller.fake), _snap(rl.ref), _snap(rl.reward)
    logs = rl.rl_update(["a handwritten digit one", "a handwritten digit two"], 0)
    assert logs["rl/num_pairs"] == 4 and logs["rl/kept_frac"] == 1.0  # 2 prompts x RL steps [999, 749]
    assert logs["rl/H"] == 0.0 and logs["loss/rl"] == pytest.approx(math.log(2), abs=1e-12)
    assert logs["rl/updated"] == 1.0 and _moved(rl.generator, g0), "the RL update moves G"
    assert not _moved(rl.ref, r0) and not _moved(rl.distiller.fake, f0) and not _moved(rl.reward, w0)
    logs = rl.rl_update(["a handwritten digit one", "a handwritten digit two"], 1)
    assert logs["rl/H"] != 0.0, "after one update the policy differs from p_ref"


def test_ratio_alternates_rl_and_distillation(joint, batch):
    rl = joint(ratio=2, critic_updates="distill_only")
    turns = [rl.distill_turn(s) for s in range(6)]
    assert turns == [False, True, False, True, False, True]
    f0 = _snap(rl.distiller.fake)
    logs = rl.step((["a handwritten digit one"], lambda: batch()), 0)
    assert logs["distill_turn"] == 0.0 and "loss/dm" not in logs and not _moved(rl.distiller.fake, f0)
    logs = rl.step((["a handwritten digit one"], lambda: batch()), 1)
    assert logs["distill_turn"] == 1.0 and "loss/fake_score" in logs and _moved(rl.distiller.fake, f0)
    post = joint(joint=False)
    assert not any(post.distill_turn(s) for s in range(10)), "post-train RL only: no distillation updates"


def test_critic_updates_every_moves_the_fake_score_and_d_on_rl_iterations(joint, batch):
    # Alg. 1 lines 20-26 run every iteration: an RL iteration (no distillation turn) updates the fake
    # score and D on a distillation batch, but not G's distillation loss.
    rl = joint(ratio=2)
    assert rl.rl.critic_updates == "every"
    f0, d0 = _snap(rl.distiller.fake), _snap(rl.distiller.disc.heads)
    logs = rl.step((["a handwritten digit one"], lambda: batch()), 0)
    assert logs["distill_turn"] == 0.0 and "loss/dm" not in logs and "loss/fake_score" in logs
    assert _moved(rl.distiller.fake, f0) and _moved(rl.distiller.disc.heads, d0)
    assert logs["generator_turn"] == 0.0


def test_no_pairs_means_no_update(joint):
    rl = joint(threshold_min=0.99, threshold_max=0.99)
    g0 = _snap(rl.generator)
    logs = rl.rl_update(["a handwritten digit one"], 0)
    assert logs["rl/num_pairs"] == 0 and logs["rl/updated"] == 0.0 and "loss/rl" not in logs
    assert not _moved(rl.generator, g0)


def test_flow_lora_generator_with_the_pixel_reward(joint):
    rl = joint("sd3")  # flow parameterisation, LoRA generator: only the adapters move
    assert all("lora" in n for n, p in rl.generator.named_parameters() if p.requires_grad)
    base0 = {n: p.detach().clone() for n, p in rl.generator.named_parameters() if not p.requires_grad}
    logs = rl.rl_update(["a handwritten digit one", "a handwritten digit two"], 0)
    assert logs["loss/rl"] == pytest.approx(math.log(2), abs=1e-12) and logs["rl/updated"] == 1.0
    assert all(torch.equal(p, base0[n]) for n, p in rl.generator.named_parameters() if n in base0)
    assert rl.rl_update(["a handwritten digit one"], 1)["rl/H"] != 0.0


def test_init_from_a_stage1_checkpoint_of_the_other_generator_kind_is_an_input_error(make_cfg, tmp_path):
    """The Distiller's own `lora` section decides: a full-weight generator cannot load a LoRA checkpoint."""
    import json

    from trainer.errors import InputError
    from trainer.rl_loop import load_stage1

    cfg = make_cfg()  # full weights
    d = Distiller.for_job(cfg, load_teacher(cfg.model), Accelerator(cpu=True))
    ckpt = tmp_path / "step-00000004"
    (ckpt / "trainable").mkdir(parents=True)
    meta = {"family": d.teacher.family, "timesteps": list(d.S), "lora": {"rank": 2, "alpha": 2.0}}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"^rl\.init_from: .* has a LoRA generator; set model\.lora to match it"):
        load_stage1(ckpt, d)
    # The same kind passes the check and reaches the weights, which this folder lacks.
    (ckpt / "meta.json").write_text(json.dumps({**meta, "lora": None}))
    with pytest.raises(InputError, match=r"has no trainable/generator\.safetensors"):
        load_stage1(ckpt, d)
