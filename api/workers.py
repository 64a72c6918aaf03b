"""Jobs land where their GPUs are: workers advertise their size, jobs route to a pool that fits.

- A *pool* is a set of identical workers, named by what one of them offers: `gpu<N>` (N GPUs, so at most
  N processes) or `cpu<N>` (a CPU worker that runs up to N gloo processes, FLASHDMD_WORKER_PROCESSES).
  The name carries the size, so a pool declared in FLASHDMD_POOLS needs no other description.
- Each pool has one Celery queue, `<FLASHDMD_QUEUE>-<pool>` (e.g. `train-gpu8`); its workers consume only it.
- A worker's main process registers a row in `workers` and heartbeats it; a row older than
  FLASHDMD_STALE_AFTER_SECONDS no longer counts. The pools on offer are the live rows plus FLASHDMD_POOLS.
- At submit, a job asking more processes than any pool offers is a 422 on `spec.train.num_processes`.
  Otherwise it goes to the smallest pool that fits, so a 1-GPU job does not hold an 8-GPU node.
  The route is decided again at every send (submit, resume, the reaper's retries), so jobs follow the fleet.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, delete, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from api.db import db_now, make_engine, make_sessionmaker, upsert, utcnow
from api.errors import APIError
from api.models import Job, Worker
from api.settings import Settings

log = logging.getLogger(__name__)

FIELD = "spec.train.num_processes"
_POOL = re.compile(r"(gpu|cpu)([1-9][0-9]{0,3})")
FORGET_AFTER = timedelta(days=1)  # rows of workers gone this long are deleted (stale ones are ignored anyway)


@dataclass(frozen=True, order=True)
class Pool:
    processes: int
    device: str  # "gpu" or "cpu"
    live: bool  # a worker of this pool heartbeats now (False: only declared in FLASHDMD_POOLS)

    @property
    def name(self) -> str:
        return f"{self.device}{self.processes}"


def parse_pool(name: str, *, live: bool = False) -> Pool:
    match = _POOL.fullmatch(name.strip())
    if match is None:
        raise ValueError(f"{name!r} is not a pool name: expected gpu<N> or cpu<N>, e.g. gpu8")
    return Pool(int(match[2]), match[1], live)


def pool_queue(settings: Settings, pool: str) -> str:
    return f"{settings.queue}-{pool}"


def requested_processes(spec: dict[str, Any]) -> int:
    """What a resolved (stored) spec launches: train.num_processes; an eval job runs one process."""
    if spec.get("kind") in ("eval", "prepare"):
        return 1
    return int((spec.get("train") or {}).get("num_processes") or 1)


# ------------------------------------------------------------------ what this worker offers


@dataclass(frozen=True)
class Capacity:
    gpus: int
    processes: int

    @property
    def pool(self) -> str:
        return f"{'gpu' if self.gpus else 'cpu'}{self.processes}"


def detect_gpus() -> int:
    """torch's count of visible CUDA devices, without creating a CUDA context in this (forking) process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0  # GPUs hidden on purpose: no need to load torch to know
    try:
        import torch
    except ImportError:
        return 0
    # The NVML count leaves CUDA uninitialised: the Celery main process forks its pool children afterwards.
    previous = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    try:
        return int(torch.cuda.device_count())
    finally:
        if previous is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = previous


def worker_capacity(settings: Settings) -> Capacity:
    """GPU workers offer one process per GPU (or fewer, capped by FLASHDMD_WORKER_PROCESSES), never more:
    two ranks on one GPU would double its memory. CPU workers offer FLASHDMD_WORKER_PROCESSES gloo
    processes (default 1), which the operator sizes to the cores and memory of the machine."""
    gpus = settings.worker_gpus if settings.worker_gpus is not None else detect_gpus()
    if gpus == 0:
        return Capacity(0, settings.worker_processes or 1)
    processes = settings.worker_processes or gpus
    if processes > gpus:
        raise ValueError(f"FLASHDMD_WORKER_PROCESSES={processes} is more than this worker's {gpus} GPU(s): "
                         "a GPU worker never runs more processes than it has GPUs")
    return Capacity(gpus, processes)


