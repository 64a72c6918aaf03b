"""Request and response bodies, layered as Create / Public / list-of-Public."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator

from api.models import Job
from inference.checkpoint import export_formats
from trainer.jobspec import DistillJob, EvalJob, PrepareJob, RLJob

T = TypeVar("T")

TINY_SPEC_EXAMPLE = {
    "kind": "distill",
    "model": {"teacher": "tiny:sdxl"},
    "data": {"builtin": "digits"},
    "train": {"max_steps": 6, "batch_size": 2, "mixed_precision": "no", "checkpoint_every": 2, "sample_every": 3},
    "distill": {"discriminator": {"backbone": "tiny"}},
}


class ErrorInfo(BaseModel):
    code: str
    message: str
    fields: list[str] | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool = False


# What the OpenAPI schema shows for `spec`: the trainer's job models, by `kind`, so that clients
# can be generated and fuzzers produce specs that get past the first check.
JobSpecSchema = Annotated[DistillJob | RLJob | EvalJob | PrepareJob, Field(discriminator="kind")]


def _spec_mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("the spec must be a mapping")
    return value


def _storable(value: str | None) -> str | None:
    """Postgres text refuses NUL, and a lone surrogate (a JSON "\\ud800" escape) cannot be encoded."""
    if value is not None and ("\x00" in value or _unencodable(value)):
        raise ValueError("must be Unicode text without NUL characters or lone surrogates")
    return value


def _unencodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Validated as a plain mapping here, and then by the trainer's own models (trainer.jobspec.parse_spec) in
    # the route, so the API and `flashdmd train` accept exactly the same specs (`kind` defaults to distill)
    # and report errors the same way. The schema still documents those models.
    spec: Annotated[dict[str, Any], PlainValidator(_spec_mapping, json_schema_input_type=JobSpecSchema)] = Field(
        description="the job spec, as for `flashdmd train`", examples=[TINY_SPEC_EXAMPLE])
    name: Annotated[str | None, AfterValidator(_storable)] = Field(None, max_length=200)


class Progress(BaseModel):
    step: int
    total_steps: int
    rate: float | None = Field(None, description="steps per second, over the latest steps")
    eta: float | None = Field(None, description="seconds left at the current rate")


class JobPublic(BaseModel):
    id: str
    name: str | None
    kind: str
    status: str
    attempt: int
    cancel_requested: bool
    progress: Progress
    error: ErrorInfo | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    notice: str | None = Field(None, description="set on POST /jobs when no worker of the job's pool is live: "
                               "the job is queued and starts when one is")
    system: dict[str, Any] | None = Field(
        None, description="the supervising worker's device, memory in use and utilisation at its last heartbeat")

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        step, total, rate = job.progress_step, job.total_steps, job.progress_rate
        if job.status == "succeeded":
            step, eta = max(step, total), 0.0
        elif job.status in ("starting", "running") and rate:  # a cancelling job's rate says nothing of its end
            eta = max(total - step, 0) / rate
        else:
            eta = None
        error = ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None
        return cls(
            id=job.id,
            name=job.name,
            kind=job.kind,
            status=job.status,
            attempt=job.attempt,
            cancel_requested=job.cancel_requested,
            progress=Progress(step=step, total_steps=total, rate=rate, eta=eta),
            error=error,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            spec=job.spec,
            system=job.system,
        )


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    time: datetime
    kind: str
    message: str
    data: dict[str, Any]
    source: str


class MetricPoint(BaseModel):
    step: int
    wall_time: float
    value: float | None = Field(description="null for NaN or infinity, which JSON cannot carry")

    @classmethod
    def of(cls, step: int, wall_time: float, value: float | None) -> MetricPoint:
        return cls(step=step, wall_time=wall_time, value=value if value is not None and math.isfinite(value) else None)


class MetricsPublic(BaseModel):
    key: str | None
    keys: list[str]
    points: list[MetricPoint]
    has_more: bool


class CheckpointPublic(BaseModel):
    step: int
    path: str = Field(description="absolute path on the shared storage volume")
    meta: dict[str, Any]
    created_at: datetime
    formats: list[str] = Field(default_factory=list, description="the `flashdmd export --format` values it supports")
    steps: list[int] = Field(default_factory=list, description="the sampler step counts /generate accepts for it")

    @classmethod
    def of(cls, *, step: int, path: str, meta: dict[str, Any], created_at: datetime) -> CheckpointPublic:
        return cls(step=step, path=path, meta=meta, created_at=created_at, formats=export_formats(meta),
                   steps=checkpoint_steps(meta))


def checkpoint_steps(meta: dict[str, Any]) -> list[int]:
    """Its own K plus any distilled step sets (inference.checkpoint.CheckpointInfo.allowed_steps, from meta.json).

    A value that is not a count is skipped: a listing must not fail on a damaged meta.json (generate reports it).
    """
    found: set[int] = set()
    timesteps = meta.get("timesteps")
    own = meta.get("num_steps") or (len(timesteps) if isinstance(timesteps, list) else None)
    sets = meta.get("step_sets")
    for value in [own, *(sets if isinstance(sets, dict) else {})]:
        try:
            found.add(int(value))
        except (TypeError, ValueError):
            continue
    return sorted(n for n in found if n > 0)


class SampleCell(BaseModel):
    prompt: str
    seed: int
    row: int
    col: int


class SamplePublic(BaseModel):
    step: int
    url: str
    created_at: datetime
    cells: list[SampleCell] = Field(default_factory=list, description="the grid's prompts and seeds, row by row")


class HealthPublic(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
