"""Job lifecycle with a real worker process and the real trainer: succeed, cancel, survive a killed worker.

The API is a TestClient on Postgres; the worker is `python -m api worker` (what
`flashdmd worker` runs) on Redis; the trainer is the tiny-SDXL distillation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servicekit import TINY_SPEC, WorkerProcess, make_settings, queue_name, settings_env, tiny_spec, wait_for

from api.main import create_app
from api.proc import job_processes
from api.reaper import Reaper

pytestmark = [pytest.mark.service, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}
RUN_TIMEOUT = 420  # seconds; the tiny run takes 10-30 s on an idle 2-core machine, much more on a busy one


class Life:
    def __init__(self, client: TestClient, auth: dict[str, str], settings, env, log_path: Path) -> None:
        self.client, self.auth, self.settings, self.env, self.log_path = client, auth, settings, env, log_path
        self.worker = WorkerProcess(env, log_path).start()

    def restart_worker(self) -> None:
        self.worker = WorkerProcess(self.env, self.log_path).start()

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/jobs/{job_id}", headers=self.auth).json()

    def get(self, path: str, **params) -> dict:
        response = self.client.get(path, params=params, headers=self.auth)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_terminal(self, job_id: str, seen: list | None = None) -> dict:
        def check():
            job = self.job(job_id)
            if seen is not None and job["status"] == "running":
                seen.append(job["progress"]["step"])
            return job if job["status"] in TERMINAL else None

        return wait_for(check, RUN_TIMEOUT, interval=0.3, what=f"job {job_id} to finish")

    def debug(self, job_id: str) -> str:
        trainer_log = self.settings.run_dir(job_id) / "trainer.log"
        tail = trainer_log.read_text(errors="replace")[-3000:] if trainer_log.exists() else "(no trainer.log)"
        return f"--- worker log ---\n{self.worker.log()[-3000:]}\n--- trainer log ---\n{tail}"

    def kinds(self, job_id: str) -> list[str]:
        return [e["kind"] for e in self.get(f"/jobs/{job_id}/events", limit=1000)["data"]]

    def full_series(self, job_id: str) -> list[int]:
        """Steps of the metric logged most often (every step), read through the API."""
        keys = self.get(f"/jobs/{job_id}/metrics")["keys"]
        series = [[p["step"] for p in self.get(f"/jobs/{job_id}/metrics", key=k, limit=20000)["points"]]
                  for k in keys]
        return max(series, key=len)


@pytest.fixture(scope="module")
def life(database_url, roots, redis_client, new_token, tmp_path_factory):
    settings = make_settings(database_url, roots, queue=queue_name("life"), heartbeat_seconds=1,
                             stale_after_seconds=4, cancel_grace_seconds=120, reaper_interval_seconds=0)
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with TestClient(create_app(settings)) as client:
        state = Life(client, new_token(), settings, settings_env(settings), log_path)
        try:
            yield state
        finally:
            state.worker.stop()


def test_tiny_job_succeeds_and_a_duplicate_delivery_does_nothing(life: Life) -> None:
    headers = {**life.auth, "Idempotency-Key": "lifecycle-1"}
    job_id = life.client.post("/jobs", json={"spec": TINY_SPEC}, headers=headers).json()["id"]
    # The same task delivered twice (as Redis does after visibility_timeout): a second copy, sent by name.
    assert life.client.app.state.dispatcher.send(job_id)
    seen: list[int] = []
    job = life.wait_terminal(job_id, seen)
    assert job["status"] == "succeeded", (job, life.debug(job_id))
    assert job["attempt"] == 1 and job["error"] is None
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 6
    assert len(set(seen)) >= 2, f"progress did not move while running: {seen}"
    assert life.client.post("/jobs", json={"spec": TINY_SPEC}, headers=headers).json()["id"] == job_id

    # The second copy is taken by the fresh worker process and finds nothing to claim.
    wait_for(lambda: "is not waiting" in life.worker.log(), 120, what="the duplicate delivery")
    kinds = life.kinds(job_id)
    assert kinds.count("claimed") == 1 and kinds.count("started") == 1, kinds  # the trainer ran once
    assert kinds[-1] == "succeeded" and "finished" in kinds

    assert life.full_series(job_id) == [1, 2, 3, 4, 5, 6]
    ckpts = life.get(f"/jobs/{job_id}/checkpoints")["data"]
    assert [c["step"] for c in ckpts] == [2, 4, 6]
    assert all((Path(c["path"]) / "meta.json").is_file() and c["meta"]["step"] == c["step"] for c in ckpts)
    samples = life.get(f"/jobs/{job_id}/samples")["data"]
    assert [s["step"] for s in samples] == [3, 6]
    image = life.client.get(samples[0]["url"], headers=life.auth)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_an_eval_job_over_http_stores_its_scores_as_metrics(life: Life, roots) -> None:
    from inference.tiny_scorers import tiny_clip_dir

    clip = tiny_clip_dir(roots["models"] / "eval-clip")
    prompts = roots["data"] / "eval-prompts.txt"
    prompts.write_text("a handwritten digit seven\na handwritten digit one\na photo of a cat\n")
    source = life.client.post("/jobs", json={"spec": TINY_SPEC}, headers=life.auth).json()["id"]
    # Submitted at once: the worker takes one job at a time, so the eval runs after its source job.
    spec = {"kind": "eval", "eval": {"job": source, "steps": "all", "protocol": "prompts", "prompts": str(prompts),
                                     "batch_size": 2, "grid": 3, "scorers": [{"kind": "clip", "path": str(clip)}]}}
    created = life.client.post("/jobs", json={"spec": spec, "name": "eval-of-tiny"}, headers=life.auth)
    assert created.status_code == 201, created.text
    eval_id = created.json()["id"]
    job = life.wait_terminal(eval_id)
    assert life.job(source)["status"] == "succeeded"
    assert job["status"] == "succeeded" and job["kind"] == "eval", (job, life.debug(eval_id))
    metrics = life.get(f"/jobs/{eval_id}/metrics")
    assert {"eval/clip", "eval/clip_std", "eval/checkpoint_step"} <= set(metrics["keys"])
    steps = life.get(f"/jobs/{eval_id}/metrics", key="eval/checkpoint_step")["points"]
    assert [p["value"] for p in steps] == [2.0, 4.0, 6.0]  # every checkpoint of the source job, in order
    clip_points = life.get(f"/jobs/{eval_id}/metrics", key="eval/clip")["points"]
    assert len(clip_points) == 3 and all(0 <= p["value"] <= 100 for p in clip_points)
    assert "scored" in life.kinds(eval_id)
    assert [s["step"] for s in life.get(f"/jobs/{eval_id}/samples")["data"]] == [1, 2, 3]


def test_an_rl_job_over_http_starts_from_its_stage1_job_and_logs_rl_metrics(life: Life) -> None:
    source = life.client.post("/jobs", json={"spec": TINY_SPEC}, headers=life.auth).json()["id"]
    spec = {**tiny_spec(max_steps=5, checkpoint_every=5, sample_every=5), "kind": "rl",
            # An untrained LRM's gaps are small: thresholds 0 keep every decisive pair, so updates happen.
            "rl": {"init_from": str(life.settings.run_dir(source)), "threshold_min": 0.0, "threshold_max": 0.0}}
    created = life.client.post("/jobs", json={"spec": spec}, headers=life.auth)
    assert created.status_code == 201, created.text
    rl_id = created.json()["id"]
    job = life.wait_terminal(rl_id)  # one job at a time: the RL job runs after its stage-1 source
    assert life.job(source)["status"] == "succeeded"
    assert job["status"] == "succeeded" and job["kind"] == "rl", (job, life.debug(rl_id))
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 5
    events = life.get(f"/jobs/{rl_id}/events", limit=1000)["data"]
    init = [e for e in events if e["kind"] == "init"]
    assert len(init) == 1 and "step-00000006" in init[0]["message"], events  # the source's latest checkpoint
    keys = set(life.get(f"/jobs/{rl_id}/metrics")["keys"])
    assert {"loss/rl", "rl/kept_frac", "rl/reward_mean", "rl/updated"} <= keys, keys
    updated = life.get(f"/jobs/{rl_id}/metrics", key="rl/updated")["points"]
    assert [p["step"] for p in updated] == [1, 2, 3, 4, 5] and any(p["value"] == 1.0 for p in updated)
    assert [c["step"] for c in life.get(f"/jobs/{rl_id}/checkpoints")["data"]] == [5]


def test_worker_shutdown_and_cancel_both_stop_at_a_checkpoint(life: Life) -> None:
    # No periodic checkpoint before step 1000: every checkpoint here is one written on a stop request.
    spec = tiny_spec(max_steps=500, checkpoint_every=1000, sample_every=1000)
    job_id = life.client.post("/jobs", json={"spec": spec}, headers=life.auth).json()["id"]
    wait_for(lambda: life.job(job_id)["progress"]["step"] >= 1, RUN_TIMEOUT, what="the first step")

    # A warm shutdown of the worker (docker stop): the trainer checkpoints and the job goes back to the queue.
    assert life.worker.stop(timeout=RUN_TIMEOUT) == 0, life.debug(job_id)
    job = life.job(job_id)
    assert job["status"] == "recovering", (job, life.debug(job_id))
    drained = [c["step"] for c in life.get(f"/jobs/{job_id}/checkpoints")["data"]]
    assert len(drained) == 1 and drained[0] >= 1, life.debug(job_id)

    # The next worker resumes from that checkpoint; then a cancel stops it at another one.
    life.restart_worker()
    wait_for(lambda: life.job(job_id)["progress"]["step"] > drained[0], RUN_TIMEOUT, what="the resumed run")
    response = life.client.post(f"/jobs/{job_id}/cancel", headers=life.auth)
    assert response.status_code == 200 and response.json()["status"] == "cancelling"
    job = life.wait_terminal(job_id)
    assert job["status"] == "cancelled" and job["attempt"] == 2, (job, life.debug(job_id))
    ckpts = life.get(f"/jobs/{job_id}/checkpoints")["data"]
    assert [c["step"] for c in ckpts][0] == drained[0] and ckpts[-1]["step"] > drained[0]
    assert all((Path(c["path"]) / "meta.json").is_file() for c in ckpts)
    assert job["progress"]["step"] < 500
    events = life.get(f"/jobs/{job_id}/events", limit=1000)["data"]
    assert [e["data"]["resume_step"] for e in events if e["kind"] == "claimed"] == [None, drained[0]]
    kinds = [e["kind"] for e in events]
    assert "recovering" in kinds and "cancel_requested" in kinds and kinds[-1] == "cancelled"
    assert not job_processes(job_id)


def test_killed_worker_job_resumes_from_its_checkpoint(life: Life) -> None:
    settings = life.settings.model_copy(update={"reaper_interval_seconds": 0.5})
    sessions = life.client.app.state.sessionmaker
    reaper = Reaper(sessions=sessions, settings=settings, send=life.client.app.state.dispatcher.send)
    reaper.start()
    try:
        spec = tiny_spec(max_steps=6, checkpoint_every=2, sample_every=1000)
        job_id = life.client.post("/jobs", json={"spec": spec}, headers=life.auth).json()["id"]
        # Kill after the step-2 checkpoint, with steps beyond it already logged.
        wait_for(lambda: life.get(f"/jobs/{job_id}/checkpoints")["data"] and life.job(job_id)["progress"]["step"] >= 3,
                 RUN_TIMEOUT, what="a checkpoint and a step past it")
        resume_from = life.get(f"/jobs/{job_id}/checkpoints")["data"][-1]["step"]
        life.worker.kill()
        # The trainer dies with its worker (it would otherwise write into the next attempt's run directory).
        wait_for(lambda: not job_processes(job_id), 15, what="the orphaned trainer to die")
        wait_for(lambda: life.job(job_id)["status"] == "recovering", 30, what="the reaper")
        life.restart_worker()
        job = life.wait_terminal(job_id)
    finally:
        reaper.stop()
    assert job["status"] == "succeeded", (job, life.debug(job_id))
    assert job["attempt"] == 2
    events = life.get(f"/jobs/{job_id}/events", limit=1000)["data"]
    claims = [e["data"] for e in events if e["kind"] == "claimed"]
    assert [c["attempt"] for c in claims] == [1, 2] and claims[1]["resume_step"] >= resume_from
    started = [e["data"] for e in events if e["kind"] == "started" and e["source"] == "trainer"]
    assert started[-1]["resumed"] is True and started[-1]["step"] == claims[1]["resume_step"]
    # Unique (key, step) rows, and every step from 1 to the end: no gap after the resume point.
    assert life.full_series(job_id) == [1, 2, 3, 4, 5, 6]
