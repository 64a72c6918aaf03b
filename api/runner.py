"""One attempt at a job, inside the worker's task: claim, spawn the trainer, supervise, record the end.

Every write after the claim is fenced by (job id, attempt): if the reaper gave the
job to another attempt (this worker looked dead), this one stops its trainer and
leaves the row alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api import crud, sysinfo
from api.celery_app import Dispatcher
from api.db import db_now, make_engine, make_sessionmaker
from api.ingest import STOP_FILE, RunIngestor, latest_checkpoint_step, rewind
from api.models import ACTIVE, WAITING, Job
from api.proc import drain_marker, kill_job_processes, output_tail, signal_group, spawn, trainer_command
from api.settings import Settings
from api.workers import Capacity, worker_capacity
from trainer.errors import OUT_OF_MEMORY, Failure, from_log, job_error
from trainer.jobspec import SpecError, num_processes, parse_spec

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3  # the trainer's exit codes (trainer/cli.py)
LOG_FILE = "trainer.log"


RUN_DIR_MODE = 0o700  # specs, logs, checkpoints and samples are the owner's: no other local user reads them


def make_run_dir(path: Path) -> None:
    """The job's run directory, 0700 whatever the umask (mkdir's mode is masked by it, and an existing folder
    from an older version keeps its mode unless set again). deploy/README.md says how to share it with a group."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, RUN_DIR_MODE)


def roots_env(settings: Settings) -> dict[str, str]:
    """The roots the trainer checks every path against again where it opens it (trainer/roots.py): always set
    from this worker's Settings, so a trainer the service starts never runs unchecked."""
    return {"FLASHDMD_ALLOWED_DATA_ROOTS": json.dumps([str(p) for p in settings.allowed_data_roots]),
            "FLASHDMD_ALLOWED_MODEL_ROOTS": json.dumps([str(p) for p in settings.allowed_model_roots]),
            "FLASHDMD_RUN_ROOT": str(settings.run_root)}


def plan_note(spec: Any) -> str:
    """" (`flashdmd plan` predicts N GiB per GPU ...)" beside an out-of-memory error, when it is cheap: the plan
    reads only the teacher's configs, so it runs for a local teacher or one in the hub cache (never a download)."""
    from trainer.hub import in_cache, parse_hub_ref

    model = getattr(spec, "model", None)
    if model is None:
        return ""
    ref = parse_hub_ref(model.teacher)
    if ref is not None and not in_cache(ref.repo_id, "model_index.json", model.revision):
        return ""
    try:
        from trainer.plan import make_plan

        plan = make_plan(spec)
    except Exception:  # a note, not the error: an eval spec, an unknown architecture
        log.debug("no memory plan for the out-of-memory note", exc_info=True)
        return ""
    return (f" (`flashdmd plan` predicts {plan.needed_gib:.1f} GiB per GPU on {plan.gpus} GPU(s); "
            "run it to see which rows to shrink)")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    spec: dict[str, Any]
    worker: str


def claim_job(*, session: Session, job_id: str, worker: str) -> Claim | None:
    """Atomically take a waiting job; None means someone else has it or it is over (a duplicate delivery)."""
    now = db_now(session)
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(WAITING))
        .values(status="starting", worker=worker, attempt=Job.attempt + 1, heartbeat_at=now, updated_at=now,
                started_at=func.coalesce(Job.started_at, now), trainer_pid=None)
        .returning(Job.attempt, Job.spec)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    session.commit()
    return Claim(job_id, row[0], row[1], worker) if row else None


def run_job(job_id: str, *, settings: Settings, capacity: Capacity | None = None) -> None:
    """The body of the Celery task; `capacity` is what this worker advertised (measured here if not given)."""
    engine = make_engine(settings.sqlalchemy_url, **settings.db_timeouts("worker"))
    try:
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            claim = claim_job(session=session, job_id=job_id, worker=worker_name())
        if claim is None:
            log.info("job %s is not waiting (duplicate delivery or already handled): nothing to do", job_id)
            return
        Attempt(settings, sessions, claim, capacity or worker_capacity(settings)).run()
    finally:
        engine.dispose()


