"""POST/GET /jobs, cancel and resume, against Postgres and Redis (no worker consumes this queue)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from servicekit import TINY_SPEC, make_settings, tiny_spec
from sqlalchemy import update

from api.main import create_app
from api.models import Job
from api.workers import pool_queue

pytestmark = pytest.mark.service


def _queued(redis_client, settings) -> list[tuple[str, list]]:
    """(task name, args) of the messages waiting in the declared pool's queue, newest first."""
    out = []
    for raw in redis_client.lrange(pool_queue(settings, "cpu1"), 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], args))
    return out


def test_create_returns_the_job_and_sends_the_task_by_name(client, auth, redis_client, settings) -> None:
    before = redis_client.llen(pool_queue(settings, "cpu1"))
    response = client.post("/jobs", json={"spec": TINY_SPEC, "name": "tiny"}, headers=auth)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["name"] == "tiny" and job["kind"] == "distill"
    assert job["attempt"] == 0 and job["error"] is None
    assert job["progress"] == {"step": 0, "total_steps": 6, "rate": None, "eta": None}
    # The stored spec is the resolved one: what the trainer will get, defaults included.
    assert job["spec"]["schedule"]["timesteps"] == [999, 749, 499, 249]
    assert redis_client.llen(pool_queue(settings, "cpu1")) == before + 1
    assert _queued(redis_client, settings)[0] == ("flashdmd.run_job", [job["id"]])


def test_idempotency_key_returns_the_same_job(client, auth, redis_client, settings) -> None:
    headers = {**auth, "Idempotency-Key": "key-1"}
    before = redis_client.llen(pool_queue(settings, "cpu1"))
    first = client.post("/jobs", json={"spec": TINY_SPEC}, headers=headers)
    again = client.post("/jobs", json={"spec": TINY_SPEC}, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert redis_client.llen(pool_queue(settings, "cpu1")) == before + 1  # queued once
    other = client.post("/jobs", json={"spec": tiny_spec(max_steps=7)}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # Keys are per owner: the same key from another token is another job.
    assert client.post("/jobs", json={"spec": TINY_SPEC}, headers={**headers, **_other(client)}).json()["id"] != (
        first.json()["id"]
    )


def _other(client) -> dict[str, str]:
    from api.auth import create_token

    with client.app.state.sessionmaker() as session:
        return {"Authorization": "Bearer " + create_token(session=session, name="o", prefix="fdmd_")[1]}


def test_concurrent_requests_with_one_key_create_one_job(client, auth) -> None:
    headers = {**auth, "Idempotency-Key": "race"}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: client.post("/jobs", json={"spec": TINY_SPEC}, headers=headers), range(6)))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in responses}) == 1


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (tiny_spec(max_steps=0), "spec.train.max_steps", "greater than or equal to 1"),
        (tiny_spec(bogus=1), "spec.train.bogus", "Extra inputs"),
        ({**TINY_SPEC, "model": {}}, "spec.model.teacher", "Field required"),
        ({**TINY_SPEC, "kind": "painting"}, "spec.kind", "unknown job kind"),
        ({**TINY_SPEC, "data": {"builtin": "digits", "prompts": "/x"}}, "spec.data", "only one data source"),
        ({**TINY_SPEC, "schedule": {"num_steps": 4, "timesteps": [1, 2, 3, 4]}}, "spec.schedule", "decreasing"),
    ],
)
def test_malformed_spec_is_422_naming_the_field(client, auth, spec, field, words) -> None:
    response = client.post("/jobs", json={"spec": spec}, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["fields"] and error["message"].startswith(field) and words in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"spec": 5}, "spec"), ({}, "spec"), ({"spec": TINY_SPEC, "extra": 1}, "extra"),
     ({"spec": TINY_SPEC, "name": "x" * 300}, "name")],
)
def test_malformed_body_is_422_naming_the_field(client, auth, body, field) -> None:
    response = client.post("/jobs", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request" and field in response.json()["error"]["fields"]


def test_invalid_json_and_bad_query_are_422_not_500(client, auth) -> None:
    bad = client.post("/jobs", content=b"{nope", headers={**auth, "Content-Type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    for query in ("limit=0", "limit=abc", "status=bogus"):
        response = client.get(f"/jobs?{query}", headers=auth)
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", query


def _with_teacher(teacher: str) -> dict:
    return {**TINY_SPEC, "model": {"teacher": teacher}}


def test_teacher_outside_the_allowed_roots_is_422(client, auth, roots) -> None:
    inside = roots["models"] / "sdxl-teacher"
    inside.mkdir(exist_ok=True)
    link = roots["models"] / "sneaky"
    if not link.exists():
        link.symlink_to(roots["outside"])
    bad = [
        str(roots["outside"]),  # another folder
        f"{roots['models']}/../outside",  # a .. escape
        str(link),  # a symlink inside a root that points out of it
        "/etc",
        "models/sub/teacher",  # relative: not a hub id (two slashes) and not absolute
        "../x",
        "./org/name",
        "~/teacher",  # the home directory is not a root
    ]
    for teacher in bad:
        response = client.post("/jobs", json={"spec": _with_teacher(teacher)}, headers=auth)
        assert response.status_code == 422, (teacher, response.text)
        error = response.json()["error"]
        assert error["code"] == "path_not_allowed" and error["fields"] == ["spec.model.teacher"], teacher

    for teacher, stored in [
        (str(inside), str(inside)),
        (f"{roots['models']}/x/../sdxl-teacher", str(inside)),  # normalised to what the trainer will open
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("tiny:sd15", "tiny:sd15"),
    ]:
        response = client.post("/jobs", json={"spec": _with_teacher(teacher)}, headers=auth)
        assert response.status_code == 201, (teacher, response.text)
        assert response.json()["spec"]["model"]["teacher"] == stored


def test_data_and_discriminator_paths_are_checked_against_their_roots(client, auth, roots) -> None:
    images = roots["data"] / "images"
    images.mkdir(exist_ok=True)
    ok = {**TINY_SPEC, "data": {"images": str(images)}}
    assert client.post("/jobs", json={"spec": ok}, headers=auth).status_code == 201
    for spec, field in [
        ({**TINY_SPEC, "data": {"images": str(roots["models"])}}, "spec.data.images"),  # a model root is not data
        ({**TINY_SPEC, "data": {"manifest": "org/manifest"}}, "spec.data.manifest"),  # no hub ids for data files
        ({**TINY_SPEC, "distill": {"discriminator": {"backbone": "vit_b", "checkpoint": "/tmp/sam.pth"}}},
         "spec.distill.discriminator.checkpoint"),
    ]:
        response = client.post("/jobs", json={"spec": spec}, headers=auth)
        assert response.status_code == 422 and response.json()["error"]["fields"] == [field], response.text


def test_list_pages_with_a_cursor_and_filters_by_status(client, new_token) -> None:
    auth = new_token()
    ids = [client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"after": after} if after else {})}, headers=auth).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == ids[::-1]  # newest first, each once
    client.post(f"/jobs/{ids[0]}/cancel", headers=auth)
    cancelled = client.get("/jobs", params={"status": "cancelled"}, headers=auth).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]] and cancelled["has_more"] is False


