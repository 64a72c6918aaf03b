"""The reaper: jobs whose worker stopped heartbeating are requeued (or finished), lost sends are retried, and
jobs sent but never claimed (a lost broker message) are sent again after FLASHDMD_REDISPATCH_AFTER_SECONDS.

It runs as a thread in every API process. Each move is one conditional UPDATE, so
several replicas can reap at once and each job moves exactly once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api import crud
from api.db import db_now
from api.models import WAITING, Job
from api.settings import Settings

log = logging.getLogger(__name__)
OWNED = ("starting", "running")


@dataclass
class Reaped:
    requeued: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)


def reap_once(*, sessions: sessionmaker[Session], settings: Settings, send: Callable[[str], bool]) -> Reaped:
    out = Reaped()
    with sessions() as session:
        now = db_now(session)
        stale = Job.heartbeat_at < now - timedelta(seconds=settings.stale_after_seconds)

        def move(where: list, **values: object) -> list[str]:  # type: ignore[type-arg]
            stmt = (update(Job).where(stale, *where).values(updated_at=now, **values).returning(Job.id)
                    .execution_options(synchronize_session=False))
            return list(session.scalars(stmt))

        # The worker died while stopping the job: the stop is what was asked for.
        out.cancelled = move([Job.status == "cancelling"], status="cancelled", finished_at=now)
        out.failed = move([Job.status.in_(OWNED), Job.recoveries >= settings.max_recoveries], status="failed",
                          finished_at=now, error_code="worker_lost",
                          error_message=f"the worker stopped heartbeating {settings.max_recoveries + 1} times")
        out.requeued = move([Job.status.in_(OWNED)], status="recovering", recoveries=Job.recoveries + 1,
                            worker=None, trainer_pid=None, dispatched_at=None)
        for kind, ids, message in (
            ("cancelled", out.cancelled, "the worker was lost while cancelling"),
            ("failed", out.failed, "the worker was lost too many times"),
            ("recovering", out.requeued, "the worker stopped heartbeating; requeued to resume from a checkpoint"),
        ):
            for job_id in ids:
                crud.add_event(session=session, job_id=job_id, kind=kind, message=message)
        session.commit()

        # Sends that failed (broker down) or never happened (the sender died after the commit). The grace
        # keeps the reaper from racing a request that is about to record its own send.
        grace = now - timedelta(seconds=settings.stale_after_seconds)
        pending = session.scalars(
            select(Job.id).where(Job.status.in_(WAITING), Job.dispatched_at.is_(None), Job.updated_at < grace)
        ).all()
        for job_id in [*out.requeued, *pending]:
            if crud.dispatch(session=session, job_id=job_id, send=send):
                out.dispatched.append(job_id)
        # Sent, but nobody claimed it: the message may be lost (a broker restarted empty, a worker that died
        # before claiming). Sent again, once per redispatch interval; a duplicate is a no-op at the claim.
        sent_before = now - timedelta(seconds=settings.redispatch_after_seconds)
        unclaimed = session.scalars(
            select(Job.id).where(Job.status.in_(WAITING), Job.dispatched_at < sent_before).limit(1000)
        ).all()
        age = f"{settings.redispatch_after_seconds:g}"
        for job_id in unclaimed:
            if crud.resend(session=session, job_id=job_id, send=send, sent_before=sent_before,
                           reason=f"not claimed {age} s after its task was sent; sent again"):
                out.redispatched.append(job_id)
    for name in ("requeued", "cancelled", "failed", "redispatched"):
        if ids := getattr(out, name):
            log.warning("reaper %s %s", name, ", ".join(ids))
    return out


def resend_waiting(*, sessions: sessionmaker[Session], queue: str, queue_for: Callable[[str], str | None],
                   send: Callable[[str], bool], worker: str) -> list[str]:
    """A worker that starts sends again what its pool has waiting: messages sent while no worker read the
    queue may be gone (a broker restarted empty). Duplicates are no-ops at the atomic claim."""
    out = []
    with sessions() as session:
        waiting = session.scalars(select(Job.id).where(Job.status.in_(WAITING)).order_by(Job.id).limit(1000)).all()
        for job_id in waiting:
            if queue_for(job_id) != queue:
                continue
            if crud.resend(session=session, job_id=job_id, send=send,
                           reason=f"worker {worker} started on {queue}; sent again"):
                out.append(job_id)
    if out:
        log.info("worker %s re-sent %d waiting job(s) of %s", worker, len(out), queue)
    return out


class Reaper(threading.Thread):
    def __init__(
        self, *, sessions: sessionmaker[Session], settings: Settings, send: Callable[[str], bool]
    ) -> None:
        super().__init__(name="flashdmd-reaper", daemon=True)
        self.sessions, self.settings, self.send = sessions, settings, send
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.reaper_interval_seconds):
            try:
                reap_once(sessions=self.sessions, settings=self.settings, send=self.send)
            except Exception:  # a database blip must not end the thread
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
