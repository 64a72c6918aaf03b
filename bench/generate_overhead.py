"""Where the fixed cost of one POST /generate request goes ("honest latency").

Starts a real server per configuration (as bench/serve_load.py does), warms the checkpoint, then sends
`--requests` single-image requests one after another (no concurrency: the fixed cost, not throughput). The
server's own histograms split each request: time queued before its sampler call (the batcher's wait),
the sampler call (model), and the rest of the HTTP path (auth, validation, thread hops, PNG, transport).

    python bench/generate_overhead.py --checkpoint RUN/checkpoints/step-N --threads 1
    python bench/generate_overhead.py --digits --threads 1      # a digits-teacher checkpoint built here

Configurations (each a server started with these environment variables; --config NAME:K=V,K=V adds one):
  default     the shipped settings
  no-wait     FLASHDMD_GENERATE_MAX_WAIT_MS=0: a lone request is sent to the sampler at once
  unpadded    FLASHDMD_GENERATE_FIXED_BATCH=false: one row, not max_batch rows, per sampler call
Writes bench/results/generate_overhead.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import command_line, wait_healthy, write_json
from serve_load import REPO, free_port, percentile, prepare, server_env

CONFIGS = {"default": {}, "no-wait": {"FLASHDMD_GENERATE_MAX_WAIT_MS": "0"},
           "unpadded": {"FLASHDMD_GENERATE_FIXED_BATCH": "false"}}
SERIES = ("flashdmd_generate_queue_seconds", "flashdmd_generate_model_seconds")


def histogram_sums(http: httpx.Client) -> dict[str, tuple[float, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}
    return {k: (values.get(f"{k}_sum", 0.0), values.get(f"{k}_count", 0.0)) for k in SERIES}


def digits_checkpoint(tmp: Path) -> str:
    """A checkpoint of the digits teacher's UNet (perturbed): the demo student's architecture and size."""
    code = ("import sys; from pathlib import Path; from inference.testing import make_checkpoint; "
            "from trainer.toy import TEACHER_DIR; "
            "print(make_checkpoint(Path(sys.argv[1]) / 'models' / 'digits-run', 'sdxl', TEACHER_DIR, resolution=32))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp)], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return done.stdout.strip().splitlines()[-1]


def run_config(args: argparse.Namespace, env: dict[str, str], token: str, checkpoint: str, log: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
            wait_healthy(http, proc, log)
            body = {"checkpoint": checkpoint, "prompt": "a handwritten digit seven", "seed": 0}
            for _ in range(3):  # load, then the first calls at this shape (allocator, oneDNN primitives)
                res = http.post("/generate", json=body)
                if res.status_code != 200:
                    raise RuntimeError(f"warm-up failed: {res.status_code} {res.text}")
            before = histogram_sums(http)
            latencies = []
            for i in range(args.requests):
                t0 = time.perf_counter()
                res = http.post("/generate", json={**body, "prompt": f"a handwritten digit {i % 10}", "seed": i})
                latencies.append(time.perf_counter() - t0)
                res.raise_for_status()
            after = histogram_sums(http)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    mean = {k: (after[k][0] - before[k][0]) / max(after[k][1] - before[k][1], 1) for k in SERIES}
    p50 = percentile(latencies, 50)
    queue, model = mean["flashdmd_generate_queue_seconds"], mean["flashdmd_generate_model_seconds"]
    return {"requests": len(latencies), "p50_ms": 1000 * p50, "mean_ms": 1000 * statistics.fmean(latencies),
            "queue_ms": 1000 * queue, "model_ms": 1000 * model,
            "rest_of_http_ms": 1000 * (statistics.fmean(latencies) - queue - model)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--digits", action="store_true", help="build a digits-teacher checkpoint (the demo's model)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--threads", type=int, help="the server's OMP/MKL threads")
    ap.add_argument("--only", nargs="*", help="run only these configurations")
    ap.add_argument("--config", action="append", default=[], help="NAME:K=V,K=V (extra server environment)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate_overhead.json")
    args = ap.parse_args()
    configs = dict(CONFIGS)
    for spec in args.config:
        name, _, pairs = spec.partition(":")
        configs[name] = dict(p.split("=", 1) for p in pairs.split(",") if p)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ckpt = digits_checkpoint(tmp) if args.digits else args.checkpoint
        db, token, checkpoint, root = prepare(tmp, ckpt)
        shared = argparse.Namespace(clients=1, max_wait_ms=10.0, threads=args.threads, device=None, dtype=None)
        for cname, extra in configs.items():
            env = {**server_env(shared, tmp, db, root, 8, None), **extra}
            results[cname] = {"env": extra, **run_config(args, env, token, checkpoint, tmp / f"{cname}.log")}
            print(f"{cname}: p50 {results[cname]['p50_ms']:.1f} ms", flush=True)
    write_json(args.out, {"command": command_line(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "checkpoint": "digits teacher UNet" if args.digits else args.checkpoint, "results": results})
    print(f"{'config':<12}{'p50 ms':>9}{'mean ms':>9}{'queue ms':>10}{'model ms':>10}{'rest ms':>9}")
    for cname, r in results.items():
        print(f"{cname:<12}{r['p50_ms']:>9.1f}{r['mean_ms']:>9.1f}{r['queue_ms']:>10.1f}{r['model_ms']:>10.1f}"
              f"{r['rest_of_http_ms']:>9.1f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