def test_cancel_and_resume_a_queued_job(client, auth, sessions) -> None:
    job = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()
    cancelled = client.post(f"/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/jobs/{job['id']}/cancel", headers=auth).json()["status"] == "cancelled"  # idempotent
    resumed = client.post(f"/jobs/{job['id']}/resume", headers=auth)
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert resumed.json()["cancel_requested"] is False
    again = client.post(f"/jobs/{job['id']}/resume", headers=auth)
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
    kinds = [e["kind"] for e in client.get(f"/jobs/{job['id']}/events", headers=auth).json()["data"]]
    assert kinds == ["queued", "cancelled", "resumed"]


def test_cancel_of_a_running_job_sets_the_flag(client, auth, sessions) -> None:
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()["id"]
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=1))
        session.commit()
    response = client.post(f"/jobs/{job_id}/cancel", headers=auth).json()
    assert response["status"] == "cancelling" and response["cancel_requested"] is True
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.commit()
    finished = client.post(f"/jobs/{job_id}/cancel", headers=auth)
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "invalid_state"
    assert client.post(f"/jobs/{job_id}/resume", headers=auth).status_code == 409


def test_progress_and_error_fields(client, auth, sessions) -> None:
    job_id = client.post("/jobs", json={"spec": tiny_spec(max_steps=100)}, headers=auth).json()["id"]
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", progress_step=40,
                                                                   progress_rate=2.0, attempt=2))
        session.commit()
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["progress"] == {"step": 40, "total_steps": 100, "rate": 2.0, "eta": 30.0}
    assert job["attempt"] == 2
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="failed", error_code="invalid_input",
                                                                   error_message="no such folder"))
        session.commit()
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["error"] == {"code": "invalid_input", "message": "no such folder", "fields": None}
    assert job["progress"]["eta"] is None


def test_unknown_routes_and_methods_use_the_error_shape(client, auth) -> None:
    assert client.get("/nope", headers=auth).json()["error"]["code"] == "not_found"
    response = client.delete("/jobs", headers=auth)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_prometheus_metrics(client, auth) -> None:
    client.get("/jobs", headers=auth)
    text = client.get("/metrics", headers=auth).text
    assert 'flashdmd_jobs{status="queued"}' in text and "flashdmd_queue_depth" in text
    assert 'flashdmd_http_request_duration_seconds_count{method="GET",route="/jobs",status="200"}' in text


