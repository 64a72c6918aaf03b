"""The worker's side of the trainer's sink: JSONL files in the run directory -> database rows.

The trainer appends `metrics.jsonl` and `events.jsonl` (trainer/sink.py). The worker
tails both by byte offset and writes batches: metrics as upserts on (job, key, step),
trainer events keyed by their byte offset. Both are idempotent, so a new attempt
simply re-reads the files from the start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from api.db import upsert
from api.models import Checkpoint, Event, Job, Metric, Sample

log = logging.getLogger(__name__)

# The run-directory layout of trainer/sink.py. Spelled out rather than imported: the API side imports
# nothing from trainer/ but its config models (tests check the names agree).
METRICS_FILE, EVENTS_FILE, STOP_FILE = "metrics.jsonl", "events.jsonl", "STOP"

STEP_DIR = re.compile(r"^step-(\d+)$")
SAMPLE_FILE = re.compile(r"^step-(\d+)\.png$")
CHUNK_ROWS = 2000  # rows per INSERT: well under SQLite's and Postgres' bind-parameter limits
MAX_READ_BYTES = 8 << 20  # per file and poll, so one poll's transaction stays short
RATE_WINDOW = 20  # steps over which progress.rate is measured
RESYNC_SECONDS = 10.0  # rescan checkpoints/samples at least this often, even without an event naming them


def json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON (Postgres JSONB rejects them): store them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class _Tail:
    """Complete lines appended to a file since the last commit, with the byte offset of each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> tuple[list[tuple[int, bytes]], int]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return [], self.offset
        start = 0 if size < self.offset else self.offset  # truncated (a rewound run): read it again
        if size == start:
            return [], start
        with self.path.open("rb") as f:
            f.seek(start)
            chunk = f.read(MAX_READ_BYTES)
        end = chunk.rfind(b"\n") + 1  # a line without its newline yet is read on a later poll
        lines, pos = [], start
        for raw in chunk[:end].splitlines(keepends=True):
            if raw.strip():
                lines.append((pos, raw))
            pos += len(raw)
        return lines, start + end


