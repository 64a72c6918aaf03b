"""Random-weight SDXL-architecture models for the GPU benchmarks (bench/gpu_train_step.py), built in memory from
the configs `flashdmd plan` counts (trainer/arch/sdxl-base), or narrowed copies of them for --dry-run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import REPO

ARCH_DIR = REPO / "trainer" / "arch"  # the configs `flashdmd plan` ships (trainer.plan_nets.ARCH_DIR)
SAM_VIT_L: dict[str, Any] = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, window_size=14,
                                 global_attn_indexes=(5, 11, 17, 23), out_chans=256)
# --dry-run: the same architectures, narrow (the UNet keeps its 3 levels, the VAE its 8x, SAM its 24 blocks).
DRY_UNET = {"sample_size": 8, "block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4],
            "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 64, "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32}
DRY_VAE = {"sample_size": 64, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
DRY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "projection_dim": 32}
DRY_SAM = {**SAM_VIT_L, "embed_dim": 64, "num_heads": 4, "out_chans": 16}


def arch_folder(dry: bool, tmp: Path) -> Path:
    """The config folder the benchmark builds from and `flashdmd plan` counts: SDXL base, or a narrow copy."""
    if not dry:
        return ARCH_DIR / "sdxl-base"
    out = tmp / "dry-arch"
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json"):
        cfg = json.loads((ARCH_DIR / "sdxl-base" / rel).read_text())
        part = rel.split("/")[0]
        cfg.update({"unet": DRY_UNET, "vae": DRY_VAE}.get(part, DRY_TEXT if part.startswith("text") else {}))
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(cfg))
    return out


def build_teacher(folder: Path, device: str, tmp: Path) -> Any:
    """A random-weight SDXL-architecture Teacher from the config folder, built directly on `device`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models import Teacher
    from trainer.tiny import build_clip_tokenizer

    def read(rel: str) -> dict[str, Any]:
        return {k: v for k, v in json.loads((folder / rel).read_text()).items() if not k.startswith("_")}

    tok = build_clip_tokenizer(tmp / "clip")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(read("unet/config.json"))
        vae = AutoencoderKL.from_config(read("vae/config.json"))
        te1 = CLIPTextModel(CLIPTextConfig(**read("text_encoder/config.json")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2/config.json")))
    sched = EulerDiscreteScheduler.from_config(read("scheduler/scheduler_config.json"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return Teacher(pipe, "sdxl", "random:sdxl-architecture", unet.config.sample_size * 8, None).to(device)


@contextlib.contextmanager
def random_sam_discriminator(dry: bool) -> Iterator[None]:
    """Let Distiller build a SAM ViT-L Pixel-GAN with random weights (the trainer needs a checkpoint)."""
    import torch
    from torch import nn

    import trainer.discriminator as td

    def build(spec: Any, sdpa: bool = False) -> td.PixelDiscriminator:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = td._image_encoder_cls()(
                img_size=spec.img_size, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=True,
                norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6), **(DRY_SAM if dry else SAM_VIT_L))
        if sdpa:
            td.use_sdpa_attention(encoder)
        return td.PixelDiscriminator(encoder.requires_grad_(False).eval(), spec.blocks, spec.head_channels)

    original = td.build_discriminator
    td.build_discriminator = build
    try:
        yield
    finally:
        td.build_discriminator = original


def random_batches(batch: int, resolution: int) -> Iterator[dict]:
    import torch

    from trainer.toy.prompts import digit_prompt

    g = torch.Generator().manual_seed(0)
    for i in range(10**9):
        yield {"image": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
               "caption": [digit_prompt((i * batch + j) % 10) for j in range(batch)]}
