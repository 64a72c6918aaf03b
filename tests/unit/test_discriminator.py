"""The SAM Pixel-GAN discriminator (trainer/discriminator.py) on the tiny random encoder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.discriminator import (
    PixelDiscriminator,
    build_discriminator,
    load_sam_image_encoder,
    sam_preprocess,
)
from trainer.jobspec import DiscriminatorSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def disc() -> PixelDiscriminator:
    torch.manual_seed(0)
    return PixelDiscriminator(load_sam_image_encoder("tiny", None), [1, 3], head_channels=8)


def _images(b: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # [B, 3, H, W] in [-1, 1]


def test_imports_and_runs_without_torchvision() -> None:
    code = textwrap.dedent(
        """
        import sys

        class BlockTorchvision:
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    raise ImportError("torchvision blocked by test")
                return None

        sys.meta_path.insert(0, BlockTorchvision())
        import torch
        from trainer.jobspec import DiscriminatorSpec
        from trainer.discriminator import build_discriminator

        d = build_discriminator(DiscriminatorSpec(backbone="tiny", head_channels=8))
        out = d(torch.zeros(1, 3, 32, 32))
        assert out.shape == (1, 32), out.shape
        assert "torchvision" not in sys.modules
        # the bare package used for the import is not left behind
        assert "segment_anything" not in sys.modules
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK"


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_output_shape(disc: PixelDiscriminator, size: tuple[int, int]) -> None:
    out = disc(_images(3, *size))
    # tiny: 64 px / patch 8 -> 8x8 tokens; stride-2 head -> 4x4 logits per head, 2 heads
    assert out.shape == (3, 2 * 4 * 4)
    feats = disc.encoder_features(_images(1, *size))
    n = sum(disc.heads[f"block{b}"](f.permute(0, 3, 1, 2)).numel() for b, f in feats.items())
    assert out.shape[1] == n
    assert torch.isfinite(out).all()


def test_encoder_frozen_heads_train(disc: PixelDiscriminator) -> None:
    before = {k: v.clone() for k, v in disc.encoder.state_dict().items()}
    disc.train()
    assert disc.training and not disc.encoder.training
    assert all(not m.training for m in disc.encoder.modules())
    opt = torch.optim.AdamW(disc.trainable_parameters(), lr=1e-2)
    loss = disc(_images()).mean()
    loss.backward()
    opt.step()
    for name, p in disc.encoder.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad, name
    after = disc.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head_params = list(disc.heads.parameters())
    assert {id(p) for p in disc.trainable_parameters()} == {id(p) for p in head_params}
    for name, p in disc.heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_through_encoder_flag(disc: PixelDiscriminator) -> None:
    x = _images().requires_grad_(True)
    disc(x, grad_through_encoder=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    disc.zero_grad(set_to_none=True)
    x2 = _images().requires_grad_(True)
    out = disc(x2, grad_through_encoder=False)
    assert out.requires_grad
    out.sum().backward()
    assert x2.grad is None
    assert all(p.grad is not None for p in disc.heads.parameters())


def test_gradient_checkpointing_same_values_and_grads(disc: PixelDiscriminator) -> None:
    disc.eval()  # fixed spectral-norm vectors so two forwards are comparable
    x = _images().requires_grad_(True)
    disc(x).sum().backward()
    g_plain = x.grad.clone()
    disc.gradient_checkpointing = True
    x.grad = None
    out = disc(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, g_plain)


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(123)
    src = load_sam_image_encoder("tiny", None)
    with torch.no_grad():  # make it differ from the seeded default init
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sam_like = {f"image_encoder.{k}": v for k, v in src.state_dict().items()}
    sam_like["mask_decoder.dummy"] = torch.zeros(2)  # the other SAM parts are ignored
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam_like, path)
    loaded = load_sam_image_encoder("tiny", str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    bare = tmp_path / "bare.pth"  # bare encoder keys are accepted too
    torch.save(src.state_dict(), bare)
    with torch.no_grad():
        torch.testing.assert_close(load_sam_image_encoder("tiny", str(bare))(x), src(x), rtol=0, atol=0)

    from safetensors.torch import save_file

    st = tmp_path / "sam_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sam_like.items()}, str(st))
    with torch.no_grad():
        torch.testing.assert_close(load_sam_image_encoder("tiny", str(st))(x), src(x), rtol=0, atol=0)


def test_checkpoint_errors(tmp_path: Path) -> None:
    state = {f"image_encoder.{k}": v for k, v in load_sam_image_encoder("tiny", None).state_dict().items()}
    state["image_encoder.neck.9.weight"] = state.pop("image_encoder.neck.0.weight")
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"neck\.0\.weight") as info:
        load_sam_image_encoder("tiny", str(path))
    assert str(path) in str(info.value) and "neck.9.weight" in str(info.value)

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_sam_image_encoder("tiny", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match=r"distill\.discriminator\.checkpoint is required.*vit_b"):
        load_sam_image_encoder("vit_b", None)
    with pytest.raises(ValueError, match="unknown SAM backbone"):
        load_sam_image_encoder("vit_x", None)


