"""The digits teacher's components: a factor-4 AutoencoderKL, a text_time UNet and two tiny CLIP text encoders,
assembled into a `StableDiffusionXLPipeline` (trainer/toy/teacher.py describes the choices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.toy import RESOLUTION
from trainer.toy.prompts import DIGIT_WORDS, digit_prompt

VAE_CHANNELS = (8, 16, 32)  # three blocks -> VAE factor 4 (32 px images, 8x8 latents)
LATENT_CHANNELS = 4
UNET_CHANNELS = (48, 96)
TEXT_HIDDEN = 32  # each CLIP encoder's width (trainer.tiny._text_encoder); cross-attention sees 32 + 32
TEXT_PROJECTION = 32  # text_encoder_2's pooled projection
TIME_EMBED = 8  # per SDXL time id (6 of them)
PROMPTS = [digit_prompt(i) for i in range(len(DIGIT_WORDS))] + [""]  # index 10: the empty prompt
EMPTY = len(DIGIT_WORDS)


def build_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # set from the trained encoder's latent std
        force_upcast=False,  # fp32 weights; nothing to upcast
    )


def build_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2 ** (len(VAE_CHANNELS) - 1),  # 8: the pipeline's default is 8 x 4 = 32 px
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=(4, 8),
        norm_num_groups=8,
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' penultimate states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_PROJECTION,
        use_linear_projection=True,
    )


def build_pipeline(tok_dir: Path, seed: int) -> Any:
    """A freshly initialised (untrained) digits pipeline; each component has its own seed."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from trainer.tiny import _SD_BETAS, _text_encoder, build_clip_tokenizer

    def seeded(offset: int) -> None:
        torch.default_generator.manual_seed(seed * 1000 + offset)

    tokenizer = build_clip_tokenizer(tok_dir)
    seeded(1)
    te1 = _text_encoder(tokenizer, projection=False, hidden_act="quick_gelu")
    seeded(2)
    te2 = _text_encoder(tokenizer, projection=True, hidden_act="gelu")
    seeded(3)
    vae = build_vae()
    seeded(4)
    unet = build_unet()
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, prediction_type="epsilon", timestep_spacing="leading",
                                       steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encode_prompts(pipe: Any) -> tuple[Tensor, Tensor]:
    """`PROMPTS` through the pipeline's own encode_prompt, with grad: ([11, 77, 64] embeds, [11, 32] pooled)."""
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled
