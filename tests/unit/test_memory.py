"""Memory levers that must not change results: SDPA attention in SAM, VAE-decoder checkpointing, bf16 frozen nets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from trainer.discriminator import load_sam_image_encoder, use_sdpa_attention
from trainer.memory import checkpoint_vae_decoder
from trainer.models import load_teacher


def _saved_bytes(fn):
    """Run fn() and return (its result, bytes of the tensors autograd saved for backward)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("img_size", [64, 48])
def test_sdpa_sam_attention_matches_segment_anythings_softmax(img_size):
    ref = load_sam_image_encoder("tiny", None, img_size).double()
    with torch.no_grad():  # rel_pos_zero_init leaves the relative-position tables at zero: exercise them
        for block in ref.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    fast = copy.deepcopy(ref)
    assert use_sdpa_attention(fast) == len(fast.blocks)
    assert fast.state_dict().keys() == ref.state_dict().keys(), "SAM checkpoints still load"
    x = torch.randn(2, 3, img_size, img_size, dtype=torch.float64, requires_grad=True)
    y_ref = ref(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y = fast(x2)
    (g,) = torch.autograd.grad(y.square().sum(), x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)  # the generator's adversarial gradient


def test_vae_decode_checkpointing_same_gradients_fewer_saved_bytes(make_cfg):
    vae = load_teacher(make_cfg("sdxl").model).vae
    ckpt = copy.deepcopy(vae)
    assert checkpoint_vae_decoder(ckpt) > 0
    assert ckpt.state_dict().keys() == vae.state_dict().keys()
    z = torch.randn(2, vae.config.latent_channels, 8, 8, requires_grad=True)

    def run(model, inp):
        out, saved = _saved_bytes(lambda: model.decode(inp, return_dict=False)[0])
        (g,) = torch.autograd.grad(out.square().sum(), inp)
        return out, g, saved

    out_ref, g_ref, saved_ref = run(vae, z)
    z2 = z.detach().clone().requires_grad_(True)
    out, g, saved = run(ckpt, z2)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)
    assert saved < 0.5 * saved_ref, (saved, saved_ref)
    with torch.no_grad():  # no graph: the patched layers run as before
        torch.testing.assert_close(ckpt.decode(z.detach()).sample, vae.decode(z.detach()).sample)


def test_distiller_wires_sdpa_and_vae_checkpointing(make_cfg, batch):
    from accelerate import Accelerator

    from trainer.discriminator import _sdpa_attention_forward
    from trainer.distill import Distiller

    cfg = make_cfg("sdxl", memory__sam_sdpa=True, memory__vae_decode_checkpointing=True)
    teacher = load_teacher(cfg.model)
    d = Distiller.for_job(cfg, teacher, Accelerator(cpu=True))
    assert all(b.attn.forward.__func__ is _sdpa_attention_forward for b in d.disc.encoder.blocks)
    assert all(hasattr(r, "_flashdmd_forward") for r in teacher.vae.decoder.up_blocks[-1].resnets)
    logs = d.step(batch(2), 0)  # the generator update decodes with grad through the checkpointed VAE and SDPA SAM
    assert logs["skipped/generator"] == 0.0 and torch.isfinite(torch.tensor(logs["loss/generator"]))


@pytest.fixture
def bf16_accelerator():
    """accelerate keeps one process-wide state: reset it around a bf16 Accelerator, so other tests keep theirs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield Accelerator(cpu=True, mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_joint_rl_bf16_reference_and_reward(make_cfg, bf16_accelerator):
    from trainer.distill import Distiller
    from trainer.jobspec import parse_spec
    from trainer.memory import AutocastReward, reward_for_training
    from trainer.reward import LatentRewardModel
    from trainer.rl import JointRL

    raw = make_cfg("sdxl", distill__gan_weight=0.0).model_dump(mode="json")
    raw.update(kind="rl", rl={"threshold_min": -1.0, "threshold_max": -1.0, "optimizer": {"lr": 1e-3}},
               memory={"ref_bf16": True, "reward_bf16": True})
    raw["train"]["mixed_precision"] = "bf16"
    cfg = parse_spec(raw)
    teacher = load_teacher(cfg.model)
    acc = bf16_accelerator
    lrm = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution).eval().requires_grad_(False)
    reward = reward_for_training(lrm, cfg, acc)
    assert isinstance(reward, AutocastReward) and lrm.unet.dtype == torch.bfloat16
    assert lrm.visual_projection.weight.dtype == torch.float32, "the small projection stays fp32"
    rl = JointRL(Distiller.for_job(cfg, teacher, acc), reward, acc, rl=cfg.rl)
    assert all(p.dtype == torch.bfloat16 for p in rl.ref.parameters())
    assert all(p.dtype == torch.float32 for p in rl.generator.parameters()), "the policy trains in fp32"
    logs = rl.rl_update(["a handwritten digit one"], 0)
    assert logs["rl/updated"] == 1.0 and logs["loss/rl"] == pytest.approx(0.6931, abs=2e-2)