def test_sam_preprocess_matches_hand_computation() -> None:
    x = _images(2, 48, 40)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)  # SAM's pixel_mean/std on 0..255
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    want = ((x + 1) * 127.5 - mean) / std
    want = F.interpolate(want, size=(64, 64), mode="bilinear", align_corners=False)
    got = sam_preprocess(x, 64)
    assert got.shape == (2, 3, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    same = _images(1, 64, 64)
    torch.testing.assert_close(sam_preprocess(same, 64), ((same + 1) * 127.5 - mean) / std)


def test_selected_features_equal_full_manual_run(disc: PixelDiscriminator) -> None:
    x = _images(2, 48, 40)
    enc = disc.encoder
    with torch.no_grad():
        h = enc.patch_embed(sam_preprocess(x, 64)) + enc.pos_embed
        manual = []
        for blk in enc.blocks:  # all blocks, no early stop
            h = blk(h)
            manual.append(h)
        feats = disc.encoder_features(x)
    assert sorted(feats) == [1, 3]
    for i in (1, 3):
        assert feats[i].shape == (2, 8, 8, 32)
        torch.testing.assert_close(feats[i], manual[i], rtol=0, atol=0)


def test_early_stop_skips_later_blocks() -> None:
    d = PixelDiscriminator(load_sam_image_encoder("tiny", None), [1], head_channels=8)
    calls: list[int] = []
    for i, blk in enumerate(d.encoder.blocks):
        blk.register_forward_hook(lambda *_, i=i: calls.append(i))
    d.encoder.neck.register_forward_hook(lambda *_: calls.append(-1))
    d(_images())
    assert calls == [0, 1]


def test_bad_blocks() -> None:
    enc = load_sam_image_encoder("tiny", None)
    with pytest.raises(ValueError, match=r"\[4\] out of range.*4 blocks"):
        PixelDiscriminator(enc, [1, 4])
    with pytest.raises(ValueError, match="out of range"):
        PixelDiscriminator(enc, [-1])
    with pytest.raises(ValueError, match="duplicates"):
        PixelDiscriminator(enc, [1, 1])
    with pytest.raises(ValueError, match="empty"):
        PixelDiscriminator(enc, [])


def test_heads_state_dict_roundtrip(disc: PixelDiscriminator) -> None:
    sd = disc.heads_state_dict()
    assert sd and all(k.startswith(("block1.", "block3.")) for k in sd)
    other = build_discriminator(DiscriminatorSpec(backbone="tiny", head_channels=8))
    other.load_heads_state_dict(sd)
    disc.eval()
    other.eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(other(x), disc(x), rtol=0, atol=0)
    assert len(disc.state_dict()) == len(sd) + len(disc.encoder.state_dict())
