"""Celery configuration, and the API's thin client that sends tasks by name.

Celery only dispatches; the job row decides what runs (DESIGN §1). The client
imports no task code: it sends `RUN_JOB` by name with the job id, to the queue of
the pool that can run the job (api/workers.py). The worker app (api/tasks.py) uses
the same configuration plus the task itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from api.settings import Settings
from api.workers import Router

log = logging.getLogger(__name__)

RUN_JOB = "flashdmd.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        # Every send names its pool's queue (api/workers.py); nothing should land in a queue nobody reads.
        "task_default_queue": f"{settings.queue}-unrouted",
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # the job row is the result; no result backend
        # One training per worker process at a time, acknowledged only when it is over, and a fresh
        # process per task so that GPU memory is fully released between jobs.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": 1,
        # Redelivery of a lost late-acked task could loop on a task that kills its worker; the reaper
        # recovers lost jobs from their heartbeats instead.
        "task_reject_on_worker_lost": False,
        # On a broker blip, keep the training running rather than kill hours of work; a redelivered
        # copy cannot claim the job while this one holds it.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
    }
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            # One folder for both directions: the API writes messages where the worker reads them.
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
        # Broadcast commands (inspect, ping) would poll the control folder for nothing: we never revoke.
        conf["worker_enable_remote_control"] = False
    else:
        # Redis redelivers a message that is still unacked after visibility_timeout, even while its first
        # copy runs (celery#5935), so long trainings do get duplicate deliveries: the atomic claim turns
        # them into no-ops. The timeout only bounds how long a message taken by a worker that died before
        # claiming waits; lost *running* jobs are recovered by the reaper from their heartbeats.
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout_seconds}
        conf["visibility_timeout"] = settings.visibility_timeout_seconds
    return conf


def create_celery(settings: Settings) -> Celery:
    app = Celery("flashdmd", broker=settings.broker_url, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class Dispatcher:
    """The API's side of Celery: send `RUN_JOB` by name to the job's pool queue, nothing else."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_celery(settings)
        self.router = Router(settings)

    def send(self, job_id: str, *, queue: str | None = None) -> bool:
        """Queue a run of the job; False (and a log line) when no pool can run it now or the broker is down.

        `queue`: the route already chosen by the caller (POST /jobs, which has just checked the pools);
        otherwise it is looked up now. A failed send leaves the job's `dispatched_at` empty and the reaper
        retries it, so a broker outage, or a pool that went away, delays jobs instead of losing them.
        """
        try:
            queue = queue or self.router.queue_for(job_id)
        except Exception:
            log.warning("could not route job %s; the reaper will retry", job_id, exc_info=True)
            return False
        if queue is None:
            log.warning("no live pool can run job %s now; the reaper retries its send", job_id)
            return False
        try:
            self.app.send_task(
                RUN_JOB, args=[job_id], queue=queue, retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
            )
            return True
        except Exception:  # kombu raises several unrelated types for "broker down"
            log.warning("could not send %s for job %s; the reaper will retry", RUN_JOB, job_id, exc_info=True)
            return False

    def ping(self, timeout: float = 2.0) -> str | None:
        """None when the broker answers, else the reason."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    def close(self) -> None:
        self.app.close()
        self.router.close()
