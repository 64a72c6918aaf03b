"""Activation estimates for `flashdmd plan` (trainer/plan.py): bytes a graph keeps for backward, from shapes.

These are estimates, not measurements. Each layer type keeps about K tensors of its width x spatial size for
backward (a resnet: two norms, two SiLUs, two convs and the residual; a transformer layer: attention q/k/v/out,
cross-attention, GEGLU feed-forward at 4x width), in bf16 (2 B/element) under autocast. With activation
checkpointing a unit keeps only its input, and backward recomputes one unit at a time, so the cost is the
inputs plus the largest unit. SD3's transformer (MMDiT) is counted per block from its image and text tokens
(mmdit_graph_bytes). bench/gpu_train_step.py measures the peaks and prints the plan's error beside them.
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


def denoiser_graph_bytes(cfg: dict[str, Any], latent: int, batch: int, checkpointing: bool,
                         mixed_precision: str, lora_rank: int | None = None) -> float:
    """One denoiser forward with grad under train.mixed_precision: a UNet (the autocast count scaled by
    precision_scale) or SD3's MMDiT (counted per precision and for LoRA or full weights, mmdit_graph_bytes)."""
    if is_mmdit(cfg):
        return mmdit_graph_bytes(cfg, latent, batch, checkpointing,
                                 autocast=mixed_precision in ("bf16", "fp16"), lora_rank=lora_rank)
    return precision_scale(mixed_precision) * unet_graph_bytes(cfg, latent, batch, checkpointing)


def unet_graph_bytes(cfg: dict[str, Any], latent: int, batch: int, checkpointing: bool) -> float:
    """One UNet forward with grad, counted under autocast (SD3's MMDiT: mmdit_graph_bytes)."""
    if is_mmdit(cfg):
        return mmdit_graph_bytes(cfg, latent, batch, checkpointing, autocast=True, lora_rank=None)
    units = _units(cfg, latent)
    if checkpointing:
        return batch * (sum(inp for _, inp in units) + max(full for full, _ in units))
    return batch * sum(full for full, _ in units)


# ------------------------------------------------------------------ SD3's MMDiT
# SD3's transformer (diffusers SD3Transformer2DModel, JointTransformerBlock): T image tokens ((latent/patch)²) and
# C text tokens (CLIP's 77 + T5's 256, the pipeline's max_sequence_length) run as two streams of width w = heads x
# head_dim, each with its own adaLN norms, q/k/v and output projections and a GELU MLP of MMDIT_MLP_RATIO x w; the
# two meet in one attention over T + C tokens. So every block keeps, per token of each stream, tensors of width w
# and of the MLP's width, and per joint token the attention's q, k, v and output (SDPA keeps those and a log-sum-exp
# per head, never the score matrix). The last block (context_pre_only) ends the text stream: its text tokens keep
# only the norm input and q/k/v projections' inputs, no output projection and no MLP.
#
# What a block keeps depends on what trains: with LoRA (the default targets, the 8 attention projections) the
# frozen MLP and adaLN linears keep no inputs; with full weights every linear keeps its input and the modulations
# keep their norm outputs. And on the precision: without autocast each tensor is 4 B; under autocast 2 B, but peft
# casts each LoRA input back to the adapter's fp32 dtype and autocast casts it again to bf16, so every adapted
# projection keeps its own bf16 copy of its input (three of the q/k/v input per stream, one of each output
# projection's input), and every linear on the gradient path keeps a bf16 copy of its fp32 weight for the input
# gradient (per graph, not per sample: MMDIT_WEIGHT_COPIES).
#
# The counts were read off the trace, then checked with the same K at other shapes. Read: an inventory of the
# tensors autograd saves in one block (real tiny tensors), and the bytes the transformer alone keeps after a
# forward with grad on fake tensors (trainer.trace_fake.PeakTracker, the trace's tracker; batch 2, the trainer's
# trainable_copy with peft LoRA). Per block and token of one stream (x e bytes):
#   LoRA, fp32:      x (norm input), h (modulated norm out), x1 (after attention)   3 w; GELU input     1 mlp
#   LoRA, autocast:  x, h x 3 (the q/k/v adapters' bf16 copies), x1                5 w; GELU input     1 mlp
#   full:            x, norm out, h, attention out, x1, norm2 out, h2, MLP out      8 w; GELU in + out  2 mlp
# and per joint token 5 w: q, k, v, the SDPA output and the output projections' input (fp32: a copy of the
# merged heads, per stream when the batch is above 1; autocast LoRA: each adapter's bf16 copy). The last block's
# text tokens keep 2 / 4 / 3 w of their stream and 4 joint (no output projection). Small terms, from shapes too:
# each adapter's rank-r output (4 per stream token), the norms' mean and rstd (2 per norm), the log-sum-exp (4 B
# per head and joint token); with LoRA the first block's input takes no gradient, so its first norms keep nothing.
# Checked (trace / plan, bytes kept for backward): the tiny-sd3 transformer (w 32 = 4 heads x 8, LoRA rank 4) at
# T 64 and 256 image tokens x C 333 and 77 text tokens x 2 and 3 blocks, all four (training, precision) pairs:
# within 1.8% for LoRA, 3.5% for full weights (24 cases); a wider one (w 64 = 8 heads x 8, rank 8, 3 blocks, T
# 256, C 77) within 1.1%, and with checkpointing the blocks' inputs within 0.8%; SD3-Medium itself (w 1536, 24
# blocks, T 4096 + C 333, LoRA rank 64, bf16 autocast, batch 1) 6.87 GiB planned / 6.85 traced (+0.4%), and full
# weights at 512² batch 2 7.66 / 7.68 (-0.3%). tests/unit/test_plan_mmdit.py re-traces two shapes per pair.
# Before this estimate the plan counted SD3 as a one-level UNet of image tokens only: tiny-sd3, whose 64 image
# tokens meet 333 text tokens, planned -16% of its trace. Caveat: the counts are the trace's, whose autocast is
# the CPU's (layer norms in bf16); CUDA's autocast runs layer_norm in fp32, so on a GPU each norm's saved input
# is an fp32 copy, about 2 B more per stream token and norm (~+13% on an autocast LoRA block; not measured).
SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77 then T5's 256 (trainer.trace_fake.TEXT_TOKENS["sd3"], the pipeline's)
MMDIT_MLP_RATIO = 4  # diffusers' FeedForward in JointTransformerBlock: GELU(tanh) MLP of 4 x w
# (stream tensors of w, stream tensors of the MLP width, joint tensors of w, last block's text: stream w, joint w);
# "lora" is LoRA on the default targets (trainer.models.LORA_TARGETS["transformer"], the 8 attention projections)
MMDIT_K = {("lora", "fp32"): (3, 1, 5, 2, 4), ("lora", "autocast"): (5, 1, 5, 4, 4),
           ("full", "fp32"): (8, 2, 5, 3, 4), ("full", "autocast"): (8, 2, 5, 3, 4)}
