"""The `flashdmd` command. Sub-commands import their heavy modules lazily."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from api.client_cli import jobs_group
from flashjob.cli import eval_command, train_command
from flashjob.demo import demo_command
from flashjob.rollout_reward import main as rollout_reward_command
from inference.cli import export_command, generate_command
from trainer.plan_cli import plan_command
from trainer.prepare_cli import data_group
from trainer.toy.cli import toy_group

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from api.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashdmd")
def cli() -> None:
    """Flash-DMD: distil, tune, evaluate, export and serve few-step diffusion generators."""


cli.add_command(train_command)
cli.add_command(eval_command)
cli.add_command(generate_command)
cli.add_command(export_command)
cli.add_command(demo_command)
# flashjob/rollout_reward.py samples checkpoints through inference/, so trainer's toy group cannot import it itself.
toy_group.add_command(rollout_reward_command, "train-rollout-reward")
cli.add_command(toy_group)
cli.add_command(data_group)  # trainer/prepare_cli.py: `flashdmd data prepare`
cli.add_command(plan_command)  # trainer/plan_cli.py: the per-GPU memory budget of a spec
cli.add_command(jobs_group)  # api/client_cli.py: `flashdmd jobs ...`, an HTTP client of a running service


@cli.command("up")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="database, broker, runs and token (default: FLASHDMD_DATA_DIR or ~/.flashdmd)")
def up_command(host: str, port: int, data_dir: Path | None) -> None:
    """Run the API and a worker on this machine: SQLite, a filesystem broker, no servers to install."""
    from api.embedded import run_embedded

    run_embedded(host=host, port=port, data_dir=data_dir)


@cli.command("serve")
# Loopback unless configured: a service started by hand for a try-out must not be reachable from the network
# (issue 11). Containers say `--host 0.0.0.0` explicitly (deploy/, docker-compose.yml), or set FLASHDMD_HOST.
@click.option("--host", default="127.0.0.1", show_default=True, envvar="FLASHDMD_HOST",
              help="interface to bind; 0.0.0.0 for every interface (behind a proxy or in a container)")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes")
@click.option("--role", type=click.Choice(["all", "control", "inference"]), default="all", show_default=True,
              metavar="ROLE",
              envvar="FLASHDMD_ROLE", help="all: the whole API; control: forward POST /generate to "
              "FLASHDMD_INFERENCE_URL; inference: only /generate and health, on a GPU node (deploy/README.md)")
def serve_command(host: str, port: int, workers: int, role: str) -> None:
    """Run the API (production: FLASHDMD_DATABASE_URL and FLASHDMD_BROKER_URL point at Postgres and Redis)."""
    import os

    import uvicorn

    os.environ["FLASHDMD_ROLE"] = role  # the app factory (in each uvicorn worker) reads it from Settings
    settings = _settings()  # fail here with a clear message (e.g. a short FLASHDMD_TOKEN), not in each worker

    from api.httpserver import uvicorn_options

    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=workers, proxy_headers=True,
                **uvicorn_options(settings))


@cli.command("worker")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: <pool>@<host>, e.g. gpu8@node1)")
def worker_command(loglevel: str, hostname: str | None) -> None:
    """Run a worker: one job at a time, acknowledged late, a fresh process per job, on its pool's queue."""
    import socket

    from api.tasks import app, capacity, queue

    app.worker_main([
        "worker", "--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1",
        "--max-tasks-per-child", "1", "--queues", queue, "--loglevel", loglevel,
        "--hostname", hostname or f"{capacity.pool}@{socket.gethostname()}", "--without-gossip", "--without-mingle",
    ])


@cli.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations)."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from api import migrate
    from api.settings import Settings

    migrate.upgrade(Settings().sqlalchemy_url, revision)


@db_group.command("downgrade")
@click.option("--revision", default="-1", show_default=True)
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (`base` drops every table)."""
    from api import migrate
    from api.settings import Settings

    migrate.downgrade(Settings().sqlalchemy_url, revision)


@cli.group("token")
def token_group() -> None:
    """API bearer tokens."""


def _settings() -> Settings:
    from pydantic import ValidationError

    from api.settings import Settings

    try:
        return Settings()
    except ValidationError as err:
        raise click.ClickException(f"invalid settings: {err}") from None


@contextlib.contextmanager
def _token_session() -> Iterator[Session]:
    """A session on the configured database; a missing schema is explained instead of a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from api.db import make_engine, make_sessionmaker

    engine = make_engine(_settings().sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    except SQLAlchemyError as err:
        raise click.ClickException(
            f"cannot use the tokens table ({type(err).__name__}); run `flashdmd db upgrade` first?"
        ) from err
    finally:
        engine.dispose()


@token_group.command("create")
@click.option("--name", default="default", show_default=True, help="a label to tell tokens apart")
def token_create(name: str) -> None:
    """Create a token and print it (only its hash is stored: keep it)."""
    from api.auth import create_token

    prefix = _settings().token_prefix
    with _token_session() as session:
        _, token = create_token(session=session, name=name, prefix=prefix)
    click.echo(token)


@token_group.command("list")
def token_list() -> None:
    """List tokens by id (never the secret): name, created, last used, revoked."""
    from api.auth import list_tokens

    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M") if value else "-"

    with _token_session() as session:
        rows = [(t.public_id, t.name, when(t.created_at), when(t.last_used_at),
                 when(t.revoked_at) if t.revoked_at else "active") for t in list_tokens(session=session)]
    header = ("ID", "NAME", "CREATED", "LAST USED", "REVOKED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@token_group.command("revoke")
@click.argument("token_id")
@click.option("--cancel-jobs", is_flag=True, help="also cancel the owner's unfinished jobs (waiting ones at once; "
              "running ones checkpoint and stop, as with POST /jobs/{id}/cancel)")
def token_revoke(token_id: str, cancel_jobs: bool) -> None:
    """Revoke a token by its id (from `token list`); its next request gets 401."""
    from api import crud
    from api.auth import TokenError, revoke_token

    with _token_session() as session:
        try:
            row = revoke_token(session=session, ref=token_id)
        except TokenError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"revoked {row.public_id} ({row.name}) at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
        if cancel_jobs:
            cancelled = crud.cancel_owner_jobs(session=session, owner_id=row.id)
            click.echo(f"cancel requested for {len(cancelled)} job(s){': ' if cancelled else ''}{', '.join(cancelled)}")


def main() -> None:
    cli(prog_name="flashdmd")
