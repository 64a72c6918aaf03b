"""Activation estimates for `flashdmd plan` (trainer/plan.py): bytes a graph keeps for backward, from shapes.

These are estimates, not measurements. Each layer type keeps about K tensors of its width x spatial size for
backward (a resnet: two norms, two SiLUs, two convs and the residual; a transformer layer: attention q/k/v/out,
cross-attention, GEGLU feed-forward at 4x width), in bf16 (2 B/element) under autocast. With activation
checkpointing a unit keeps only its input, and backward recomputes one unit at a time, so the cost is the
inputs plus the largest unit. bench/gpu_train_step.py measures the peaks and prints the plan's error beside them.
"""

from __future__ import annotations

from typing import Any

BF16 = 2
RESNET_K = 10  # tensors of c x s² kept by one resnet block
TRANSFORMER_K = 32  # ... by one transformer layer (attention + cross-attention + GEGLU 4c feed-forward)
# Tensors of c x s² one VAE decoder resnet keeps (fp32 weights under autocast: its group norms keep fp32 tensors).
# Taught by the trace (trainer.trace_fake.PeakTracker on fake tensors, SDXL's VAE decoding 128² latents to 1024²,
# batch 1, under bf16 autocast, backward to the latent): 4.24 GiB with memory.vae_decode_checkpointing, 11.96
# GiB without. K = 8 gives 4.22 / 12.81 (the checkpointed path the presets use within 0.5%); the former 12 gave
# 5.22 / 18.4.
VAE_RESNET_K = 8
SAM_MLP_K = 16  # a ViT block's norms, qkv (3C), attention output, MLP (4C, GELU, 4C)
# The K above are counted under autocast (bf16/fp16): conv/linear outputs in 2 B, the norms' and SiLUs' outputs in
# fp32 (autocast runs group/layer norm in fp32), plus the 2 B copy autocast casts for each conv/linear input.
# Without autocast (train.mixed_precision "no") every saved tensor is 4 B but those cast copies are gone, so a
# graph grows by less than 2x. The trace measures the ratio (trainer/trace.py, tiny-sdxl, batch 4): 1.595 for
# the UNet alone (distill.gan_weight=0: 19.31 / 12.11 MB of activations at the generator phase's peak) and 1.593
# for the whole generator phase with the VAE decode and SAM (39.95 / 25.08 MiB).
FP32_OVER_AUTOCAST = 1.59


# The VAE decoder alone grows by more: its autocast graph already keeps the group norms' fp32 outputs, and without
# autocast its conv outputs double too. Traced (SDXL's VAE, 1024², batch 1): 8.48 / 4.24 GiB with per-layer
# checkpointing, 23.23 / 11.96 without.
VAE_FP32_OVER_AUTOCAST = 2.0


def precision_scale(mixed_precision: str, vae: bool = False) -> float:
    """Factor on the autocast-counted graph bytes above for a run's train.mixed_precision."""
    if mixed_precision in ("bf16", "fp16"):
        return 1.0
    return VAE_FP32_OVER_AUTOCAST if vae else FP32_OVER_AUTOCAST


def _units(cfg: dict[str, Any], latent: int) -> list[tuple[float, float]]:
    """(bytes per sample without checkpointing, checkpoint-input bytes) of each checkpointed unit of a UNet."""
    chans = list(cfg["block_out_channels"])
    lpb = cfg.get("layers_per_block", 2)
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * len(chans) if isinstance(tl, int) else list(tl)
    units: list[tuple[float, float]] = []

    def add(c: int, s: int, layers: int, attention: bool) -> None:
        size = c * s * s * BF16
        units.extend([(RESNET_K * size, size)] * layers)
        if attention:
            units.extend([(TRANSFORMER_K * tl_l * size, size)] * layers)

    for level, (c, kind) in enumerate(zip(chans, cfg["down_block_types"], strict=False)):
        tl_l = tl[level]
        add(c, latent >> level, lpb, "CrossAttn" in kind)
    deepest = len(chans) - 1
    tl_l = tl[-1]
    add(chans[-1], latent >> deepest, 2, True)  # mid block: resnet, transformer, resnet
    for i, (c, kind) in enumerate(zip(reversed(chans), cfg["up_block_types"], strict=False)):
        level = deepest - i
        tl_l = tl[level]
        add(c, latent >> level, lpb + 1, "CrossAttn" in kind)
    return units


