"""`flashdmd demo` beside another service: it takes a free port and says so, talks only to the service it
started, names the real cause when its service cannot start, and with --no-serve prints only what stays true."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest

from flashjob.demo import Service, choose_port, closing_lines

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture
def taken_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A port some other server holds (listening, as the user's running `flashdmd up` would)."""
    for key in [k for k in os.environ if k.startswith("FLASHDMD_")]:
        monkeypatch.delenv(key)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_the_demo_takes_a_free_port_and_uses_its_own_services_token(taken_port: int, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    port = choose_port(taken_port)
    assert port != taken_port
    assert f"port {taken_port} is in use (another service?); the demo's service takes port {port}" in capsys.readouterr().out
    service = Service(port, tmp_path / "service")
    try:
        token = service.wait_ready(timeout=180)
        assert token == (tmp_path / "service" / "token").read_text().strip()
        jobs = httpx.get(f"http://127.0.0.1:{port}/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert jobs.status_code == 200, jobs.text
    finally:
        service.stop()


def test_a_service_that_cannot_start_says_why(taken_port: int, tmp_path: Path) -> None:
    """The cause from the service's own output, not `401 invalid or revoked token` from someone else's."""
    service = Service(taken_port, tmp_path / "service")
    try:
        with pytest.raises(click.ClickException) as err:
            service.wait_ready(timeout=120)
    finally:
        service.stop()
    assert f"port {taken_port} on 127.0.0.1 is already in use" in err.value.message
    assert f"the service on port {taken_port} exited" in err.value.message


def test_no_serve_prints_no_url_token_or_curl_for_a_stopped_service(tmp_path: Path) -> None:
    args = {"url": "http://127.0.0.1:8765", "token": "fdmd_secret", "job_id": "j1", "data_dir": tmp_path}
    stopped = "\n".join(closing_lines(**args, keep_serving=False))
    assert "fdmd_secret" not in stopped and "curl" not in stopped and "8765" not in stopped
    assert f"flashdmd up --data-dir {tmp_path}" in stopped and f"jobs --data-dir {tmp_path} show j1" in stopped
    serving = "\n".join(closing_lines(**args, keep_serving=True))
    assert "fdmd_secret" in serving and "curl" in serving and "http://127.0.0.1:8765/ui#/jobs/j1" in serving
