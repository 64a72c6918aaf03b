"""What the process entry (flashjob/cli.py) needs from the trainer: exit codes, the CPU thread policy, and the
process's settings read from the environment (the one place the trainer reads them): the run's timeouts and
test hooks, the allowed roots the worker hands over, and the cache root."""

from __future__ import annotations

import os
from collections.abc import Mapping

from trainer.cache import CACHE_ENV, install_cache_root
from trainer.hooks import Hooks, parse_hooks
from trainer.roots import install_roots, parse_roots
from trainer.trackers import TrackerEnv, install_tracker_env

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


def configure_process(env: Mapping[str, str] | None = None) -> None:
    """Read this process's roots, cache root and tracker settings from `env` (default: the environment) and
    install them, once, at the process entry: library code below asks trainer/roots.py, trainer/cache.py and
    trainer/trackers.py, never the environment."""
    env = os.environ if env is None else env
    install_roots(parse_roots(env))
    install_cache_root(env.get(CACHE_ENV) or None)
    install_tracker_env(TrackerEnv.parse(env))


def hooks_from_env() -> Hooks:
    """The collective timeouts and test hooks of trainer/hooks.py, from this process's environment."""
    return parse_hooks(os.environ)


def quiet_libraries() -> None:
    """Keep a run's log to what the run says: progress, events and errors. Library notices that repeat at every
    start (optional-dependency fallbacks, weight-loading bars, deprecation chatter) go; their errors still show.
    The log is what the dashboard's log panel and `flashdmd jobs logs` show, so this is done at the source."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the plan and trace tools run without them
        return
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
