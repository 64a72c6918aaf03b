"""`flashdmd up` as a new user runs it: no servers, one command, then HTTP with the printed token."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from servicekit import TINY_SPEC, settings_env, wait_for

from api.cli import cli
from api.proc import job_processes

NO_CLIENT_ENV = {"FLASHDMD_URL": None, "FLASHDMD_TOKEN": None, "FLASHDMD_DATA_DIR": None}

pytestmark = [pytest.mark.service, pytest.mark.slow]
RUN_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with_env(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_flashdmd_up_serves_and_runs_a_tiny_job(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "flashdmd", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDMD_")}
    env["FLASHDMD_DATA_DIR"] = str(data_dir)  # only to find its processes below; --data-dir says the same
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [str(Path(sys.executable).with_name("flashdmd")), "up", "--data-dir", str(data_dir), "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    job_id = None
    try:
        def healthy() -> bool:
            assert up.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base}/healthz", timeout=2).json() == {"status": "ok", "checks": {}}
            except httpx.HTTPError:
                return False

        wait_for(healthy, 90, interval=0.5, what="flashdmd up to serve /healthz")
        token = (data_dir / "token").read_text().strip()
        assert token in log_path.read_text()  # printed for the user as well
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            assert http.get("/readyz").json()["status"] == "ok"
            created = http.post("/jobs", json={"spec": TINY_SPEC})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]

            def finished() -> dict | None:
                job = http.get(f"/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_for(finished, RUN_TIMEOUT, interval=1.0, what="the tiny job")
            assert job["status"] == "succeeded", (job, log_path.read_text()[-4000:])
            samples = http.get(f"/jobs/{job_id}/samples").json()["data"]
            assert samples and http.get(samples[0]["url"]).content.startswith(b"\x89PNG")
            assert [c["step"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["data"]] == [2, 4, 6]
        assert (data_dir / "flashdmd.db").is_file() and (data_dir / "broker").is_dir()
        # Discovery: on a non-default port, the data dir alone finds the service (its URL and token).
        service_file = data_dir / "service.json"
        assert stat.S_IMODE(service_file.stat().st_mode) == 0o600
        assert json.loads(service_file.read_text())["url"] == base
        assert json.loads(service_file.read_text())["token_file"] == str(data_dir / "token")
        shown = CliRunner().invoke(cli, ["jobs", "--data-dir", str(data_dir), "show", job_id], env=NO_CLIENT_ENV)
        assert shown.exit_code == 0 and "succeeded" in shown.stdout, shown.output
        by_env = CliRunner().invoke(cli, ["jobs", "list"], env={**NO_CLIENT_ENV, "FLASHDMD_DATA_DIR": str(data_dir)})
        assert by_env.exit_code == 0 and job_id in by_env.stdout, by_env.output
        # An explicit --url still wins over the service file (nothing listens on port 9: refused).
        explicit = CliRunner().invoke(cli, ["jobs", "--data-dir", str(data_dir), "--url", "http://127.0.0.1:9", "list"],
                                      env=NO_CLIENT_ENV)
        assert explicit.exit_code == 2 and "127.0.0.1:9" in explicit.stderr, explicit.output
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert code == 0, log_path.read_text()[-3000:]
    assert not (data_dir / "service.json").exists()  # a stopped service is not advertised
    # Nothing is left behind: no worker, no trainer.
    wait_for(lambda: not _processes_with_env(f"FLASHDMD_DATA_DIR={data_dir}"), 15, what="the worker to exit")
    assert job_id is None or not job_processes(job_id)


def test_flashdmd_up_on_a_taken_port_fails_at_once_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        out = subprocess.run([str(Path(sys.executable).with_name("flashdmd")), "up", "--data-dir",
                              str(tmp_path / "d"), "--port", str(port)], capture_output=True, text=True, timeout=120)
        took = time.monotonic() - start
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in out.stderr, out.stderr
    assert not (tmp_path / "d" / "service.json").exists()
    assert took < 60, took  # the check runs before the database, the worker and the app: import time only


def test_flashdmd_serve_uses_the_production_urls(settings, tmp_path: Path) -> None:
    """`flashdmd serve` with FLASHDMD_DATABASE_URL/BROKER_URL set (Postgres, Redis), as in docker-compose."""
    port = _free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = subprocess.Popen(
            [str(Path(sys.executable).with_name("flashdmd")), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        def ready() -> dict | None:
            assert serve.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
            except httpx.HTTPError:
                return None

        body = wait_for(ready, 60, interval=0.5, what="flashdmd serve")
        assert body == {"status": "ok", "checks": {}}  # no token: ready or not, no reasons
        assert httpx.get(f"http://127.0.0.1:{port}/jobs").status_code == 401
    finally:
        serve.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert serve.wait(30) in (0, -signal.SIGTERM), log_path.read_text()
    assert "Application shutdown complete" in log_path.read_text()
