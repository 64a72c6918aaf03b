"""Keyword-only helpers over the tables. State changes are conditional UPDATEs, so they stay atomic
against the worker and the reaper without holding locks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db import utcnow
from api.errors import APIError, not_found
from api.models import TERMINAL, WAITING, ApiToken, Checkpoint, Event, Job, Metric, Sample


def add_event(*, session: Session, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
    session.add(Event(job_id=job_id, time=utcnow(), kind=kind, message=message, data=data or {}, source="service"))


def _transition(session: Session, job_id: str, where: Sequence[ColumnElement[bool]], **values: Any) -> bool:
    values.setdefault("updated_at", utcnow())
    result = session.execute(
        update(Job).where(Job.id == job_id, *where).values(**values).execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _plausible_id(job_id: str) -> bool:
    # Postgres refuses NUL in a text parameter (a 500); no job id has one, so such an id is simply not found.
    return "\x00" not in job_id


def get_job(*, session: Session, owner: ApiToken, job_id: str) -> Job:
    """The owner's job; another owner's job is reported exactly like a missing one."""
    if not _plausible_id(job_id):
        raise not_found()
    job = session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner.id))
    if job is None:
        raise not_found()
    return job


def owns_job(*, session: Session, owner: ApiToken, job_id: str) -> bool:
    if not _plausible_id(job_id):
        return False
    return session.scalar(select(Job.id).where(Job.id == job_id, Job.owner_id == owner.id)) is not None


def _by_key(session: Session, owner: ApiToken, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner_id == owner.id, Job.idempotency_key == key))


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise APIError("idempotency_conflict", "this Idempotency-Key was used with a different request body")
    return job


def check_active_quota(*, session: Session, owner: ApiToken, limit: int) -> None:
    """409 `quota_exceeded` when the owner already has `limit` unfinished jobs (0: no limit).

    The owner's token row is locked first (FOR UPDATE on Postgres; SQLite's BEGIN IMMEDIATE already
    serialises writers), so two concurrent submits cannot both see room for one more job.
    """
    if not limit:
        return
    session.execute(select(ApiToken.id).where(ApiToken.id == owner.id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner.id, Job.status.not_in(TERMINAL))
    ) or 0
    if active >= limit:
        session.rollback()
        # 409, not 429: this clears when one of the owner's jobs finishes, not after some time, so a
        # client's automatic retry-with-backoff on 429 would only spin (the reference's Cog answers a
        # full house with 409 as well).
        raise APIError(
            "quota_exceeded",
            f"active jobs quota: you have {active} unfinished jobs and the limit is {limit} "
            "(FLASHDMD_MAX_ACTIVE_JOBS_PER_OWNER); cancel one or wait for one to finish",
            409,
        )


def create_job(
    *,
    session: Session,
    owner: ApiToken,
    spec: dict[str, Any],
    total_steps: int,
    name: str | None,
    idempotency_key: str | None,
    request_hash: str,
    max_active: int = 0,
) -> tuple[Job, bool]:
    """Insert a queued job; with an Idempotency-Key already used by this owner, return that job instead."""
    if idempotency_key and (existing := _by_key(session, owner, idempotency_key)):
        return _replay(existing, request_hash), False
    check_active_quota(session=session, owner=owner, limit=max_active)
    job = Job(
        owner_id=owner.id, name=name or spec.get("name"), kind=spec["kind"], status="queued", spec=spec,
        total_steps=total_steps, idempotency_key=idempotency_key, request_hash=request_hash,
        cancel_requested=False, attempt=0, recoveries=0, progress_step=0,
    )
    session.add(job)
    try:
        session.flush()
        add_event(session=session, job_id=job.id, kind="queued", message="job created")
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the insert: answer with its job.
        session.rollback()
        if idempotency_key and (existing := _by_key(session, owner, idempotency_key)):
            return _replay(existing, request_hash), False
        raise
    return job, True


def dispatch(*, session: Session, job_id: str, send: Callable[[str], bool]) -> bool:
    """Send the job's task (after its row is committed) and record that it went out."""
    if not send(job_id):
        return False
    _transition(session, job_id, [Job.status.in_(WAITING)], dispatched_at=utcnow())
    session.commit()
    return True


def resend(*, session: Session, job_id: str, send: Callable[[str], bool], reason: str,
           sent_before: datetime | None = None) -> bool:
    """Send a waiting job's task again (its message may be lost: a broker restarted empty, a worker that died
    before claiming), and record an event. The re-send is itself fenced: one conditional UPDATE of
    `dispatched_at` decides which of several replicas sends, and a duplicate message is a no-op at the atomic
    claim. `sent_before`: only if the last send is older than this (the reaper's redispatch time)."""
    now = utcnow()
    where = [Job.status.in_(WAITING)]
    if sent_before is not None:
        where.append(Job.dispatched_at < sent_before)
    if not _transition(session, job_id, where, dispatched_at=now):
        session.rollback()
        return False
    add_event(session=session, job_id=job_id, kind="redispatched", message=reason)
    session.commit()
    if send(job_id):
        return True
    # Not sent (broker down, no pool): leave it to the reaper's retry of unsent jobs.
    _transition(session, job_id, [Job.status.in_(WAITING), Job.dispatched_at == now], dispatched_at=None)
    session.commit()
    return False


