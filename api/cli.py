"""The `flashdmd` command. Sub-commands import their heavy modules lazily."""

from __future__ import annotations

from pathlib import Path

import click

from flashjob.cli import eval_command, train_command
from inference.cli import export_command, generate_command
from trainer.toy.cli import toy_group
from trainer.toy.demo import demo_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashdmd")
def cli() -> None:
    """Flash-DMD: distil, tune, evaluate, export and serve few-step diffusion generators."""


cli.add_command(train_command)
cli.add_command(eval_command)
cli.add_command(generate_command)
cli.add_command(export_command)
cli.add_command(demo_command)
cli.add_command(toy_group)


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
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes")
def serve_command(host: str, port: int, workers: int) -> None:
    """Run the API (production: FLASHDMD_DATABASE_URL and FLASHDMD_BROKER_URL point at Postgres and Redis)."""
    import uvicorn

    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=workers, proxy_headers=True)


@cli.command("worker")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: gpu@<host>)")
def worker_command(loglevel: str, hostname: str | None) -> None:
    """Run a GPU worker: one job at a time, acknowledged late, a fresh process per job."""
    import socket

    from api.tasks import app, settings

    app.worker_main([
        "worker", "--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1",
        "--max-tasks-per-child", "1", "--queues", settings.queue, "--loglevel", loglevel,
        "--hostname", hostname or f"gpu@{socket.gethostname()}", "--without-gossip", "--without-mingle",
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


@token_group.command("create")
@click.option("--name", default="default", show_default=True, help="a label to tell tokens apart")
def token_create(name: str) -> None:
    """Create a token and print it (only its hash is stored: keep it)."""
    from sqlalchemy.exc import SQLAlchemyError

    from api.auth import create_token
    from api.db import make_engine, make_sessionmaker
    from api.settings import Settings

    settings = Settings()
    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_sessionmaker(engine)() as session:
            _, token = create_token(session=session, name=name, prefix=settings.token_prefix)
    except SQLAlchemyError as err:
        raise click.ClickException(
            f"cannot store the token ({type(err).__name__}); run `flashdmd db upgrade` first?"
        ) from err
    finally:
        engine.dispose()
    click.echo(token)


def main() -> None:
    cli(prog_name="flashdmd")
