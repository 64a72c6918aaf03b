"""The `flashdmd` command.

Sub-commands owned by other packages load lazily (`LazyGroup`): `flashdmd --help`, `flashdmd jobs ...` and
`flashdmd token ...` are a REST client and a database tool, and must not pay seconds of torch, diffusers and
transformers imports that only training, sampling and export need. The commands defined here import their
heavy modules inside their bodies.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from api.settings import Settings

# name -> ("module:attribute", the command's one-line help). The only place that names where a sub-command
# lives; the help is listed by `flashdmd --help` without importing the module (a unit test keeps it equal to
# the command's own docstring).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flashjob.cli:train_command",
              "Distil a teacher into a few-step generator with Flash-DMD (or the dmd2 baseline)."),
    "eval": ("flashjob.cli:eval_command", "Score checkpoints with a `kind: eval` spec (digits evaluator, or "
             "CLIP/PickScore/HPSv2/ImageReward/FID)."),
    "generate": ("inference.cli:generate_command", "Generate images with a trained few-step generator."),
    "export": ("inference.cli:export_command", "Export a checkpoint as a diffusers folder, UNet safetensors, or "
               "LoRA (diffusers or kohya keys)."),
    "demo": ("flashjob.demo:demo_command", "Distil the shipped digits teacher into a 4-step student through the "
             "embedded service, and score it."),
    "toy": ("trainer.toy.cli:toy_group", "The digits toy: a small SDXL-format teacher and a digits evaluator, "
            "trained by our code."),
    "data": ("trainer.prepare_cli:data_group", "Training data: encode a source once into a latent + "
             "text-embedding cache (`data.cache`)."),
    "plan": ("trainer.plan_cli:plan_command", "Print the per-GPU memory budget of SPEC by component, counted on "
             "the meta device (no weights loaded),\n    and the expected wall time, GPU-hours and cost of its "
             "max_steps."),
    "jobs": ("api.client_cli:jobs_group", "Jobs from the terminal: submit, list, show, follow, logs, cancel, "
             "resume."),
}
# Commands added to a lazily loaded group when it loads: the rollout reward samples checkpoints through
# inference/, so trainer's toy group cannot import it itself.
LAZY_SUBCOMMANDS: dict[str, dict[str, str]] = {
    "toy": {"train-rollout-reward": "flashjob.rollout_reward:main"},
}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    """A group whose `lazy` commands are imported by `get_command`, when (and only when) one is invoked."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        command = _load(self.lazy[cmd_name][0])
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[cmd_name][0]} is not a click command")
        for name, target in LAZY_SUBCOMMANDS.get(cmd_name, {}).items():
            if isinstance(command, click.Group) and name not in command.commands:
                command.add_command(_load(target), name)
        self.add_command(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with the help of commands not yet loaded taken from the table (no import)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is not None:
                if not command.hidden:
                    rows.append((name, command.get_short_help_str(limit)))
            else:
                # click's own shortening, on a stand-in that carries only the help text.
                rows.append((name, click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashdmd")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Flash-DMD: distil, tune, evaluate, export and serve few-step diffusion generators."""
    from trainer.cli import configure_process

    configure_process()  # every command below: the roots and cache root, read once from the environment
    # `flashdmd generate --job ID` (inference/cli.py, RUN_DIR_META) finds a job's run directory through this:
    # the storage root is the service's setting, and inference/ does not import api/.
    ctx.meta["flashdmd.run_dir"] = _run_dir


def _run_dir(job: str) -> Path:
    return _settings().run_dir(job)


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
# Loopback unless configured: a service started by hand for a try-out must not be reachable from the network.
# Containers say `--host 0.0.0.0` explicitly (deploy/, docker-compose.yml), or set FLASHDMD_HOST.
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
