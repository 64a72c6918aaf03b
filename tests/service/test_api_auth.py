"""Bearer tokens and isolation: 401 without a token and 404 for another owner's job, on every route."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from servicekit import TINY_SPEC, settings_env
from sqlalchemy import select

from api.auth import hash_token
from api.cli import cli
from api.db import utcnow
from api.models import ApiToken

pytestmark = pytest.mark.service

PUBLIC = {"/healthz", "/readyz"}


def _routes(client) -> list[tuple[str, str]]:
    """Every documented (method, path) but the health checks, from the app's own OpenAPI schema."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(m.upper(), p) for p, ops in paths.items() if p not in PUBLIC for m in ops]


def _fill(path: str, job_id: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: job_id if m.group(1) == "job_id" else "3", path)


def test_route_table_is_what_we_check(client) -> None:
    # If a route is added, it is covered by the loops below; this guards against checking an empty list.
    paths = {p for _, p in _routes(client)}
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/metrics", "/jobs/{job_id}/samples/{step}", "/metrics"} <= paths


@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer "])
def test_every_non_health_route_needs_a_token(client, auth, header) -> None:
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=auth).json()["id"]
    headers = {"Authorization": header} if header else {}
    for method, path in _routes(client):
        response = client.request(method, _fill(path, job_id), headers=headers, json={"spec": TINY_SPEC})
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_another_owners_job_is_not_found_on_every_route(client, new_token) -> None:
    owner, other = new_token(), new_token()
    job_id = client.post("/jobs", json={"spec": TINY_SPEC}, headers=owner).json()["id"]
    job_routes = [(m, p) for m, p in _routes(client) if "{job_id}" in p]
    assert len(job_routes) >= 8
    for method, path in job_routes:
        response = client.request(method, _fill(path, job_id), headers=other)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
        # ...exactly as for a job that does not exist at all
        missing = client.request(method, _fill(path, "job_doesnotexist"), headers=other)
        assert missing.status_code == 404 and missing.json() == response.json()
    assert job_id not in {j["id"] for j in client.get("/jobs", headers=other).json()["data"]}
    assert client.get(f"/jobs/{job_id}", headers=owner).status_code == 200


def test_health_routes_and_docs_are_open(client, auth) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ok", "checks": {}}  # the reasons only for token holders
    assert client.get("/readyz", headers=auth).json()["checks"] == {"database": "ok", "migrations": "ok", "broker": "ok"}
    assert client.get("/docs").status_code == 200
    assert "/jobs/{job_id}/metrics" in client.get("/openapi.json").json()["paths"]


def test_token_create_cli_stores_only_a_hash(settings, sessions) -> None:
    result = CliRunner().invoke(cli, ["token", "create", "--name", "ci"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert token.startswith(settings.token_prefix) and len(token) > 40
    with sessions() as session:
        rows = session.scalars(select(ApiToken).where(ApiToken.name == "ci")).all()
        assert [r.token_hash for r in rows] == [hash_token(token)]
        assert all(token not in (r.token_hash, r.public_id, r.name) for r in rows)


def test_a_created_token_authenticates(client, settings) -> None:
    result = CliRunner().invoke(cli, ["token", "create"], env=settings_env(settings))
    headers = {"Authorization": f"Bearer {result.output.strip()}"}
    assert client.get("/jobs", headers=headers).json() == {"data": [], "has_more": False}


def test_revoked_token_is_refused(client, sessions, auth) -> None:
    with sessions() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(auth["Authorization"][7:])))
        row.revoked_at = utcnow()
        session.commit()
    assert client.get("/jobs", headers=auth).status_code == 401
