"""Benchmark of the control plane against a real Postgres (and Redis as the broker).

Measures, over real HTTP (uvicorn in this process, an httpx client with keep-alive):
  - POST /jobs latency, p50 and p99 (validation, insert, commit, send to Redis);
  - metrics ingest rate through the worker's sink (trainer JSONL -> batched upserts), points/s;
  - GET /jobs/{id}/metrics latency per page with 100k points in the job.
Targets: p50 <= 20 ms, >= 20k points/s, <= 50 ms per metrics page.

    python bench/api_latency.py [--requests 500] [--points 100000] [--pages 200]

Writes bench/results/api.json and prints a table. Uses a fresh database
(flashdmd_bench_<random>, dropped afterwards) and Redis DB 14 by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
import uvicorn
from sqlalchemy import make_url

from api import migrate
from api.auth import create_token
from api.ingest import RunIngestor
from api.main import create_app
from api.schemas import TINY_SPEC_EXAMPLE
from api.settings import Settings
from trainer.sink import JsonlSink

PG_ADMIN_URL = os.environ.get("FLASHDMD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FLASHDMD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
SPEC = TINY_SPEC_EXAMPLE  # POSTed as is: the spec the API documents as its example
TARGETS = {"post_jobs_p50_ms": 20.0, "ingest_points_per_s": 20_000.0, "metrics_page_p50_ms": 50.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}


def timed(call, n: int) -> list[float]:  # noqa: ANN001
    out = []
    for i in range(n):
        start = time.perf_counter()
        response = call(i)
        out.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return out


class Server:
    def __init__(self, app: Any, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_metrics(run_dir: Path, points: int, keys: int) -> int:
    """A run's metrics.jsonl as the trainer's own sink writes it: `keys` scalars per step."""
    sink = JsonlSink(run_dir)
    steps = points // keys
    for step in range(1, steps + 1):
        sink.log_metrics(step, {f"loss/k{k}": random.random() for k in range(keys)})
    sink.close()
    return steps * keys


def run(args: argparse.Namespace, database_url: str, tmp: Path) -> dict[str, Any]:
    migrate.upgrade(database_url)
    settings = Settings(database_url=database_url, broker_url=REDIS_URL, data_dir=tmp, storage_root=tmp / "storage",
                        queue=f"bench-{secrets.token_hex(3)}", reaper_interval_seconds=0,
                        # One token posts hundreds of queued jobs here: a limit high enough to pass, yet checked.
                        max_active_jobs_per_owner=10**6,
                        pools=["gpu1"])  # no worker runs: a declared pool, so jobs are accepted and routed
    app = create_app(settings)
    sessions = app.state.sessionmaker
    with sessions() as session:
        _, token = create_token(session=session, name="bench", prefix="fdmd_")
    port = free_port()
    results: dict[str, Any] = {}
    with Server(app, port), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                         headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        timed(lambda i: http.post("/jobs", json={"spec": SPEC}), 20)  # warm-up: pools, caches, JIT-free paths
        results["post_jobs"] = summary(timed(lambda i: http.post("/jobs", json={"spec": SPEC}), args.requests))
        results["post_jobs_idempotent_replay"] = summary(timed(
            lambda i: http.post("/jobs", json={"spec": SPEC}, headers={"Idempotency-Key": "same"}), args.requests // 5))

        job_id = http.post("/jobs", json={"spec": SPEC}).json()["id"]
        run_dir = settings.run_dir(job_id)
        points = write_metrics(run_dir, args.points, args.keys)
        start = time.perf_counter()
        RunIngestor(sessions=sessions, job_id=job_id, run_dir=run_dir).drain()
        elapsed = time.perf_counter() - start
        results["ingest"] = {"points": points, "seconds": elapsed, "points_per_s": points / elapsed}
        start = time.perf_counter()
        RunIngestor(sessions=sessions, job_id=job_id, run_dir=run_dir).drain()  # a new attempt re-reads it all
        elapsed = time.perf_counter() - start
        results["ingest_reread"] = {"points": points, "seconds": elapsed, "points_per_s": points / elapsed}

        steps = points // args.keys
        url = f"/jobs/{job_id}/metrics"
        rng = random.Random(0)
        timed(lambda i: http.get(url, params={"key": "loss/k0"}), 10)
        results["metrics_page"] = summary(timed(lambda i: http.get(
            url, params={"key": f"loss/k{i % args.keys}", "since_step": rng.randrange(steps), "limit": 1000}),
            args.pages))
        results["metrics_page_stride"] = summary(timed(lambda i: http.get(
            url, params={"key": "loss/k1", "since_step": rng.randrange(steps), "stride": 10, "limit": 1000}),
            args.pages))
        results["get_job"] = summary(timed(lambda i: http.get(f"/jobs/{job_id}"), args.pages))
        full = http.get(url, params={"key": "loss/k0", "limit": 1000}).json()
        assert len(full["points"]) == 1000 and full["has_more"], "the metrics query returned the wrong page"
    app.state.engine.dispose()
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("measure", "p50 / rate", "p99", "target")]
    for name in ("post_jobs", "post_jobs_idempotent_replay", "get_job", "metrics_page", "metrics_page_stride"):
        r = results[name]
        target = {"post_jobs": "p50 <= 20 ms", "metrics_page": "<= 50 ms"}.get(name, "")
        rows.append((name, f"{r['p50_ms']:.2f} ms", f"{r['p99_ms']:.2f} ms", target))
    for name in ("ingest", "ingest_reread"):
        r = results[name]
        rows.append((name, f"{r['points_per_s']:,.0f} points/s", f"{r['points']:,} in {r['seconds']:.2f} s",
                     ">= 20,000 points/s" if name == "ingest" else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "api.json")
    args = parser.parse_args()

    name = f"flashdmd_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        server_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(False)
    broker = redis.Redis.from_url(REDIS_URL)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(args, url, Path(tmp))
    finally:
        broker.flushdb()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    checks = {
        "post_jobs_p50_ms": results["post_jobs"]["p50_ms"] <= TARGETS["post_jobs_p50_ms"],
        "ingest_points_per_s": results["ingest"]["points_per_s"] >= TARGETS["ingest_points_per_s"],
        "metrics_page_p50_ms": results["metrics_page"]["p50_ms"] <= TARGETS["metrics_page_p50_ms"],
    }
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0], "postgres": server_version},
        "params": vars(args) | {"out": str(args.out)},
        "targets": TARGETS,
        "met": checks,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"targets met: {checks}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; wrote {args.out}")


if __name__ == "__main__":
    main()
