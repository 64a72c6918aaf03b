"""Algorithm 1's wiring on a tiny SDXL teacher: which network moves when, and by how much."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from trainer.distill import Distiller
from trainer.models import load_teacher


def build(cfg):
    teacher = load_teacher(cfg.model)
    return Distiller.for_job(cfg, teacher, Accelerator(cpu=True))


def generator_phase(d, b, step: int = 0) -> tuple[dict, int]:
    """Alg. 1 lines 5-19 as training runs them (one micro-batch: grad_accum 1), on a generator turn."""
    k = d.pick_step(step, True)
    logs, _, _ = d.generator_phase(d.micro_batches(b, step), k, step, True)
    return logs, k


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    params = dict(module.named_parameters())
    return any(not torch.equal(params[n], v) for n, v in before.items())


def test_ttur2_moves_generator_only_on_generator_iterations(make_cfg, batch):
    d = build(make_cfg(distill__ttur=2))
    for step in range(5):
        g0, f0 = snapshot(d.generator), snapshot(d.fake)
        logs = d.step(batch(offset=step), step)
        assert logs["generator_turn"] == float(step % 2 == 0)
        assert changed(d.generator, g0) == (step % 2 == 0), f"step {step}"
        assert changed(d.fake, f0), "the fake score is updated every iteration (Alg. 1 line 24)"


def test_flash_never_computes_dm_on_the_low_noise_step(make_cfg, batch):
    d = build(make_cfg())
    calls: list[int] = []
    real_dm_term = d.dm_term

    def recording_dm_term(x, cond, uncond, gen):
        calls.append(d.last_k)
        return real_dm_term(x, cond, uncond, gen)

    real_pick = d.pick_step

    def recording_pick(step, turn):
        d.last_k = real_pick(step, turn)
        return d.last_k

    d.dm_term, d.pick_step = recording_dm_term, recording_pick
    for step in range(12):
        logs = d.step(batch(), step)
        assert logs["dm/timestep"] in (999, 749, 499)
    assert len(calls) == 12
    assert 3 not in calls, "DM loss computed for the low-noise input step 249"
    assert len(set(calls)) > 1


def test_dmd2_mode_does_use_every_step(make_cfg, batch):
    # The contrast that shows the flash test above can fail: dmd2 sums DM at all steps of S.
    d = build(make_cfg(distill__mode="dmd2", distill__ttur=1))
    ks = {d.pick_step(step, True) for step in range(40)}
    assert ks == {0, 1, 2, 3}
    assert d.latent_head is not None and d.disc is None and d.distill.ema == 0


def test_ema_injection_follows_eq_11_exactly(make_cfg, batch):
    d = build(make_cfg(distill__ema=0.9))
    psi0 = snapshot(d.fake)
    logs, _ = generator_phase(d, batch())
    assert logs["skipped/generator"] == 0.0
    theta1 = dict(d.generator.named_parameters())
    psi1 = dict(d.fake.named_parameters())
    moved = 0
    for name, before in psi0.items():
        expect = 0.9 * before + 0.1 * theta1[name].detach()
        torch.testing.assert_close(psi1[name].detach(), expect, rtol=0, atol=1e-6)
        moved += not torch.equal(before, psi1[name])
    assert moved > 0
    assert changed(d.generator, psi0), "the generator moved, so the injection is not the identity"


def test_no_ema_injection_in_dmd2_mode(make_cfg, batch):
    d = build(make_cfg(distill__mode="dmd2"))
    psi0, g0 = snapshot(d.fake), snapshot(d.generator)
    generator_phase(d, batch())
    assert changed(d.generator, g0), "the generator moved, so the test could see an injection"
    assert not changed(d.fake, psi0), "generator update moved the fake score without EMA injection"


def test_discriminator_encoder_stays_frozen_while_heads_learn(make_cfg, batch):
    d = build(make_cfg())
    enc0 = {n: p.detach().clone() for n, p in d.disc.encoder.named_parameters()}
    heads0 = {n: p.detach().clone() for n, p in d.disc.heads.named_parameters()}
    for step in range(3):
        d.step(batch(), step)
    for n, p in d.disc.encoder.named_parameters():
        assert torch.equal(p, enc0[n]) and p.grad is None and not p.requires_grad
    assert any(not torch.equal(p, heads0[n]) for n, p in d.disc.heads.named_parameters())
    assert not d.disc.encoder.training


def test_generator_loss_leaves_no_grads_on_other_networks(make_cfg, batch):
    d = build(make_cfg())
    generator_phase(d, batch())
    for net in (d.fake, d.disc.heads, d.teacher.denoiser, d.teacher.vae):
        assert all(p.grad is None for p in net.parameters())


def test_nonfinite_loss_skips_the_update(make_cfg, batch):
    # The non-finite hook makes rank 0's generator loss infinite at step 0 only (trainer/hooks.py).
    d = Distiller.for_job(make_cfg(distill__ttur=1), load_teacher(make_cfg().model), Accelerator(cpu=True),
                  nonfinite_at=frozenset({(0, 0)}))
    g0 = snapshot(d.generator)
    logs = d.step(batch(), 0)
    assert logs["skipped/generator"] == 1.0 and not changed(d.generator, g0)
    assert logs["skipped/fake_score"] == 0.0, "only the poisoned update is skipped"
    logs = d.step(batch(), 1)
    assert logs["skipped/generator"] == 0.0 and changed(d.generator, g0)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_other_families_step(make_cfg, batch, family):
    d = build(make_cfg(family))
    g0 = snapshot(d.generator)
    logs = d.step(batch(), 0)
    assert changed(d.generator, g0)
    for key in ("loss/dm", "loss/fake_score", "loss/disc", "loss/gen_adv", "grad_norm/generator"):
        assert torch.isfinite(torch.tensor(logs[key])), key
    if family == "sd3":  # LoRA: only adapters train, and EMA pairs are the adapters
        assert all("lora" in n for n, p in d.generator.named_parameters() if p.requires_grad)
        assert d.ema_pairs and all(p.shape == q.shape for p, q in d.ema_pairs)


@pytest.mark.parametrize("mode", ["flash", "dmd2"])
def test_gradient_checkpointing_runs_every_update(make_cfg, batch, mode):
    # Checkpointed forwards are recomputed in backward: the networks frozen for the generator's
    # loss must stay frozen until its backward is done.
    d = build(make_cfg(distill__mode=mode, distill__ttur=1, train__gradient_checkpointing=True))
    g0 = snapshot(d.generator)
    logs = d.step(batch(), 0)
    assert changed(d.generator, g0) and logs["skipped/generator"] == 0.0


def test_cpu_runs_leave_one_core_free_unless_told(monkeypatch):
    import torch

    from trainer.cli import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("FLASHDMD_CPU_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [cpu_threads(n) for n in (1, 2, 16)] == [1, 1, 15]
    monkeypatch.setenv("FLASHDMD_CPU_THREADS", "2")
    assert cpu_threads(2) == 2  # an explicit setting wins
    monkeypatch.delenv("FLASHDMD_CPU_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(2) is None  # torch already follows OMP_NUM_THREADS


def test_the_distiller_follows_the_sections_it_is_given_not_a_job(make_cfg):
    from trainer.distill import job_sections

    cfg = make_cfg()  # digits: real images, so flash mode builds the Pixel-GAN discriminator
    sections = job_sections(cfg)
    assert set(sections) == {"distill", "schedule", "optim", "train", "memory", "lora", "real_images"}
    assert build(cfg).disc is not None
    # The same job with the data section's answer overridden: no real images, no GAN. The Distiller holds no
    # job to read it from behind the caller's back.
    d = Distiller(load_teacher(cfg.model), Accelerator(cpu=True), **{**sections, "real_images": False})
    assert d.disc is None and d.latent_head is None and not d.use_gan
    assert not hasattr(d, "cfg")
