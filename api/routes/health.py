"""/healthz (liveness, the container healthcheck), /readyz (database, schema, broker) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import migrate
from api.deps import CurrentToken, DispatcherDep, SessionDep
from api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is up. Touches nothing else, so a database outage does not restart the API."""
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def readyz(session: SessionDep, dispatcher: DispatcherDep) -> Response:
    """Ready to serve: the database answers and is migrated to head, and the broker answers."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        current, head = migrate.current_revision(session.connection()), migrate.head_revision()
        checks["database"] = "ok"
        checks["migrations"] = "ok" if current == head else f"at {current}, head is {head}: run `flashdmd db upgrade`"
    except Exception as exc:
        checks["database"] = f"{type(exc).__name__}: {exc}"[:300]
    checks["broker"] = dispatcher.ping() or "ok"
    ok = all(v == "ok" for v in checks.values())
    body = HealthPublic(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, _token: CurrentToken) -> Response:
    """Prometheus exposition: jobs by status, queue depth, request latency. Needs a token like any data route."""
    return Response(generate_latest(request.app.state.observability.registry), media_type=CONTENT_TYPE_LATEST)
