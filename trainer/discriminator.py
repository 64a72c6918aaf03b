"""The Flash-DMD Pixel-GAN discriminator D_omega (DESIGN §3 item 4, reference lrm_sam.md §B).

A frozen segment-anything ViT image encoder with one small trainable 2D conv head on the output of
each selected block (by default the global-attention blocks). Only the heads are trained.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from trainer.jobspec import SAM_GLOBAL_BLOCKS

# SAM's pixel_mean/std (0..255 RGB) divided by 255: the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Encoder settings of segment-anything's build_sam.py: (embed_dim, depth, num_heads, global_attn_indexes).
_SAM_VARIANTS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
_PREFIX = "image_encoder."


def _image_encoder_cls() -> type[nn.Module]:
    """Import `ImageEncoderViT` without running `segment_anything/__init__.py`.

    That __init__ imports the predictor and the automatic mask generator, which import torchvision; the
    PyPI torchvision wheel does not load beside our torch, and the encoder does not need it. So, unless the
    real package is already imported, we register a bare package object (same __path__) for the import of
    the submodule and remove it afterwards, so a later `import segment_anything` still runs the real
    __init__ (reusing the already-imported submodules). `segment_anything.modeling.__init__` only imports
    torch/numpy modules (sam, encoders, decoder, transformer), so it is imported normally.
    """
    name = "segment_anything"
    inserted = False
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the 'segment-anything' package is required for the SAM discriminator")
        bare = types.ModuleType(name)
        bare.__path__ = list(spec.submodule_search_locations)
        bare.__spec__ = spec
        sys.modules[name] = bare
        inserted = True
    try:
        module = importlib.import_module(f"{name}.modeling.image_encoder")
    finally:
        if inserted:
            sys.modules.pop(name, None)
    return module.ImageEncoderViT


def _sdpa_attention_forward(self: nn.Module, x: Tensor) -> Tensor:
    """segment-anything's `Attention.forward` through F.scaled_dot_product_attention (same maths).

    The original builds the [B*heads, HW, HW] score matrix, adds the decomposed relative-position terms and
    softmaxes it by hand, so backward keeps ~3 such matrices per block (at 1024² a global block has 4096
    tokens: 16 heads x 4096² x 4 B = 1 GiB each). Here the relative-position terms go in as an additive
    attn_mask, and SDPA's fused kernels keep neither the scores nor the probabilities. The terms use the
    unscaled q, as in `add_decomposed_rel_pos`; SDPA's default scale is head_dim**-0.5 = `self.scale`.
    """
    b, h, w, _ = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, nH, HW, d]
    q, k, v = qkv.unbind(0)  # [B, nH, HW, d] each
    bias = None
    if self.use_rel_pos:
        get_rel_pos = sys.modules[type(self).__module__].get_rel_pos
        rh = get_rel_pos(h, h, self.rel_pos_h)  # [h, h, d]
        rw = get_rel_pos(w, w, self.rel_pos_w)  # [w, w, d]
        r_q = q.reshape(b, heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)  # [B, nH, h, w, h]
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)  # [B, nH, h, w, w]
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, nH, HW, d]
    return self.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, -1))


def use_sdpa_attention(encoder: nn.Module) -> int:
    """Route every attention layer of a SAM `ImageEncoderViT` through `_sdpa_attention_forward`.

    Bound per instance, so the state dict (and checkpoints, SAM .pth loading) are unchanged. Returns the
    number of layers switched.
    """
    n = 0
    for block in encoder.blocks:
        block.attn.forward = types.MethodType(_sdpa_attention_forward, block.attn)
        n += 1
    return n


SAM_SUFFIXES = (".pth", ".pt", ".safetensors")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read tensors only (weights_only / safetensors); never unpickle arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file or one holding non-tensor objects
        raise ValueError(f"cannot read SAM checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"SAM checkpoint {path} is not a flat state dict of tensors")
    if any(k.startswith(_PREFIX) for k in state):  # a full SAM checkpoint: keep the encoder part
        return {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return dict(state)  # already bare encoder keys


def _load_encoder_weights(encoder: nn.Module, checkpoint: str) -> None:
    from trainer.hub import resolve_weights  # a hub id (org/name[/file][@rev]) or a local file

    path = resolve_weights(checkpoint, "distill.discriminator.checkpoint", want="file", suffixes=SAM_SUFFIXES)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path} (distill.discriminator.checkpoint)")
    state = _read_state_dict(path)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"SAM checkpoint {path} does not match the encoder: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(shapes)} shape mismatches "
            f"{shapes[:3]} (is the backbone / img_size right?)"
        )
    encoder.load_state_dict(state, strict=True)


def load_sam_image_encoder(backbone: str, checkpoint: str | None, img_size: int | None = None) -> nn.Module:
    """Build a frozen (eval, requires_grad False) SAM `ImageEncoderViT`.

    `vit_b`/`vit_l`/`vit_h` need `checkpoint` (a SAM .pth with `image_encoder.*` keys, a bare encoder
    state dict, or .safetensors); `tiny` is a small seeded random encoder for tests (checkpoint optional).
    """
    encoder_cls = _image_encoder_cls()
    if backbone in _SAM_VARIANTS:
        if checkpoint is None:
            raise ValueError(f"distill.discriminator.checkpoint is required for backbone {backbone!r} "
                             "(a SAM .pth such as sam_vit_l_0b3195.pth)")
        embed, depth, heads, global_idx = _SAM_VARIANTS[backbone]
        kwargs: dict[str, Any] = dict(
            img_size=img_size or 1024, patch_size=16, embed_dim=embed, depth=depth, num_heads=heads,
            global_attn_indexes=global_idx, window_size=14, out_chans=256)
    elif backbone == "tiny":
        kwargs = dict(img_size=img_size or 64, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                      global_attn_indexes=(1, 3), window_size=4, out_chans=16)
    else:
        raise ValueError(f"unknown SAM backbone {backbone!r}; expected vit_b, vit_l, vit_h or tiny")
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(0)
        encoder = encoder_cls(
            mlp_ratio=4.0, qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=True,
            norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6), **kwargs)
    if checkpoint is not None:
        _load_encoder_weights(encoder, checkpoint)
    encoder.requires_grad_(False)
    return encoder.eval()


def sam_preprocess(images: Tensor, img_size: int) -> Tensor:
    """[-1, 1] images [B, 3, H, W] -> ImageNet-normalised [B, 3, img_size, img_size] (bilinear resize).

    SAM's pos_embed has a fixed grid, so the input must be exactly img_size square.
    """
    x = (images + 1) / 2  # [B, 3, H, W] in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x  # [B, 3, S, S]


def _make_head(channels: int, head_channels: int) -> nn.Sequential:
    # A simplified SenseFlow / StyleGAN-T 2D head: spectral-normalised convs (SN keeps D Lipschitz-ish,
    # stabilising the hinge GAN) with LeakyReLU(0.2); no BatchNormLocal, residual blocks or projection
    # conditioning. The stride-2 conv halves the token grid: [B, C, h, w] -> [B, 1, ceil(h/2), ceil(w/2)].
    return nn.Sequential(
        spectral_norm(nn.Conv2d(channels, head_channels, 1)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Conv2d(head_channels, head_channels, 3, stride=2, padding=1)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Conv2d(head_channels, 1, 1)),
    )


class PixelDiscriminator(nn.Module):
    """Frozen SAM encoder + one trainable conv head per selected block; logits [B, N]."""

    def __init__(self, encoder: nn.Module, blocks: Sequence[int], head_channels: int = 256) -> None:
        super().__init__()
        depth = len(encoder.blocks)
        blocks = [int(b) for b in blocks]
        if not blocks:
            raise ValueError("discriminator blocks must not be empty")
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"discriminator blocks {bad} out of range: the encoder has {depth} blocks "
                             f"(valid indices 0..{depth - 1})")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"discriminator blocks {blocks} contain duplicates")
        self.encoder = encoder.requires_grad_(False).eval()
        self.blocks = blocks
        self.img_size: int = int(encoder.img_size)
        channels = int(encoder.patch_embed.proj.out_channels)
        self.heads = nn.ModuleDict({f"block{b}": _make_head(channels, head_channels) for b in blocks})
        # Recompute encoder block activations in backward (global attention at 1024^2 is memory-heavy).
        self.gradient_checkpointing: bool = False

    def train(self, mode: bool = True) -> PixelDiscriminator:
        super().train(mode)
        self.encoder.eval()  # frozen backbone: always eval
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    # The normal state_dict() still holds the encoder; checkpoints may store the heads only (the encoder
    # is rebuilt from its SAM checkpoint) via these helpers. Keys are "block{i}.<layer>...".
    def heads_state_dict(self) -> dict[str, Tensor]:
        return dict(self.heads.state_dict())

    def load_heads_state_dict(self, state: Mapping[str, Tensor], strict: bool = True) -> Any:
        return self.heads.load_state_dict(state, strict=strict)

    def encoder_features(self, images: Tensor) -> dict[int, Tensor]:
        """Selected blocks' outputs, channels-last [B, h, w, C], for [-1, 1] images [B, 3, H, W]."""
        enc = self.encoder
        dtype = enc.patch_embed.proj.weight.dtype
        x = sam_preprocess(images.to(dtype), self.img_size)  # [B, 3, S, S]
        x = enc.patch_embed(x)  # [B, S/p, S/p, C]
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        wanted, last = set(self.blocks), max(self.blocks)
        feats: dict[int, Tensor] = {}
        for i, block in enumerate(enc.blocks[: last + 1]):  # later blocks and the neck are unused
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in wanted:
                feats[i] = x  # [B, h, w, C]
        return feats

    def forward(self, images: Tensor, *, grad_through_encoder: bool = True) -> Tensor:
        """[-1, 1] images [B, 3, H, W] -> logits [B, N] (all heads' logit maps, flattened, concatenated).

        grad_through_encoder=False (the discriminator's own step on detached inputs) runs the frozen
        encoder under no_grad so only the heads build a graph; True (the generator's adversarial loss)
        lets gradients flow through the frozen encoder back to `images`.
        """
        if grad_through_encoder:
            feats = self.encoder_features(images)
        else:
            with torch.no_grad():
                feats = self.encoder_features(images)
        head_dtype = next(iter(self.heads.parameters())).dtype
        logits = []
        for b in self.blocks:
            f = feats[b].permute(0, 3, 1, 2).to(head_dtype)  # [B, C, h, w]
            logits.append(self.heads[f"block{b}"](f).flatten(1))  # [B, ceil(h/2) * ceil(w/2)]
        return torch.cat(logits, dim=1)  # [B, N]


def build_discriminator(spec: Any, sdpa: bool = False) -> PixelDiscriminator:
    """From a `trainer.jobspec.DiscriminatorSpec` (backbone, checkpoint, blocks, img_size, head_channels).

    sdpa: the encoder's attention through F.scaled_dot_product_attention (memory.sam_sdpa).
    """
    encoder = load_sam_image_encoder(spec.backbone, spec.checkpoint, spec.img_size)
    if sdpa:
        use_sdpa_attention(encoder)
    blocks = spec.blocks or SAM_GLOBAL_BLOCKS[spec.backbone]  # the spec normally resolves this already
    return PixelDiscriminator(encoder, blocks, head_channels=spec.head_channels)
