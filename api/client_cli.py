"""`flashdmd jobs ...`: submit, list, show, follow, logs, cancel and resume jobs from a terminal.

Talks to FLASHDMD_URL with FLASHDMD_TOKEN (or --url/--token); without them, to the embedded `flashdmd up`
serving from --data-dir (FLASHDMD_DATA_DIR, default ~/.flashdmd): the URL and token it wrote in that data dir's
service.json, else http://127.0.0.1:8000 and the token saved there.

Exit codes: 0 done (for `follow`: the job succeeded), 1 the job failed, 2 the server refused the request
or could not be reached (its message and the fields it names are printed, no traceback), 3 the job was
cancelled, 130 interrupted (Ctrl-C; the job goes on).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial, update_wrapper
from pathlib import Path
from typing import Any

import click

from api.client import TERMINAL, ClientError, JobsClient, resolve_target

EXIT_OK, EXIT_FAILED, EXIT_REQUEST, EXIT_CANCELLED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT
OUTCOME = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
STATUSES = ("queued", "starting", "running", "cancelling", "cancelled", "succeeded", "failed", "recovering")
SHOWN_LOSSES = 4  # loss keys in the progress bar; more would not fit a terminal line
RETRIES = 30  # polls in a row that may fail (server restarting, database busy) before `follow` gives up
METRICS_WINDOW = 1000  # steps back from the current one where the latest point of a key is looked for


class JobsGroup(click.Group):
    """Turns a ClientError from any command into its message and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as err:
            click.echo(err.render(), err=True)
            ctx.exit(EXIT_REQUEST)
        except KeyboardInterrupt:  # Ctrl-C while following: not the job's outcome, so not 1 (click's default)
            click.echo("\ninterrupted; the job itself goes on (`flashdmd jobs cancel ID` stops it)", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group("jobs", cls=JobsGroup)
@click.option("--url", envvar="FLASHDMD_URL", default=None, show_envvar=True,
              help="the API (default: the `flashdmd up` serving from --data-dir, else http://127.0.0.1:8000)")
@click.option("--token", envvar="FLASHDMD_TOKEN", default=None, show_envvar=True,
              help="bearer token (default: the one `flashdmd up` saved in its data dir)")
@click.option("--data-dir", envvar="FLASHDMD_DATA_DIR", default=None, show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="find the `flashdmd up` serving from this data dir: its URL and token (default ~/.flashdmd)")
@click.pass_context
def jobs_group(ctx: click.Context, url: str | None, token: str | None, data_dir: Path | None) -> None:
    """Jobs from the terminal: submit, list, show, follow, logs, cancel, resume."""
    ctx.obj = Connection(ctx, url, token, data_dir)


class Connection:
    """The client, made on first use: `flashdmd jobs submit --help` must work without a token."""

    def __init__(self, ctx: click.Context, url: str | None, token: str | None, data_dir: Path | None = None) -> None:
        self.ctx, self.url, self.token, self.data_dir = ctx, url, token, data_dir
        self._client: JobsClient | None = None

    def client(self) -> JobsClient:
        if self._client is None:
            target = resolve_target(self.url, self.token, data_dir=self.data_dir)
            self._client = self.ctx.with_resource(JobsClient(target))
        return self._client


def pass_client(f: Callable[..., Any]) -> Callable[..., Any]:
    """Pass the JobsClient as the command's first argument."""

    @click.pass_obj
    def wrapper(conn: Connection, *args: Any, **kwargs: Any) -> Any:
        return f(conn.client(), *args, **kwargs)

    return update_wrapper(wrapper, f)


def _load_spec(path: Path, overrides: tuple[str, ...]) -> dict[str, Any]:
    """The spec file as `flashdmd train` reads it (YAML or JSON, `--set key=value`); the server validates it."""
    import yaml

    from trainer.jobspec import SpecError, apply_overrides
    from trainer.jobspec.limits import load_yaml

    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise click.ClickException(f"{path}: not a readable YAML/JSON file: {err}") from None
    if not isinstance(raw, dict):
        raise click.ClickException(f"{path}: the spec must be a mapping, got {type(raw).__name__}")
    try:
        return apply_overrides(raw, list(overrides))
    except SpecError as err:
        raise click.ClickException(str(err)) from None


def _row(job: dict[str, Any]) -> tuple[str, ...]:
    p = job["progress"]
    return (job["id"], job["name"] or "-", job["kind"], job["status"], f"{p['step']}/{p['total_steps']}",
            job["created_at"][:19].replace("T", " "))


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


@jobs_group.command("submit")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="a label for the job")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec field")
@click.option("--idempotency-key", default=None, help="repeat-safe submit: the same key returns the same job")
@click.option("--follow", "then_follow", is_flag=True, help="then follow it (exit code: the job's outcome)")
@pass_client
@click.pass_context
def submit_command(ctx: click.Context, client: JobsClient, spec: Path, name: str | None,
                   overrides: tuple[str, ...], idempotency_key: str | None, then_follow: bool) -> None:
    """Submit a job spec (YAML or JSON); prints the new job's id."""
    job = client.submit(_load_spec(spec, overrides), name=name, idempotency_key=idempotency_key)
    click.echo(job["id"])  # alone on stdout, so that `ID=$(flashdmd jobs submit spec.yaml)` works
    click.echo(f"{job['kind']} job {job['id']} {job['status']}", err=True)
    if then_follow:
        ctx.exit(follow(client, job["id"]))


@jobs_group.command("list")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="only jobs in this state")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--all", "every", is_flag=True, help="every page, not only the newest --limit jobs")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@pass_client
def list_command(client: JobsClient, status: str | None, limit: int, every: bool, as_json: bool) -> None:
    """List your jobs, newest first."""
    jobs = list(client.jobs(status=status, limit=limit, every=every))
    if as_json:
        for job in jobs:
            click.echo(json.dumps(job))
        return
    click.echo(_table([_row(j) for j in jobs], ("ID", "NAME", "KIND", "STATUS", "STEP", "CREATED")))


