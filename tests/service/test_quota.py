"""Per-owner quotas from Settings, on Postgres and SQLite.

One token posted 500 jobs in 6 s and `max_steps=10^12` was accepted. Now a token holds at most
FLASHDMD_MAX_ACTIVE_JOBS_PER_OWNER unfinished jobs (409 `quota_exceeded`) and asks for at most
FLASHDMD_MAX_TRAIN_STEPS steps (422 naming spec.train.max_steps).
"""

from __future__ import annotations

import threading

import pytest
from appkit import DIALECTS, App, dialect_app
from servicekit import TINY_SPEC, tiny_spec

pytestmark = pytest.mark.service

LIMIT, MAX_STEPS = 3, 1000


@pytest.fixture(scope="module", params=DIALECTS)
def app(request, database_url, roots, tmp_path_factory) -> App:
    with dialect_app(request.param, database_url=database_url, roots=roots, tmp=tmp_path_factory.mktemp("quota"),
                     max_active_jobs_per_owner=LIMIT, max_train_steps=MAX_STEPS) as built:
        yield built


def _post(app: App, headers: dict[str, str], **extra_headers: str):
    return app.client.post("/jobs", json={"spec": TINY_SPEC}, headers={**headers, **extra_headers})


def test_active_jobs_per_owner(app: App) -> None:
    owner, other = app.token(), app.token()
    ids = []
    for i in range(LIMIT):
        created = _post(app, owner, **{"Idempotency-Key": f"k{i}"})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    refused = _post(app, owner)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "FLASHDMD_MAX_ACTIVE_JOBS_PER_OWNER" in error["message"] and f"limit is {LIMIT}" in error["message"]
    # Nothing was stored for the refused request.
    assert len(app.client.get("/jobs", headers=owner).json()["data"]) == LIMIT
    # The quota is per owner, and a replay of an accepted request is still answered.
    assert _post(app, other).status_code == 201
    replay = _post(app, owner, **{"Idempotency-Key": "k0"})
    assert replay.status_code == 200 and replay.json()["id"] == ids[0]
    # A finished (here: cancelled) job frees its slot...
    assert app.client.post(f"/jobs/{ids[0]}/cancel", headers=owner).json()["status"] == "cancelled"
    again = _post(app, owner)
    assert again.status_code == 201, again.text
    # ...and resuming it would take one again: refused while the owner is at the limit.
    resumed = app.client.post(f"/jobs/{ids[0]}/resume", headers=owner)
    assert resumed.status_code == 409 and resumed.json()["error"]["code"] == "quota_exceeded"
    assert app.client.get(f"/jobs/{ids[0]}", headers=owner).json()["status"] == "cancelled"


def test_concurrent_submits_do_not_overshoot(app: App) -> None:
    """The owner's row is locked while counting: 12 parallel submits leave exactly LIMIT jobs."""
    owner = app.token()
    codes: list[int] = []
    lock = threading.Lock()

    def submit() -> None:
        code = _post(app, owner).status_code
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [201] * LIMIT + [409] * (12 - LIMIT), codes


def test_max_steps_cap(app: App) -> None:
    owner = app.token()
    for steps in (MAX_STEPS + 1, 10**12, 2**31 - 1):  # 10^12 was accepted before
        response = app.client.post("/jobs", json={"spec": tiny_spec(max_steps=steps)}, headers=owner)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["fields"] == ["spec.train.max_steps"], error
        assert "FLASHDMD_MAX_TRAIN_STEPS" in error["message"] or steps > 2**31 - 1
    assert app.client.post("/jobs", json={"spec": tiny_spec(max_steps=MAX_STEPS)}, headers=owner).status_code == 201
    rl = {**tiny_spec(max_steps=MAX_STEPS + 1), "kind": "rl"}
    assert app.client.post("/jobs", json={"spec": rl}, headers=owner).json()["error"]["fields"] == [
        "spec.train.max_steps"]


def test_zero_means_no_active_limit(database_url, roots, tmp_path) -> None:
    with dialect_app("sqlite", database_url=database_url, roots=roots, tmp=tmp_path,
                     max_active_jobs_per_owner=0) as app:
        owner = app.token()
        assert all(_post(app, owner).status_code == 201 for _ in range(LIMIT + 2))
