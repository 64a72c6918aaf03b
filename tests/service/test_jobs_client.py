"""`flashdmd jobs ...` against a real API served over HTTP (uvicorn on Postgres and Redis).

The client is invoked as the user types it (the `flashdmd` click group), with FLASHDMD_URL/FLASHDMD_TOKEN in
its environment. Jobs stay queued (no worker consumes the queue) except in the slow test, which starts a
real worker so that `follow` sees a job succeed and another fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from click.testing import CliRunner, Result
from servicekit import WorkerProcess, make_settings, queue_name, settings_env, tiny_spec

from api.auth import create_token
from api.cli import cli
from api.client import JobsClient, Target, resolve_target
from api.client_cli import follow
from api.main import create_app
from api.settings import Settings

pytestmark = pytest.mark.service


@dataclass
class Served:
    url: str
    token: str
    settings: Settings
    app: object

    def new_token(self) -> str:
        with self.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            return create_token(session=session, name="client-test", prefix=self.settings.token_prefix)[1]

    def jobs(self, *args: str, token: str | None = "default", data_dir: Path | None = None) -> Result:
        """`flashdmd jobs ARGS` with this server's URL; token None: no FLASHDMD_TOKEN at all."""
        env = {"FLASHDMD_URL": self.url, "FLASHDMD_TOKEN": self.token if token == "default" else token,
               "FLASHDMD_DATA_DIR": str(data_dir or self.settings.data_dir / "no-embedded-token-here")}
        return CliRunner().invoke(cli, ["jobs", *args], env=env, catch_exceptions=False)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


@pytest.fixture(scope="module")
def served(database_url: str, roots: dict[str, Path], redis_client) -> Iterator[Served]:
    settings = make_settings(database_url, roots, queue=queue_name("client"), cancel_grace_seconds=120)
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn exited before it started"
            thread.join(0.05)
        host, port = sock.getsockname()
        state = Served(f"http://{host}:{port}", "", settings, app)
        state.token = state.new_token()
        yield state
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _spec_file(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_list_show_then_cancel_ends_follow_with_3(served: Served, tmp_path: Path) -> None:
    submitted = served.jobs("submit", str(_spec_file(tmp_path, tiny_spec(max_steps=2))), "--name", "cli-a")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()  # the id alone on stdout, for ID=$(flashdmd jobs submit ...)
    assert f"distill job {job_id} queued" in submitted.stderr

    listed = served.jobs("list")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1:5] == ["cli-a", "distill", "queued", "0/2"]
    assert job_id not in served.jobs("list", "--status", "cancelled").stdout
    shown = served.jobs("show", job_id)
    assert "status:   queued" in shown.stdout and "progress: 0/2" in shown.stdout

    # `follow` on the waiting job; the user cancels it while follow waits between two polls.
    polls: list[str] = []

    def cancel_on_first_wait(_seconds: float) -> None:
        if not polls:
            with served.http() as http:
                assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        polls.append(job_id)

    with JobsClient(Target(served.url, served.token)) as client:
        assert follow(client, job_id, sleep=cancel_on_first_wait) == 3
    assert polls == [job_id]  # it waited once, then saw the cancel and stopped

    followed = served.jobs("follow", job_id)
    assert followed.exit_code == 3 and f"job {job_id} cancelled" in followed.stderr
    assert job_id in served.jobs("list", "--status", "cancelled").stdout

    resumed = served.jobs("resume", job_id)
    assert resumed.exit_code == 0 and f"job {job_id} queued" in resumed.stdout
    # Resuming a waiting job is the server's 409: its message, exit 2, no traceback.
    again = served.jobs("resume", job_id)
    assert again.exit_code == 2, again.output
    assert "invalid_state, HTTP 409" in again.stderr and "this one is queued" in again.stderr
    assert "Traceback" not in again.output
    cancelled = served.jobs("cancel", job_id)
    assert cancelled.exit_code == 0 and f"job {job_id} cancelled" in cancelled.stdout


def test_a_bad_spec_prints_the_server_message_and_field(served: Served, tmp_path: Path) -> None:
    spec = tiny_spec(max_steps="many")
    result = served.jobs("submit", str(_spec_file(tmp_path, spec)))
    assert result.exit_code == 2, result.output
    assert "invalid_request, HTTP 422" in result.stderr
    assert "spec.train.max_steps: Input should be a valid integer" in result.stderr
    assert "  field: spec.train.max_steps" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output

    # --set reaches the server the same way `flashdmd train --set` reaches the trainer.
    fixed = served.jobs("submit", str(_spec_file(tmp_path, spec)), "--set", "train.max_steps=2")
    assert fixed.exit_code == 0, fixed.output
    assert served.jobs("cancel", fixed.stdout.strip()).exit_code == 0


