"""Prometheus metrics: request latency, jobs by status and queue depth (read from the job table at scrape),
and the /generate batcher's queue wait, batch size, model time and pipeline cache hits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.models import JOB_STATUSES, WAITING, Job


class JobsCollector(Collector):
    """Counts come from the database at scrape time, so every API replica reports the same numbers."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            counts = {s: n for s, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}
        jobs = GaugeMetricFamily("flashdmd_jobs", "Jobs by status", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "flashdmd_queue_depth", "Jobs waiting for a worker (queued or recovering)",
            value=sum(counts.get(s, 0) for s in WAITING),
        )


class CacheCollector(Collector):
    """Pipeline cache hits and misses, read from the cache's own counters at scrape (the cache is built on the
    first /generate, in a worker thread; before that both are 0)."""

    def __init__(self) -> None:
        self.stats: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (hits, loads); the runtime sets it

    def collect(self) -> Iterator[Metric]:
        hits, loads = self.stats()
        family = CounterMetricFamily("flashdmd_generate_pipeline_cache", "Loaded-pipeline cache lookups",
                                     labels=["result"])
        family.add_metric(["hit"], hits)
        family.add_metric(["miss"], loads)
        yield family


class GenerateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        seconds = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
        self.queue_seconds = Histogram(
            "flashdmd_generate_queue_seconds", "Time a /generate request waited before its sampler call started",
            registry=registry, buckets=seconds)
        self.batch_images = Histogram(
            "flashdmd_generate_batch_images", "Images (requests' rows, not padding) per sampler call",
            registry=registry, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.model_seconds = Histogram(
            "flashdmd_generate_model_seconds", "Time of one sampler call: load or cache hit, sampling, decoding",
            registry=registry, buckets=seconds)
        # What the inference tier's HPA scales on (deploy/k8s/inference-hpa.yaml): requests inside POST /generate
        # on this process right now (validating, queued, sampling or encoding; on a control plane, forwarded).
        self.inflight = Gauge("flashdmd_generate_inflight", "POST /generate requests in progress on this process",
                              registry=registry)
        self.cache = CacheCollector()
        registry.register(self.cache)


class Observability:
    def __init__(self, sessions: sessionmaker[Session], *, jobs: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "flashdmd_http_request_duration_seconds", "HTTP request latency",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        if jobs:  # not on the inference role: N GPU pods would each report the same table
            self.registry.register(JobsCollector(sessions))
        self.generate = GenerateMetrics(self.registry)


class LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead); labels by route template to keep cardinality bounded."""

    def __init__(self, app: ASGIApp, observability: Observability) -> None:
        self.app = app
        self.observability = observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        inflight = self.observability.generate.inflight if scope["path"] == "/generate" else None
        if inflight is not None:
            inflight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if inflight is not None:
                inflight.dec()
            route = scope.get("route")
            self.observability.latency.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status)
            ).observe(time.perf_counter() - start)
