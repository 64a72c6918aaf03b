"""The worker's Celery app: `celery -A api.tasks worker` (what `flashdmd worker` runs).

Only the worker imports this module; the API sends `RUN_JOB` by name (api/celery_app.py).
At import, in the worker's main process, it measures what this worker offers (GPUs, and
so the pool and queue: api/workers.py); pool children inherit that by fork.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from api.celery_app import RUN_JOB, create_celery
from api.proc import drain_marker
from api.settings import Settings
from api.workers import Registration, pool_queue, worker_capacity

log = logging.getLogger(__name__)
settings = Settings()
capacity = worker_capacity(settings)  # a misconfigured size stops the worker here, before it takes any job
queue = pool_queue(settings, capacity.pool)
app = create_celery(settings)
# `celery -A api.tasks worker` without -Q consumes the default queue: make that this worker's pool queue.
app.conf.task_default_queue = queue
_registration: Registration | None = None


@worker_init.connect
def _starting(**_: Any) -> None:
    # In a container the worker is often pid 1 every time: a marker left by the last run is not ours.
    drain_marker(os.getpid()).unlink(missing_ok=True)


@worker_ready.connect
def _ready(**_: Any) -> None:
    # Sent just before Celery logs "ready.": the pool counts for routing from the moment jobs can arrive.
    global _registration
    _registration = Registration(settings, capacity)
    _registration.start()
    threading.Thread(target=_resend_waiting, name="flashdmd-resend", daemon=True).start()


def _resend_waiting() -> None:
    """What this pool has waiting is sent again (api/reaper.py resend_waiting), off the main thread: a slow
    database must not delay the worker's start."""
    from sqlalchemy.pool import NullPool

    from api.celery_app import Dispatcher
    from api.db import make_engine, make_sessionmaker
    from api.reaper import resend_waiting
    from api.workers import worker_id

    engine = make_engine(settings.sqlalchemy_url, poolclass=NullPool, **settings.db_timeouts("worker"))
    dispatcher = Dispatcher(settings)
    try:
        resend_waiting(sessions=make_sessionmaker(engine), queue=queue, queue_for=dispatcher.router.queue_for,
                       send=lambda job_id: dispatcher.send(job_id, queue=queue), worker=worker_id())
    except Exception:  # the database or broker is down: the reaper's redispatch covers these jobs later
        log.warning("could not re-send this pool's waiting jobs", exc_info=True)
    finally:
        dispatcher.close()
        engine.dispose()


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """Warm shutdown (e.g. `docker stop`): the running task checkpoints its trainer and requeues the job."""
    drain_marker(os.getpid()).touch()


@worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    if _registration is not None:
        _registration.stop()


@app.task(name=RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    # Imported per task: each task runs in a fresh pool process (max_tasks_per_child=1) anyway,
    # and the worker's main process then holds no database connection when it forks (its heartbeat
    # opens and closes one per beat).
    from api.runner import run_job as run

    run(job_id, settings=settings, capacity=capacity)
