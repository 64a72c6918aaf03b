"""`flashdmd demo`: the main job on the embedded default, end to end, as a user would run it.

1. start the embedded service (`flashdmd up`: SQLite, filesystem broker, a worker child process);
2. submit a Flash-DMD 4-step `distill` job on the shipped digits teacher over the REST API and show its progress;
3. call `POST /generate` on the finished job and score student and teacher with the digits evaluator;
4. write demo-out/: a grid (teacher 50-step | teacher 4-step | student 4-step, same seeds), loss and
   digits-FD curves, summary.json; print a table and leave the service URL and token on screen.

This module is an HTTP *client* of the service (httpx), plus local scoring; it imports no service code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
from tqdm.auto import tqdm

from trainer.toy import TEACHER_DIR

TERMINAL = {"succeeded", "failed", "cancelled"}
# The student recipe on the digits teacher lives in presets/digits-4step.yaml, one source for the demo, `flashdmd
# train` and `flashdmd jobs submit`. Its lambda_ema is what the pre-registered rule of bench/README.md ("The demo's
# recipe: a rule fixed before the runs") picks from the held-out study (`python bench/demo_recipe.py --pick`):
# lambda_ema 0 only if it is lower on FD vs held-out real with a paired interval clear of 0 over >= 3 seeds;
# otherwise the paper's 0.98. tests/unit/test_bench_demo_recipe.py checks that this spec follows the rule.
DEMO_PRESET = Path(__file__).resolve().parents[1] / "presets" / "digits-4step.yaml"


def load_demo_spec(path: Path = DEMO_PRESET) -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise click.ClickException(f"{path}: the demo's preset must be a mapping")
    return spec


DEMO_SPEC: dict[str, Any] = load_demo_spec()
DEFAULT_PORT = 8765


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the service binds it
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(port: int) -> int:
    """`port`, or, when something else holds it (another service, an earlier demo still serving), a free one:
    the demo talks only to the service it started, never to whatever answers on the default port."""
    if port_free(port):
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    click.echo(f"port {port} is in use (another service?); the demo's service takes port {free} instead")
    return free


class Service:
    """`flashdmd up` as a child process; stopped on exit unless the user keeps it."""

    def __init__(self, port: int, data_dir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "service.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the service
        self._log_start = self.log.tell()
        # One client at a time: serve each /generate at once and compute only its own row, the lowest latency
        # per request (the CPU's batching defaults pad every call to max_batch rows and wait 10 ms for company,
        # which pays off only with concurrent clients; bench/generate_overhead.py measured 125 -> 63 ms p50).
        # The user's own settings win.
        env = {"FLASHDMD_GENERATE_FIXED_ROWS": "1", "FLASHDMD_GENERATE_MAX_WAIT_MS": "0",
               **os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "api", "up", "--host", "127.0.0.1", "--port", str(port),
                                      "--data-dir", str(data_dir)], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def _cause(self) -> str:
        """The service's own last words (e.g. `Error: port 8765 ... is already in use`), not just the log's name."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_start)
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        errors = [ln for ln in lines if ln.lower().startswith(("error", "critical"))]
        return (errors or lines or ["(no output)"])[-1]

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Its token, once it answers /healthz. URL and token come from the service file *this* child wrote (its
        pid), so a token from another service on the same data dir is never used."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise click.ClickException(f"the service on port {self.port} exited ({self.proc.returncode}): "
                                           f"{self._cause()} (full log: {self.log_path})")
            token = self._token()
            try:
                if token and httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return token
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise click.ClickException(f"the service did not answer {self.url}/healthz within {timeout:.0f} s "
                                   f"(last log line: {self._cause()})")

    def _token(self) -> str | None:
        try:
            info = json.loads((self.data_dir / "service.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("pid") != self.proc.pid:
            return None
        if not info.get("token_file"):  # the service took FLASHDMD_TOKEN from this environment
            return os.environ.get("FLASHDMD_TOKEN")
        with contextlib.suppress(OSError):
            return Path(info["token_file"]).read_text().strip() or None
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def closing_lines(*, url: str, token: str, job_id: str, data_dir: Path, keep_serving: bool) -> list[str]:
    """What the demo leaves on screen: how to reach the service while it runs, or, when it is about to stop
    (--no-serve), only what stays true: how to serve the job again and find it."""
    if not keep_serving:
        return [f"the service stops with the demo (--no-serve); serve job {job_id} again with "
                f"`flashdmd up --data-dir {data_dir}`, then `flashdmd jobs --data-dir {data_dir} show {job_id}`"]
    return [f"service: {url}   token: {token}   dashboard: {url}/ui#/jobs/{job_id}",
            f'try: curl -s -X POST {url}/generate -H "Authorization: Bearer {token}" '
            f'-H "Content-Type: application/json" -d \'{{"job": "{job_id}", "prompt": '
            f'"a handwritten digit seven", "seed": 1}}\' -o seven.png',
            "the service keeps running; press Ctrl+C to stop it"]


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise click.ClickException(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text}")
    return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.content


def follow(client: httpx.Client, job_id: str) -> dict:
    """Show the job's progress until it ends."""
    job = _check(client.get(f"/jobs/{job_id}"))
    bar = tqdm(total=job["progress"]["total_steps"], desc=f"job {job_id} {job['status']}", unit="step")
    while job["status"] not in TERMINAL:
        time.sleep(1.0)
        job = _check(client.get(f"/jobs/{job_id}"))
        bar.n = min(job["progress"]["step"], bar.total)
        bar.set_description(f"job {job_id} {job['status']}")
        eta = job["progress"].get("eta")
        bar.set_postfix_str(f"eta {eta:.0f}s" if eta else "")
        bar.refresh()
    bar.close()
    return job


def student_images(client: httpx.Client, job_id: str, seeds: list[int]):  # noqa: ANN201
    """One /generate call per digit (its own seed); returns images [10, 3, R, R] in [-1, 1] and s/image."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer.toy.prompts import digit_prompt

    # One call first: the service loads the checkpoint into its cache; latency is measured warm.
    _check(client.post("/generate", json={"job": job_id, "prompt": digit_prompt(0), "seed": 0}))
    out, t0 = [], time.perf_counter()
    for digit, seed in enumerate(seeds):
        png = _check(client.post("/generate", json={"job": job_id, "prompt": digit_prompt(digit), "seed": seed}))
        arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out), (time.perf_counter() - t0) / len(seeds)


def metric_series(client: httpx.Client, job_id: str, key: str) -> list[tuple[int, float]]:
    page = _check(client.get(f"/jobs/{job_id}/metrics", params={"key": key, "limit": 10000}))
    points = page.get("data", page.get("points", [])) if isinstance(page, dict) else page
    return [(p["step"], p["value"]) for p in points]


def run_demo(*, out: Path, steps: int | None, quick: bool, port: int, data_dir: Path | None, keep_serving: bool,
             per_class: int) -> dict:
    from flashjob.digits_scoring import plot_curves, save_grid, score_run

    if not (TEACHER_DIR / "model_index.json").is_file():
        raise click.ClickException(f"the digits teacher is missing at {TEACHER_DIR}; run `flashdmd toy train-teacher`")
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(DEMO_SPEC))
    if quick:
        spec["train"].update(max_steps=60, checkpoint_every=20, sample_every=20)
        per_class = min(per_class, 20)
    if steps:
        every = max(steps // 6, 1)
        spec["train"].update(max_steps=steps, checkpoint_every=every, sample_every=every)
    service = Service(choose_port(port), (data_dir or out / "service").absolute())
    try:
        click.echo(f"starting the embedded service on {service.url} ...")
        token = service.wait_ready()
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            job = _check(client.post("/jobs", json={"spec": spec, "name": spec["name"]}))
            click.echo(f"submitted job {job['id']}: Flash-DMD, K=4, {spec['train']['max_steps']} steps; "
                       f"watch it at {service.url}/ui#/jobs/{job['id']} (token in {service.data_dir / 'token'})")
            job = follow(client, job["id"])
            if job["status"] != "succeeded":
                raise click.ClickException(f"job {job['id']} ended {job['status']}: {job.get('error')}")
            checkpoints = _check(client.get(f"/jobs/{job['id']}/checkpoints"))["data"]
            seeds = list(range(10))  # image i of the grid: seed i for teacher and student alike
            student, latency = student_images(client, job["id"], seeds)
            curves = {k: metric_series(client, job["id"], k)
                      for k in ("loss/dm", "loss/fake_score", "loss/disc", "loss/gen_adv")}
        _scoring_threads()
        summary = score_run(checkpoints=checkpoints, student_grid=student, seeds=seeds, per_class=per_class,
                            student_latency=latency, out=out, guidance=spec["distill"]["real_guidance"])
        summary.update(job=job["id"], service={"url": service.url, "token_file": str(service.data_dir / "token")},
                       spec=spec)
        from flashjob.latency import like_for_like  # teacher and student timed alike; HTTP overhead apart

        latest = max(checkpoints, key=lambda c: c["step"])["path"]
        # Batch 64: per-image cost on the CPU is flat from there on, and the 50-step teacher at 250 took 30 s.
        summary["latency"] = like_for_like(summary, service.url, token, job["id"], latest, batch=64)
        plot_curves(curves, summary["fd_over_steps"], out)
        save_grid(summary.pop("_grid"), out / "grid.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_table(summary)
        click.echo(f"\nwrote {out}/grid.png, {out}/curves.png, {out}/summary.json")
        for line in closing_lines(url=service.url, token=token, job_id=job["id"], data_dir=service.data_dir,
                                  keep_serving=keep_serving):
            click.echo(line)
        if keep_serving:
            with contextlib.suppress(KeyboardInterrupt):
                service.proc.wait()
        return summary
    finally:
        service.stop()


def _scoring_threads() -> None:
    """Score with the trainer's CPU thread policy (one core left free): the service still runs beside us, and
    with a thread per core OpenMP's barriers spin-wait whenever another process holds a core."""
    import torch

    from trainer.cli import cpu_threads

    threads = cpu_threads()
    if threads is not None:
        torch.set_num_threads(threads)


def _print_table(summary: dict) -> None:
    rows = summary["table"]
    click.echo("\nFD held-out: vs the 360 held-out real digits (no evaluator or GAN trained on them; the shipped "
               f"teacher did). Teacher rows and T50 at the student's CFG {summary['teacher_guidance']:g}.")
    click.echo(f"{'sampler':<22}{'FD held-out':>12}{'FD vs T50':>11}{'recall':>8}{'coverage':>9}{'accuracy':>10}"
               f"{'diversity':>11}{'s/image':>10}")
    for name, r in rows.items():
        click.echo(f"{name:<22}{r['fd_heldout']:>12.2f}{r.get('fd_teacher', float('nan')):>11.2f}{r['recall']:>8.3f}"
                   f"{r['coverage']:>9.3f}{r['accuracy']:>10.3f}{r['diversity']:>11.3f}"
                   f"{r.get('latency_s', float('nan')):>10.4f}")
    floor = summary["real_baselines"]["floor"]
    n = min(floor, key=lambda k: abs(int(k) - 10 * summary["per_class"]))
    click.echo(f"{'real digits (floor)':<22}{floor[n]['fd_heldout']:>12.2f}{'':>11}{floor[n]['recall']:>8.3f}"
               f"{floor[n]['coverage']:>9.3f}{floor[n]['accuracy']:>10.3f}{floor[n]['diversity']:>11.3f}"
               f"   (train-split digits, N = {n})")


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--steps", type=int, default=None, help="distillation steps (default 400)")
@click.option("--quick", is_flag=True, help="a short run (60 steps, smaller evaluation) to try the plumbing")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
              help="the embedded service's port; a free one is taken if it is in use")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the embedded service's data (default OUT/service)")
@click.option("--serve/--no-serve", "keep_serving", default=None,
              help="keep the service running at the end (default: when run in a terminal)")
@click.option("--per-class", type=int, default=50, show_default=True, help="evaluation samples per digit")
def demo_command(out: Path, steps: int | None, quick: bool, port: int, data_dir: Path | None,
                 keep_serving: bool | None, per_class: int) -> None:
    """Distil the shipped digits teacher into a 4-step student through the embedded service, and score it."""
    if keep_serving is None:
        keep_serving = sys.stdout.isatty() and sys.stdin.isatty()
    run_demo(out=out, steps=steps, quick=quick, port=port, data_dir=data_dir, keep_serving=keep_serving,
             per_class=per_class)
