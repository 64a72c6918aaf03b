"""What the training loop (trainer/loop.py `run_loop`) asks of a training method, as EDM2's `training_loop`
takes its loss: stage 1 (`trainer/distill_method.py` DistillMethod, Alg. 1 lines 5-26) and stage 2
(`trainer/rl_loop.py` RLMethod, Alg. 1 lines 27-31) implement it; the loop owns everything else (resume,
events, the non-finite guard, progress, logging, trackers, validation samples, checkpoints, stop).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.hooks import Hooks
    from trainer.jobspec import DistillJob
    from trainer.models import Teacher
    from trainer.schedules import Parameterisation
    from trainer.sink import Sink
    from trainer.validation import ValidationPlan


@dataclass
class Setup:
    """What the loop has built before the method: the accelerator, the teacher, where the run writes."""

    cfg: DistillJob
    acc: Accelerator
    teacher: Teacher
    sink: Sink
    run_dir: Path
    hooks: Hooks


class Method(Protocol):
    """One training method. Checkpoints read `cfg`, `teacher`, `generator`, `S`, `sharded` and the state."""

    cfg: DistillJob
    teacher: Teacher
    generator: nn.Module  # what validation samples (the K-step student)
    S: list[int]  # the student's timesteps
    param: Parameterisation
    sharded: bool  # FSDP: checkpoints hold shards (trainer/sharded.py)
    label: str  # the progress bar's description
    progress_keys: tuple[str, ...]  # the metrics the progress bar shows

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The state of the networks: saved as trainable/<name>.safetensors, restored on resume."""
        ...

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimiser state, saved and restored with accelerate's state."""
        ...

    def started(self, start: int) -> tuple[str, dict[str, Any]]:
        """The `started` event's message and its method-specific fields."""
        ...

    def batches(self, start: int) -> Iterator[Any]:
        """This rank's inputs from step `start` on, one item per step (resuming continues the data order)."""
        ...

    def step(self, batch: Any, step: int) -> dict[str, float]:
        """One optimiser update of every network; returns its metrics (`skipped/*` = an update skipped)."""
        ...

    def sample(self, plan: ValidationPlan, step: int, out_dir: Path | None,
               ) -> tuple[list[Path], dict[str, float], torch.Tensor]:
        """Validation grids (written by rank 0: out_dir given; every rank joins), metrics to log with them, and the
        first size's latents (the collapse guard judges them)."""
        ...

    def checkpoint_meta(self) -> dict[str, dict]:
        """Extra JSON files written beside a checkpoint's meta.json (file name -> content)."""
        ...
