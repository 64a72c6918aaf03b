"""/healthz (liveness, the container healthcheck), /readyz (database, schema, broker; on the inference role:
warm-up instead of the broker) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import migrate
from api.db import UNAVAILABLE
from api.deps import CurrentToken, lookup_token
from api.edge import bearer_token
from api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is up. Touches nothing else, so a database outage does not restart the API."""
    return HealthPublic(status="ok")


def _has_valid_token(request: Request) -> bool:
    token = bearer_token(request.scope)
    if token is None:
        return False
    state = request.app.state
    try:
        return lookup_token(reads=state.read_sessionmaker, writes=state.sessionmaker, token=token) is not None
    except UNAVAILABLE:
        return False


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(request: Request) -> Response:
    """Ready to serve: the database answers and is migrated to head, and the broker answers (the inference role
    has no broker; it is ready once its warm-up has loaded and run the configured checkpoints, api/warmup.py).

    Probes carry no token, so anyone may ask; only a caller with a valid token sees which check
    failed and why (the reasons name hosts and drivers).
    """
    checks: dict[str, str] = {}
    try:
        with request.app.state.read_sessionmaker() as session:
            session.execute(text("SELECT 1"))
            current, head = migrate.current_revision(session.connection()), migrate.head_revision()
        checks["database"] = "ok"
        checks["migrations"] = "ok" if current == head else f"at {current}, head is {head}: run `flashdmd db upgrade`"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the reason is shown to token holders only
        checks["database"] = f"{type(exc).__name__}: {exc}"[:300]
    state = request.app.state
    if state.dispatcher is not None:
        checks["broker"] = state.dispatcher.ping() or "ok"
    if getattr(state, "warmup", None) is not None:
        checks["warmup"] = state.warmup.status()
    ok = all(v == "ok" for v in checks.values())
    shown = checks if _has_valid_token(request) else {}
    body = HealthPublic(status="ok" if ok else "unavailable", checks=shown)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": str(request.app.state.settings.db_retry_after_seconds)})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, _token: CurrentToken) -> Response:
    """Prometheus exposition: jobs by status, queue depth, request latency. Needs a token like any data route."""
    return Response(generate_latest(request.app.state.observability.registry), media_type=CONTENT_TYPE_LATEST)
