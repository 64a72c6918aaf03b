"""Train the digits teacher: a real, small SDXL-format pipeline.

Data: sklearn's 8x8 digits (`trainer.data.DigitsDataset`), bilinearly upsampled to 32x32 RGB in [-1, 1], with the
caption `digit_prompt(label)` ("a handwritten digit seven").

Architecture (chosen for the distillation demo, which runs many UNet forwards per step on 2 CPU cores):
- VAE: `AutoencoderKL`, three encoder/decoder blocks (8, 16, 32 channels) -> factor 4: 32x32x3 images,
  8x8x4 latents. The digits are 8x8 images at heart, so an 8x8x4 latent loses nothing visible, and every UNet
  forward costs a quarter of what a 16x16 latent would. Trained first, alone, with MSE reconstruction plus a small
  KL term (`kl_weight`, on the per-element mean) on posterior samples. The KL keeps the posterior noise at ~0.4 of
  the latent spread, so the decoder is robust to small latent errors. `scaling_factor` is then set to 1/std of
  posterior samples over the whole dataset (unit-std latents, no shift, as SDXL).
- Text encoders: `trainer.tiny`'s tiny CLIPTextModel (quick_gelu) and CLIPTextModelWithProjection (gelu), hidden 32,
  2 layers, with the locally built CLIP BPE tokenizer (`build_clip_tokenizer`). They are trained jointly with the
  UNet, end to end through `StableDiffusionXLPipeline.encode_prompt` itself (penultimate hidden states of both,
  concatenated to 64 dims; pooled projection 32), so training and inference encode prompts by one code path.
- UNet: `UNet2DConditionModel`, `addition_embed_type="text_time"`, blocks (48, 96) (DownBlock2D at 8x8,
  CrossAttnDownBlock2D at 4x4, cross-attention mid block), 1 layer per block: ~2.3M parameters.
- Scheduler saved with the pipeline: SDXL's `EulerDiscreteScheduler` (scaled_linear 0.00085-0.012, 1000 steps,
  epsilon, leading spacing, steps_offset 1).

UNet training: epsilon prediction on that DDPM schedule (`trainer.schedules.EpsDDPM`, t ~ U{0..999}), min-SNR-5
loss weighting (Hang et al. 2023; it speeds up convergence, and is still epsilon prediction), AdamW with warmup and
cosine decay, and an EMA (0.999) of the UNet and both text encoders, which is what gets saved. Latents are fresh
posterior samples every step (as `Teacher.encode_images` draws them). Micro-conditioning time_ids are
[32, 32, 0, 0, 32, 32], what both the stock pipeline and `Teacher.time_ids` pass at 32 px.

Unconditional branch (CFG): the pipeline is saved with `force_zeros_for_empty_prompt=True` (the SDXL default), so
the stock pipeline without a negative prompt and `trainer.models.Teacher.uncond` both feed *zero* embeddings and a
zero pooled vector. Training therefore replaces the conditioning with zeros for `p_zero` (10%) of the samples. A
further `p_empty` (5%) get the encoded empty prompt "", so `negative_prompt=""` is unconditional as well.

Reproducibility: everything is seeded from `seed` (component initialisation, batches, noise). With a fixed
`--steps` the result is a function of the seed, the torch build and the thread count; `--minutes` makes it stop
(and its LR schedule progress) by wall time instead, which is machine-dependent. The shipped folder was rebuilt
twice with `--threads 1` and came out bitwise identical. On a busy 2-core machine use `--threads 1`: a second
OpenMP thread mostly spin-waits there (we measured 5-10x more CPU per step with 2 threads under load).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trainer.data import DigitsDataset
from trainer.toy import RESOLUTION
from trainer.toy.teacher_nets import build_pipeline, count_params
from trainer.toy.teacher_train import Recipe, encode_posterior, eval_denoiser_loss, train_denoiser, train_vae


def save_pipeline(pipe: Any, out: Path, tok_dir: Path) -> None:
    pipe.save_pretrained(out, safe_serialization=True)
    # As trainer.tiny does: keep CLIP's vocab.json/merges.txt next to tokenizer.json (transformers 4 readers).
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, out / sub / name)


def train_teacher(out_dir: str | Path, recipe: Recipe | None = None, progress: bool = True,
                  command: str | None = None) -> dict[str, Any]:
    """Train the VAE, then the UNet and text encoders, and save the pipeline to `out_dir` (replaced atomically).

    Returns the summary also written to `out_dir/training.json` (recipe, times, losses, parameter counts).
    """
    recipe = recipe or Recipe()
    out = Path(out_dir)
    old_threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
            tok_dir = Path(tmp) / "clip"
            pipe = build_pipeline(tok_dir, recipe.seed)
            gen = torch.Generator().manual_seed(recipe.seed)
            data = DigitsDataset(RESOLUTION)
            images, labels = data.images[:recipe.subset], torch.tensor(data.labels[:recipe.subset])

            t0 = time.monotonic()
            logs = train_vae(pipe.vae, images, recipe, gen, progress)
            logs["vae_minutes"] = (time.monotonic() - t0) / 60
            mean, std = encode_posterior(pipe.vae, images)
            samples = mean + std * torch.randn(mean.shape, generator=gen)
            scaling = round(1.0 / samples.std().item(), 5)
            pipe.vae.register_to_config(scaling_factor=scaling)
            logs.update(scaling_factor=scaling, latent_posterior_std=(std * scaling).mean().item())

            t0 = time.monotonic()
            logs.update(train_denoiser(pipe, mean * scaling, std * scaling, labels, recipe, gen, progress))
            logs["unet_minutes"] = (time.monotonic() - t0) / 60
            logs["unet_eval_eps_mse"] = eval_denoiser_loss(pipe, mean * scaling, std * scaling, labels,
                                                           n=recipe.eval_samples)

            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".digits-teacher-", dir=out.parent))
            save_pipeline(pipe, staging, tok_dir)
            summary = {
                "command": command,
                "recipe": asdict(recipe),
                "metrics": logs,
                "total_minutes": (time.monotonic() - t_start) / 60,
                "params": {"unet": count_params(pipe.unet), "vae": count_params(pipe.vae),
                           "text_encoder": count_params(pipe.text_encoder),
                           "text_encoder_2": count_params(pipe.text_encoder_2)},
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
            }
            (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            shutil.move(str(staging), str(out))
    finally:
        torch.set_num_threads(old_threads)
    return summary
