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