@jobs_group.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="the full job, spec included, as JSON")
@pass_client
def show_command(client: JobsClient, job_id: str, as_json: bool) -> None:
    """One job: status, progress, attempt and error."""
    job = client.job(job_id)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    p = job["progress"]
    lines = [("id", job["id"]), ("name", job["name"] or "-"), ("kind", job["kind"]), ("status", job["status"]),
             ("progress", f"{p['step']}/{p['total_steps']}"), ("attempt", str(job["attempt"])),
             ("created", job["created_at"]), ("finished", job["finished_at"] or "-")]
    if p.get("rate"):
        lines.append(("rate", f"{p['rate']:.3g} steps/s, eta {p['eta'] or 0:.0f} s"))
    if job["error"]:
        lines.append(("error", f"{job['error']['code']}: {job['error']['message']}"))
    for label, value in lines:
        click.echo(f"{label + ':':<10}{value}")


class LatestLosses:
    """The newest value of each `loss/*` metric, read with `since_step` so each poll fetches only new points."""

    def __init__(self, client: JobsClient, job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.keys: list[str] = []
        self.last_step: dict[str, int] = {}
        self.values: dict[str, float] = {}

    def poll(self, step: int) -> dict[str, float]:
        if not self.keys:  # the keys appear with the first metrics the trainer logs
            keys = self.client.metrics(self.job_id, limit=1)["keys"]  # only the key list is wanted here
            self.keys = [k for k in keys if k.startswith("loss/")][:SHOWN_LOSSES]
        for key in self.keys:
            since = max(self.last_step.get(key, -1), step - METRICS_WINDOW)
            points = self.client.metrics(self.job_id, key=key, since_step=since)["points"]
            valued = [pt for pt in points if pt["value"] is not None]
            if points:
                self.last_step[key] = points[-1]["step"]
            if valued:
                self.values[key] = valued[-1]["value"]
        return self.values


def _patiently(call: Callable[[], dict[str, Any]], interval: float, sleep: Callable[[float], None]) -> dict[str, Any]:
    """Retry through a restart or a busy database (no answer, 5xx) for a while; a 4xx is final."""
    for attempt in range(RETRIES):
        try:
            return call()
        except ClientError as err:
            if (err.status is not None and err.status < 500) or attempt == RETRIES - 1:
                raise
            sleep(interval)
    raise AssertionError("unreachable")


def follow(client: JobsClient, job_id: str, *, interval: float = 1.0,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """A live progress bar with the latest losses until the job ends; returns the exit code of its outcome."""
    from tqdm.auto import tqdm

    losses = LatestLosses(client, job_id)
    job = client.job(job_id)
    bar = tqdm(total=job["progress"]["total_steps"], unit="step", file=sys.stderr, dynamic_ncols=True,
               desc=job_id[:12])
    try:
        while True:
            progress = job["progress"]
            bar.total = progress["total_steps"]
            bar.n = min(progress["step"], progress["total_steps"])
            latest = _patiently(partial(losses.poll, progress["step"]), interval, sleep)
            shown = {k.removeprefix("loss/"): f"{v:.4g}" for k, v in latest.items()}
            bar.set_postfix({"status": job["status"], **shown}, refresh=False)
            bar.refresh()
            if job["status"] in TERMINAL:
                break
            sleep(interval)
            job = _patiently(lambda: client.job(job_id), interval, sleep)
    finally:
        bar.close()
    if job["error"]:
        click.echo(f"job {job_id} {job['status']}: {job['error']['code']}: {job['error']['message']}", err=True)
    else:
        click.echo(f"job {job_id} {job['status']} at step {job['progress']['step']}", err=True)
    return OUTCOME[job["status"]]


@jobs_group.command("follow")
@click.argument("job_id")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True, help="seconds between polls")
@pass_client
@click.pass_context
def follow_command(ctx: click.Context, client: JobsClient, job_id: str, interval: float) -> None:
    """Watch a job's progress and losses until it ends; exit 0 succeeded, 1 failed, 3 cancelled."""
    ctx.exit(follow(client, job_id, interval=interval))


@jobs_group.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", "keep_following", is_flag=True, help="keep printing until the job ends")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="start at this byte")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True)
@pass_client
def logs_command(client: JobsClient, job_id: str, keep_following: bool, offset: int, interval: float) -> None:
    """Print the job's trainer log (trainer.log), from --offset; with --follow, as it grows."""
    out = sys.stdout.buffer  # the log's own bytes (a range may end inside a UTF-8 sequence)
    ended = False
    while True:
        chunk, offset = client.logs(job_id, offset=offset)
        if chunk:
            out.write(chunk)
            out.flush()
            continue
        if not keep_following or ended:
            return
        # The status is read after an empty read, so one more pass gets the lines written before the end.
        ended = client.job(job_id)["status"] in TERMINAL
        if not ended:
            time.sleep(interval)


@jobs_group.command("cancel")
@click.argument("job_id")
@pass_client
def cancel_command(client: JobsClient, job_id: str) -> None:
    """Cancel: a waiting job stops at once, a running one at its next step (after a checkpoint)."""
    job = client.cancel(job_id)
    click.echo(f"job {job['id']} {job['status']}")


@jobs_group.command("resume")
@click.argument("job_id")
@pass_client
def resume_command(client: JobsClient, job_id: str) -> None:
    """Queue a cancelled or failed job again; it continues from its latest checkpoint."""
    job = client.resume(job_id)
    click.echo(f"job {job['id']} {job['status']} (attempt {job['attempt']} so far)")