MMDIT_HEAD_K = {"lora": 1, "full": 3}  # tensors of w per image token the output norm and projection keep
# Linear weights (in w²) of one block on the gradient path, of which autocast keeps a bf16 copy: attention
# projections 8 (the last block 7: no text output projection), the two MLPs 2 x 2 x MMDIT_MLP_RATIO (last: one), and
# with full weights the adaLN modulations 2 x 6 (last: 6 + 2).
MMDIT_WEIGHT_COPIES = {"lora": (8 + 4 * MMDIT_MLP_RATIO, 7 + 2 * MMDIT_MLP_RATIO),
                       "full": (8 + 4 * MMDIT_MLP_RATIO + 12, 7 + 2 * MMDIT_MLP_RATIO + 8)}


def is_mmdit(cfg: dict[str, Any]) -> bool:
    return "block_out_channels" not in cfg and "joint_attention_dim" in cfg


def mmdit_graph_bytes(cfg: dict[str, Any], latent: int, batch: int, checkpointing: bool, *, autocast: bool,
                      lora_rank: int | None, text_tokens: int = SD3_TEXT_TOKENS, recompute: bool = True) -> float:
    """One SD3 transformer forward with grad: what its blocks keep for backward, from the shapes (image and text
    tokens, width, heads, MLP ratio, blocks, LoRA rank) and the per-block tensor counts MMDIT_K above.

    With checkpointing, the blocks' inputs and, if `recompute`, the one block backward recomputes at a time (the
    units convention of unet_graph_bytes)."""
    heads = int(cfg.get("num_attention_heads", 24))
    w = heads * int(cfg.get("attention_head_dim", 64))
    n = int(cfg.get("num_layers", 24))
    t_img, t_txt = (latent // int(cfg.get("patch_size", 2))) ** 2, text_tokens
    train = "lora" if lora_rank else "full"
    e = BF16 if autocast else 4
    s_w, s_m, j_w, p_w, pj_w = MMDIT_K[(train, "autocast" if autocast else "fp32")]
    r = int(lora_rank or 0)
    mlp, lse = MMDIT_MLP_RATIO * w, 4 * heads  # the log-sum-exp: fp32, per head and joint token
    # bytes per token of one stream in a full block (its norms' mean and rstd: 2 x 2), and of the last block's
    # text stream (one norm, three adapters, no output projection, no MLP)
    stream = (s_w * w + s_m * mlp + j_w * w + 4 * r + 4) * e + lse
    last_text = (p_w * w + pj_w * w + 3 * r + 2) * e + lse
    block = (t_img + t_txt) * stream  # per sample
    last = t_img * stream + t_txt * last_text
    if lora_rank:  # the first block's input takes no gradient (frozen embedders): its first norms keep nothing
        first = block - (t_img + t_txt) * (w + 2) * e
    else:  # trained embedders; autocast keeps a bf16 copy of the text embeddings for the context embedder
        first = block + (t_txt * int(cfg["joint_attention_dim"]) * BF16 if autocast else 0)
    head = t_img * (MMDIT_HEAD_K[train] * w + 2) * e  # the output norm (and projection)
    # autocast's bf16 weight copies: once per graph, not per sample (the adapters' A and B, 2 x r x w each)
    full_w, last_w = MMDIT_WEIGHT_COPIES[train]
    copies = [BF16 * (full_w * w * w + 8 * 2 * r * w)] * (n - 1) + [BF16 * (last_w * w * w + 7 * 2 * r * w)]
    copies = copies if autocast else [0.0] * n
    if checkpointing:  # diffusers checkpoints each block: the inputs of its two streams
        kept = batch * (n * (t_img + t_txt) * w * e + head)
        return kept + (batch * block + max(copies) if recompute else 0.0)
    blocks = last + (first - block) if n == 1 else first + (n - 2) * block + last
    return batch * (blocks + head) + sum(copies)


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
        return 4 * (SD3_TEXT_TOKENS * int(cfg["joint_attention_dim"]) + int(cfg.get("pooled_projection_dim", 0)))
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