def list_jobs(
    *, session: Session, owner: ApiToken, status: str | None, after: str | None, limit: int
) -> tuple[Sequence[Job], bool]:
    """Newest first; `after` is the last id of the previous page (ids sort by creation time)."""
    query = select(Job).where(Job.owner_id == owner.id)
    if status:
        query = query.where(Job.status == status)
    if after:
        query = query.where(Job.id < after)
    rows = session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def request_cancel(*, session: Session, job: Job) -> Job:
    """A waiting job is cancelled at once; a running one gets the flag its worker polls."""
    if _transition(session, job.id, [Job.status.in_(WAITING)], status="cancelled", cancel_requested=True,
                   finished_at=utcnow()):
        add_event(session=session, job_id=job.id, kind="cancelled", message="cancelled before it started")
    elif _transition(session, job.id, [Job.status.in_(("starting", "running"))], status="cancelling",
                     cancel_requested=True):
        add_event(session=session, job_id=job.id, kind="cancel_requested", message="cancel requested")
    else:
        session.refresh(job)
        if job.status not in ("cancelling", "cancelled"):  # asking twice is fine; a finished job cannot cancel
            raise APIError("invalid_state", f"a {job.status} job cannot be cancelled")
    session.commit()
    session.refresh(job)
    return job


def cancel_owner_jobs(*, session: Session, owner_id: int) -> list[str]:
    """Cancel every unfinished job of one owner (`flashdmd token revoke --cancel-jobs`): the ids asked to stop."""
    ids = session.scalars(select(Job.id).where(Job.owner_id == owner_id, Job.status.not_in(TERMINAL))).all()
    out = []
    for job_id in ids:
        job = session.get(Job, job_id)
        if job is None:
            continue
        try:
            request_cancel(session=session, job=job)
        except APIError:  # it finished (or is cancelling) meanwhile: nothing left to stop
            session.rollback()
            continue
        out.append(job_id)
    return out


def request_resume(*, session: Session, job: Job, owner: ApiToken | None = None, max_active: int = 0) -> Job:
    """Queue a cancelled or failed job again; the worker resumes from its latest checkpoint."""
    if owner is not None and job.status in TERMINAL:  # a resumed job is active again: it counts
        check_active_quota(session=session, owner=owner, limit=max_active)
    if not _transition(
        session, job.id, [Job.status.in_(("cancelled", "failed"))], status="queued", cancel_requested=False,
        error_code=None, error_message=None, finished_at=None, dispatched_at=None, heartbeat_at=None, recoveries=0,
    ):
        session.refresh(job)
        raise APIError("invalid_state", f"only cancelled or failed jobs can be resumed, this one is {job.status}")
    add_event(session=session, job_id=job.id, kind="resumed", message="resume requested")
    session.commit()
    session.refresh(job)
    return job


def list_events(*, session: Session, job_id: str, after: int, limit: int) -> tuple[Sequence[Event], bool]:
    rows = session.scalars(
        select(Event).where(Event.job_id == job_id, Event.id > after).order_by(Event.id).limit(limit + 1)
    ).all()
    return rows[:limit], len(rows) > limit


# SELECT DISTINCT would read every point of the job (30 ms at 100k points); this walks the (job_id, key, step)
# primary key from one key to the next instead: one index probe per key. Same SQL on Postgres and SQLite.
_KEYS = text("""
WITH RECURSIVE k(key) AS (
    SELECT min(key) FROM metrics WHERE job_id = :job_id
    UNION ALL
    SELECT (SELECT min(m.key) FROM metrics m WHERE m.job_id = :job_id AND m.key > k.key) FROM k WHERE k.key IS NOT NULL
)
SELECT key FROM k WHERE key IS NOT NULL
""")


def metric_keys(*, session: Session, job_id: str) -> list[str]:
    return list(session.scalars(_KEYS, {"job_id": job_id}))


def metric_points(
    *, session: Session, job_id: str, key: str, since_step: int | None, stride: int, limit: int
) -> tuple[list[tuple[int, float, float | None]], bool]:
    """Points of one key after `since_step`, at most `limit` of them (+ whether more follow).

    With a stride, the first point and every stride-th one after it; with `since_step` as well,
    every stride-th point after since_step. So paging with since_step = the last step returned
    continues the same thinned series.
    """
    where = [Metric.job_id == job_id, Metric.key == key]
    if since_step is not None:
        where.append(Metric.step > since_step)
    query: Select[Any]
    if stride == 1:
        query = select(Metric.step, Metric.wall_time, Metric.value).where(*where).order_by(Metric.step)
    else:
        numbered = select(
            Metric.step, Metric.wall_time, Metric.value,
            func.row_number().over(order_by=Metric.step).label("n"),
        ).where(*where).subquery()
        phase = 0 if since_step is None else stride - 1
        query = (select(numbered.c.step, numbered.c.wall_time, numbered.c.value)
                 .where((numbered.c.n - 1) % stride == phase).order_by(numbered.c.step))
    rows = session.execute(query.limit(limit + 1)).all()
    return [(r[0], r[1], r[2]) for r in rows[:limit]], len(rows) > limit


def list_checkpoints(*, session: Session, job_id: str) -> Sequence[Checkpoint]:
    return session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()


def list_samples(*, session: Session, job_id: str) -> Sequence[Sample]:
    return session.scalars(select(Sample).where(Sample.job_id == job_id).order_by(Sample.step)).all()


def get_sample(*, session: Session, job_id: str, step: int) -> Sample:
    sample = session.get(Sample, (job_id, step))
    if sample is None:
        raise not_found("sample")
    return sample
