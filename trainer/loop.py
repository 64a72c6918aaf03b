"""The plain training function: `train(cfg, sink, run_dir=..., resume=...)` (EDM2 style).

Resuming means re-running the same command with `--resume`: the latest complete
checkpoint under `run_dir/checkpoints/` restores the weights, the optimiser state
(accelerate) and the step, and per-step randomness is a pure function of the step.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from trainer.config import DistillJob
from trainer.data import build_dataset, infinite_batches
from trainer.errors import StopRequested, TrainingError
from trainer.models import load_teacher
from trainer.optim import check_runtime
from trainer.sink import Sink
from trainer.textcache import prepare_text_cache


def _accelerator(cfg: DistillJob):  # noqa: ANN202
    from accelerate import Accelerator

    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        mp = "no"  # fp16 autocast needs a GPU; bf16 works on CPUs too
    return Accelerator(mixed_precision=mp)


def _sample_prompts(ds, n: int) -> list[str]:  # noqa: ANN001
    idx = [round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)]
    return [ds[i]["caption"] for i in idx]


def save_samples(distiller, prompts: list[str], path: Path) -> Path:  # noqa: ANN001
    from inference.sampler import image_grid, sample

    t = distiller.teacher
    cond = t.encode(prompts)
    lat = sample(distiller.generator, cond, distiller.S, distiller.param, seeds=list(range(len(prompts))),
                 latent_shape=t.latent_shape(1)[1:])
    with torch.no_grad():
        images = t.decode(lat)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=min(len(prompts), 8)).save(path)
    return path


class NonfiniteGuard:
    """Skip-and-count for non-finite steps; fail with a clear error after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def observe(self, logs: dict[str, float], step: int, sink: Sink) -> None:
        """Count a step whose update was skipped (a `skipped/*` log), log the event, and record the total."""
        skipped = any(v for k, v in logs.items() if k.startswith("skipped/"))
        if skipped:
            sink.log_event("nonfinite", f"non-finite loss or gradient at step {step}; update skipped",
                           step=step, consecutive=self.consecutive + 1)
        self.update(skipped, step)
        logs["nonfinite/total"] = float(self.total)

    def update(self, skipped: bool, step: int) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.total += skipped
        if self.consecutive >= self.limit:
            raise TrainingError(f"{self.consecutive} consecutive steps with non-finite losses or gradients "
                                f"(up to step {step}; train.max_nonfinite={self.limit}); lower the learning "
                                "rates or use mixed_precision: bf16 instead of fp16")


class _StopFlag:
    """SIGTERM from the worker means: checkpoint at the next step boundary and exit."""

    def __init__(self) -> None:
        self.set = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_: object) -> None:
        self.set = True


def train(cfg: DistillJob, sink: Sink, *, run_dir: str | Path, resume: bool = False) -> int:
    """Run Flash-DMD stage 1 until cfg.train.max_steps; returns the last step."""
    check_runtime(cfg)  # levers this machine cannot run (optim.optimizer: adamw8bit without CUDA) fail here
    if cfg.kind == "rl":  # stage 2 (joint RL) has its own loop
        from trainer.rl_loop import train_rl

        return train_rl(cfg, sink, run_dir=run_dir, resume=resume)
    if cfg.kind == "eval":  # scoring a checkpoint runs through the same command, sink and exit codes
        from inference.evaluate import run_eval

        return run_eval(cfg, sink, run_dir=run_dir, resume=resume)
    from trainer.distill import Distiller

    run_dir = Path(run_dir)
    acc = _accelerator(cfg)
    torch.manual_seed(cfg.train.seed)
    teacher = load_teacher(cfg.model, acc.device, cfg.schedule.shift)
    ds = build_dataset(cfg.data, teacher.resolution)
    prepare_text_cache(cfg, teacher, ds, run_dir, acc)  # memory.text_cache (trainer/textcache.py)
    distiller = Distiller(cfg, teacher, acc)

    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, distiller, acc)
        if acc.is_main_process:
            truncate_metrics(run_dir, start)
    sink.log_event("started", f"{cfg.distill.mode} distillation from step {start}", step=start,
                   max_steps=cfg.train.max_steps, resumed=ckpt is not None, family=teacher.family)
    if start >= cfg.train.max_steps:
        sink.log_event("finished", "nothing to do: already at max_steps", step=start)
        return start

    epoch = (start * cfg.train.batch_size) // max(len(ds), 1)
    batches = infinite_batches(ds, cfg.train.batch_size, cfg.train.seed + acc.process_index,
                               cfg.data.num_workers, start_epoch=epoch)
    sample_prompts = _sample_prompts(ds, cfg.train.num_samples)
    stop, guard, last_saved = _StopFlag(), NonfiniteGuard(cfg.train.max_nonfinite), start
    bar = tqdm(total=cfg.train.max_steps, initial=start, desc=f"{cfg.distill.mode} K={len(distiller.S)}",
               disable=not acc.is_main_process, dynamic_ncols=True)
    step = start
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            logs = distiller.step(next(batches), step)
            step += 1
            guard.observe(logs, step, sink)
            logs["time/step_s"] = time.perf_counter() - t0
            logs["lr/generator"] = distiller.opt_g.param_groups[0]["lr"]
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                sink.log_metrics(step, {k: v for k, v in logs.items() if math.isfinite(v)})
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                             if k in ("loss/dm", "loss/fake_score", "loss/disc", "loss/gen_adv")})
            bar.update(1)
            if acc.is_main_process and (step % cfg.train.sample_every == 0 or step == cfg.train.max_steps):
                path = save_samples(distiller, sample_prompts, run_dir / "samples" / f"step-{step:08d}.png")
                sink.log_event("sample", f"sample grid at step {step}", step=step, path=str(path))
            requested = stop.set or sink.should_stop()
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps or requested:
                save_checkpoint(run_dir, step, distiller, acc, cfg, sink)
                last_saved = step
            if requested:
                sink.log_event("stopped", f"stopped on request at step {step}", step=step)
                raise StopRequested(step)
    except (TrainingError, RuntimeError) as err:  # a StopRequested is not a failure and passes through
        sink.log_event("failed", str(err), code=type(err).__name__, message=str(err), step=step,
                       last_checkpoint=last_saved)
        raise
    finally:
        bar.close()
    sink.log_event("finished", f"finished at step {step}", step=step)
    return step
