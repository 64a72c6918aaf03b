"""What one POST /generate will do, resolved once when the request is validated (api/routes/generate.py).

`GenerationPlan` holds everything the request's checkpoint decides (its info, the timestep list for the
steps asked, the size, the work units), so nothing downstream reads meta.json or resolves steps again: the
batcher groups requests by the plan's `BatchKey`, and the sampler call takes the timesteps and the checkpoint
info from that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from inference.checkpoint import CheckpointInfo


class Row(NamedTuple):
    """One image of a request."""

    prompt: str
    seed: int


@dataclass(frozen=True)
class BatchKey:
    """What every row of one sampler call shares. Requests with equal keys may share a call."""

    path: str  # the checkpoint folder (realpath): the pipeline cache's key
    width: int
    height: int
    timesteps: tuple[int, ...]
    guidance: float
    negative_prompt: str | None  # only with guidance != 1
    # Read once at validation and handed to the pipeline cache, so a cold load does not read meta.json again.
    # Not part of equality: two requests for one folder carry equal infos.
    checkpoint: CheckpointInfo = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class GenerationPlan:
    checkpoint: CheckpointInfo
    timesteps: tuple[int, ...]
    width: int
    height: int
    work: float  # api/generate_cost.py units
    guidance: float = 1.0
    negative_prompt: str | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def key(self) -> BatchKey:
        return BatchKey(str(self.checkpoint.path), self.width, self.height, self.timesteps, self.guidance,
                        self.negative_prompt if self.guidance != 1.0 else None, self.checkpoint)