# ------------------------------------------------------------------ the registry (the workers table)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def register(*, session: Session, name: str, capacity: Capacity, queue: str) -> None:
    now = db_now(session)
    session.execute(delete(Worker).where(Worker.heartbeat_at < now - FORGET_AFTER))
    row = {"name": name, "pool": capacity.pool, "queue": queue, "gpus": capacity.gpus,
           "processes": capacity.processes, "started_at": now, "heartbeat_at": now}
    upsert(session, Worker.__table__, [row], keys=["name"], update=[k for k in row if k != "name"])  # type: ignore[arg-type]
    session.commit()


def beat(*, session: Session, name: str) -> bool:
    """Refresh the heartbeat; False when the row is gone (deleted by hand or forgotten), to register again."""
    now = db_now(session)
    found = session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=now)
                            .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
    session.commit()
    return bool(found)


def deregister(*, session: Session, name: str) -> None:
    session.execute(delete(Worker).where(Worker.name == name))
    session.commit()


def live_pools(*, session: Session, settings: Settings) -> list[Pool]:
    """Pools with a fresh worker that consumes one of *our* queues, then those declared in FLASHDMD_POOLS.

    The queue check keeps workers of another deployment sharing the database (another FLASHDMD_QUEUE)
    from counting here: we could not reach them.
    """
    # The database's clock, as for heartbeats written on other hosts, but inside this one query: POST /jobs
    # pays for every round trip (bench/api_latency.py).
    stale = timedelta(seconds=settings.stale_after_seconds)
    since = (func.statement_timestamp() - stale if session.get_bind().dialect.name == "postgresql"
             else utcnow() - stale)
    rows = session.execute(select(Worker.pool, Worker.queue).where(Worker.heartbeat_at >= since)).all()
    live = {parse_pool(pool, live=True) for pool, queue in rows if queue == pool_queue(settings, pool)}
    declared = {parse_pool(name) for name in settings.pools} - {Pool(p.processes, p.device, False) for p in live}
    return sorted(live | declared, key=lambda p: (p.processes, not p.live, p.device != "gpu"))


def seen_pools(*, session: Session, settings: Settings) -> list[Pool]:
    """Pools a worker of this deployment registered in, live or not (rows are forgotten after FORGET_AFTER):
    a pool that is restarting or scaling up from zero still exists, and its queue will be read again."""
    rows = session.execute(select(Worker.pool, Worker.queue).distinct()).all()
    return sorted({parse_pool(pool) for pool, queue in rows if queue == pool_queue(settings, pool)})


def choose_pool(pools: list[Pool], processes: int) -> Pool | None:
    """The smallest pool that fits; among equals a live one before a declared one, a GPU one before a CPU one."""
    fits = [p for p in pools if p.processes >= processes]
    return min(fits, key=lambda p: (p.processes, not p.live, p.device != "gpu")) if fits else None


def route(*, session: Session, settings: Settings, processes: int) -> tuple[Pool | None, list[Pool]]:
    """(the pool for a job of `processes`, the pools considered). Live and declared pools first (as before);
    when none fits, a pool seen before: its queue keeps the job until one of its workers is back."""
    pools = live_pools(session=session, settings=settings)
    pool = choose_pool(pools, processes)
    if pool is None:
        known = {(p.processes, p.device) for p in pools}
        seen = [p for p in seen_pools(session=session, settings=settings) if (p.processes, p.device) not in known]
        pools = sorted([*pools, *seen], key=lambda p: (p.processes, not p.live, p.device != "gpu"))
        pool = choose_pool(seen, processes)
    return pool, pools


@dataclass(frozen=True)
class Placement:
    pool: str
    queue: str
    live: bool  # a worker of the chosen pool heartbeats now

    @property
    def notice(self) -> str | None:
        return None if self.live else (f"no worker of pool {self.pool} is live now: the job is queued and "
                                       "starts when one is")


