"""The worker's Celery app: `celery -A api.tasks worker` (what `flashdmd worker` runs).

Only the worker imports this module; the API sends `RUN_JOB` by name (api/celery_app.py).
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import worker_init, worker_shutting_down

from api.celery_app import RUN_JOB, create_celery
from api.proc import drain_marker
from api.settings import Settings

settings = Settings()
app = create_celery(settings)


@worker_init.connect
def _starting(**_: Any) -> None:
    # In a container the worker is often pid 1 every time: a marker left by the last run is not ours.
    drain_marker(os.getpid()).unlink(missing_ok=True)


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    """Warm shutdown (e.g. `docker stop`): the running task checkpoints its trainer and requeues the job."""
    drain_marker(os.getpid()).touch()


@app.task(name=RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    # Imported per task: each task runs in a fresh pool process (max_tasks_per_child=1) anyway,
    # and the worker's main process then never opens a database connection to fork.
    from api.runner import run_job as run

    run(job_id, settings=settings)
