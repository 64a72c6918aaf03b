"""CPU benchmark of the few-step sampler: overhead over its lower bound, speed-up over the teacher, encoding.

    python bench/sampler_cpu.py --models tiny,small --rounds 15

Models: random-weight SDXL-format pipelines, `tiny` (the `tiny:sdxl` teacher, 32 px) and `small` (bench/
train_step.py's teacher: the tiny pipeline with an SDXL-shaped UNet of width 64-128-256, 64 px). The
generator is a checkpoint in the trainer's layout (the teacher's UNet, perturbed), loaded through
`inference.pipeline.load_pipeline`, the service's own path.

Per model and K (4 and 8), in one process, with the rounds interleaved so that load from other processes
hits every measurement alike (medians reported):
  k_step       `FewStepPipeline.latents` (given the text conditioning) + VAE decode: the sampler
  lower_bound  K bare generator forwards on a prepared input + one VAE decode
  ratio        k_step / lower_bound                         (target <= 1.10)
  end_to_end   `FewStepPipeline.generate` from the prompt (adds text encoding, uint8 conversion)
and, for K = 4, the teacher's own diffusers pipeline at 50 steps with CFG (guidance 5, its Euler scheduler),
end to end from the prompt, against our end to end    (target: >= 20x faster). CFG batches the conditional
and unconditional inputs, and a batch of 2 costs c(2) < 2 c(1), so the UNet-only bound on that speed-up is
50 c(2) / (4 c(1)); `speedup_bound` reports it from measured c(1), c(2).
Encoding: PNG/JPEG/WebP time of one generated image at the model's size and upscaled to 1024^2.
Results go to bench/results/inference.json under "cpu" (bench/gpu_generate.py writes "gpu").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, machine_info, write_json

RESULTS = REPO / "bench" / "results" / "inference.json"
PROMPT = "a handwritten digit seven"
STEP_SETS = {8: [999, 874, 749, 624, 499, 374, 249, 124]}
TEACHER_STEPS, TEACHER_CFG = 50, 5.0


def _median_times(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Interleave the functions round by round; median wall time of each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: allocator, lazy inits
        fn()
    for r in range(rounds):
        order = list(fns)
        order = order[r % len(order):] + order[: r % len(order)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(model: str, tmp: Path, rounds: int, teacher_rounds: int) -> dict[str, Any]:
    import torch
    from train_step import teacher_dir

    from inference.pipeline import load_pipeline
    from inference.testing import make_checkpoint
    from trainer.models import pipeline_class, predict

    teacher = teacher_dir(model, tmp)
    unet_cfg = json.loads((Path(teacher) / "unet" / "config.json").read_text())
    vae_cfg = json.loads((Path(teacher) / "vae" / "config.json").read_text())
    res = unet_cfg["sample_size"] * 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    ckpt = make_checkpoint(tmp / f"run-{model}", "sdxl", Path(teacher), resolution=res, step_sets=STEP_SETS)
    pipe = load_pipeline(ckpt)
    cond = pipe.encode([PROMPT], res, res)
    out: dict[str, Any] = {"resolution": res, "unet_params_m": sum(p.numel() for p in pipe.net.parameters()) / 1e6,
                           "per_k": {}}
    x = torch.randn(1, pipe.geometry.latent_channels, res // pipe.geometry.vae_scale, res // pipe.geometry.vae_scale)

    def bound(ts: list[int]) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                for t in ts:
                    predict(pipe.net, x, torch.full((1,), t, dtype=torch.long), cond, pipe.param)
                pipe.decode(x)
        return run

    for k in (4, 8):
        ts = pipe.info.timesteps_for(k)
        t = _median_times({
            "k_step": lambda k=k: pipe.decode(pipe.latents([PROMPT], [0], steps=k, cond=cond)),
            "lower_bound": bound(ts),
            "end_to_end": lambda k=k: pipe.generate([PROMPT], [0], steps=k),
        }, rounds)
        t["ratio"] = t["k_step"] / t["lower_bound"]
        out["per_k"][str(k)] = t
    out["text_encode_s"] = _median_times({"enc": lambda: pipe.encode([PROMPT], res, res)}, rounds)["enc"]

    # The teacher as a user would run it: its own pipeline and scheduler, 50 steps, CFG (a batch of 2 per step).
    teacher_pipe = pipeline_class("sdxl").from_pretrained(teacher)
    teacher_pipe.set_progress_bar_config(disable=True)
    t = _median_times({
        "teacher_50_cfg": lambda: teacher_pipe(PROMPT, num_inference_steps=TEACHER_STEPS, guidance_scale=TEACHER_CFG,
                                               output_type="np", generator=torch.Generator().manual_seed(0)),
        "ours_k4": lambda: pipe.generate([PROMPT], [0], steps=4),
    }, teacher_rounds)
    t["speedup"] = t["teacher_50_cfg"] / t["ours_k4"]
    # What bounds the speed-up: CFG runs the UNet on a batch of 2, which costs less than two batch-1 calls,
    # so even with free text encoding and decoding it is 50 * c(2) / (4 * c(1)), not 50 * 2 / 4 = 25.
    x2, cond2 = torch.cat([x, x]), cond.map(lambda v: torch.cat([v, v]))

    def fwd(xx: Any, cc: Any) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                predict(pipe.net, xx, torch.full((xx.shape[0],), 999, dtype=torch.long), cc, pipe.param)
        return run

    c = _median_times({"b1": fwd(x, cond), "b2": fwd(x2, cond2)}, rounds)
    t.update(unet_batch1_s=c["b1"], unet_batch2_s=c["b2"],
             speedup_bound=TEACHER_STEPS * c["b2"] / (4 * c["b1"]))
    out["vs_teacher"] = t
    out["encode"] = bench_encode(pipe.generate([PROMPT], [0])[0], rounds)
    return out


def bench_encode(image: Any, rounds: int) -> dict[str, dict[str, float]]:
    import numpy as np
    from PIL import Image

    from inference.images import MEDIA_TYPES, encode_image

    big = np.asarray(Image.fromarray(image).resize((1024, 1024), Image.BICUBIC))
    out: dict[str, dict[str, float]] = {}
    for label, img in ((f"{image.shape[1]}px", image), ("1024px", big)):
        times = _median_times({f: (lambda f=f, img=img: encode_image(img, f)) for f in MEDIA_TYPES}, rounds)
        for f in MEDIA_TYPES:
            out.setdefault(f, {})[f"{label}_ms"] = times[f] * 1e3
            out[f][f"{label}_kb"] = len(encode_image(img, f)) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per measurement (median)")
    ap.add_argument("--teacher-rounds", type=int, default=3, help="rounds for the 50-step teacher comparison")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on a shared small machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            print(f"== {model}", file=sys.stderr, flush=True)
            models[model] = bench_model(model, Path(tmp), args.rounds, args.teacher_rounds)

    rows = []
    for model, r in models.items():
        for k, t in r["per_k"].items():
            vs = r["vs_teacher"] if k == "4" else {}
            rows.append([model, r["resolution"], k, t["k_step"] * 1e3, t["lower_bound"] * 1e3, t["ratio"],
                         t["end_to_end"] * 1e3, vs.get("teacher_50_cfg", 0) * 1e3 or None, vs.get("speedup"),
                         vs.get("speedup_bound")])
    print(format_table(["model", "px", "K", "k_step ms", "lower bound ms", "ratio (<=1.10)", "end to end ms",
                        "teacher 50+CFG ms", "speed-up (>=20)", "UNet-only bound"], rows))
    enc_rows = [[m, f, v[k1], v[k2]] for m, r in models.items() for f, v in r["encode"].items()
                for k1, k2 in [tuple(x for x in v if x.endswith("_ms"))]]
    print(format_table(["model", "format", "small ms", "1024px ms"], enc_rows))

    payload = json.loads(args.out.read_text()) if args.out.exists() else {}
    payload["cpu"] = {"command": command_line(), "machine": machine_info(), "threads": args.threads,
                      "rounds": args.rounds, "prompt": PROMPT, "teacher": {"steps": TEACHER_STEPS, "cfg": TEACHER_CFG},
                      "models": models,
                      "targets": {"ratio_max": 1.10, "speedup_min_k4": 20.0}}
    print(f"wrote {write_json(args.out, payload)}", file=sys.stderr)


if __name__ == "__main__":
    main()
