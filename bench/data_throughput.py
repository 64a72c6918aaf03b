"""CPU benchmark of the data path: prepare images/s, and the per-step data cost from a prepare cache
vs from raw images, on the tiny SDXL teacher with aspect-ratio buckets.

    python bench/data_throughput.py --images 64 --steps 8

A synthetic LAION-like folder: JPEGs of mixed aspect ratios (sides 320-720 px) with captions. Measured:
- prepare: `trainer.prepare.prepare` over the folder (decode, bucket fit, VAE posterior, both text
  encoders), images/s;
- data path per step, the work a training step does before its networks run, per micro-batch:
  `next(batches)` (raw: decode + resize + crop; cache: safetensors reads) + `Distiller._micro` (raw: both
  text encoders; cache: embedding lookups) + DMD2's real latents (raw: VAE encode; cache: a posterior sample);
- steps/s: whole `Distiller.step` iterations (flash, TTUR 1) fed from each, data loading inside the clock,
  alternated raw/cache step by step so load from other processes hits both alike.
Each is timed in wall seconds and in CPU seconds of this process (all threads); the ratios use CPU seconds,
the cost measure that other processes on a shared machine do not inflate. Warm-up covers one epoch of data
(every bucket shape) and three steps.
The tiny teacher makes the networks cheap, so the step ratio is much smaller than the data-path ratio; on a
full-size SDXL the data-path saving is the same work, but a smaller share of a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, machine_info, write_json

BUCKETS = {"enabled": True, "step": 8, "target_pixels": 1024, "crop": "random"}


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs (smooth colour fields plus noise, so they compress like photos) and captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(320, 720, size=2))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) / w + yy / h) * 80 for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text(f"a photo number {i} of a {['cat', 'dog', 'house', 'tree'][i % 4]}")
    return root


def spec(teacher: str, data: dict, mode: str, batch: int) -> Any:
    from trainer.jobspec import parse_spec

    return parse_spec({
        "model": {"teacher": teacher}, "data": data,
        "distill": {"mode": mode, "discriminator": {"backbone": "tiny", "head_channels": 32}},
        "train": {"batch_size": batch, "mixed_precision": "no", "seed": 0}})


def build(cfg: Any) -> tuple[Any, Any]:
    """(Distiller, batch iterator) as trainer/loop.py sets them up."""
    import torch
    from accelerate import Accelerator

    from trainer.data import build_dataset, sharded_batches
    from trainer.datacache import attach_cache
    from trainer.distill import Distiller
    from trainer.loop import data_preprocess
    from trainer.models import load_teacher

    teacher = load_teacher(cfg.model)
    ds = build_dataset(cfg.data, teacher.resolution, cfg.train.seed)
    if cfg.data.cache:
        attach_cache(ds, teacher, data_preprocess(cfg, teacher.resolution))
    torch.manual_seed(0)
    return Distiller.for_job(cfg, teacher, Accelerator(cpu=True)), sharded_batches(ds, cfg.train.batch_size, 0)


def timed(fn: Any) -> tuple[float, float]:
    """(wall s, CPU s of this process, all threads): on a shared machine the CPU time is the cost measure,
    since the wall time also counts the waits for cores that other processes hold."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def data_path_seconds(distiller: Any, batches: Any, n: int) -> list[tuple[float, float]]:
    """Per micro-batch: load + text conditioning + real latents (what a step spends on data)."""
    from trainer.micro import real_latents

    def one() -> None:
        (mb,) = next(batches)
        real_latents(distiller.teacher, distiller.micro_batches(mb, 0)[0])

    return [timed(one) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per data path")
    ap.add_argument("--data-steps", type=int, default=16, help="timed data-path micro-batches per data path")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_throughput.json"))
    args = ap.parse_args()

    import torch

    from trainer.data import resolve_buckets
    from trainer.models import load_teacher
    from trainer.prepare import prepare
    from trainer.tiny import tiny_pipeline_dir

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        teacher_dir = str(tiny_pipeline_dir("sdxl", cache_root=tmp_path / "tiny"))
        folder = make_folder(tmp_path / "imgs", args.images)
        raw_cfg = spec(teacher_dir, {"images": str(folder), "buckets": BUCKETS}, "dmd2", args.batch)
        teacher = load_teacher(raw_cfg.model)
        sizes = resolve_buckets(raw_cfg.data.buckets, teacher.resolution)
        res = prepare(str(folder), tmp_path / "cache", teacher, buckets=sizes, crop="random", seed=0,
                      batch=16, shard_size=32)
        cache_cfg = spec(teacher_dir, {"cache": str(tmp_path / "cache"), "buckets": BUCKETS}, "dmd2", args.batch)

        data: dict[str, list[float]] = {}
        for name, cfg in (("raw", raw_cfg), ("cache", cache_cfg)):
            d, batches = build(cfg)
            # Warm-up over a whole epoch: the first VAE call at each bucket's shape is slow (kernel setup),
            # which only the raw path pays; timing it would flatter the cache.
            data_path_seconds(d, batches, args.images // args.batch)
            data[name] = data_path_seconds(d, batches, args.data_steps)

        runs = {name: build(spec(teacher_dir, cfg.data.model_dump(), "flash", args.batch))
                for name, cfg in (("raw", raw_cfg), ("cache", cache_cfg))}
        step_s: dict[str, list[tuple[float, float]]] = {"raw": [], "cache": []}
        warm = 3  # the first steps meet new bucket shapes
        for step in range(args.steps + warm):
            for name, (d, batches) in runs.items():
                t = timed(lambda d=d, batches=batches, step=step: d.step(next(batches), step))
                if step >= warm:
                    step_s[name].append(t)

    med = {k: statistics.median(c for _, c in v) for k, v in data.items()}  # CPU s
    med_wall = {k: statistics.median(w for w, _ in v) for k, v in data.items()}
    steps_per_s = {k: 1.0 / statistics.median(c for _, c in v) for k, v in step_s.items()}  # per CPU s
    steps_per_wall_s = {k: 1.0 / statistics.median(w for w, _ in v) for k, v in step_s.items()}
    result = {
        "command": command_line(), "machine": machine_info(),
        "setup": {"teacher": "tiny:sdxl (32 px, random weights)", "images": args.images, "batch": args.batch,
                  "image_sides_px": [320, 720], "buckets": BUCKETS, "bucket_count": len(sizes)},
        "prepare": {"images": res.written, "seconds": res.seconds, "images_per_s": res.images_per_s,
                    "skipped": len(res.skipped)},
        "data_path_cpu_s_per_micro_batch": {"raw_median": med["raw"], "cache_median": med["cache"]},
        "data_path_wall_s_per_micro_batch": {"raw_median": med_wall["raw"], "cache_median": med_wall["cache"]},
        "data_path_all_wall_cpu_s": data,
        "data_path_ratio_raw_over_cache": med["raw"] / med["cache"],
        "train_steps_per_cpu_s": steps_per_s, "train_steps_per_wall_s": steps_per_wall_s,
        "train_steps_all_wall_cpu_s": step_s,
        "step_ratio_cache_over_raw": steps_per_s["cache"] / steps_per_s["raw"],
        "goal": "data path >= 3x cheaper per step from the cache",
        "goal_met": med["raw"] / med["cache"] >= 3.0,
    }
    write_json(args.out, result)
    print(format_table(["measure", "raw images", "cache", "ratio"], [
        ["data path CPU s / micro-batch (median)", med["raw"], med["cache"], med["raw"] / med["cache"]],
        ["data path wall s / micro-batch (median)", med_wall["raw"], med_wall["cache"],
         med_wall["raw"] / med_wall["cache"]],
        ["train steps per CPU s (flash, median)", steps_per_s["raw"], steps_per_s["cache"],
         steps_per_s["cache"] / steps_per_s["raw"]],
        ["train steps per wall s (flash, median)", steps_per_wall_s["raw"], steps_per_wall_s["cache"],
         steps_per_wall_s["cache"] / steps_per_wall_s["raw"]],
        ["prepare images/s", None, res.images_per_s, None],
    ]))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
