"""Shared pieces of the training-step benchmarks (bench/train_step.py, bench/gpu_train_step.py).

A benchmark "config" is one distillation mode at one TTUR: flash TTUR 1, flash TTUR 2 and dmd2 TTUR 5. For
each, `Distiller.step(batch, step)` runs one loop iteration (one fake-score update); the generator updates
only when `step % ttur == 0`, so a *generator cycle* is `ttur` consecutive iterations starting at a
generator turn, and "seconds per generator update" is the time of one cycle.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

from trainer.cli import configure_process  # noqa: E402
from trainer.jobspec import DistillJob, parse_spec  # noqa: E402

configure_process()  # a bench script is a process entry: $FLASHDMD_CACHE (where tiny teachers are built), roots

CONFIGS: tuple[tuple[str, int], ...] = (("flash", 1), ("flash", 2), ("dmd2", 5))
BASELINE = "dmd2-ttur5"


def config_name(mode: str, ttur: int) -> str:
    return f"{mode}-ttur{ttur}"


def make_spec(teacher: str, mode: str, ttur: int, batch: int, *, mixed_precision: str = "no",
              gradient_checkpointing: bool = False, discriminator: dict[str, Any] | None = None,
              lora: int | None = None, resolution: int | None = None) -> DistillJob:
    """A validated job spec: digits data, 4-step schedule, the given mode/TTUR; everything else default."""
    distill: dict[str, Any] = {"mode": mode, "ttur": ttur}
    if discriminator is not None and mode == "flash":
        distill["discriminator"] = discriminator
    model: dict[str, Any] = {"teacher": teacher, "family": "sdxl", "resolution": resolution}
    if lora:
        model["lora"] = {"rank": lora}
    return parse_spec({
        "model": model,
        "data": {"builtin": "digits"},
        "schedule": {"num_steps": 4},
        "distill": distill,
        "train": {"batch_size": batch, "mixed_precision": mixed_precision,
                  "gradient_checkpointing": gradient_checkpointing, "seed": 0},
    })


def spec_summary(cfg: DistillJob) -> dict[str, Any]:
    d = cfg.distill
    return {"mode": d.mode, "ttur": d.ttur, "ema": d.ema, "gan_weight": d.gan_weight, "gan_loss": d.gan_loss,
            "real_guidance": d.real_guidance, "timesteps": cfg.schedule.timesteps,
            "dm_steps": cfg.schedule.dm_steps, "gan_steps": cfg.schedule.gan_steps,
            "discriminator": d.discriminator.model_dump() if d.mode == "flash" else "latent head (DMD2)",
            "batch_size": cfg.train.batch_size, "mixed_precision": cfg.train.mixed_precision,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "lora": cfg.model.lora.model_dump() if cfg.model.lora else None}


@dataclass
class StepTimes:
    """Per-iteration wall times of one config; `turns[i]` says whether iteration i updated the generator."""

    ttur: int
    seconds: list[float] = field(default_factory=list)
    turns: list[bool] = field(default_factory=list)
    skipped: int = 0  # optimiser updates skipped for non-finite losses/grads (would make a step cheaper)

    def cycles(self) -> list[float]:
        """Times of whole generator cycles (a generator turn plus the ttur - 1 iterations after it)."""
        out, i = [], 0
        while i + self.ttur <= len(self.seconds):
            if self.turns[i]:
                out.append(sum(self.seconds[i:i + self.ttur]))
                i += self.ttur
            else:
                i += 1
        return out

    def summary(self) -> dict[str, Any]:
        n, updates = len(self.seconds), sum(self.turns)
        total = sum(self.seconds)
        cyc = self.cycles()
        gen_iters = [s for s, t in zip(self.seconds, self.turns, strict=True) if t]
        other_iters = [s for s, t in zip(self.seconds, self.turns, strict=True) if not t]
        return {
            "iterations": n, "generator_updates": updates, "total_s": total,
            "s_per_iter_mean": total / n, "s_per_iter_median": statistics.median(self.seconds),
            # As the issue defines it: total time / number of generator updates.
            "s_per_gen_update_mean": total / updates,
            # Robust to noisy neighbours: the median generator-cycle time.
            "s_per_gen_update_median": statistics.median(cyc),
            "s_per_gen_update_iqr": _iqr(cyc),
            "s_gen_turn_iter_median": statistics.median(gen_iters),
            "s_other_iter_median": statistics.median(other_iters) if other_iters else None,
            "skipped_updates": self.skipped,
        }


def _iqr(xs: Sequence[float]) -> list[float]:
    if len(xs) < 4:
        return [min(xs), max(xs)]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def run_iterations(distiller: Any, batches: Iterator[dict], start: int, n: int, times: StepTimes | None,
                   sync: Callable[[], None] = lambda: None) -> int:
    """Run loop iterations start..start+n-1 (data loading outside the clock); returns the next step."""
    for step in range(start, start + n):
        batch = next(batches)
        sync()
        t0 = time.perf_counter()
        logs = distiller.step(batch, step)
        sync()
        dt = time.perf_counter() - t0
        if times is not None:
            times.seconds.append(dt)
            times.turns.append(bool(logs.get("generator_turn")))
            times.skipped += int(sum(v for k, v in logs.items() if k.startswith("skipped/")))
    return start + n


# Distiller.step's phases (each over all grad_accum micro-batches) and pieces inside them.
PHASES = ("generator_phase", "dm_term", "fake_score_phase", "discriminator_phase", "decoded_fake",
          "latent_logits")


def instrument_phases(distiller: Any, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Wrap the Distiller's Alg. 1 phase methods (on this instance only) to accumulate their wall time.

    Nested phases (dm_term inside generator_phase, latent_logits inside both) are counted in both.
    """
    acc: dict[str, float] = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return timed

    for name in PHASES:
        setattr(distiller, name, wrap(name, getattr(distiller, name)))
    return acc


def phase_summary(phases: dict[str, float], times: StepTimes) -> dict[str, float]:
    """Seconds per generator update spent in each phase; `other` = the rest of the step (text encoding,
    learning rates). The generator phase includes backward simulation and G's forward; decoded_fake runs
    inside the discriminator phase."""
    updates = sum(times.turns)
    out = {k: v / updates for k, v in phases.items()}
    top = sum(phases.get(k, 0.0) for k in ("generator_phase", "fake_score_phase", "discriminator_phase"))
    out["other"] = (sum(times.seconds) - top) / updates
    return out


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Per config: its seconds per generator update over dmd2 TTUR 5's (mean and median)."""
    base = results.get(BASELINE)
    if not base or "timing" not in base:
        return
    for r in results.values():
        if "timing" in r:
            t, b = r["timing"], base["timing"]
            r["ratio_vs_dmd2"] = {f"per_gen_update_{k}": t[f"s_per_gen_update_{k}"] / b[f"s_per_gen_update_{k}"]
                                  for k in ("mean", "median")}


def machine_info() -> dict[str, Any]:
    import diffusers
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                    gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (floats to 3 significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def wait_healthy(http: Any, proc: Any, log: Path, timeout: float = 120.0) -> None:
    """Poll GET /healthz (an httpx.Client on the server) until 200; fail with the server's log tail if the process
    (a subprocess.Popen) exits or `timeout` seconds pass. Shared by the serving benches."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
