"""What the process entry (flashjob/cli.py) needs from the trainer: exit codes, the CPU thread policy, and the
run's timeouts and test hooks read from the environment (the one place the trainer reads them)."""

from __future__ import annotations

import os

from trainer.hooks import Hooks, parse_hooks

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


def cpu_threads(available: int | None = None) -> int | None:
    """Torch threads for a CPU run, or None to leave torch's default (GPU runs, or OMP_NUM_THREADS set).

    One core is left free: OpenMP's barriers wait for every thread, so when another process holds one core a
    thread-per-core run crawls (measured: the digits demo went from ~2 steps/s to 25 s/step beside one busy
    process on 2 cores); one thread fewer costs ~15 % on an idle machine.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS") or os.environ.get("FLASHDMD_CPU_THREADS"):
        env = os.environ.get("FLASHDMD_CPU_THREADS")
        return int(env) if env and env.isdigit() and int(env) > 0 else None
    if available is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, available - 1)


def hooks_from_env() -> Hooks:
    """The collective timeouts and test hooks of trainer/hooks.py, from this process's environment."""
    return parse_hooks(os.environ)
