"""The demo's latency, like for like: teacher and student through one sampler function and one batch,
and the HTTP path's overhead on a line of its own.

Every row goes through `trainer.toy.teacher_sampling.generate` (the trainer's `sample` loop plus a VAE decode) on the
same labels and seeds at the same batch size; the student runs as its own `Teacher` (the checkpoint's
generator in the teacher's pipeline), without CFG and on its trained timesteps, as /generate samples it. The
HTTP line is a warm single-image POST /generate (median) minus the same image sampled locally at batch 1:
what a client pays for the service around the model (auth, validation, queueing, thread hops, PNG, transport).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import click
import httpx
import torch

BATCH = 250  # what score_run samples its evaluation sets with
ROWS = ("teacher 50-step CFG", "teacher 4-step renoise", "student 4-step")


def _per_image(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n


def time_samplers(checkpoint: str | Path, *, batch: int = BATCH, single: int = 10) -> dict[str, dict[str, float]]:
    """Seconds per image of the teacher's two samplers and the student's, at `batch` and at batch 1."""
    from inference.pipeline import load_pipeline
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.toy.teacher_sampling import generate

    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    student = load_pipeline(checkpoint)
    labels = torch.arange(batch) % 10
    samplers = {
        "teacher 50-step CFG": lambda lab, b: generate(teacher, lab, method="euler", steps=50, batch=b),
        "teacher 4-step renoise": lambda lab, b: generate(teacher, lab, method="renoise", batch=b),
        "student 4-step": lambda lab, b: generate(student.teacher, lab, method="renoise", guidance=1.0,
                                                  timesteps=list(student.info.timesteps), batch=b),
    }
    rows: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, run in samplers.items():
            run(labels[:2], 2)  # first-call costs (allocator, kernel choice) are not per-image latency
            rows[name] = {"batched_s": _per_image(lambda r=run: r(labels, batch), batch),
                          "batch1_s": _per_image(lambda r=run: [r(labels[i:i + 1], 1) for i in range(single)],
                                                 single)}
        # The HTTP line's baseline: the very pipeline call /generate makes (one prompt, one seed, the checkpoint's
        # own sampler), in-process. The toy sampler above also embeds labels and runs its own loop, so it is not
        # what a request pays for (it came out slower than a whole warm request).
        from trainer.toy.prompts import digit_prompt

        student.generate([digit_prompt(0)], [0])
        rows["student 4-step"]["service_batch1_s"] = statistics.median(
            _per_image(lambda i=i: student.generate([digit_prompt(i % 10)], [i]), 1) for i in range(single))
    return rows


def http_seconds(url: str, token: str, job_id: str, requests: int = 10) -> float:
    """Median seconds of a warm single-image POST /generate (two calls first: load and warm-up)."""
    from trainer.toy.prompts import digit_prompt

    times = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        for i in range(requests + 2):
            body = {"job": job_id, "prompt": digit_prompt(i % 10), "seed": i}
            while True:
                t0 = time.perf_counter()
                res = client.post("/generate", json=body)
                if res.status_code not in (429, 503):
                    break
                # The per-token rate limit (the demo's own grid calls came first) or a busy queue: wait as told,
                # and time only the answered attempt, which is the request's latency.
                time.sleep(float(res.headers.get("Retry-After", "1")))
            res.raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def report(summary: dict[str, Any], rows: dict[str, dict[str, float]], http_p50: float, batch: int) -> dict[str, Any]:
    """Put the batched seconds per image into `summary["table"]` (the rows it has); print and return the report."""
    local = rows["student 4-step"].get("service_batch1_s", rows["student 4-step"]["batch1_s"])
    out = {"batch": batch, "rows": rows, "http": {"p50_s": http_p50, "student_local_batch1_s": local,
                                                  "overhead_s": http_p50 - local}}
    for name in ROWS:
        if name in summary.get("table", {}):
            summary["table"][name]["latency_s"] = rows[name]["batched_s"]
    click.echo(f"\nlatency, like for like (one sampler function, same labels and seeds; s/image)\n"
               f"{'sampler':<24}{f'batch {batch}':>12}{'batch 1':>10}")
    for name, r in rows.items():
        click.echo(f"{name:<24}{r['batched_s']:>12.5f}{r['batch1_s']:>10.4f}")
    click.echo(f"{'HTTP /generate overhead':<24}{'':>12}{out['http']['overhead_s']:>10.4f}   (one warm request "
               f"{http_p50:.4f} s minus the same pipeline call in-process, {local:.4f} s)")
    return out


def like_for_like(summary: dict[str, Any], url: str, token: str, job_id: str, checkpoint: str | Path, *,
                  batch: int = BATCH) -> dict[str, Any]:
    """The demo's call: time the samplers and the HTTP path, update the table, print, return the report."""
    return report(summary, time_samplers(checkpoint, batch=batch), http_seconds(url, token, job_id), batch)
