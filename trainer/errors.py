"""Errors the CLI turns into clear messages and exit codes (no tracebacks for user mistakes), and the one-line
`code: cause` a failed job shows.

A failed job's error is read by `jobs show`, `--follow`, /ui and the API from one field, so it must be one line
a user can act on: a stable code, then the cause, naming the spec field where there is one. The trainer writes
it as a `failed` event (`classify` of the exception); api/runner.py reads that event, and `job_error` turns an
event from an older trainer (whose code is an exception's class name) or a bare exit into the same codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INVALID_INPUT = "invalid_input"  # the spec or its inputs are wrong: fix them and submit again
MODEL_UNREACHABLE = "model_unreachable"  # a hub id while the hub cannot be reached (offline, no network)
OUT_OF_MEMORY = "out_of_memory"  # the GPU (or host) ran out of memory: a smaller batch, LoRA, more GPUs
TRAINER_FAILED = "trainer_failed"  # anything else: a crash, a collective's timeout, non-finite losses
COLLAPSED = "collapsed"  # the collapse guard stopped the run (train.guard): a checkpoint before the trip is kept
CODES = (INVALID_INPUT, MODEL_UNREACHABLE, OUT_OF_MEMORY, TRAINER_FAILED, COLLAPSED)
MAX_MESSAGE = 500  # one line in a terminal or a table cell; the whole story stays in the run's logs


class InputError(Exception):
    """A user-facing problem with the inputs: a missing teacher path, an empty data folder, ..."""

    code = INVALID_INPUT


class ModelUnreachable(InputError):
    """A hub id that cannot be fetched because the hub cannot be reached (not because the id is wrong)."""

    code = MODEL_UNREACHABLE

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class Collapsed(TrainingError):
    """The collapse guard's statistics stayed out of bounds for `patience` validations (train.guard.action stop)."""

    code = COLLAPSED


class StopRequested(Exception):
    """The sink asked the run to stop; a checkpoint has been written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step = step


@dataclass(frozen=True)
class Failure:
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def one_line(text: str) -> str:
    """`text` on one line: its non-empty lines joined by "; " (" " after a colon), at most MAX_MESSAGE chars."""
    line = ""
    for part in (p.strip() for p in text.splitlines()):
        if part:  # a heading ending in ":" runs on into its first item; the items are separated by "; "
            line += part if not line else (" " if line.endswith(":") else "; ") + part
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 1] + "…"


_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


def is_oom(text: str) -> bool:
    return bool(_OOM.search(text))


def classify(err: BaseException) -> Failure:
    """The code and one-line cause of an exception that ended a run."""
    if isinstance(err, InputError):
        return Failure(err.code, one_line(str(err)))
    text = str(err)
    if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError) or is_oom(text):
        # torch's message is a paragraph (allocator advice); its first sentence holds the figures.
        first = text.split(". ", 1)[0] if text else type(err).__name__
        return Failure(OUT_OF_MEMORY, one_line(first))
    return Failure(TRAINER_FAILED, one_line(f"{type(err).__name__}: {text}" if text else type(err).__name__))


def job_error(event_code: str | None, message: str) -> Failure:
    """A trainer's `failed` event (code, message) in the job's codes: ours pass through; an exception's class
    name (what the training loop records) becomes out_of_memory or trainer_failed."""
    if event_code in CODES:
        return Failure(event_code, one_line(message))
    if event_code == "OutOfMemoryError" or is_oom(message):
        return Failure(OUT_OF_MEMORY, one_line(message.split(". ", 1)[0]))
    return Failure(TRAINER_FAILED, one_line(message))


def from_log(exit_code: int, tail: str, *, bad_input_exit: int) -> Failure:
    """The failure of a trainer that wrote no `failed` event, from its exit code and the end of its log: the
    last `error: ...` line (what flashjob/cli.py prints), else the last line of a traceback."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    # The last error with the lines it printed below it (an invalid spec lists its fields there).
    errors = ["\n".join([lines[starts[-1]][len("error: "):], *lines[starts[-1] + 1:]])] if starts else []
    if exit_code == bad_input_exit:
        return Failure(INVALID_INPUT, one_line(errors[-1] if errors else "the trainer rejected its input"))
    what = f"killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
    if exit_code == -9:
        what += " (SIGKILL: the host's out-of-memory killer does this)"
    cause = errors[-1] if errors else (lines[-1] if lines else "")
    if is_oom(cause):
        return Failure(OUT_OF_MEMORY, one_line(cause.split(". ", 1)[0]))
    return Failure(TRAINER_FAILED, one_line(f"the trainer {what}" + (f": {cause}" if cause else "")))
