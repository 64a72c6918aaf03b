"""The trainer's only window to the outside world (DESIGN §2).

The trainer calls `log_metrics`, `log_event`, `save_checkpoint` and `should_stop`.
Standalone runs use `JsonlSink` (files in the run directory); the service's worker
reads the same JSONL files and moves the rows into Postgres, so the trainer never
imports a database driver.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"


class Sink(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_event(self, kind: str, message: str = "", /, **data: Any) -> None: ...
    def save_checkpoint(self, step: int, path: Path, meta: dict[str, Any]) -> None: ...
    def should_stop(self) -> bool: ...
    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per line, flushed at once, so a crash loses nothing written.

    metrics.jsonl: {"step", "wall_time", "metrics": {key: value}}
    events.jsonl:  {"time", "kind", "message", "data"}
    A run is asked to stop when the file `STOP` appears in the run directory
    (the worker creates it when a cancel is requested).
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled  # False on non-main ranks: only rank 0 writes
        self._metrics = self._events = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Long-lived append handles, closed in close(); line-buffered so every row reaches the file.
            self._metrics = open(self.run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115
            self._events = open(self.run_dir / EVENTS_FILE, "a", buffering=1)  # noqa: SIM115

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._metrics is None:
            return
        row = {"step": int(step), "wall_time": time.time(), "metrics": {k: float(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")

    def log_event(self, kind: str, message: str = "", /, **data: Any) -> None:
        # kind and message are positional-only, so `data` may carry a "message" too (the `failed` event does).
        if self._events is None:
            return
        row = {"time": time.time(), "kind": kind, "message": message, "data": data}
        self._events.write(json.dumps(row, default=str) + "\n")

    def save_checkpoint(self, step: int, path: Path, meta: dict[str, Any]) -> None:
        self.log_event("checkpoint", f"checkpoint at step {step}", step=step, path=str(path), **meta)

    def should_stop(self) -> bool:
        return (self.run_dir / STOP_FILE).exists()

    def close(self) -> None:
        for f in (self._metrics, self._events):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._metrics = self._events = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
