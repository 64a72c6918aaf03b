"""Alembic upgrade -> downgrade -> upgrade on Postgres and SQLite, and the models match the migrations."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from servicekit import fresh_pg_database
from sqlalchemy import inspect

from api import migrate
from api.cli import cli
from api.db import make_engine
from api.models import Base

pytestmark = pytest.mark.service

TABLES = {"api_tokens", "jobs", "events", "metrics", "checkpoints", "samples", "workers"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    assert _diff(url) == []  # the ORM models and the migrations describe the same schema
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    engine = make_engine(url)
    with engine.connect() as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()
    engine.dispose()


def test_postgres_round_trip() -> None:
    with fresh_pg_database() as url:
        _round_trip(url)


def test_sqlite_round_trip(tmp_path) -> None:
    _round_trip(f"sqlite:///{tmp_path / 'flashdmd.db'}")


def test_db_commands(tmp_path) -> None:
    env = {"FLASHDMD_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"], env=env).exit_code == 0
    url = f"sqlite:///{tmp_path / 'flashdmd.db'}"
    assert _tables(url) == TABLES
    assert runner.invoke(cli, ["db", "downgrade", "--revision", "base"], env=env).exit_code == 0
    assert _tables(url) == set()
    # Without tables, `token create` explains what to do instead of printing a traceback.
    result = runner.invoke(cli, ["token", "create"], env=env)
    assert result.exit_code == 1 and "flashdmd db upgrade" in result.output
