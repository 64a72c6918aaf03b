"""The inference role's warm-up: load the configured checkpoints and run each served shape once, before /readyz.

A pod that says ready before its first checkpoint is loaded (and, with torch.compile, before each shape is
compiled) would take traffic it answers in minutes; so readiness waits for this. Checkpoints come from the
operator's `FLASHDMD_GENERATE_WARM` (absolute paths or job ids: a job's latest checkpoint), not from a request,
so no owner is checked here; a request still needs to own what it asks for. A checkpoint that fails (a typo, a
volume not mounted yet, a run still being copied) is retried every `generate_warm_retry_seconds`, and /readyz
keeps answering 503 meanwhile. The log names the checkpoint and the error; /readyz shows a token holder only
the counts and the error's type, since any owner's token may ask and the warm list is the operator's.

The warm calls go through the route's own batcher with the route's batch key: the pipeline loaded is the
cache entry requests will hit, the shapes run are the ones they will run, and a warm call never runs beside
more sampler calls than `generate_max_concurrency` allows (one GPU's memory).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api import crud
from api.generate_plan import BatchKey, GenerationPlan, Row
from api.generate_runtime import Runtime
from api.models import Job
from api.settings import Settings
from trainer.roots import under_root

log = logging.getLogger(__name__)
WARM_PROMPT = "warm-up"


def _checkpoint(ref: str, sessions: sessionmaker[Session], settings: Settings) -> Path:
    """The checkpoint folder a warm entry names: a path (realpath, then the latest step inside a run directory)
    or a job id (its latest ingested checkpoint)."""
    from inference.checkpoint import CheckpointError, resolve_checkpoint_dir

    if os.path.isabs(ref):
        return Path(os.path.realpath(resolve_checkpoint_dir(os.path.realpath(ref))))
    with sessions() as session:
        job = session.get(Job, ref)
        if job is None:
            raise CheckpointError(f"no job {ref!r} (FLASHDMD_GENERATE_WARM takes absolute paths or job ids)")
        rows = crud.list_checkpoints(session=session, job_id=job.id)
    run_dir = os.path.realpath(settings.run_dir(ref))
    done = [Path(os.path.realpath(os.path.join(run_dir, c.path))) for c in rows]
    done = [p for p in done if p != Path(run_dir) and under_root(p, [run_dir]) and (p / "meta.json").is_file()]
    if not done:
        raise CheckpointError(f"job {ref} has no checkpoint yet")
    return done[-1]


class Warmup:
    """What /readyz reads: `ready` once every configured checkpoint has loaded and run its shapes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pending = list(settings.generate_warm)
        self.errors: dict[str, str] = {}
        self.ready = not self.pending

    def status(self) -> str:
        if self.ready:
            return "ok"
        done = len(self.settings.generate_warm) - len(self.pending)
        failed = sorted(set(self.errors.values()))
        return f"warming up: {done} of {len(self.settings.generate_warm)} checkpoints ready" + (
            f" ({len(self.errors)} failed with {', '.join(failed)}; retrying, see the server log)" if failed else "")

    def keys(self, ref: str, rt: Runtime, sessions: sessionmaker[Session]) -> list[tuple[BatchKey, int]]:
        """(batch key, rows) of each warm call for one checkpoint (in a worker thread: it reads files): one per
        FLASHDMD_GENERATE_WARM_SHAPES entry, or the checkpoint's own size with one row."""
        from inference.checkpoint import CheckpointInfo

        info = CheckpointInfo.load(_checkpoint(ref, sessions, self.settings))
        timesteps = tuple(info.timesteps_for(None))
        out: list[tuple[BatchKey, int]] = []
        for width, height, batch in self.settings.warm_shapes() or [(None, None, 1)]:
            size = info.check_size(width, height, rt.settings.generate_max_side)
            out.append((GenerationPlan(info, timesteps, *size, work=0.0).key(), batch or 1))
        return out

    def compile_and_warm(self, key: BatchKey, rt: Runtime) -> dict[str, Any]:
        """The pipeline's own warm-up (inference.serving.warm_up, in a worker thread): every shape of its serving
        options (FLASHDMD_GENERATE_WARM_SHAPES, or the checkpoint's serving.json) is sampled once; with
        FLASHDMD_GENERATE_COMPILE this compiles them and saves the compile cache to disk, so the next pod start
        loads the kernels instead of compiling."""
        from inference.serving import warm_up

        return warm_up(rt.pipeline(key.checkpoint))

    async def warm_one(self, ref: str, rt: Runtime, sessions: sessionmaker[Session]) -> int:
        """Load one checkpoint, warm its pipeline's shapes, then run one route-level sampler call per
        warm shape (through the batcher, as requests run); the number of calls."""
        calls = await run_in_threadpool(self.keys, ref, rt, sessions)
        report = await run_in_threadpool(self.compile_and_warm, calls[0][0], rt)
        log.info("warm-up of %s: %d shapes in %.1f s (compile %s, cache %s)", ref, len(report["shapes"]),
                 report["total_s"], report["compile"], report["cache_loaded"] or "not loaded")
        for key, batch in calls:
            await rt.batcher.submit(key, [Row(WARM_PROMPT, seed) for seed in range(batch)])
        return len(report["shapes"]) + len(calls)

    async def run(self, rt: Runtime, sessions: sessionmaker[Session]) -> None:
        """Until every checkpoint is warm; each failure is logged, counted by /readyz and retried later."""
        while self.pending:
            for ref in list(self.pending):
                try:
                    calls = await self.warm_one(ref, rt, sessions)
                except Exception as err:  # noqa: BLE001 - anything that stops a load is retried, not fatal
                    log.warning("warm-up of %s failed (retrying in %g s): %s", ref,
                                self.settings.generate_warm_retry_seconds, err)
                    self.errors[ref] = type(err).__name__
                    continue
                log.info("warm-up: %s loaded, %d sampler calls", ref, calls)
                self.pending.remove(ref)
                self.errors.pop(ref, None)
            if self.pending:
                await asyncio.sleep(self.settings.generate_warm_retry_seconds)
        self.ready = True
