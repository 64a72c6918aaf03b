"""Load benchmark of POST /generate: N concurrent clients, dynamic batching on vs off.

Each mode starts a real server (`uvicorn --factory api.main:create_app`, a subprocess on 127.0.0.1 with an
embedded SQLite database and a filesystem broker), warms the checkpoint with one request, then runs
`--clients` threads, each posting one image at a time (its own prompt and seed) until `--requests` are
answered or `--seconds` pass. Reported per mode: images/s, request latency p50/p99, and the server's own
mean batch size (from /metrics). "unbatched" is FLASHDMD_GENERATE_MAX_BATCH=1; "batched" pads every sampler
call to max_batch rows where the server does by default (the CPU: bytes independent of the batch);
"batched-unpadded" turns that off (FLASHDMD_GENERATE_FIXED_BATCH=false), what a GPU server does by default.

CPU (the tiny SDXL model, built on the fly):
    python bench/serve_load.py --clients 8 --requests 160 --seconds 40 --threads 1

GPU (SDXL architecture, 1024², bf16; any checkpoint folder in the trainer's layout; not yet run):
    python bench/serve_load.py --checkpoint /models/run/checkpoints/step-00010000 --clients 16 \\
        --requests 320 --seconds 240 --width 1024 --height 1024 --device cuda --dtype bf16

Writes bench/results/serve_load.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from _common import command_line, wait_healthy, write_json  # noqa: E402  (no torch: the bench process stays light)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prepare(tmp: Path, checkpoint: str | None) -> tuple[str, str, str, Path]:
    """(database url, token, checkpoint path, allowed model root): a migrated SQLite file and one token."""
    from api import migrate
    from api.auth import create_token
    from api.db import make_engine, make_sessionmaker

    url = f"sqlite:///{tmp / 'flashdmd.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        _, token = create_token(session=session, name="serve-load", prefix="fdmd_")
    engine.dispose()
    if checkpoint is None:
        # Built in a child process: torch loaded here would keep its thread pool in this process, which then
        # competed with the first server for the CPUs (the first mode measured several times slower).
        code = ("import sys; from pathlib import Path; from inference.testing import make_checkpoint; "
                "from trainer.tiny import tiny_pipeline_dir; t = Path(sys.argv[1]); "
                "print(make_checkpoint(t / 'models' / 'tiny-run', 'sdxl', tiny_pipeline_dir('sdxl', cache_root=t / "
                "'tiny')))")
        done = subprocess.run([sys.executable, "-c", code, str(tmp)], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        checkpoint = done.stdout.strip().splitlines()[-1]
    real = Path(os.path.realpath(checkpoint))
    return url, token, str(real), real.parent


def server_env(args: argparse.Namespace, tmp: Path, db: str, root: Path, max_batch: int,
               fixed: bool | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDMD_")}
    env.update({
        "PYTHONPATH": str(REPO), "FLASHDMD_DATABASE_URL": db, "FLASHDMD_DATA_DIR": str(tmp / "home"),
        "FLASHDMD_STORAGE_ROOT": str(tmp / "storage"), "FLASHDMD_BROKER_URL": f"filesystem://{tmp / 'broker'}",
        "FLASHDMD_ALLOWED_MODEL_ROOTS": str(root), "FLASHDMD_REAPER_INTERVAL_SECONDS": "0",
        # One token sends every request here: its share and rate must not be what limits the run.
        "FLASHDMD_GENERATE_OWNER_SHARE": "1.0", "FLASHDMD_GENERATE_RATE_BURST": "100000",
        "FLASHDMD_GENERATE_RATE_PER_MINUTE": "0", "FLASHDMD_GENERATE_MAX_QUEUE": str(args.clients * 2),
        "FLASHDMD_GENERATE_MAX_BATCH": str(max_batch), "FLASHDMD_GENERATE_MAX_WAIT_MS": str(args.max_wait_ms),
    })
    if args.threads:
        # On a shared CPU, OpenMP threads that spin-wait for a descheduled peer stall for seconds at a time;
        # one intra-op thread per server makes the comparison about batching, not about the neighbours.
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if fixed is not None:
        env["FLASHDMD_GENERATE_FIXED_BATCH"] = str(fixed).lower()
    if args.device:
        env["FLASHDMD_GENERATE_DEVICE"] = args.device
    if args.dtype:
        env["FLASHDMD_GENERATE_DTYPE"] = args.dtype
    return env


def mean_batch(http: httpx.Client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text)
              for s in f.samples if s.name.startswith("flashdmd_generate_batch_images_")}
    count = values.get("flashdmd_generate_batch_images_count", 0.0)
    return values.get("flashdmd_generate_batch_images_sum", 0.0) / count if count else 0.0


def run_mode(args: argparse.Namespace, env: dict[str, str], token: str, checkpoint: str,
             log: Path) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
            wait_healthy(http, proc, log)
            body = {"checkpoint": checkpoint, "prompt": "warm-up", "seed": 0, "steps": args.steps,
                    "width": args.width, "height": args.height}
            warm = http.post("/generate", json=body)  # loads the pipeline: not part of the measurement
            if warm.status_code != 200:
                raise RuntimeError(f"warm-up failed: {warm.status_code} {warm.text}")
            batch_before = mean_batch(http)  # the warm-up's call of 1

            latencies: list[float] = []
            codes: dict[int, int] = {}
            lock = threading.Lock()
            issued = [0]
            stop_at = time.monotonic() + args.seconds

            def client(c: int) -> None:
                with httpx.Client(base_url=base, headers=headers, timeout=600) as mine:
                    while time.monotonic() < stop_at:
                        with lock:
                            if issued[0] >= args.requests:
                                return
                            issued[0] += 1
                            n = issued[0]
                        t0 = time.perf_counter()
                        res = mine.post("/generate", json={**body, "prompt": f"client {c} image {n}", "seed": n})
                        took = time.perf_counter() - t0
                        with lock:
                            codes[res.status_code] = codes.get(res.status_code, 0) + 1
                            if res.status_code == 200:
                                latencies.append(took)

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            batch = mean_batch(http)
            calls_note = {"mean_batch_incl_warmup": batch, "mean_batch_before": batch_before}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = len(latencies)
    return {"images": ok, "seconds": wall, "images_per_s": ok / wall if wall else 0.0,
            "p50_ms": 1000 * percentile(latencies, 50) if ok else None,
            "p99_ms": 1000 * percentile(latencies, 99) if ok else None,
            "mean_ms": 1000 * statistics.fmean(latencies) if ok else None, "codes": codes, **calls_note}


def table(results: dict[str, Any]) -> str:
    rows = [("mode", "max_batch", "images", "images/s", "p50 ms", "p99 ms", "mean batch", "codes")]
    for mode, r in results.items():
        rows.append((mode, str(r["max_batch"]), str(r["images"]), f"{r['images_per_s']:.2f}",
                     f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-",
                     f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-",
                     f"{r['mean_batch_incl_warmup']:.2f}", json.dumps(r["codes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: a tiny SDXL one, built here)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160, help="per mode, at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="per mode, at most")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--device", help="default: the server's (cuda if available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, help="the server's OMP/MKL threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db, token, checkpoint, root = prepare(tmp, args.checkpoint)
        modes = {"unbatched": (1, None), "batched": (args.max_batch, None),
                 "batched-unpadded": (args.max_batch, False)}
        for mode, (max_batch, fixed) in modes.items():
            env = server_env(args, tmp, db, root, max_batch, fixed)
            results[mode] = {"max_batch": max_batch, "fixed_batch": fixed,
                             **run_mode(args, env, token, checkpoint, Path(tmp) / f"{mode}.log")}
            print(f"{mode}: {results[mode]['images_per_s']:.2f} images/s", flush=True)
    speedup = results["batched"]["images_per_s"] / max(results["unbatched"]["images_per_s"], 1e-9)
    report = {
        "command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoint": args.checkpoint or "tiny SDXL (inference.testing.make_checkpoint)",
        "results": results,
        "batched_over_unbatched_images_per_s": speedup,
    }
    write_json(args.out, report)
    print(table(results))
    print(f"batched / unbatched images/s: {speedup:.2f}x  -> {args.out}")


if __name__ == "__main__":
    main()
