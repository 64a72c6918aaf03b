"""/jobs: create, list, inspect, cancel and resume training jobs, and read what they produced."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse

from api import crud, workers
from api.deps import CurrentToken, DispatcherDep, SessionDep, SettingsDep
from api.edge import public_url
from api.errors import APIError, not_found
from api.models import JOB_STATUSES, Job
from api.schemas import (
    CheckpointPublic,
    ErrorBody,
    EventPublic,
    JobCreate,
    JobPublic,
    MetricPoint,
    MetricsPublic,
    Page,
    SamplePublic,
)
from api.settings import Settings
from api.spec_paths import check_spec_paths
from trainer.jobspec import SpecError, parse_spec, total_steps
from trainer.jobspec.limits import INT32_MAX

JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
errors = {code: {"model": ErrorBody} for code in (401, 404, 409, 422)}
# Every integer a client sends must fit the column it is compared with: SQLite refuses Python ints
# beyond 64 bits with an OverflowError. Steps are 32-bit (trainer/jobspec/limits.py INT32_MAX); event ids are 64-bit.
INT64_MAX = 2**63 - 1
Step = Annotated[int, Path(ge=0, le=INT32_MAX, description="a training step")]
# Text that Postgres can compare: no NUL (psycopg refuses it) and at most the column's length.
NO_NUL = r"^[^\x00]*$"
router = APIRouter(prefix="/jobs", tags=["jobs"], responses=errors)  # type: ignore[arg-type]


def _validated_spec(raw: dict[str, Any], settings: Settings, owns_job: Callable[[str], bool]) -> dict[str, Any]:
    try:
        parsed = parse_spec(raw)
        spec = parsed.model_dump(mode="json")
    except SpecError as err:
        # The trainer's message has one "field.path: message" line per problem; name the fields from the body.
        fields, lines = [], []
        for line in str(err).splitlines():
            field, _, message = line.partition(": ")
            field = "spec" if field == "<spec>" else f"spec.{field}"
            fields.append(field)
            lines.append(f"{field}: {message}")
        raise APIError("invalid_request", "; ".join(lines), fields=fields) from None
    if parsed.kind not in ("eval", "prepare") and parsed.train.max_steps > settings.max_train_steps:
        # The spec allows up to 2^31 - 1; the server's cap keeps one job from holding a worker for ever.
        raise APIError(
            "invalid_request", f"spec.train.max_steps: {parsed.train.max_steps} is above this server's limit of "
            f"{settings.max_train_steps} steps (FLASHDMD_MAX_TRAIN_STEPS)", fields=["spec.train.max_steps"])
    if spec["kind"] == "eval" and spec["eval"]["job"]:
        # An eval job may name one of the caller's jobs; the trainer only knows paths, so store its run directory.
        source = spec["eval"]["job"]
        if not owns_job(source):
            raise APIError("invalid_request", f"spec.eval.job: no job {source!r} of yours", fields=["spec.eval.job"])
        spec["eval"].update(checkpoint=str(settings.run_dir(source)), job=None)
    return check_spec_paths(spec, settings=settings, owns_job=owns_job)


@router.post("", status_code=201, response_model=JobPublic)
def create_job(
    body: JobCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    token: CurrentToken,
    dispatcher: DispatcherDep,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$")
    ] = None,
) -> JobPublic:
    """Validate the spec (the trainer's own models, plus the allowed roots) and queue the job.

    With an `Idempotency-Key` header, repeating the request returns the job it created
    (status 200, `Idempotent-Replayed: true`) instead of creating another. A token may hold at most
    FLASHDMD_MAX_ACTIVE_JOBS_PER_OWNER unfinished jobs (409 `quota_exceeded` past it).
    """
    reads = request.app.state.read_sessionmaker

    def owns(job_id: str) -> bool:
        # A short read of its own: the path checks read manifests and walk image folders, which must not run
        # inside this request's write transaction (on SQLite that would hold the database's write lock).
        with reads() as own_session:
            return crud.owns_job(session=own_session, owner=token, job_id=job_id)

    spec = _validated_spec(body.spec, settings, owns)
    with reads() as own_session:  # a short read of its own, like the ownership checks above
        placement = workers.check_capacity(session=own_session, settings=settings, spec=spec)  # 422: no pool fits
    queue = placement.queue
    request_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    job, created = crud.create_job(
        session=session, owner=token, spec=spec, total_steps=total_steps(parse_spec(spec)), name=body.name,
        idempotency_key=idempotency_key, request_hash=request_hash, max_active=settings.max_active_jobs_per_owner,
    )
    if created:
        crud.dispatch(session=session, job_id=job.id, send=lambda job_id: dispatcher.send(job_id, queue=queue))
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    out = JobPublic.of(job)
    if placement.notice and out.status in ("queued", "recovering"):
        out.notice = placement.notice
        response.headers["X-Worker-Live"] = "false"
    return out


@router.get("", response_model=Page[JobPublic])
def list_jobs(
    session: SessionDep,
    token: CurrentToken,
    status: JobStatus | None = None,
    after: Annotated[str | None, Query(max_length=64, pattern=NO_NUL, description="the last id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[JobPublic]:
    jobs, has_more = crud.list_jobs(session=session, owner=token, status=status, after=after, limit=limit)
    return Page[JobPublic](data=[JobPublic.of(j) for j in jobs], has_more=has_more)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, token: CurrentToken) -> JobPublic:
    return JobPublic.of(crud.get_job(session=session, owner=token, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, token: CurrentToken) -> JobPublic:
    """Cancel: a waiting job stops at once; a running one checkpoints and stops (then is killed after a grace)."""
    job = crud.get_job(session=session, owner=token, job_id=job_id)
    return JobPublic.of(crud.request_cancel(session=session, job=job))


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(
    job_id: str, session: SessionDep, token: CurrentToken, dispatcher: DispatcherDep, settings: SettingsDep
) -> JobPublic:
    """Queue a cancelled or failed job again; it continues from its latest checkpoint (counts toward the quota)."""
    job = crud.request_resume(session=session, job=crud.get_job(session=session, owner=token, job_id=job_id),
                              owner=token, max_active=settings.max_active_jobs_per_owner)
    crud.dispatch(session=session, job_id=job.id, send=dispatcher.send)
    return JobPublic.of(job)


@router.get("/{job_id}/events", response_model=Page[EventPublic])
def list_events(
    job_id: str,
    session: SessionDep,
    token: CurrentToken,
    after: Annotated[int, Query(ge=0, le=INT64_MAX, description="the last event id already seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[EventPublic]:
    job = crud.get_job(session=session, owner=token, job_id=job_id)
    events, has_more = crud.list_events(session=session, job_id=job.id, after=after, limit=limit)
    return Page[EventPublic](data=[EventPublic.model_validate(e) for e in events], has_more=has_more)


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def get_metrics(
    job_id: str,
    session: SessionDep,
    token: CurrentToken,
    key: Annotated[str | None, Query(max_length=128, pattern=NO_NUL,
                                     description="default: the first key in alphabetical order")] = None,
    since_step: Annotated[int | None, Query(ge=-1, le=INT32_MAX, description="only steps after this one")] = None,
    stride: Annotated[int, Query(ge=1, le=100_000, description="every stride-th point (counted from since_step)")] = 1,
    limit: Annotated[int, Query(ge=1, le=20_000)] = 1000,
) -> MetricsPublic:
    """Points `{step, wall_time, value}` of one metric; page with `since_step` = the last step returned."""
    job = crud.get_job(session=session, owner=token, job_id=job_id)
    keys = crud.metric_keys(session=session, job_id=job.id)
    key = key or (keys[0] if keys else None)
    points, has_more = (
        crud.metric_points(session=session, job_id=job.id, key=key, since_step=since_step, stride=stride, limit=limit)
        if key else ([], False)
    )
    return MetricsPublic(key=key, keys=keys, points=[MetricPoint.of(*p) for p in points], has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=Page[CheckpointPublic])
def list_checkpoints(job_id: str, session: SessionDep, token: CurrentToken, settings: SettingsDep) -> Page[CheckpointPublic]:
    job = crud.get_job(session=session, owner=token, job_id=job_id)
    run_dir = settings.run_dir(job.id)
    return Page[CheckpointPublic](data=[
        CheckpointPublic.of(step=c.step, path=str(run_dir / c.path), meta=c.meta, created_at=c.created_at)
        for c in crud.list_checkpoints(session=session, job_id=job.id)
    ])


@router.get("/{job_id}/samples", response_model=Page[SamplePublic])
def list_samples(job_id: str, session: SessionDep, token: CurrentToken, request: Request,
                 settings: SettingsDep) -> Page[SamplePublic]:
    """Image URLs are relative (or under FLASHDMD_PUBLIC_BASE_URL), never built from the request's Host."""
    job = crud.get_job(session=session, owner=token, job_id=job_id)
    return Page[SamplePublic](data=[
        SamplePublic(step=s.step, url=public_url(
            str(request.app.url_path_for("get_sample", job_id=job.id, step=s.step)), settings.public_base_url),
                     created_at=s.created_at, cells=(s.meta or {}).get("cells") or [])
        for s in crud.list_samples(session=session, job_id=job.id)
    ])


@router.get("/{job_id}/samples/{step}", name="get_sample", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}})
def get_sample(job_id: str, step: Step, session: SessionDep, token: CurrentToken, settings: SettingsDep) -> FileResponse:
    """The sample image the trainer wrote at `step`."""
    job: Job = crud.get_job(session=session, owner=token, job_id=job_id)
    sample = crud.get_sample(session=session, job_id=job.id, step=step)
    run_dir = settings.run_dir(job.id).resolve()
    path = (run_dir / sample.path).resolve()
    if not path.is_relative_to(run_dir) or not path.is_file():
        raise not_found("sample file")
    return FileResponse(path, media_type="image/png")
