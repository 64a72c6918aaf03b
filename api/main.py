"""The FastAPI application: `uvicorn --factory api.main:create_app` (or `flashdmd serve` / `flashdmd up`).

`settings.role` picks what one process serves (deploy/README.md "Inference tier"): `all` is the whole
API, with /generate in-process unless `inference_url` is set; `control` is the same with /generate always
forwarded (api/inference_proxy.py); `inference` serves only /generate, /healthz, /readyz (after warm-up,
api/warmup.py) and /metrics, against the same database for tokens and job ownership, with no broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.celery_app import Dispatcher
from api.db import make_bookkeeping_sessionmaker, make_engine, make_read_sessionmaker, make_sessionmaker
from api.deps import lookup_token
from api.edge import EdgeMiddleware
from api.errors import install_error_handlers
from api.inference_proxy import InferenceProxy
from api.inference_proxy import router as proxy_router
from api.models import ApiToken
from api.observability import LatencyMiddleware, Observability
from api.reaper import Reaper
from api.routes import generate, health, jobs, live, specs
from api.settings import Settings
from api.ui import install_ui
from api.warmup import Warmup
from trainer.cli import configure_process


def _version() -> str:
    try:
        return version("flashdmd")
    except PackageNotFoundError:
        return "0+unknown"


def _pool_args(settings: Settings) -> dict[str, float]:
    # SQLite's default pool has no checkout wait; Postgres' QueuePool waits pool_timeout for a connection.
    return {} if settings.sqlalchemy_url.startswith("sqlite") else {"pool_timeout": settings.db_pool_timeout_seconds}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_process()  # an app served without `flashdmd` (uvicorn api.main:app): the cache root for tiny: teachers
    engine = make_engine(settings.sqlalchemy_url, **settings.db_timeouts("api"), **_pool_args(settings))
    sessions = make_sessionmaker(engine)
    reads = make_read_sessionmaker(engine)
    bookkeeping = make_bookkeeping_sessionmaker(engine)
    inference = settings.role == "inference"
    dispatcher = None if inference else Dispatcher(settings)  # the inference role needs no broker
    proxy = InferenceProxy(settings) if settings.inference_url and not inference else None
    warmup = Warmup(settings) if inference else None
    # A scrape only reads: no write lock on SQLite.
    observability = Observability(reads, jobs=not inference)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = warming = None
        if dispatcher is not None and settings.reaper_interval_seconds > 0:
            reaper = Reaper(sessions=sessions, settings=settings, send=dispatcher.send)
            reaper.start()
        if warmup is not None:
            warming = asyncio.ensure_future(warmup.run(generate.runtime(app), reads))
        try:
            yield
        finally:
            if warming is not None:
                warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming
            if reaper is not None:
                reaper.stop()
            if proxy is not None:
                await proxy.aclose()
            if dispatcher is not None:
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
    app.state.inference_proxy = proxy
    app.state.warmup = warmup
    app.state.observability = observability
    install_error_handlers(app)

    async def authenticate(token: str) -> ApiToken | None:
        return await run_in_threadpool(lambda: lookup_token(reads=reads, writes=bookkeeping, token=token))

    # Added first, so it runs inside the latency middleware: its 401s and 413s are observed too.
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, authenticate=authenticate,
                       retry_after=settings.db_retry_after_seconds, public_base_url=settings.public_base_url)
    app.add_middleware(LatencyMiddleware, observability=observability)
    app.include_router(health.router)
    if not inference:  # the inference role serves /generate and health only
        app.include_router(jobs.router)
        app.include_router(live.router)
        app.include_router(specs.router)
        install_ui(app)
    app.include_router(generate.router if proxy is None else proxy_router)
    return app
