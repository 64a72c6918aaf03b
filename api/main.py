"""The FastAPI application: `uvicorn --factory api.main:create_app` (or `flashdmd serve` / `flashdmd up`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.celery_app import Dispatcher
from api.db import make_engine, make_read_sessionmaker, make_sessionmaker
from api.deps import lookup_token
from api.edge import EdgeMiddleware
from api.errors import install_error_handlers
from api.models import ApiToken
from api.observability import LatencyMiddleware, Observability
from api.reaper import Reaper
from api.routes import generate, health, jobs, live
from api.settings import Settings
from api.ui import install_ui


def _version() -> str:
    try:
        return version("flashdmd")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.sqlalchemy_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    sessions = make_sessionmaker(engine)
    reads = make_read_sessionmaker(engine)
    dispatcher = Dispatcher(settings)
    observability = Observability(reads)  # a scrape only reads: no write lock on SQLite

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = None
        if settings.reaper_interval_seconds > 0:
            reaper = Reaper(sessions=sessions, settings=settings, send=dispatcher.send)
            reaper.start()
        try:
            yield
        finally:
            if reaper is not None:
                reaper.stop()
            dispatcher.close()
            engine.dispose()

    app = FastAPI(
        title="flashdmd",
        version=_version(),
        description="Distil a diffusion teacher into a few-step generator with Flash-DMD. "
        "Every route but /healthz and /readyz needs `Authorization: Bearer <token>` (`flashdmd token create`).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessions
    app.state.read_sessionmaker = reads
    app.state.dispatcher = dispatcher
    app.state.observability = observability
    install_error_handlers(app)

    async def authenticate(token: str) -> ApiToken | None:
        return await run_in_threadpool(lambda: lookup_token(reads=reads, writes=sessions, token=token))

    # Added first, so it runs inside the latency middleware: its 401s and 413s are observed too.
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, authenticate=authenticate,
                       retry_after=settings.db_retry_after_seconds)
    app.add_middleware(LatencyMiddleware, observability=observability)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(live.router)
    app.include_router(generate.router)
    install_ui(app)
    return app
