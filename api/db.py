"""Engines, sessions and the few dialect differences between Postgres and SQLite."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Table, create_engine, event, func, make_url, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both dialects (SQLite stores them naive and would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# An execution option that marks an engine (and the sessions bound to it) as read-only: on SQLite its
# transactions start DEFERRED, so in WAL mode they read a snapshot and never wait for the writer.
READ_ONLY = "flashdmd_read_only"
BUSY_MS = "flashdmd_busy_ms"  # SQLite: this transaction's busy timeout (make_bookkeeping_sessionmaker)

# Errors that mean "the database is down, unreachable or busy", not "the request is wrong": the API answers
# them with 503 and Retry-After (api/errors.py), never 500. OperationalError covers both a refused Postgres
# connection and SQLite's "database is locked" after busy_timeout.
UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, SATimeoutError, DisconnectionError)


def make_engine(url: str, *, busy_timeout_ms: int = 30_000, connect_timeout: int | None = None,
                statement_timeout_ms: int | None = None, lock_timeout_ms: int | None = None, **kwargs: Any) -> Engine:
    """An engine whose every wait is bounded: SQLite's busy timeout; on Postgres connect_timeout (a server that
    accepts and never answers), statement_timeout and lock_timeout (a table locked elsewhere), set per
    connection at startup. Their errors are OperationalErrors, so the API answers 503 (UNAVAILABLE)."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        timeout = busy_timeout_ms / 1000
        engine = create_engine(url, connect_args={"timeout": timeout, "check_same_thread": False}, **kwargs)
        _configure_sqlite(engine, busy_timeout_ms)
        return engine
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    if connect_timeout is not None:
        connect_args["connect_timeout"] = max(2, int(connect_timeout))  # libpq treats 1 as 2
    options = [f"-c {name}={int(value)}" for name, value in (("statement_timeout", statement_timeout_ms),
                                                              ("lock_timeout", lock_timeout_ms)) if value is not None]
    if options:
        connect_args["options"] = " ".join(options)
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL, so readers never block the writer; BEGIN IMMEDIATE for transactions that may write.

    In WAL mode a transaction that reads first and writes later fails at once with
    SQLITE_BUSY if another connection committed in between (busy_timeout does not
    help there). The worker commits metrics every half second while the API reads
    and writes, so a transaction that may write takes the write lock up front and
    waits for it (at most busy_timeout). That is only cheap because every write
    transaction is short: no request holds one across model work (api/routes/generate.py).
    Read-only sessions (`read_sessionmaker`, GET requests) begin DEFERRED and take no lock.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let us emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", f"busy_timeout={busy_timeout_ms}"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        # Set per transaction: a bookkeeping write (BOOKKEEPING_BUSY_MS) must not keep the pooled connection's
        # short wait for the next request's transaction.
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(options.get(BUSY_MS, busy_timeout_ms))}")
        conn.exec_driver_sql("BEGIN DEFERRED" if options.get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_bookkeeping_sessionmaker(engine: Engine, busy_ms: int = 250) -> sessionmaker[Session]:
    """Sessions for writes that may be skipped (a token's last use): on SQLite they wait `busy_ms` for the write
    lock instead of the full busy timeout, so a request never pays a long wait for bookkeeping."""
    return sessionmaker(engine.execution_options(**{BUSY_MS: busy_ms}), expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read (same pool; see READ_ONLY). A write through one may fail on SQLite."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def db_now(session: Session) -> datetime:
    """The database server's clock: heartbeats and the reaper compare times written on different hosts."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.scalar(select(func.statement_timestamp()))
        assert value is not None
        return value.astimezone(timezone.utc)
    return utcnow()  # SQLite is embedded: one host, one clock


def upsert(
    session: Session,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    keys: Iterable[str],
    update: Iterable[str] = (),
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE (or DO NOTHING), for Postgres and SQLite alike."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"upsert is not implemented for {dialect}")
    stmt = insert(table)
    update = list(update)
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={col: stmt.excluded[col] for col in update}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt, list(rows))
