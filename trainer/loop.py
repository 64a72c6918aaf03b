"""The one training loop, `run_loop(cfg, sink, build, run_dir=..., resume=...)` (EDM2's `training_loop` with
the method passed in): `train` runs it with stage 1 (trainer/distill_method.py), `train_rl` (trainer/rl_loop.py)
with stage 2. The method does one update per step (trainer/method.py); the loop owns the rest: set-up, resume,
the started/stopped/finished/failed events, the non-finite guard, progress, logging, trackers, validation
samples, checkpoints and stop.

Resuming means re-running the same command with `--resume`: the latest complete
checkpoint under `run_dir/checkpoints/` restores the weights, the optimiser state
and the step; per-step randomness is a pure function of (step, global sample index),
and the data order continues where the checkpoint left it (trainer/data.py ShardSampler).

One step = one optimiser update of each network, over world x grad_accum x batch_size samples.
Every rank runs this loop; decisions that change control flow (skip, stop, SIGTERM, cancel) are agreed
with one all-reduce (trainer/parallel.py) before any rank acts, only rank 0 writes metrics, events and
samples, and every rank joins each checkpoint save.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from trainer.data import build_dataset
from trainer.errors import Collapsed, StopRequested, TrainingError
from trainer.guard import from_spec as guard_from_spec
from trainer.guard import grid_stats, health_metrics
from trainer.hooks import Hooks
from trainer.jobspec import DistillJob, GuardSpec
from trainer.method import Method, Setup
from trainer.models import load_teacher
from trainer.optim import check_runtime
from trainer.parallel import agree_any, main_process_first, make_accelerator, start_training
from trainer.sink import Sink
from trainer.textcache import prepare_text_cache
from trainer.trackers import accelerator_kwargs, finish_trackers, tracked_sink
from trainer.validation import ValidationPlan, plan_validation

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.models import Teacher

# A method's builder: from the loop's set-up, the method and the validation plan of its data.
Build = Callable[[Setup], tuple[Method, ValidationPlan]]


def _accelerator(cfg: DistillJob, run_dir: Path | None = None, startup_timeout_s: float | None = None,
                 ) -> Accelerator:
    """The run's Accelerator, with the trackers of train.report_to when a run directory is given."""
    tracking = accelerator_kwargs(cfg.train.report_to, run_dir) if run_dir is not None else {}
    return make_accelerator(cfg.train.mixed_precision, startup_timeout_s, **tracking)


def data_preprocess(cfg: DistillJob, resolution: int) -> dict:
    """The preprocessing this spec asks of its data, as a prepare cache records it (trainer/datacache.py)."""
    from trainer.data import resolve_buckets
    from trainer.datacache import preprocess_of

    b = cfg.data.buckets
    sizes = resolve_buckets(b, resolution) if b.enabled else None
    return preprocess_of(resolution, sizes, b.crop if b.enabled else "center", cfg.train.seed)


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


class StopControl:
    """Whether to stop after this step: SIGTERM, the sink (STOP file / cancel), agreed across ranks."""

    def __init__(self, acc: Accelerator, sink: Sink, hooks: Hooks) -> None:
        self.acc, self.sink, self.flag = acc, sink, _StopFlag()
        self.hook, self.hang = hooks.stop_at, hooks.hang_at

    def requested(self, step: int) -> bool:
        me = (self.acc.process_index, step)
        if self.hang == me:
            time.sleep(3600)
        local = self.flag.set or self.sink.should_stop() or self.hook == me
        return agree_any(self.acc, local)[0]


def amp_logs(acc: Accelerator) -> dict[str, float]:
    return {"amp/scale": float(acc.scaler.get_scale())} if acc.scaler is not None else {}


