"""GPU benchmark of the memory levers (issue #10 §2): SDXL architecture, 1024², bf16, batch 1, each lever alone and
all together, stage 1 and stage 2, with peak allocated/reserved memory beside `flashdmd plan`'s prediction.

    pip install -e '.[gpu]' && python bench/gpu_train_step.py            # one command, < 8 min on an H100
    python bench/gpu_train_step.py --configs s1-all,s2-all --iters 10      # a subset, longer timing
    python bench/gpu_train_step.py --dry-run                               # CPU, scaled-down, end to end

Random weights throughout, built in memory from the configs in trainer/arch/sdxl-base (the same ones
`flashdmd plan` counts: SDXL base 1.0's UNet, VAE and both full-depth CLIP text encoders; the tokenizer is the
tiny CLIP BPE one, which only changes the token ids). The Pixel-GAN is a SAM ViT-L with random weights (the
trainer needs a checkpoint, so `trainer.discriminator.build_discriminator` is patched for the benchmark only).
Spec: flash TTUR 1 (presets/sdxl-4step.yaml's method), gradient checkpointing, digits captions, random [-1, 1]
real images. Each config runs in turn on a fresh teacher: build, `--warmup` iterations, then `--iters` timed
iterations between torch.cuda.synchronize() calls. Peaks are torch.cuda.max_memory_allocated/reserved over the
whole config. A config that runs out of memory is recorded as such (its peak is where it stopped).

Configs (levers are `memory.*` / `optim.optimizer` values, see trainer/config.py):
  s1-baseline    none (today's trainer: fp32 AdamW, text encoders on the GPU, ...): ~89 GiB, so an 80 GB
                 card records an OOM here; run on an H200 for the baseline's time (the issue's "15% slower" goal)
  s1-<lever>     that lever alone: adamw8bit, text-cache, vae-ckpt, sam-sdpa
  s1-all         all of them (presets/sdxl-4step.yaml at batch 1)
  s2-stage1      stage 2 (joint RL, ratio 5, the untrained LRM reward) with the stage-1 levers only
  s2-all         plus ref_bf16, reward_bf16 and the shared RL optimiser (presets/sdxl-rl-4step.yaml at batch 1)
bitsandbytes must be installed for the adamw8bit configs (`pip install 'flashdmd[gpu]'`); without it they record
the trainer's error and the others run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import REPO, StepTimes, command_line, format_table, machine_info, write_json

GIB = 2.0**30
ARCH_DIR = REPO / "trainer" / "arch"  # the configs `flashdmd plan` ships (trainer.plan.ARCH_DIR)

LEVERS: dict[str, dict[str, Any]] = {
    "adamw8bit": {"optim": {"optimizer": "adamw8bit"}},
    "text-cache": {"memory": {"text_cache": True}},
    "vae-ckpt": {"memory": {"vae_decode_checkpointing": True}},
    "sam-sdpa": {"memory": {"sam_sdpa": True}},
}
RL_LEVERS = {"memory": {"ref_bf16": True, "reward_bf16": True, "rl_optimizer": "shared"}}
CONFIGS = ["s1-baseline", *(f"s1-{k}" for k in LEVERS), "s1-all", "s2-stage1", "s2-all"]
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


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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


def spec_for(name: str, res: int, batch: int, cpu: bool = False) -> Any:
    """The config's spec. cpu (--dry-run): adamw stands in for adamw8bit, which needs CUDA."""
    from trainer.config import parse_spec

    raw: dict[str, Any] = {
        "kind": "rl" if name.startswith("s2") else "distill", "name": name,
        "model": {"teacher": "random:sdxl-architecture", "family": "sdxl", "resolution": res},
        "data": {"builtin": "digits"}, "schedule": {"num_steps": 4},
        "distill": {"mode": "flash", "real_guidance": 8.0,
                    "discriminator": {"backbone": "vit_l", "img_size": 1024 if res >= 1024 else 64}},
        "train": {"batch_size": batch, "mixed_precision": "bf16", "gradient_checkpointing": True, "seed": 0}}
    lever = name.split("-", 1)[1]
    if lever in ("all", "stage1"):
        for extra in LEVERS.values():
            raw = _merge(raw, extra)
    elif lever in LEVERS:
        raw = _merge(raw, LEVERS[lever])
    if name == "s2-all":
        raw = _merge(raw, RL_LEVERS)
    if cpu and raw.get("optim", {}).get("optimizer") == "adamw8bit":
        raw["optim"]["optimizer"] = "adamw"
    if raw["kind"] == "rl":  # the untrained reward's gaps are tiny: keep every pair, so every RL update runs
        raw["rl"] = {"threshold_min": -1.0, "threshold_max": -1.0, "batch_size": batch, "ratio": 5}
    return parse_spec(raw)


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

    from trainer.data import digit_prompt

    g = torch.Generator().manual_seed(0)
    for i in range(10**9):
        yield {"image": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
               "caption": [digit_prompt((i * batch + j) % 10) for j in range(batch)]}


