"""GPU benchmark: iteration time and peak GPU memory, flash (TTUR 1, 2) vs dmd2 (TTUR 5), SDXL size at 1024².

    python bench/gpu_train_step.py --iters 20            # CUDA; writes bench/results/train_step_gpu.json
    python bench/gpu_train_step.py --lora 64             # LoRA generator/fake score (fits an 80 GB card)
    python bench/gpu_train_step.py --dry-run             # CPU: scaled-down models, code path end to end

Random weights throughout, built in memory (nothing is downloaded or saved): a UNet with SDXL base 1.0's
config (2.57 B parameters, 128x128 latents), SDXL's VAE (4 blocks: 1024 px), CLIP text encoders of SDXL's
widths (768 and 1280, pooled projection 1280) but one layer each (they run once per step, without grad), and a
SAM ViT-L Pixel-GAN encoder with random weights (built here without a checkpoint, by patching
`trainer.discriminator.build_discriminator` for the benchmark only). Training settings: bf16 autocast,
gradient checkpointing, batch 1, 4-step schedule, each mode's defaults (as presets/sdxl-4step.yaml).

Configs run one after another (three SDXL Distillers do not fit together); each gets a fresh teacher (the
Distiller casts the teacher's UNet to bf16 in place), warm-up iterations, then `--iters` timed iterations
(rounded up to whole generator cycles), each timed between torch.cuda.synchronize()
calls. Peak memory is torch.cuda.max_memory_allocated over the whole config (teacher, Distiller, steps).

Memory: full weights keep fp32 generator + fake score with grads and AdamW states, ~16 B x 2.57 B x 2 = 82 GB
before activations: use an H200 (139 GB), or --lora. Batches are random [-1, 1] images with digit captions:
DigitsDataset would materialise 1797 x 3 x 1024² floats (22.6 GB) up front.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    CONFIGS,
    REPO,
    StepTimes,
    add_ratios,
    command_line,
    config_name,
    format_table,
    instrument_phases,
    machine_info,
    make_spec,
    phase_summary,
    run_iterations,
    spec_summary,
    write_json,
)

# SDXL base 1.0's unet/config.json and vae/config.json (non-default fields).
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025, force_upcast=True,
)
# Text encoders: (hidden, heads, intermediate, act); text_encoder_2 projects its pooled output to its width.
SDXL_TEXT = ((768, 12, 3072, "quick_gelu"), (1280, 20, 5120, "gelu"))
SAM_VIT_L: dict[str, Any] = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, window_size=14,
                                 global_attn_indexes=(5, 11, 17, 23), out_chans=256)
# --dry-run: the same architectures, narrow (the UNet keeps its 3 levels, the VAE its 8x, SAM its 24 blocks).
DRY_UNET = {**SDXL_UNET, "sample_size": 8, "block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4),
            "transformer_layers_per_block": (1, 1, 2), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32}
DRY_VAE = {**SDXL_VAE, "sample_size": 64, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
DRY_TEXT = ((32, 2, 64, "quick_gelu"), (32, 2, 64, "gelu"))
DRY_SAM = {**SAM_VIT_L, "embed_dim": 64, "num_heads": 4, "out_chans": 16}


def build_teacher(dry: bool, device: str, tmp: Path) -> Any:
    """A random-weight SDXL-architecture Teacher, built directly on `device`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models import Teacher
    from trainer.tiny import MAX_LENGTH, build_clip_tokenizer

    tok = build_clip_tokenizer(tmp / "clip")
    text = []
    for i, (hidden, heads, inter, act) in enumerate(DRY_TEXT if dry else SDXL_TEXT):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                             num_attention_heads=heads, max_position_embeddings=MAX_LENGTH, projection_dim=hidden,
                             hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        text.append((CLIPTextModelWithProjection if i else CLIPTextModel)(cfg))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(DRY_UNET if dry else SDXL_UNET))
        vae = AutoencoderKL(**(DRY_VAE if dry else SDXL_VAE))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   num_train_timesteps=1000, prediction_type="epsilon",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text[0], text_encoder_2=text[1], tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    resolution = unet.config.sample_size * 8
    return Teacher(pipe, "sdxl", "random:sdxl-architecture", resolution, None).to(device)


@contextlib.contextmanager
def random_sam_discriminator(dry: bool) -> Iterator[None]:
    """Let Distiller build a SAM ViT-L Pixel-GAN with random weights (the trainer needs a checkpoint)."""
    import torch
    from torch import nn

    import trainer.discriminator as td

    def build(spec: Any) -> td.PixelDiscriminator:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = td._image_encoder_cls()(
                img_size=spec.img_size, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=True,
                norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6), **(DRY_SAM if dry else SAM_VIT_L))
        return td.PixelDiscriminator(encoder.requires_grad_(False).eval(), spec.blocks, spec.head_channels)

    original = td.build_discriminator
    td.build_discriminator = build
    try:
        yield
    finally:
        td.build_discriminator = original


def random_batches(batch: int, resolution: int) -> Iterator[dict]:
    import torch

    from trainer.data import digit_prompt

    g = torch.Generator().manual_seed(0)
    for i in range(10**9):
        yield {"image": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
               "caption": [digit_prompt((i * batch + j) % 10) for j in range(batch)]}


