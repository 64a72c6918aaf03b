"""Errors the CLI turns into clear messages and exit codes (no tracebacks for user mistakes)."""


class InputError(Exception):
    """A user-facing problem with the inputs: a missing teacher path, an empty data folder, ..."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class StopRequested(Exception):
    """The sink asked the run to stop; a checkpoint has been written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step = step
