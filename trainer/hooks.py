"""What a run takes from its process rather than its spec: the collective timeouts and the test hooks.

The process entry (trainer/cli.py `hooks_from_env`, called by flashjob/cli.py) reads them from the environment
once and passes them down; no library module reads the environment for them. The names of the variables are
kept stable, since the tests (tests/dist) and the service set them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 1800.0
# Start-up (rank 0 downloads and loads the teacher while the others wait; every rank encodes its part of the
# captions; the ranks' imports finish at different times on a loaded host) can take far longer than any
# training collective should.
DEFAULT_STARTUP_TIMEOUT_S = 7200.0

DIST_TIMEOUT_ENV = "FLASHDMD_DIST_TIMEOUT_S"
STARTUP_TIMEOUT_ENV = "FLASHDMD_STARTUP_TIMEOUT_S"
# Test hooks (tests/dist), not for production use. "RANK:STEP": that rank alone requests a stop after that
# step (as if it alone had seen the STOP file or a SIGTERM); or hangs there (a stuck rank).
STOP_HOOK = "FLASHDMD_TEST_STOP_AT"
HANG_HOOK = "FLASHDMD_TEST_HANG_AT"
# "RANK:SECONDS": that rank sleeps before the teacher load, as a rank 0 downloading SDXL, or a rank slow to
# start on a loaded host, would.
SLOW_START_HOOK = "FLASHDMD_TEST_SLOW_START"
# "RANK:STEP[,RANK:STEP...]": the generator loss is infinite on that rank at that step, to test that every
# rank skips the update together.
NONFINITE_HOOK = "FLASHDMD_TEST_NONFINITE"
# Seconds rank 0 sleeps before writing a checkpoint's files, standing in for an SDXL checkpoint that
# outlasts a launcher's default 30 s SIGTERM window.
SLOW_CHECKPOINT_HOOK = "FLASHDMD_TEST_SLOW_CHECKPOINT_S"


@dataclass(frozen=True)
class Hooks:
    """Timeouts (seconds) and test hooks of one run; the defaults are a production run's."""

    dist_timeout_s: float = DEFAULT_TIMEOUT_S
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    stop_at: tuple[int, int] | None = None  # (rank, step)
    hang_at: tuple[int, int] | None = None  # (rank, step)
    slow_start: tuple[int, float] | None = None  # (rank, seconds)
    nonfinite_at: frozenset[tuple[int, int]] = frozenset()  # {(rank, step)}
    slow_checkpoint_s: float = 0.0


def _pair(value: str) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value.split(":")) if value else None


def parse_hooks(env: Mapping[str, str]) -> Hooks:
    """Hooks from a mapping of the variables above (the process environment, at the process entry)."""
    slow = _pair(env.get(SLOW_START_HOOK, ""))
    pairs = env.get(NONFINITE_HOOK, "")
    return Hooks(
        dist_timeout_s=float(env.get(DIST_TIMEOUT_ENV) or DEFAULT_TIMEOUT_S),
        startup_timeout_s=float(env.get(STARTUP_TIMEOUT_ENV) or DEFAULT_STARTUP_TIMEOUT_S),
        stop_at=_pair(env.get(STOP_HOOK, "")),  # type: ignore[arg-type]
        hang_at=_pair(env.get(HANG_HOOK, "")),  # type: ignore[arg-type]
        slow_start=(slow[0], float(slow[1])) if slow else None,
        nonfinite_at=frozenset(tuple(int(v) for v in item.split(":")) for item in pairs.split(",") if item.strip()),
        slow_checkpoint_s=float(env.get(SLOW_CHECKPOINT_HOOK, "0") or 0))