def test_broker_outage_delays_jobs_instead_of_failing_them(database_url, roots, redis_client) -> None:
    from api.auth import create_token
    from api.reaper import reap_once

    down = make_settings(database_url, roots, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(down)) as client:
        with client.app.state.sessionmaker() as session:
            auth = {"Authorization": "Bearer " + create_token(session=session, name="x", prefix="fdmd_")[1]}
        ready = client.get("/readyz", headers=auth)  # the reasons are for token holders
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok"
        response = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth)
        assert response.status_code == 201 and response.json()["status"] == "queued"
        job_id = response.json()["id"]
        sessions = client.app.state.sessionmaker
    # Once a broker answers, the reaper sends what could not be sent (after the grace period).
    up = make_settings(database_url, roots, stale_after_seconds=0.001, heartbeat_seconds=0.0001)
    with TestClient(create_app(up)) as client_up:
        result = reap_once(sessions=sessions, settings=up, send=client_up.app.state.dispatcher.send)
    assert job_id in result.dispatched
    assert ("flashdmd.run_job", [job_id]) in _queued(redis_client, up)


def test_rl_job_paths_checkpoint_of_your_own_job_or_an_allowed_root(client, new_token, roots, settings) -> None:
    owner, other = new_token(), new_token()
    stage1 = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]
    checkpoint = str(settings.run_dir(stage1) / "checkpoints" / "step-00000002")

    def rl(**section) -> dict:
        return {**TINY_SPEC, "kind": "rl", "rl": section}

    created = client.post("/jobs", json={"spec": rl(init_from=checkpoint)}, headers=owner)
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "rl" and created.json()["spec"]["rl"]["init_from"] == checkpoint
    for spec, headers in [
        (rl(init_from=checkpoint), other),  # someone else's job: as invisible as on GET /jobs/{id}
        (rl(init_from=str(settings.run_root)), owner),  # every job's runs at once
        (rl(init_from=str(settings.run_root / "job_nope")), owner),
        (rl(init_from=str(roots["outside"])), owner),
    ]:
        response = client.post("/jobs", json={"spec": spec}, headers=headers)
        assert response.status_code == 422 and response.json()["error"]["fields"] == ["spec.rl.init_from"], spec
    reward = {"path": str(roots["outside"] / "lrm")}
    response = client.post("/jobs", json={"spec": rl(reward=reward)}, headers=owner)
    assert response.status_code == 422 and response.json()["error"]["fields"] == ["spec.rl.reward.path"]
    inside = {"path": str(roots["models"] / "lrm")}
    assert client.post("/jobs", json={"spec": rl(reward=inside)}, headers=owner).status_code == 201


def test_eval_job_names_your_job_or_paths_under_the_roots(client, new_token, roots, settings) -> None:
    owner, other = new_token(), new_token()
    source = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]

    def ev(**section) -> dict:
        return {"kind": "eval", "eval": {"protocol": "prompts", "prompts": str(roots["data"] / "p.txt"),
                                         "scorers": [{"kind": "clip", "path": str(roots["models"] / "clip")}],
                                         **section}}

    created = client.post("/jobs", json={"spec": ev(job=source)}, headers=owner)
    assert created.status_code == 201, created.text
    body = created.json()
    # The job id becomes that job's run directory, which the trainer can open; progress counts checkpoints.
    assert body["kind"] == "eval" and body["spec"]["eval"]["checkpoint"] == str(settings.run_dir(source))
    assert body["spec"]["eval"]["job"] is None and body["progress"]["total_steps"] == 1
    response = client.post("/jobs", json={"spec": ev(job=source)}, headers=other)
    assert response.status_code == 422 and response.json()["error"]["fields"] == ["spec.eval.job"]
    bad_scorer = ev(job=source, scorers=[{"kind": "clip", "path": str(roots["models"] / "clip")},
                                         {"kind": "fid", "path": str(roots["outside"] / "inception.pt"),
                                          "reference": str(roots["data"] / "coco.npz")}])
    response = client.post("/jobs", json={"spec": bad_scorer}, headers=owner)
    assert response.status_code == 422 and response.json()["error"]["fields"] == ["spec.eval.scorers.1.path"]
    for spec, field in [
        (ev(), "spec.eval"),  # neither checkpoint nor job
        (ev(job=source, steps=[]), "spec.eval"),
        (ev(job=source, scorers=[{"kind": "fid", "path": str(roots["models"] / "i.pt")}]), "spec.eval.scorers.0"),
        (ev(job=source, prompts=None), "spec.eval"),
    ]:
        response = client.post("/jobs", json={"spec": spec}, headers=owner)
        assert response.status_code == 422 and response.json()["error"]["fields"] == [field], (spec, response.text)
    outside = ev(checkpoint=str(roots["outside"] / "ck"))
    response = client.post("/jobs", json={"spec": outside}, headers=owner)
    assert response.status_code == 422 and response.json()["error"]["fields"] == ["spec.eval.checkpoint"]
