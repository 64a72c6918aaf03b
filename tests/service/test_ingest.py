"""The worker's sink: the trainer's JSONL files -> rows, idempotently, on Postgres and on SQLite.

The files are written with the trainer's own JsonlSink, as a run writes them.
"""

from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import func, select

import trainer.sink
from api import crud, ingest
from api.auth import create_token
from api.ingest import RunIngestor, latest_checkpoint_step, rewind
from api.models import Checkpoint, Event, Job, Metric, Sample
from trainer.sink import JsonlSink

pytestmark = pytest.mark.service


def test_file_names_match_the_trainer_sink() -> None:
    assert (ingest.METRICS_FILE, ingest.EVENTS_FILE, ingest.STOP_FILE) == (
        trainer.sink.METRICS_FILE, trainer.sink.EVENTS_FILE, trainer.sink.STOP_FILE)


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, sessions, sqlite_sessions):
    return sessions if request.param == "postgres" else sqlite_sessions


@pytest.fixture
def job_id(db) -> str:
    with db() as session:
        owner, _ = create_token(session=session, name="ingest", prefix="t_")
        spec = {"kind": "distill", "train": {"max_steps": 100}}
        job, _ = crud.create_job(session=session, owner=owner, spec=spec, total_steps=100, name=None,
                                 idempotency_key=None, request_hash="x")
        return job.id


def _count(db, model, job_id: str) -> int:
    with db() as session:
        return session.scalar(select(func.count()).select_from(model).where(model.job_id == job_id))


def _steps(db, job_id: str, key: str) -> list[int]:
    with db() as session:
        return list(session.scalars(select(Metric.step).where(Metric.job_id == job_id, Metric.key == key)
                                    .order_by(Metric.step)))


def test_metrics_and_events_are_ingested_once(db, job_id, tmp_path) -> None:
    sink = JsonlSink(tmp_path)
    for step in range(1, 31):
        sink.log_metrics(step, {"loss/dm": 1.0 / step, "loss/disc": 2.0, "weird": math.nan})
    sink.log_event("started", "go", step=0, max_steps=100, resumed=False)
    sink.log_event("nonfinite", "nan seen", loss=math.inf)
    sink.close()

    RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path).drain()
    assert _count(db, Metric, job_id) == 90 and _count(db, Event, job_id) == 3  # + the service's "queued"
    # A new attempt re-reads the files from the start: nothing is duplicated.
    RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path).drain()
    assert _count(db, Metric, job_id) == 90 and _count(db, Event, job_id) == 3
    with db() as session:
        assert session.scalar(select(Metric.value).where(Metric.job_id == job_id, Metric.key == "weird")) is None
        event = session.scalar(select(Event).where(Event.job_id == job_id, Event.kind == "nonfinite"))
        assert event.data == {"loss": None} and event.source == "trainer"
        assert session.get(Job, job_id).progress_step == 30
        assert crud.metric_keys(session=session, job_id=job_id) == ["loss/disc", "loss/dm", "weird"]


def test_only_complete_lines_are_read(db, job_id, tmp_path) -> None:
    path = tmp_path / ingest.METRICS_FILE
    tail = RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path)
    path.write_text(json.dumps({"step": 1, "wall_time": 1.0, "metrics": {"a": 1}}) + "\n{\"step\": 2, \"wall")
    tail.poll()
    assert _steps(db, job_id, "a") == [1]
    with path.open("a") as f:
        f.write('_time": 2.0, "metrics": {"a": 2}}\nnot json\n{"step": "x"}\n')
        f.write(json.dumps({"step": 3, "wall_time": 3.0, "metrics": {"a": 3}}) + "\n")
    tail.poll()
    assert _steps(db, job_id, "a") == [1, 2, 3]  # malformed lines are skipped, not fatal


def test_last_row_for_a_step_wins_within_one_batch(db, job_id, tmp_path) -> None:
    sink = JsonlSink(tmp_path)
    sink.log_metrics(5, {"a": 1.0})
    sink.log_metrics(5, {"a": 2.0})
    sink.close()
    RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path).drain()
    with db() as session:
        assert session.scalars(select(Metric.value).where(Metric.job_id == job_id)).all() == [2.0]


def test_rate_comes_from_this_attempts_steps(db, job_id, tmp_path) -> None:
    path = tmp_path / ingest.METRICS_FILE
    rows = [{"step": s, "wall_time": 1000.0 + 0.5 * s, "metrics": {"a": 0}} for s in range(1, 11)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tail = RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path, since=1002.0)
    tail.poll()
    assert tail.rate() == pytest.approx(2.0)
    with db() as session:
        job = session.get(Job, job_id)
        assert (job.progress_step, job.progress_rate) == (10, pytest.approx(2.0))


def test_rewind_forgets_steps_after_the_checkpoint(db, job_id, tmp_path) -> None:
    sink = JsonlSink(tmp_path)
    for step in range(1, 11):
        sink.log_metrics(step, {"a": float(step)})
    sink.close()
    RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path).drain()
    with db() as session:
        rewind(session=session, job_id=job_id, run_dir=tmp_path, step=4)
        session.commit()
    assert _steps(db, job_id, "a") == [1, 2, 3, 4]
    assert [r["step"] for r in trainer.sink.read_metrics(tmp_path)] == [1, 2, 3, 4]
    with db() as session:
        assert session.get(Job, job_id).progress_step == 4
        rewind(session=session, job_id=job_id, run_dir=tmp_path, step=None)  # no checkpoint: start over
        session.commit()
    assert _steps(db, job_id, "a") == [] and trainer.sink.read_metrics(tmp_path) == []


def _checkpoint(run_dir, step: int, complete: bool = True) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "meta.json").write_text(json.dumps({"step": step, "family": "sdxl", "generator": "unet"}))


def test_checkpoint_and_sample_rows_mirror_the_run_directory(db, job_id, tmp_path) -> None:
    sink = JsonlSink(tmp_path)
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, complete=False)  # meta.json is written last: still being saved
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step-00000003.png").write_bytes(b"\x89PNG fake")
    sink.log_event("checkpoint", "checkpoint at step 2", step=2, path=str(tmp_path / "checkpoints/step-00000002"))
    sink.log_event("sample", "sample at step 3", step=3, path=str(tmp_path / "samples/step-00000003.png"))
    tail = RunIngestor(sessions=db, job_id=job_id, run_dir=tmp_path)
    tail.poll()
    with db() as session:
        ckpts = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert [(c.step, c.path, c.meta["generator"]) for c in ckpts] == [(2, "checkpoints/step-00000002", "unet")]
        assert [(s.step, s.path) for s in session.scalars(select(Sample).where(Sample.job_id == job_id))] == [
            (3, "samples/step-00000003.png")]
    assert latest_checkpoint_step(tmp_path) == 2
    # The trainer keeps the last N checkpoints: pruned folders disappear from the table too.
    (tmp_path / "checkpoints/step-00000004/meta.json").write_text(json.dumps({"step": 4}))
    (tmp_path / "checkpoints/step-00000002/meta.json").unlink()
    (tmp_path / "checkpoints/step-00000002").rmdir()
    tail.drain()
    with db() as session:
        assert session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)).all() == [4]
    assert latest_checkpoint_step(tmp_path) == 4
    sink.close()