def run_config(name: str, args: argparse.Namespace, device: str, folder: Path, tmp: Path) -> dict[str, Any]:
    import torch

    from trainer.data import digit_prompt
    from trainer.distill import Distiller
    from trainer.loop import _accelerator
    from trainer.memory import reward_for_training
    from trainer.optim import check_runtime
    from trainer.plan import load_arch, make_plan
    from trainer.textcache import build_text_cache, use_text_cache

    cuda = device == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict[str, Any] = {}
    teacher = distiller = trainer = acc = reward = lrm = None
    try:
        cfg = spec_for(name, 64 if args.dry_run else 1024, args.batch, cpu=args.dry_run)
        plan = make_plan(cfg, gpus=1, gpu_mem_gib=args.gpu_mem_gib, arch=load_arch(str(folder)))
        out.update(plan_alloc_gib=plan.peak_allocated_gib, plan_reserved_gib=plan.reserved_gib,
                   plan_rows={r.component: r.bytes / GIB for r in plan.rows})
        if cuda:  # return the previous config's cached blocks first, or they count in this one's reserved peak
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            out["start_alloc_gib"] = torch.cuda.memory_allocated() / GIB
        check_runtime(cfg)
        teacher = build_teacher(folder, device, tmp)
        acc = _accelerator(cfg)
        torch.manual_seed(cfg.train.seed)
        if cfg.kind == "rl":  # built before the Distiller casts the teacher, as trainer/rl_loop.py does
            from trainer.reward import LatentRewardModel

            lrm = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution)
            reward = reward_for_training(lrm.to(device).requires_grad_(False).eval(), cfg, acc)
        if cfg.memory.text_cache:
            use_text_cache(teacher, build_text_cache(teacher, [digit_prompt(i) for i in range(10)], tmp / name))
        with random_sam_discriminator(args.dry_run):
            distiller = Distiller(cfg, teacher, acc)
        if cfg.kind == "rl":
            from trainer.rl import JointRL

            trainer = JointRL(cfg, distiller, reward, acc)
        if cuda:
            out["after_build_alloc_gib"] = torch.cuda.memory_allocated() / GIB
        batches = random_batches(args.batch, teacher.resolution)
        times = StepTimes(1 if cfg.kind == "distill" else cfg.rl.ratio)

        def one(step: int, timed: bool) -> None:
            batch = next(batches)
            sync()
            t0 = time.perf_counter()
            if trainer is None:
                logs = distiller.step(batch, step)
                turn = bool(logs.get("generator_turn"))
            else:
                logs = trainer.step(list(batch["caption"]), step, lambda: next(batches))
                turn = step % cfg.rl.ratio == 0  # a cycle: ratio RL updates, the last with a distillation turn
            sync()
            if timed:
                times.seconds.append(time.perf_counter() - t0)
                times.turns.append(turn)

        warm = args.warmup if cfg.kind == "distill" else cfg.rl.ratio * min(args.warmup, 1)
        for s in range(warm):
            one(s, False)
        n = args.iters if cfg.kind == "distill" else cfg.rl.ratio * max(1, args.iters // cfg.rl.ratio)
        for s in range(warm, warm + n):
            one(s, True)
        out["timing"] = times.summary()
    except Exception as err:  # OOM, a missing library, a trainer error: record it and go on
        out["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    finally:
        if cuda:
            out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            if "plan_alloc_gib" in out:
                out["plan_error_alloc"] = out["plan_alloc_gib"] / out["peak_alloc_gib"] - 1
                out["plan_error_reserved"] = out["plan_reserved_gib"] / out["peak_reserved_gib"] - 1
        teacher = distiller = trainer = acc = reward = lrm = None  # noqa: F841 (drop every reference first)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per config (default 4; dry run 1)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (stage 2: one RL cycle)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="the card the plan's verdict is for")
    ap.add_argument("--dry-run", action="store_true", help="CPU, scaled-down models; writes only with --out")
    ap.add_argument("--out", default=None, help="default: bench/results/memory_levers_gpu.json (not in --dry-run)")
    args = ap.parse_args()
    import torch

    if args.iters is None:
        args.iters = 1 if args.dry_run else 4
    if args.dry_run:
        device = "cpu"
        args.warmup = min(args.warmup, 1)
        print("dry run: adamw stands in for adamw8bit (bitsandbytes' kernels need CUDA)", flush=True)
        torch.set_num_threads(1)  # scaled-down models: one thread avoids OpenMP stalls on a busy small machine
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train_step.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run it with --dry-run to check the code path on CPU")
    else:
        device = "cuda"
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in wanted if c not in CONFIGS]
    if bad or not wanted:
        raise SystemExit(f"--configs: unknown {bad}; choose from {CONFIGS}")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="flashdmd-gpu-bench-") as tmp:
        folder = arch_folder(args.dry_run, Path(tmp))
        for name in wanted:
            print(f"[{name}] {'dry run (CPU, scaled down)' if args.dry_run else 'SDXL architecture, 1024²'}",
                  flush=True)
            results[name] = r = run_config(name, args, device, folder, Path(tmp))
            print(f"  {r.get('error') or r['timing']['s_per_iter_median']} s/iter; peak "
                  f"{r.get('peak_alloc_gib', float('nan')):.1f} GiB (plan {r.get('plan_alloc_gib', float('nan')):.1f})",
                  flush=True)
    base = results.get("s1-baseline", {}).get("timing")
    rows = []
    for name, r in results.items():
        t = r.get("timing", {})
        slower = t["s_per_gen_update_median"] / base["s_per_gen_update_median"] if t and base else None
        rows.append([name, t.get("s_per_iter_median"), t.get("s_per_gen_update_median"), slower,
                     r.get("peak_alloc_gib"), r.get("plan_alloc_gib"), r.get("plan_error_alloc"),
                     r.get("peak_reserved_gib"), r.get("plan_reserved_gib"), r.get("plan_error_reserved"),
                     r.get("error")])
    table = format_table(["config", "s/iter (med)", "s/G-update (med)", "vs s1-baseline", "peak alloc GiB",
                          "plan alloc GiB", "plan err", "peak reserved GiB", "plan reserved GiB", "plan err",
                          "error"], rows)
    print(table)
    out = args.out or (None if args.dry_run else str(REPO / "bench" / "results" / "memory_levers_gpu.json"))
    if out:
        payload = {"benchmark": "memory_levers_gpu", "command": command_line(), "machine": machine_info(),
                   "settings": {"dry_run": args.dry_run, "iters": args.iters, "warmup": args.warmup,
                                "batch": args.batch, "mixed_precision": "bf16", "gradient_checkpointing": True,
                                "arch": str(folder) if args.dry_run else "trainer/arch/sdxl-base"},
                   "results": results, "table": table, "wall_s": time.perf_counter() - started}
        print(f"wrote {write_json(out, payload)}")


if __name__ == "__main__":
    main()