class CollapseWatch:
    """train.guard in the loop: the statistics of each validation grid, a `guard` event when one trips, and with
    `action: stop` the reason to stop. Every rank samples the same cells with the same weights, and the decision
    is agreed anyway, so all ranks stop together."""

    def __init__(self, spec: GuardSpec, teacher: Teacher, acc: Accelerator, sink: Sink) -> None:
        self.spec, self.teacher, self.acc, self.sink = spec, teacher, acc, sink
        self.guard, self.tripped = guard_from_spec(spec), ""

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, step: int) -> dict[str, float]:
        images = self.teacher.decode(latents).float()  # the first grid size, as saved (before clipping)
        stats = grid_stats(images, latents)
        trips = self.guard.update(stats)
        for trip in trips:
            self.sink.log_event("guard", str(trip), step=step, stat=trip.stat, value=trip.value,
                                threshold=trip.threshold, action=self.spec.action)
        if agree_any(self.acc, bool(trips) and self.spec.action == "stop")[0]:
            self.tripped = "; ".join(str(t) for t in trips) or "collapse guard tripped on another rank"
        return health_metrics(self.guard, stats)


class Progress:
    """Where a run is, for its `failed` event: the last step done and the last checkpoint written."""

    def __init__(self) -> None:
        self.step, self.last_saved = 0, 0


@contextlib.contextmanager
def failures_recorded(sink: Sink, progress: Progress) -> Iterator[None]:
    """Every failure from process-group set-up on (a start-up barrier, the teacher load, a collective's
    timeout) ends as a `failed` event with its cause; a StopRequested is not a failure and passes through."""
    try:
        yield
    except (TrainingError, RuntimeError) as err:
        sink.log_event("failed", str(err), code=getattr(err, "code", type(err).__name__), message=str(err), step=progress.step,
                       last_checkpoint=progress.last_saved)
        raise


def prepare_data(setup: Setup) -> tuple[Any, ValidationPlan]:
    """The dataset and the validation plan, with the text or data cache attached (both stages)."""
    cfg, teacher = setup.cfg, setup.teacher
    ds = build_dataset(cfg.data, teacher.resolution, cfg.train.seed)
    plan = plan_validation(cfg.train, ds, teacher)  # train.validation, or num_samples dataset captions
    if cfg.data.cache:  # a `flashdmd data prepare` cache: refused unless made for this teacher and preprocessing
        from trainer.datacache import attach_cache

        attach_cache(ds, teacher, data_preprocess(cfg, teacher.resolution))
    else:  # memory.text_cache (trainer/textcache.py)
        prepare_text_cache(cfg, teacher, ds, setup.run_dir, setup.acc, plan.prompts)
    skipped = getattr(ds, "skipped", None)
    if skipped:
        setup.sink.log_event("data_skipped", f"{len(skipped)} unreadable image(s) skipped, e.g. {skipped[0]}",
                             count=len(skipped), examples=skipped[:20])
    return ds, plan


def _distill(setup: Setup) -> tuple[Method, ValidationPlan]:
    from trainer.distill_method import DistillMethod

    ds, plan = prepare_data(setup)
    return DistillMethod(setup, ds), plan


def train(cfg: DistillJob, sink: Sink, *, run_dir: str | Path, resume: bool = False,
          hooks: Hooks = Hooks()) -> int:  # noqa: B008 - frozen, so one shared default is safe
    """Run Flash-DMD stage 1 until cfg.train.max_steps; returns the last step."""
    return run_loop(cfg, sink, _distill, run_dir=run_dir, resume=resume, hooks=hooks)


def run_loop(cfg: DistillJob, sink: Sink, build: Build, *, run_dir: str | Path, resume: bool = False,
             hooks: Hooks = Hooks()) -> int:  # noqa: B008 - frozen, so one shared default is safe
    """Train the method that `build` makes until cfg.train.max_steps; returns the last step."""
    check_runtime(cfg)  # levers this machine cannot run (optim.optimizer: adamw8bit without CUDA) fail here
    progress = Progress()
    with failures_recorded(sink, progress):
        return _run(cfg, sink, build, Path(run_dir), resume, hooks, progress)