def unet_graph_bytes(cfg: dict[str, Any], latent: int, batch: int, checkpointing: bool) -> float:
    """One denoiser forward with grad (SD3 transformers: treated as a UNet of one level)."""
    if "block_out_channels" not in cfg:  # SD3 MMDiT: n joint layers at (latent/patch)² tokens
        tokens = (latent // cfg.get("patch_size", 2)) ** 2
        width = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 64)
        layer = TRANSFORMER_K * width * tokens * BF16
        n = cfg.get("num_layers", 24)
        return batch * (n * width * tokens * BF16 + layer if checkpointing else n * layer)
    units = _units(cfg, latent)
    if checkpointing:
        return batch * (sum(inp for _, inp in units) + max(full for full, _ in units))
    return batch * sum(full for full, _ in units)


def vae_decode_graph_bytes(cfg: dict[str, Any], latent: int, batch: int, checkpointing: bool) -> float:
    """The VAE decoder with grad (Pixel-GAN path), at `latent` input size."""
    chans = list(reversed(cfg["block_out_channels"]))
    lpb = cfg.get("layers_per_block", 2) + 1
    layers: list[tuple[float, float]] = []
    s = latent
    c0 = chans[0]
    mid = c0 * s * s * BF16
    layers += [(VAE_RESNET_K * mid, mid)] * 2 + [(4 * mid, mid)]  # 2 resnets + single-head attention
    for i, c in enumerate(chans):
        size = c * s * s * BF16
        layers += [(VAE_RESNET_K * size, size)] * lpb
        if i < len(chans) - 1:  # upsampler: nearest x2 then a conv at the new size
            s *= 2
            up = c * s * s * BF16
            layers.append((2 * up, up))
    if checkpointing:
        return batch * (sum(inp for _, inp in layers) + max(full for full, _ in layers))
    return batch * sum(full for full, _ in layers)


def sam_graph_bytes(encoder: Any, blocks: list[int], batch: int, checkpointing: bool, sdpa: bool) -> float:
    """The SAM encoder with grad to its input (the generator's adversarial loss), up to the last used block."""
    embed = int(encoder.patch_embed.proj.out_channels)
    grid = int(encoder.img_size) // int(encoder.patch_embed.proj.kernel_size[0])
    tokens = grid * grid
    per_block: list[tuple[float, float]] = []
    for i, blk in enumerate(encoder.blocks[: max(blocks) + 1]):
        heads = int(blk.attn.num_heads)
        t_attn = tokens if blk.window_size == 0 else blk.window_size**2
        n_attn = 1 if blk.window_size == 0 else -(-grid // blk.window_size) ** 2
        scores = heads * t_attn * t_attn * n_attn
        # hand-written: scores (bf16) + scores with rel-pos (bf16) + softmax (fp32); SDPA: the rel-pos bias only
        attn = scores * (2 * BF16 if sdpa else 2 * BF16 + 4)
        inp = tokens * embed * BF16
        per_block.append((SAM_MLP_K * inp + attn, inp))
        del i
    if checkpointing:
        return batch * (sum(inp for _, inp in per_block) + max(full for full, _ in per_block))
    return batch * sum(full for full, _ in per_block)


def text_bytes(cfg: dict[str, Any]) -> int:
    """fp32 bytes of one sample's text conditioning (the embeddings, pooled vector and SDXL time ids)."""
    if "joint_attention_dim" in cfg:
        return 4 * ((77 + 256) * int(cfg["joint_attention_dim"]) + int(cfg.get("pooled_projection_dim", 0)))
    pooled = int(cfg.get("projection_class_embeddings_input_dim") or 0)
    return 4 * (77 * int(cfg["cross_attention_dim"]) + pooled)


def disc_nets(spec: Any) -> tuple[Any, Any, Any]:
    """(SAM encoder, heads) counts and the meta encoder, for a flash spec's Pixel-GAN."""
    from accelerate import init_empty_weights
    from torch import nn

    from trainer.discriminator import _make_head, load_sam_image_encoder
    from trainer.plan_nets import count

    d = spec.distill.discriminator
    with init_empty_weights(include_buffers=True):
        enc = load_sam_image_encoder("tiny", None, d.img_size) if d.backbone == "tiny" else \
            sam_meta(d.backbone, d.img_size)
    # The heads are small and spectral_norm initialises from real values: build them on the CPU.
    channels = int(enc.patch_embed.proj.out_channels)
    heads = nn.ModuleDict({f"block{b}": _make_head(channels, d.head_channels) for b in d.blocks})
    return count("sam_encoder", enc), count("discriminator", heads, trainable=True), enc


def sam_meta(backbone: str, img_size: int) -> Any:
    from torch import nn

    from trainer.discriminator import _SAM_VARIANTS, _image_encoder_cls

    embed, depth, heads, global_idx = _SAM_VARIANTS[backbone]
    return _image_encoder_cls()(img_size=img_size, patch_size=16, embed_dim=embed, depth=depth, num_heads=heads,
                                global_attn_indexes=global_idx, window_size=14, out_chans=256, mlp_ratio=4.0,
                                qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=True,
                                norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6))