class RunIngestor:
    def __init__(self, *, sessions: sessionmaker[Session], job_id: str, run_dir: Path, since: float = 0.0) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.run_dir = run_dir
        self.since = since  # rows older than this belong to an earlier attempt and do not count for the rate
        self.metrics = _Tail(run_dir / METRICS_FILE)
        self.events = _Tail(run_dir / EVENTS_FILE)
        self.failure: dict[str, Any] | None = None  # data of the trainer's last `failed` event
        self.stopped = False  # the trainer logged `stopped` (a checkpoint was written) in this attempt
        self._window: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW)
        self._max_step: int | None = None
        self._synced_at = 0.0

    def poll(self) -> int:
        """Move whatever is new into the database in one transaction; returns the lines read."""
        metric_lines, metric_end = self.metrics.read()
        event_lines, event_end = self.events.read()
        resync = time.monotonic() - self._synced_at > RESYNC_SECONDS
        if not metric_lines and not event_lines and not resync:
            return 0
        with self.sessions() as session:
            self._write_metrics(session, metric_lines)
            if self._write_events(session, event_lines) or resync:
                self._sync_artifacts(session)
            session.commit()
        # Offsets move only after the commit: after a database error the same lines are read again.
        self.metrics.offset, self.events.offset = metric_end, event_end
        return len(metric_lines) + len(event_lines)

    def drain(self) -> None:
        """Read to the end of both files (after the trainer exited) and resync the artifacts."""
        self._synced_at = 0.0
        while self.poll():
            pass

    def _write_metrics(self, session: Session, lines: list[tuple[int, bytes]]) -> None:
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for _, raw in lines:
            try:
                rec = json.loads(raw)
                step, wall = int(rec["step"]), float(rec["wall_time"])
                values = dict(rec["metrics"])
            except (ValueError, KeyError, TypeError):
                log.warning("job %s: skipping a malformed metrics line: %.200r", self.job_id, raw)
                continue
            # The last row for a (key, step) wins, as it would in the table; Postgres refuses to
            # update one row twice in a single statement, so duplicates must go before the insert.
            for key, value in values.items():
                rows[(str(key), step)] = {
                    "job_id": self.job_id, "key": str(key)[:128], "step": step, "wall_time": wall,
                    "value": _finite(value),
                }
            self._max_step = step if self._max_step is None else max(self._max_step, step)
            if wall >= self.since and (not self._window or step > self._window[-1][0]):
                self._window.append((step, wall))
        batch = list(rows.values())
        for i in range(0, len(batch), CHUNK_ROWS):
            upsert(session, Metric.__table__, batch[i : i + CHUNK_ROWS],
                   keys=("job_id", "key", "step"), update=("wall_time", "value"))
        if self._max_step is not None:
            session.execute(
                update(Job).where(Job.id == self.job_id)
                .values(progress_step=self._max_step, progress_rate=self.rate())
                .execution_options(synchronize_session=False)
            )

    def rate(self) -> float | None:
        if len(self._window) < 2:
            return None
        (s0, w0), (s1, w1) = self._window[0], self._window[-1]
        return (s1 - s0) / (w1 - w0) if w1 > w0 else None

    def _write_events(self, session: Session, lines: list[tuple[int, bytes]]) -> bool:
        rows, artifacts = [], False
        for offset, raw in lines:
            try:
                rec = json.loads(raw)
                when = datetime.fromtimestamp(float(rec.get("time", 0.0)), timezone.utc)
            except (ValueError, TypeError, OverflowError):
                log.warning("job %s: skipping a malformed event line: %.200r", self.job_id, raw)
                continue
            kind = str(rec.get("kind") or "log")[:32]
            data = json_safe(rec.get("data") if isinstance(rec.get("data"), dict) else {})
            rows.append({
                "job_id": self.job_id, "time": when, "kind": kind, "message": str(rec.get("message") or ""),
                "data": data, "source": "trainer", "source_offset": offset,
            })
            if kind == "failed":
                self.failure = data
            elif kind == "stopped":
                self.stopped = True
            artifacts = artifacts or kind in ("checkpoint", "sample")
        for i in range(0, len(rows), CHUNK_ROWS):
            upsert(session, Event.__table__, rows[i : i + CHUNK_ROWS], keys=("job_id", "source_offset"))
        return artifacts

    def _sync_artifacts(self, session: Session) -> None:
        """Checkpoint and sample rows mirror the run directory; the trainer prunes old checkpoints itself."""
        self._synced_at = time.monotonic()
        ckpts = {}
        for step, folder in _numbered(self.run_dir / "checkpoints", STEP_DIR):
            meta_file = folder / "meta.json"  # written last: a folder without it is incomplete
            try:
                meta = json_safe(json.loads(meta_file.read_text()))
            except (OSError, ValueError):
                continue
            ckpts[step] = {"job_id": self.job_id, "step": step, "path": str(folder.relative_to(self.run_dir)),
                           "meta": meta, "created_at": _mtime(meta_file)}
        samples = {
            step: {"job_id": self.job_id, "step": step, "path": str(f.relative_to(self.run_dir)),
                   "meta": sample_meta(f), "created_at": _mtime(f)}
            for step, f in _numbered(self.run_dir / "samples", SAMPLE_FILE)
        }
        for model, found, cols in ((Checkpoint, ckpts, ("path", "meta", "created_at")),
                                   (Sample, samples, ("path", "meta", "created_at"))):
            session.execute(
                delete(model).where(model.job_id == self.job_id, model.step.not_in(list(found) or [-1]))
                .execution_options(synchronize_session=False)
            )
            upsert(session, model.__table__, list(found.values()), keys=("job_id", "step"), update=cols)


def _numbered(folder: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), folder / n) for n in names if (m := pattern.match(n)))


def sample_meta(png: Path) -> dict[str, Any]:
    """The cells of a grid (prompt, seed, row, col) from the step-N.json beside it, for the dashboard's captions.

    {} when the trainer wrote none (older runs, or the PNG was read before its JSON landed: the next resync
    fills it in, since the upsert updates `meta`).
    """
    try:
        raw = json.loads(png.with_suffix(".json").read_text())
        # NUL would not fit a Postgres JSONB string; a caption is shown, never matched, so dropping it is safe.
        cells = [{"prompt": str(c["prompt"]).replace("\x00", ""), "seed": int(c["seed"]),
                  "row": int(c["row"]), "col": int(c["col"])} for c in raw["cells"]]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {"cells": cells}


def _mtime(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    except OSError:
        return datetime.now(timezone.utc)


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (one with its meta.json), which `--resume` continues from."""
    steps = [s for s, folder in _numbered(run_dir / "checkpoints", STEP_DIR) if (folder / "meta.json").is_file()]
    return max(steps) if steps else None


def rewind(*, session: Session, job_id: str, run_dir: Path, step: int | None) -> None:
    """Forget metrics after `step` (None: all) in the file and the table, before a new attempt starts.

    The trainer truncates metrics.jsonl itself on --resume, but only once it runs; doing
    it here first means the tail never reads rows of the lost timeline, and the table
    has no stale points past the resume step if the new attempt stops early.
    """
    keep = -1 if step is None else step
    path = run_dir / METRICS_FILE
    if path.exists():
        kept = []
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                if int(json.loads(line)["step"]) <= keep:
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
            except (ValueError, KeyError, TypeError):
                continue
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    session.execute(delete(Metric).where(Metric.job_id == job_id, Metric.step > keep)
                    .execution_options(synchronize_session=False))
    session.execute(update(Job).where(Job.id == job_id).values(progress_step=max(keep, 0), progress_rate=None)
                    .execution_options(synchronize_session=False))