def _run(cfg: DistillJob, sink: Sink, build: Build, run_dir: Path, resume: bool, hooks: Hooks,
         progress: Progress) -> int:
    # A tracker whose extra is missing fails here, before any model loads.
    acc = _accelerator(cfg, run_dir, hooks.startup_timeout_s)
    torch.manual_seed(cfg.train.seed)
    if hooks.slow_start is not None and hooks.slow_start[0] == acc.process_index:
        time.sleep(hooks.slow_start[1])
    with main_process_first(acc, "loading the teacher"):  # rank 0 builds/downloads it once; the others read it
        teacher = load_teacher(cfg.model, acc.device, cfg.schedule.shift)
    method, plan = build(Setup(cfg, acc, teacher, sink, run_dir, hooks))

    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, method, acc)
        if acc.is_main_process:
            truncate_metrics(run_dir, start)
    progress.step = progress.last_saved = start
    start_training(hooks.dist_timeout_s)  # every rank is ready: collectives from here run under the training timeout
    message, fields = method.started(start)
    sink.log_event("started", message, step=start, max_steps=cfg.train.max_steps, resumed=ckpt is not None,
                   family=teacher.family, **fields)
    if start >= cfg.train.max_steps:
        sink.log_event("finished", "nothing to do: already at max_steps", step=start)
        return start

    t = cfg.train
    batches = method.batches(start)
    sink = tracked_sink(sink, acc, cfg, run_dir, start=start)  # train.report_to: metrics and grids too
    stop, guard = StopControl(acc, sink, hooks), NonfiniteGuard(t.max_nonfinite)
    collapse = CollapseWatch(t.guard, teacher, acc, sink) if t.guard.enabled else None
    bar = tqdm(total=t.max_steps, initial=start, desc=method.label, disable=not acc.is_main_process,
               dynamic_ncols=True)
    step = start
    try:
        while step < t.max_steps:
            t0 = time.perf_counter()
            logs = method.step(next(batches), step)
            step = progress.step = step + 1
            guard.observe(logs, step, sink)
            logs.update(amp_logs(acc))
            logs["time/step_s"] = time.perf_counter() - t0
            sampled: dict[str, float] = {}
            if plan.due(step, t.max_steps):  # every rank samples (a sharded G needs them all); rank 0 writes
                paths, sampled, latents = method.sample(plan, step,
                                                        run_dir / "samples" if acc.is_main_process else None)
                sampled.update(collapse.observe(latents, step) if collapse else {})
                logs.update(sampled)
                for path in paths:
                    sink.log_event("sample", f"sample grid at step {step}", step=step, path=str(path))
            if step % t.log_every == 0 or step == t.max_steps or sampled:  # a sample's metrics are logged
                sink.log_metrics(step, {k: v for k, v in logs.items() if math.isfinite(v)})
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k in method.progress_keys})
            bar.update(1)
            requested = stop.requested(step)
            if step % t.checkpoint_every == 0 or step == t.max_steps or requested:
                save_checkpoint(run_dir, step, method, acc, cfg, sink, sidecars=method.checkpoint_meta(),
                                slow_s=hooks.slow_checkpoint_s)
                progress.last_saved = step
            if requested:
                sink.log_event("stopped", f"stopped on request at step {step}", step=step)
                raise StopRequested(step)
            if collapse and collapse.tripped:  # after the checkpoint above, so the run can be inspected and resumed
                if progress.last_saved != step:
                    save_checkpoint(run_dir, step, method, acc, cfg, sink, sidecars=method.checkpoint_meta(),
                                    slow_s=hooks.slow_checkpoint_s)
                    progress.last_saved = step
                raise Collapsed(collapse.tripped)
    finally:
        bar.close()
        finish_trackers(acc)
    sink.log_event("finished", f"finished at step {step}", step=step)
    return step