def check_capacity(*, session: Session, settings: Settings, spec: dict[str, Any]) -> Placement:
    """Where a new job goes, or the 422 that names `spec.train.num_processes` when no declared or ever-seen
    pool could run it. A job whose pool has no live worker now (a rolling restart, a pool scaling up from
    zero, a worker still starting) is accepted and queued: the Placement says so."""
    wanted = requested_processes(spec)
    pool, pools = route(session=session, settings=settings, processes=wanted)
    if pool is not None:
        return Placement(pool.name, pool_queue(settings, pool.name), pool.live)
    declared = set(settings.pools)

    def label(p: Pool) -> str:
        return "" if p.live else " (declared)" if p.name in declared else " (seen, not live)"

    offered = ", ".join(f"{p.name}{label(p)}" for p in pools) or "none"
    field = "spec" if spec.get("kind") in ("eval", "prepare") else FIELD
    raise APIError(
        "invalid_request",
        f"{field}: {wanted} process(es) asked, but no pool offers that many (pools: {offered}); "
        "start a worker with enough GPUs, or list its pool in FLASHDMD_POOLS if it scales from zero",
        fields=[field],
    )


class Router:
    """The queue for a job at the moment it is sent, for the Dispatcher (the API, the reaper, a requeue).

    It reads on a connection of its own. On SQLite that connection must not take the write lock (every
    transaction of api.db's engines does): the reaper sends while its own transaction holds that lock.
    A plain pysqlite connection reads a WAL database without locking it, and sees what was committed.
    """

    def __init__(self, settings: Settings) -> None:
        for name in settings.pools:  # a typo in FLASHDMD_POOLS stops the API at start, not each POST /jobs
            parse_pool(name)
        self.settings = settings
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def _bind(self) -> Engine:
        with self._lock:
            if self._engine is None:
                url = self.settings.sqlalchemy_url
                self._engine = (create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
                                if url.startswith("sqlite") else
                                make_engine(url, pool_size=2, max_overflow=2, **self.settings.db_timeouts("api")))
            return self._engine

    def queue_for(self, job_id: str) -> str | None:
        """None when the job is unknown or no pool can run it now (its send is then retried by the reaper)."""
        with Session(self._bind()) as session:
            spec = session.scalar(select(Job.spec).where(Job.id == job_id))
            if spec is None:
                return None
            pool, _ = route(session=session, settings=self.settings, processes=requested_processes(spec))
            return pool_queue(self.settings, pool.name) if pool else None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class Registration:
    """The worker's entry in `workers`, kept fresh by a thread in the Celery main process.

    NullPool: each beat opens and closes its connection, so no socket is open in this process when
    Celery forks a pool child (a child that closed an inherited connection would break ours).
    """

    def __init__(self, settings: Settings, capacity: Capacity, name: str | None = None) -> None:
        self.settings, self.capacity = settings, capacity
        self.name = name or worker_id()
        self.queue = pool_queue(settings, capacity.pool)
        self._engine = make_engine(settings.sqlalchemy_url, poolclass=NullPool, **settings.db_timeouts("worker"))
        self._sessions = make_sessionmaker(self._engine)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashdmd-worker-heartbeat", daemon=True)

    def start(self) -> None:
        """Register now (so the pool counts before the worker says it is ready), then heartbeat."""
        log.info("worker %s: pool %s (%d GPU(s), up to %d process(es) per job), queue %s", self.name,
                 self.capacity.pool, self.capacity.gpus, self.capacity.processes, self.queue)
        try:
            with self._sessions() as session:
                register(session=session, name=self.name, capacity=self.capacity, queue=self.queue)
        except Exception:  # the database is down: the heartbeat thread registers when it is back
            log.warning("worker %s could not register yet", self.name, exc_info=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with self._sessions() as session:
                    if not beat(session=session, name=self.name):
                        register(session=session, name=self.name, capacity=self.capacity, queue=self.queue)
            except Exception:  # a database blip: the next beat tries again; stale only if it lasts
                log.warning("worker heartbeat failed", exc_info=True)

    def stop(self) -> None:
        """Leave the registry at once, so that the API stops routing here before the row goes stale."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            with self._sessions() as session:
                deregister(session=session, name=self.name)
        except Exception:
            log.warning("could not deregister worker %s; its row goes stale instead", self.name, exc_info=True)
        self._engine.dispose()
