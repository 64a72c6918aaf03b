"""A wall-clock limit on every sampler call of POST /generate (FLASHDMD_GENERATE_CALL_TIMEOUT_SECONDS).

A thread cannot be killed, and a sampler call is one long stretch of torch work in a worker thread, so the
limit is cooperative: every module of the pipeline (text encoders, denoiser, VAE) gets a forward pre-hook
that raises `GenerationTimeout` once the calling thread's deadline has passed. The check is a clock read
per module call; a call past its deadline stops at its next layer, its thread is free at once, and the
batcher hands the error to each request of the call (503 + Retry-After, api/routes/generate.py).

A compiled denoiser (FLASHDMD_GENERATE_COMPILE) gets no hooks: a hook that reads the clock would break its
graph. There the check runs at the text encoders and at each image's VAE decode, and the cost bound
(api/generate_cost.py) is what keeps one denoiser pass short.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()
_HOOKED = "_flashdmd_deadline_hooked"


class GenerationTimeout(Exception):
    """A sampler call ran past its wall-clock limit and was stopped."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the generation ran past its {seconds:g} s limit and was stopped")
        self.seconds = seconds


def _check(*_: Any) -> None:
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline[0]:
        raise GenerationTimeout(deadline[1])


def install(pipe: Any) -> None:
    """Hook every module of a FewStepPipeline once (idempotent; the cache keeps the pipeline for reuse)."""
    if getattr(pipe, _HOOKED, False):
        return
    teacher = pipe.teacher
    modules = [teacher.vae, *teacher.text_encoders()]
    if getattr(pipe, "compiled", None) is None:
        modules.append(pipe.net)
    for root in modules:
        for module in root.modules():
            module.register_forward_pre_hook(_check)
    setattr(pipe, _HOOKED, True)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within this block, in this thread, hooked modules raise GenerationTimeout after `seconds`."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = (time.monotonic() + seconds, seconds)
    try:
        yield
    finally:
        _local.deadline = previous
