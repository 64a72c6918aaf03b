"""Score a digits distillation run: teacher 50-step / teacher 4-step / student 4-step, FD over steps, plots.

Shared by `flashdmd demo` and `bench/quality_vs_cost.py`. All sample sets use the same labels and the same
per-image seeds (image i: seed i), so rows differ only in the sampler. It lives in flashjob/, above trainer/ and
inference/, because it samples a checkpoint through inference's loader and scores with the trainer's toy evaluator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from trainer.jobspec import ModelSpec
from trainer.models import load_teacher
from trainer.toy.evaluate import default_evaluator
from trainer.toy.prompts import digit_prompt
from trainer.toy.reference import teacher_features, teacher_reference
from trainer.toy.teacher_sampling import eval_labels, generate

SEED = 0
T = TypeVar("T")


def _timed(fn: Callable[[], T], n: int) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) / max(n, 1)


def student_samples(checkpoint: str | Path, labels: Tensor, batch: int = 250) -> Tensor:
    """The checkpoint's K-step samples for `labels` (image i: seed i), decoded to [-1, 1]."""
    from inference.pipeline import load_pipeline

    pipe = load_pipeline(checkpoint)
    out = []
    for lo in range(0, len(labels), batch):
        lab = labels[lo:lo + batch].tolist()
        lat = pipe.latents([digit_prompt(c) for c in lab], [SEED * 1_000_003 + lo + j for j in range(len(lab))])
        out.append(pipe.decode(lat).clamp(-1, 1))
    return torch.cat(out)


def score_run(*, checkpoints: list[dict[str, Any]], student_grid: Tensor, seeds: list[int], per_class: int,
              student_latency: float, out: Path, guidance: float) -> dict[str, Any]:
    """`guidance`: the CFG the student was distilled with (`distill.real_guidance`). Every teacher row and the FD
    vs teacher reference are sampled at it, so "FD vs T50" measures distance to the teacher the student learnt."""
    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    ev = default_evaluator()
    reference = teacher_reference(teacher, ev, per_class=per_class, guidance=guidance, progress=True)
    labels = eval_labels(per_class)
    n = len(labels)
    # The teacher's 50-step samples are deterministic and cost more than the rest of scoring together: their
    # features come from the shipped (or cached) file for this teacher + evaluator + sampler settings.
    t50_features = teacher_features(teacher, ev, per_class=per_class, guidance=guidance, seed=SEED, progress=True)
    t4, lat4 = _timed(lambda: generate(teacher, labels, method="renoise", guidance=guidance, seed=SEED,
                                       progress=True), n)
    d4, latd4 = _timed(lambda: generate(teacher, labels, method="ddim", guidance=guidance, seed=SEED, progress=True), n)
    grid_labels = torch.arange(10)
    # The grid's ten 50-step images are sampled anyway: they give the row's latency (a batch of 10, not 250).
    grid50, lat50 = _timed(lambda: generate(teacher, grid_labels, method="euler", steps=50, guidance=guidance,
                                            seed=SEED), 10)
    table = {
        "teacher 50-step CFG": {**ev.report_features(t50_features, labels, reference), "latency_s": lat50,
                                "latency_batch": 10},
        "teacher 4-step DDIM": {**ev.report(d4, labels, reference), "latency_s": latd4},
        "teacher 4-step renoise": {**ev.report(t4, labels, reference), "latency_s": lat4},
    }
    fd_over_steps = []
    for ck in sorted(checkpoints, key=lambda c: c["step"]):
        rep = ev.report(student_samples(ck["path"], labels), labels, reference)
        fd_over_steps.append({"step": ck["step"], **rep})
    table["student 4-step"] = {**fd_over_steps[-1], "latency_s": student_latency}
    grid = torch.cat([grid50, generate(teacher, grid_labels, method="renoise", guidance=guidance, seed=SEED),
                      student_grid])
    best_teacher4 = min(table["teacher 4-step DDIM"]["fd_real"], table["teacher 4-step renoise"]["fd_real"])
    return {"table": table, "fd_over_steps": fd_over_steps, "per_class": per_class, "seeds": seeds,
            "student_beats_teacher_4step": table["student 4-step"]["fd_real"] < best_teacher4,
            "teacher_guidance": guidance, "real_baselines": ev.real_baselines(), "_grid": grid}


GRID_ROWS = ("teacher 50-step CFG", "teacher 4-step", "student 4-step")


def save_grid(images: Tensor, path: Path, cols: int = 10, rows: tuple[str, ...] = GRID_ROWS) -> None:
    """Rows: teacher 50-step, teacher 4-step (renoise), student 4-step (digits 0-9), upscaled 2x, each row
    named in a left margin so the PNG reads on its own."""
    from PIL import Image, ImageDraw

    from trainer.sampling import image_grid

    grid = image_grid(images, cols=cols)
    grid = grid.resize((grid.width * 2, grid.height * 2))
    margin, row_h = 130, grid.height // len(rows)
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(rows):
        draw.text((6, i * row_h + row_h // 2 - 6), name, fill="black")
    canvas.save(path)


def plot_curves(curves: dict[str, list[tuple[int, float]]], fd_over_steps: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            axes[0].plot(xs, ys, label=key, linewidth=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("losses")
    axes[0].legend()
    steps = [r["step"] for r in fd_over_steps]
    axes[1].plot(steps, [r["fd_real"] for r in fd_over_steps], "o-", label="FD vs real")
    axes[1].plot(steps, [r["fd_teacher"] for r in fd_over_steps], "s-", label="FD vs teacher 50-step")
    axes[1].set_xlabel("step")
    axes[1].set_title("student digits-FD")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