class Attempt:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], claim: Claim,
                 capacity: Capacity | None = None) -> None:
        self.settings, self.sessions, self.claim = settings, sessions, claim
        self.capacity = capacity
        self.run_dir = settings.run_dir(claim.job_id)
        self.log_path = self.run_dir / LOG_FILE
        self.proc: subprocess.Popen[bytes] | None = None
        self.cancel_requested = False
        self.draining = False  # the worker is shutting down: stop at a checkpoint and requeue
        self._cpu_clock = sysinfo.CpuClock()
        self.spec: Any = None  # the parsed spec, once run() has it (the out-of-memory note plans it)

    def _owned(self) -> list[Any]:
        return [Job.id == self.claim.job_id, Job.attempt == self.claim.attempt, Job.status.in_(ACTIVE)]

    def run(self) -> None:
        job_id = self.claim.job_id
        try:
            spec = self.spec = parse_spec(self.claim.spec)
        except SpecError as err:  # validated at submission; only a spec from an older version can fail here
            self._finish("failed", "invalid_spec", str(err))
            return
        if self._too_large(num_processes(spec)):
            return
        try:
            self.proc = self._start(spec.model_dump(mode="json"), num_processes(spec))
        except Exception as exc:
            log.exception("job %s: could not start the trainer", job_id)
            self._reap_processes()
            self._finish("failed", "worker_error", f"could not start the trainer: {exc}")
            return
        try:
            outcome = self._supervise()
        finally:
            self._reap_processes()
        if outcome is None:
            return  # lost the job to a newer attempt: leave its row alone
        if outcome[0] == "recovering":
            self._requeue()
        else:
            self._finish(*outcome)

    def _too_large(self, wanted: int) -> bool:
        """Refuse a job this worker cannot run: it never launches more processes than it advertised.

        Routing sends jobs only to pools that fit (api/workers.py); this catches a message that reached
        the wrong queue anyway (a hand-sent task, a worker restarted with fewer GPUs, a changed pool).
        """
        if self.capacity is None or wanted <= self.capacity.processes:
            return False
        cap = self.capacity
        self._finish("failed", "worker_too_small",
                     f"spec.train.num_processes is {wanted}, but worker {self.claim.worker} (pool {cap.pool}: "
                     f"{cap.gpus} GPU(s)) runs at most {cap.processes} process(es); resume the job to route "
                     "it to a pool that fits")
        return True

    def _start(self, spec: dict[str, Any], num_processes: int) -> subprocess.Popen[bytes]:
        job_id, attempt = self.claim.job_id, self.claim.attempt
        make_run_dir(self.run_dir)
        kill_job_processes(job_id)  # a trainer orphaned by an earlier attempt on this host must not write here
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        spec_path = self.run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        resume_step = latest_checkpoint_step(self.run_dir)
        with self.sessions() as session:
            rewind(session=session, job_id=job_id, run_dir=self.run_dir, step=resume_step)
            where = "from scratch" if resume_step is None else f"from the checkpoint at step {resume_step}"
            crud.add_event(session=session, job_id=job_id, kind="claimed",
                           message=f"attempt {attempt} on {self.claim.worker}, starting {where}",
                           data={"attempt": attempt, "worker": self.claim.worker, "resume_step": resume_step})
            session.commit()
        cmd = trainer_command(spec_path=spec_path, run_dir=self.run_dir, resume=resume_step is not None,
                              num_processes=num_processes, accelerate_config=self.settings.accelerate_config)
        proc = spawn(cmd, cwd=self.run_dir, log_path=self.log_path, job_id=job_id, attempt=attempt,
                     extra_env=roots_env(self.settings))
        log.info("job %s attempt %d: trainer pid %d: %s", job_id, attempt, proc.pid, " ".join(cmd))
        with self.sessions() as session:
            session.execute(update(Job).where(*self._owned()).values(trainer_pid=proc.pid)
                            .execution_options(synchronize_session=False))
            session.execute(update(Job).where(*self._owned(), Job.status == "starting").values(status="running")
                            .execution_options(synchronize_session=False))
            session.commit()
        return proc

    def _heartbeat(self) -> bool | None:
        """Refresh the heartbeat; returns the cancel flag, or None when this attempt no longer owns the job."""
        with self.sessions() as session:
            now = db_now(session)
            stmt = (update(Job).where(*self._owned()).values(heartbeat_at=now, **self._system())
                    .returning(Job.cancel_requested).execution_options(synchronize_session=False))
            flag = session.execute(stmt).scalar()
            session.commit()
            return flag

    def _system(self) -> dict[str, Any]:
        """The dashboard's system panel rides on the heartbeat: {"system": ...}, or {} if sampling failed."""
        try:
            gpus = self.capacity.gpus if self.capacity is not None else 0
            pid = self.proc.pid if self.proc is not None else None
            return {"system": sysinfo.snapshot(trainer_pid=pid, gpus=gpus, clock=self._cpu_clock)}
        except Exception:  # never let a statistic stop the heartbeat that keeps the job ours
            log.debug("job %s: no system sample", self.claim.job_id, exc_info=True)
            return {}

    def _supervise(self) -> tuple[str, str | None, str | None] | None:
        """Ingest and heartbeat until the trainer exits; the final (status, code, message), or None if lost."""
        assert self.proc is not None
        ingest = RunIngestor(sessions=self.sessions, job_id=self.claim.job_id, run_dir=self.run_dir, since=time.time())
        grace = self.settings.cancel_grace_seconds
        next_beat = 0.0
        stop_at: float | None = None
        sent: set[int] = set()
        while self.proc.poll() is None:
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.settings.heartbeat_seconds
                try:
                    flag = self._heartbeat()
                except Exception:  # a database blip: keep training; the reaper decides if it lasts
                    log.warning("job %s: heartbeat failed", self.claim.job_id, exc_info=True)
                    flag = False
                if flag is None:
                    log.error("job %s: attempt %d lost the job (stale heartbeat?); stopping its trainer",
                              self.claim.job_id, self.claim.attempt)
                    return None
                if flag and stop_at is None:
                    # The trainer polls for STOP at step boundaries, checkpoints and exits with code 3.
                    self.cancel_requested, stop_at = True, now
                    (self.run_dir / STOP_FILE).touch()
                if not self.draining and drain_marker(os.getppid()).exists():
                    # No escalation here: the container's stop timeout bounds how long this may take.
                    log.warning("job %s: the worker is shutting down; stopping at a checkpoint", self.claim.job_id)
                    self.draining = True
                    (self.run_dir / STOP_FILE).touch()
            if stop_at is not None:
                for sig, after in ((signal.SIGTERM, grace), (signal.SIGKILL, 2 * grace)):
                    if now - stop_at >= after and sig not in sent:
                        log.warning("job %s: trainer still running %.0fs after the stop request: %s",
                                    self.claim.job_id, now - stop_at, sig.name)
                        signal_group(self.proc.pid, sig)
                        if sig == signal.SIGKILL:
                            kill_job_processes(self.claim.job_id)  # ranks in sessions of their own
                        sent.add(sig)
            self._poll(ingest)
            time.sleep(self.settings.ingest_poll_seconds)
        try:
            ingest.drain()
        except Exception:
            log.exception("job %s: final ingest failed", self.claim.job_id)
        code = self.proc.returncode
        if code not in (EXIT_OK, EXIT_STOPPED) and ingest.stopped and not ingest.failure:
            # Under `accelerate launch` every rank exits 3 after a stop, but torchrun reports any non-zero rank
            # as a failure (exit 1): the trainer's own `stopped` event is the reliable signal.
            code = EXIT_STOPPED
        return self._outcome(code, ingest.failure)

    def _poll(self, ingest: RunIngestor) -> None:
        try:
            ingest.poll()
        except Exception:  # offsets did not move: the same lines are retried on the next poll
            log.warning("job %s: ingest failed", self.claim.job_id, exc_info=True)

    def _outcome(self, code: int, failure: dict[str, Any] | None) -> tuple[str, str | None, str | None]:
        with self.sessions() as session:
            flag = session.scalar(select(Job.cancel_requested).where(Job.id == self.claim.job_id))
        cancelled = bool(flag or self.cancel_requested)
        if code == EXIT_OK:
            return "succeeded", None, None
        if self.draining and code == EXIT_STOPPED and not cancelled:
            return "recovering", None, None
        if code == EXIT_STOPPED or cancelled:
            return "cancelled", None, None
        if failure and failure.get("message"):  # the trainer's own record: a code and a one-line cause
            err = job_error(str(failure.get("code") or ""), str(failure["message"]))
        else:  # it died before it could write one (a kill, an import error): its exit code and last error line
            err = from_log(code, output_tail(self.log_path), bad_input_exit=EXIT_BAD_INPUT)
        if err.code == OUT_OF_MEMORY and self.spec is not None:
            err = Failure(err.code, err.message + plan_note(self.spec))
        return "failed", err.code, err.message
    def _reap_processes(self) -> None:
        """Nothing of this attempt may outlive it: its process group, and ranks in sessions of their own."""
        if self.proc is not None:
            if self.proc.poll() is None:
                signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            signal_group(self.proc.pid, signal.SIGKILL)
        kill_job_processes(self.claim.job_id)

    def _finish(self, status: str, code: str | None, message: str | None) -> None:
        with self.sessions() as session:
            now = db_now(session)
            done = session.execute(
                update(Job).where(*self._owned())
                .values(status=status, finished_at=now, updated_at=now, error_code=code,
                        error_message=(message or "")[-4000:] or None, trainer_pid=None)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if done:
                crud.add_event(session=session, job_id=self.claim.job_id, kind=status,
                               message=message.splitlines()[-1] if message else f"job {status}",
                               data={"attempt": self.claim.attempt, **({"code": code} if code else {})})
            session.commit()
        log.info("job %s attempt %d: %s%s", self.claim.job_id, self.claim.attempt, status,
                 f" ({code})" if code else "")

    def _requeue(self) -> None:
        """Back to the queue after a worker shutdown; the next attempt resumes from the checkpoint just written."""
        with self.sessions() as session:
            now = db_now(session)
            moved = session.execute(
                update(Job).where(*self._owned())
                .values(status="recovering", updated_at=now, worker=None, trainer_pid=None, dispatched_at=None)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if moved:
                crud.add_event(session=session, job_id=self.claim.job_id, kind="recovering",
                               message="the worker shut down; requeued to resume from its checkpoint")
            session.commit()
            if moved:
                dispatcher = Dispatcher(self.settings)
                try:  # if the broker is down the reaper sends it later (dispatched_at stays empty)
                    crud.dispatch(session=session, job_id=self.claim.job_id, send=dispatcher.send)
                finally:
                    dispatcher.close()
        log.info("job %s attempt %d: requeued", self.claim.job_id, self.claim.attempt)