def run_config(mode: str, ttur: int, args: argparse.Namespace, device: str, tmp: Path) -> dict[str, Any]:
    import torch

    from trainer.distill import Distiller
    from trainer.loop import _accelerator

    cuda = device == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    gib = 2.0**30
    out: dict[str, Any] = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        out["start_alloc_gib"] = torch.cuda.memory_allocated() / gib  # leftovers of an earlier config
    teacher = distiller = acc = phases = None
    try:
        teacher = build_teacher(args.dry_run, device, tmp)
        cfg = make_spec("random:sdxl-architecture", mode, ttur, args.batch, mixed_precision="bf16",
                        gradient_checkpointing=not args.no_checkpointing, lora=args.lora,
                        resolution=teacher.resolution,
                        discriminator={"backbone": "vit_l", "img_size": 64 if args.dry_run else 1024})
        out["spec"] = spec_summary(cfg)
        if cuda:
            out["teacher_alloc_gib"] = torch.cuda.memory_allocated() / gib
        acc = _accelerator(cfg)
        torch.manual_seed(cfg.train.seed)
        t0 = time.perf_counter()
        with random_sam_discriminator(args.dry_run):
            distiller = Distiller(cfg, teacher, acc)
        out["build_s"] = time.perf_counter() - t0
        out["trainable_params_m"] = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
                                     for k, m in distiller.trainable_modules().items()}
        if cuda:
            out["after_build_alloc_gib"] = torch.cuda.memory_allocated() / gib
        phases = instrument_phases(distiller, sync)
        batches = random_batches(args.batch, teacher.resolution)
        warmup = ttur * math.ceil(2 / ttur)
        t0 = time.perf_counter()
        step = run_iterations(distiller, batches, 0, warmup, None, sync)
        out.update(warmup_iters=warmup, warmup_s=time.perf_counter() - t0)
        phases.clear()
        times = StepTimes(ttur)
        run_iterations(distiller, batches, step, math.ceil(args.iters / ttur) * ttur, times, sync)
        out.update(timing=times.summary(), phase_s_per_gen_update=phase_summary(phases, times),
                   iteration_s=[round(x, 5) for x in times.seconds])
    except Exception as err:  # OOM, or a trainer error: record it and go on to the next config
        out["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    finally:
        if cuda:
            out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / gib
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / gib
        teacher = distiller = acc = phases = None  # noqa: F841 (drop every reference before the next config)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None,
                    help="timed iterations per config, rounded up to whole generator cycles (default 20; dry run 1)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora", type=int, default=None, help="LoRA rank for generator and fake score")
    ap.add_argument("--configs", default=",".join(config_name(m, t) for m, t in CONFIGS))
    ap.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--dry-run", action="store_true", help="CPU, scaled-down models; writes only with --out")
    ap.add_argument("--out", default=None, help="default: bench/results/train_step_gpu.json (not in --dry-run)")
    args = ap.parse_args()
    import torch

    if args.iters is None:
        args.iters = 1 if args.dry_run else 20
    if args.dry_run:
        device = "cpu"
        torch.set_num_threads(1)  # scaled-down models: one thread avoids OpenMP stalls on a busy small machine
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train_step.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it with --dry-run to check the code path on CPU")
    else:
        device = "cuda"
    wanted = {c.strip() for c in args.configs.split(",") if c.strip()}
    configs = [(m, t) for m, t in CONFIGS if config_name(m, t) in wanted]
    if not configs:
        raise SystemExit(f"--configs: none of {sorted(wanted)} in {[config_name(m, t) for m, t in CONFIGS]}")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flashdmd-gpu-bench-") as tmp:
        for mode, ttur in configs:
            name = config_name(mode, ttur)
            print(f"[{name}] {'dry run (CPU, scaled down)' if args.dry_run else 'SDXL size, 1024²'}", flush=True)
            results[name] = run_config(mode, ttur, args, device, Path(tmp))
            print(f"  {results[name].get('error') or results[name]['timing']}", flush=True)
    add_ratios(results)
    rows = []
    for name, r in results.items():
        t, ratio = r.get("timing", {}), r.get("ratio_vs_dmd2", {})
        rows.append([name, t.get("s_per_iter_median"), t.get("s_per_gen_update_median"),
                     t.get("s_per_gen_update_mean"), ratio.get("per_gen_update_median"),
                     ratio.get("per_gen_update_mean"), r.get("peak_alloc_gib"), r.get("error")])
    table = format_table(["config", "s/iter (med)", "s/G-update (med)", "s/G-update (mean)", "vs dmd2 (med)",
                          "vs dmd2 (mean)", "peak alloc GiB", "error"], rows)
    print(table)
    out = args.out or (None if args.dry_run else str(REPO / "bench" / "results" / "train_step_gpu.json"))
    if out:
        payload = {"benchmark": "train_step_gpu", "command": command_line(), "machine": machine_info(),
                   "settings": {"dry_run": args.dry_run, "iters": args.iters,
                                "batch": args.batch, "lora": args.lora, "mixed_precision": "bf16",
                                "gradient_checkpointing": not args.no_checkpointing, "unet": DRY_UNET if args.dry_run else SDXL_UNET},
                   "results": results, "table": table, "wall_s": time.perf_counter() - started}
        print(f"wrote {write_json(out, payload)}")
    if any("error" in r for r in results.values()):
        raise SystemExit("some configs failed: see the error column")


if __name__ == "__main__":
    main()