def test_tokens_missing_wrong_embedded_and_other_owners(served: Served, tmp_path: Path) -> None:
    missing = served.jobs("list", token=None, data_dir=tmp_path / "empty")
    assert missing.exit_code == 2
    assert "no API token: set FLASHDMD_TOKEN or pass --token" in missing.stderr
    assert str(tmp_path / "empty" / "token") in missing.stderr  # where `flashdmd up` would have put one

    wrong = served.jobs("list", token="fdmd_" + "x" * 40)
    assert wrong.exit_code == 2 and "unauthorized, HTTP 401" in wrong.stderr
    assert "check FLASHDMD_TOKEN or --token" in wrong.stderr and "Traceback" not in wrong.output

    # No FLASHDMD_TOKEN: the token `flashdmd up` saved in the data dir is used.
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "token").write_text(served.token + "\n")
    assert served.jobs("list", token=None, data_dir=tmp_path / "up").exit_code == 0

    # Another owner's job is not found, exactly as an unknown one.
    submitted = served.jobs("submit", str(_spec_file(tmp_path, tiny_spec(max_steps=2))))
    job_id = submitted.stdout.strip()
    other = served.jobs("show", job_id, token=served.new_token())
    assert other.exit_code == 2 and "not_found, HTTP 404" in other.stderr
    assert served.jobs("cancel", job_id).exit_code == 0


def _has_logs_route(app: object) -> bool:
    # From the OpenAPI paths: this FastAPI nests included routers, so app.routes does not list their paths.
    return "/jobs/{job_id}/logs" in app.openapi()["paths"]  # type: ignore[attr-defined]


def test_logs_prints_the_trainer_log_from_an_offset(served: Served, tmp_path: Path) -> None:
    if not _has_logs_route(served.app):
        pytest.skip("needs GET /jobs/{id}/logs (ui branch)")
    job_id = served.jobs("submit", str(_spec_file(tmp_path, tiny_spec(max_steps=2)))).stdout.strip()
    assert served.jobs("cancel", job_id).exit_code == 0
    text = "".join(f"step {i} loss 0.{i}\n" for i in range(5000))  # more than one 64 KiB page
    run_dir = served.settings.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "trainer.log").write_text(text)  # as the worker writes it

    full = served.jobs("logs", job_id)
    assert full.exit_code == 0 and full.stdout == text
    assert served.jobs("logs", job_id, "--offset", "100").stdout == text[100:]
    followed = served.jobs("logs", job_id, "--follow")  # the job has ended: all of it, then exit
    assert followed.exit_code == 0 and followed.stdout == text


@pytest.mark.slow
def test_follow_exits_0_on_success_and_1_on_failure(served: Served, tmp_path: Path) -> None:
    # HF_HUB_OFFLINE: the hub-id job below must fail at once with model_unreachable, network or not.
    worker = WorkerProcess({**settings_env(served.settings), "HF_HUB_OFFLINE": "1"}, tmp_path / "worker.log").start()
    try:
        spec = tiny_spec(max_steps=2, checkpoint_every=2, sample_every=2, report_to=["tensorboard"])
        ok = served.jobs("submit", str(_spec_file(tmp_path, spec)), "--follow")
        assert ok.exit_code == 0, (ok.output, worker.log()[-3000:])
        job_id = ok.stdout.strip()
        assert f"job {job_id} succeeded at step 2" in ok.stderr
        assert "dm=" in ok.stderr and "status=" in ok.stderr  # the bar showed a loss and the state
        # train.report_to through the service: the trainer wrote its TensorBoard events in the run dir.
        assert list((served.settings.run_dir(job_id) / "trackers").rglob("events.out.tfevents.*"))

        # A hub teacher that cannot be fetched: one line with its code and the field, in --follow and in show.
        hub = served.jobs("submit", str(_spec_file(tmp_path, {**spec, "model": {"teacher": "someorg/not-a-model"}},
                                                   "hub.yaml")), "--follow")
        assert hub.exit_code == 1, (hub.output, worker.log()[-3000:])
        hub_id = hub.stdout.strip()
        line = f"job {hub_id} failed: model_unreachable: model.teacher: cannot resolve hub id 'someorg/not-a-model'"
        assert line in hub.stderr and "Retrying" not in hub.stderr, hub.stderr
        error = served.http().get(f"/jobs/{hub_id}").json()["error"]
        assert error["code"] == "model_unreachable" and "\n" not in error["message"], error
        assert error["message"] in served.jobs("show", hub_id).stdout

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here: the missing-extra failure cannot happen")
        bad = served.jobs("submit", str(_spec_file(tmp_path, {**spec, "train": {**spec["train"],
                                                                                 "report_to": ["wandb"]}})), "--follow")
        assert bad.exit_code == 1, (bad.output, worker.log()[-3000:])
        assert "failed: invalid_input" in bad.stderr and "pip install 'flashdmd[wandb]'" in bad.stderr
    finally:
        worker.stop()


def test_the_data_dir_alone_finds_the_service_and_skips_a_stale_file(served: Served, tmp_path: Path) -> None:
    """service.json (what `flashdmd up` writes) gives URL and token; one left by a dead process is ignored."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "kept-token").write_text(served.token + "\n")
    live = {"url": served.url, "token_file": str(data / "kept-token"), "pid": os.getpid()}
    (data / "service.json").write_text(json.dumps(live))
    unset = {"FLASHDMD_URL": None, "FLASHDMD_TOKEN": None, "FLASHDMD_DATA_DIR": None}
    found = CliRunner().invoke(cli, ["jobs", "--data-dir", str(data), "list", "--json"], env=unset)
    assert found.exit_code == 0, found.output
    assert resolve_target(None, "explicit", env={}, data_dir=data) == Target(served.url, "explicit")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (data / "service.json").write_text(json.dumps({**live, "pid": gone.pid}))
    (data / "token").write_text("saved-token\n")
    assert resolve_target(None, None, env={}, data_dir=data) == Target("http://127.0.0.1:8000", "saved-token")
