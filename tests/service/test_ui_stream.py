"""The dashboard's server side: /ui static files, GET /jobs/{id}/stream (SSE) and GET /jobs/{id}/logs."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from servicekit import TINY_SPEC, make_settings, wait_for
from sqlalchemy import update

from api.auth import create_token, revoke_token
from api.db import utcnow
from api.main import create_app
from api.models import Event, Job, Metric
from api.routes.live import LOG_MAX_LIMIT, open_streams

pytestmark = pytest.mark.service


def _job(client: TestClient, auth: dict[str, str]) -> str:
    created = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def _messages(body: str) -> list[tuple[str, Any]]:
    """(event, data) of each SSE message; comment lines (keepalives) are skipped."""
    out = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def _finish(sessions: Any, job_id: str, *, steps: range, status: str = "succeeded") -> None:
    with sessions() as session:
        session.add_all([Metric(job_id=job_id, key=key, step=s, wall_time=float(s), value=s / 10)
                         for key in ("loss/dm", "grad_norm/generator") for s in steps])
        session.add(Event(job_id=job_id, time=utcnow(), kind="step", message="trained", data={}, source="service"))
        session.execute(update(Job).where(Job.id == job_id).values(
            status=status, progress_step=steps.stop - 1, finished_at=utcnow(), updated_at=utcnow()))
        session.commit()


def test_stream_is_404_for_another_owner_and_an_unknown_job(client, auth, new_token) -> None:
    job_id = _job(client, auth)
    for headers, path in ((new_token(), f"/jobs/{job_id}/stream"), (auth, "/jobs/j_nope/stream")):
        response = client.get(path, headers=headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get(f"/jobs/{job_id}/stream").status_code == 401


def test_stream_of_a_finished_job_sends_everything_then_ends(client, auth, sessions) -> None:
    job_id = _job(client, auth)
    _finish(sessions, job_id, steps=range(1, 6))
    response = client.get(f"/jobs/{job_id}/stream", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    messages = _messages(response.text)
    assert messages[0][0] == "job" and messages[0][1]["status"] == "succeeded"
    assert messages[-1] == ("end", {"status": "succeeded"})
    events = [e for name, data in messages if name == "events" for e in data]
    assert [e["kind"] for e in events] == ["queued", "step"]
    metrics = next(data for name, data in messages if name == "metrics")
    assert [p["step"] for p in metrics["loss/dm"]] == [1, 2, 3, 4, 5]
    assert metrics["grad_norm/generator"][2] == {"step": 3, "wall_time": 3.0, "value": 0.3}

    # Resuming from what a client already has sends only the rest.
    again = _messages(client.get(f"/jobs/{job_id}/stream", params={"after": events[-1]["id"], "since_step": 3},
                                 headers=auth).text)
    assert [name for name, _ in again] == ["job", "metrics", "end"]
    assert [p["step"] for p in again[1][1]["loss/dm"]] == [4, 5]


def test_stream_follows_a_live_job_to_its_end(client, auth, sessions) -> None:
    job_id = _job(client, auth)
    app = client.app

    def train() -> None:
        # Once the stream is being served, the job runs, logs in two batches and finishes.
        wait_for(lambda: open_streams(app) > 0, 30, interval=0.02, what="the stream to open")
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(status="running", progress_step=2))
            session.add_all([Metric(job_id=job_id, key="loss/dm", step=s, wall_time=float(s), value=1.0)
                             for s in (1, 2)])
            session.commit()
        _finish(sessions, job_id, steps=range(3, 7))

    thread = threading.Thread(target=train)
    thread.start()
    response = client.get(f"/jobs/{job_id}/stream", headers=auth)  # returns once the stream has ended
    thread.join()
    messages = _messages(response.text)
    statuses = [data["status"] for name, data in messages if name == "job"]
    assert statuses[-1] == "succeeded" and messages[-1] == ("end", {"status": "succeeded"})
    steps = [p["step"] for name, data in messages if name == "metrics" for p in data.get("loss/dm", [])]
    assert steps == [1, 2, 3, 4, 5, 6]  # every point once, in order, whichever poll saw it
    assert open_streams(app) == 0


def test_revoking_the_token_ends_its_open_stream(client, sessions) -> None:
    with sessions() as session:
        row, token = create_token(session=session, name="revoked", prefix="fdmd_")
    headers = {"Authorization": f"Bearer {token}"}
    job_id = _job(client, headers)
    app = client.app

    def revoke() -> None:
        wait_for(lambda: open_streams(app) > 0, 30, interval=0.02, what="the stream to open")
        with sessions() as session:
            revoke_token(session=session, ref=row.public_id)

    thread = threading.Thread(target=revoke)
    thread.start()
    response = client.get(f"/jobs/{job_id}/stream", headers=headers)  # the job stays queued
    thread.join()
    # Returning at all is the point (the job is queued for ever); it must not claim that the job ended.
    assert response.status_code == 200 and "end" not in [name for name, _ in _messages(response.text)]
    assert client.get(f"/jobs/{job_id}/stream", headers=headers).status_code == 401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(database_url, roots) -> Iterator[tuple[str, Any]]:
    """The app under a real uvicorn, in a thread: a TestClient cannot drop a connection mid-response."""
    app = create_app(make_settings(database_url, roots, stream_poll_seconds=0.05, reaper_interval_seconds=0))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, interval=0.05, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_client_that_disconnects_mid_stream_leaves_nothing_behind(live_server) -> None:
    base, app = live_server
    with app.state.sessionmaker() as session:
        _, token = create_token(session=session, name="sse", prefix="fdmd_")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        job_id = http.post("/jobs", json={"spec": TINY_SPEC}).json()["id"]
        for _ in range(3):  # the job stays queued: only the client going away can end these streams
            with http.stream("GET", f"/jobs/{job_id}/stream") as response:
                assert response.status_code == 200
                first = next(response.iter_lines())
                assert first == "event: job"
            # Leaving the block closes the connection with the body unread.
    wait_for(lambda: open_streams(app) == 0, 30, interval=0.05, what="the abandoned streams to end")
    wait_for(lambda: app.state.engine.pool.checkedout() == 0, 30, interval=0.05, what="the sessions to close")
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        assert http.get(f"/jobs/{job_id}").json()["status"] == "queued"


def test_logs_serve_byte_ranges_to_the_owner_only(client, auth, new_token, settings) -> None:
    job_id = _job(client, auth)
    url = f"/jobs/{job_id}/logs"
    empty = client.get(url, headers=auth)  # not started: no log yet
    assert empty.status_code == 200 and empty.content == b"" and empty.headers["x-next-offset"] == "0"

    text = "step 1 loss 0.5\nstep 2 loss 0.4 — ok\n".encode() * 50
    log = settings.run_dir(job_id) / "trainer.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(text)
    whole = client.get(url, headers=auth)
    assert whole.content == text and whole.headers["content-type"] == "text/plain; charset=utf-8"
    assert whole.headers["x-next-offset"] == str(len(text))
    part = client.get(url, params={"offset": 10, "limit": 25}, headers=auth)
    assert part.content == text[10:35] and part.headers["x-next-offset"] == "35"
    past = client.get(url, params={"offset": len(text) + 100}, headers=auth)
    assert past.content == b"" and past.headers["x-next-offset"] == str(len(text))  # bounded by the file

    assert client.get(url, headers=new_token()).status_code == 404
    assert client.get("/jobs/j_nope/logs", headers=auth).status_code == 404
    for params, field in (({"offset": -1}, "offset"), ({"limit": LOG_MAX_LIMIT + 1}, "limit"), ({"limit": 0}, "limit")):
        bad = client.get(url, params=params, headers=auth)
        assert bad.status_code == 422 and bad.json()["error"]["fields"] == [field], bad.text


def test_logs_do_not_follow_a_symlink_out_of_the_run_dir(client, auth, settings, roots) -> None:
    job_id = _job(client, auth)
    secret = roots["outside"] / "secret.txt"
    secret.write_text("not yours")
    run_dir = settings.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "trainer.log").symlink_to(secret)
    assert client.get(f"/jobs/{job_id}/logs", headers=auth).content == b""


def test_ui_is_served_without_a_token_with_the_right_types(client) -> None:
    index = client.get("/ui")
    assert index.status_code == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    assert 'name="viewport"' in index.text and "/ui/static/app.js" in index.text
    assert "default-src 'self'" in index.headers["content-security-policy"]
    for path, kind in (("/ui/static/app.js", "text/javascript"), ("/ui/static/job.js", "text/javascript"),
                       ("/ui/static/app.css", "text/css"), ("/ui/static/vendor/uPlot.iife.min.js", "text/javascript"),
                       ("/ui/static/vendor/uPlot.min.css", "text/css")):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), path
        assert "content-security-policy" in response.headers
    assert client.get("/ui/static/nope.js").status_code == 404
    assert client.get("/ui/static/..%2F..%2Fedge.py").status_code == 404
    presets = client.get("/ui/presets.json").json()
    # The form's default makes real images on a CPU (the digits recipe); the groups follow presets/README.md.
    assert list(presets)[:2] == ["CPU / digits-4step", "CPU / tiny (smoke test, seconds)"]
    assert next(iter(presets.values()))["model"]["teacher"] == "toy:digits"
    assert {name.split(" / ")[0] for name in presets} == {"CPU", "One GPU", "Many GPUs", "Eval"}
    # Only the dashboard is public: its prefix must not open a neighbouring path.
    assert client.get("/uiadmin").status_code == 401
    assert client.get("/jobs").status_code == 401


def test_openapi_documents_the_stream_and_the_logs(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "text/event-stream" in paths["/jobs/{job_id}/stream"]["get"]["responses"]["200"]["content"]
    logs = paths["/jobs/{job_id}/logs"]["get"]["responses"]["200"]
    assert "text/plain; charset=utf-8" in logs["content"] and "X-Next-Offset" in logs["headers"]
    assert {p["name"] for p in paths["/jobs/{job_id}/logs"]["get"]["parameters"]} >= {"offset", "limit"}
