"""ORM tables. The Postgres job row is the only source of truth (DESIGN §1); Celery only dispatches."""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from api.db import UTCDateTime, utcnow

JOB_STATUSES = ("queued", "starting", "running", "cancelling", "cancelled", "succeeded", "failed", "recovering")
TERMINAL = ("cancelled", "succeeded", "failed")
WAITING = ("queued", "recovering")  # a worker may claim these
ACTIVE = ("starting", "running", "cancelling")  # a worker owns these and heartbeats them

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid alias).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def new_job_id() -> str:
    """Time-ordered ids, so `ORDER BY id` is creation order and a cursor needs no extra lookup."""
    return f"job_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (Index(None, "public_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # sha256 of the token: tokens are 32 random bytes, so a fast hash is enough and lookups stay indexed.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Random and not secret (it is part of the token, before the secret): listings and revoke name it.
    public_id: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"),
        UniqueConstraint("owner_id", "idempotency_key"),
        Index(None, "owner_id", "id"),
        Index(None, "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"))
    name: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict[str, Any]]
    total_steps: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    recoveries: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    trainer_pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None]
    dispatched_at: Mapped[datetime | None]  # NULL: the send failed and the reaper will retry it

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    # Kept up to date by the worker's ingest so that GET /jobs/{id} reads one row.
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_rate: Mapped[float | None] = mapped_column(Float)
    # The supervising worker's last sample of its device, memory and utilisation (api/sysinfo.py), written
    # with each heartbeat; NULL until the first one.
    system: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        # Trainer events are keyed by their byte offset in events.jsonl, so re-reading the file is a no-op.
        UniqueConstraint("job_id", "source_offset"),
        Index(None, "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    time: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(16))  # "trainer" or "service"
    source_offset: Mapped[int | None] = mapped_column(BigInteger)


class Metric(Base):
    """One scalar per (job, key, step): the primary key is the uniqueness the resume story relies on."""

    __tablename__ = "metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    wall_time: Mapped[float] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float)  # SQLite turns NaN into NULL


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the run directory
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Sample(Base):
    __tablename__ = "samples"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the run directory
    # The grid's step-N.json (trainer/validation.py): its cells' prompts and seeds, for captions.
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A worker and the size it advertises; rows with a stale heartbeat no longer count (api/workers.py)."""

    __tablename__ = "workers"
    __table_args__ = (Index(None, "heartbeat_at"),)

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # <host>:<pid> of the worker's main process
    pool: Mapped[str] = mapped_column(String(32))  # gpu<N> or cpu<N>
    queue: Mapped[str] = mapped_column(String(255))  # the Celery queue it consumes: <settings.queue>-<pool>
    gpus: Mapped[int] = mapped_column(Integer)
    processes: Mapped[int] = mapped_column(Integer)  # the most processes it launches for one job
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
