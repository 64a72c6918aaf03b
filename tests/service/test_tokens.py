"""Token ids, list and revoke, old tokens after the migration, FLASHDMD_TOKEN length,
and the embedded data dir's permissions."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from appkit import DIALECTS, App, dialect_app
from click.testing import CliRunner
from pydantic import ValidationError
from servicekit import TINY_SPEC, fresh_pg_database, settings_env
from sqlalchemy import select, text

from api import migrate
from api.auth import TokenError, ensure_token, find_token, hash_token
from api.cli import cli
from api.db import make_engine, make_sessionmaker
from api.embedded import secure_data_dir
from api.models import ApiToken
from api.settings import Settings

pytestmark = pytest.mark.service
TOKEN_FORMAT = re.compile(r"^fdmd_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")


@pytest.fixture(scope="module", params=DIALECTS)
def app(request, database_url, roots, tmp_path_factory) -> App:
    with dialect_app(request.param, database_url=database_url, roots=roots,
                     tmp=tmp_path_factory.mktemp("tokens")) as built:
        yield built


def _cli(app: App, *args: str):
    return CliRunner().invoke(cli, list(args), env=settings_env(app.settings))


def test_create_list_revoke(app: App) -> None:
    created = _cli(app, "token", "create", "--name", "laptop")
    assert created.exit_code == 0, created.output
    token = created.output.strip()
    match = TOKEN_FORMAT.match(token)
    assert match, token
    headers = {"Authorization": f"Bearer {token}"}
    assert app.client.get("/jobs", headers=headers).status_code == 200

    listed = _cli(app, "token", "list")
    assert listed.exit_code == 0, listed.output
    line = next(row for row in listed.output.splitlines() if row.startswith(match["id"]))
    assert "laptop" in line and "active" in line
    assert match["secret"] not in listed.output and match["secret"][:4] not in line
    with app.sessions() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.public_id == match["id"]))
        # The row keeps the public id and the hash of the whole token: no characters of the secret.
        assert row is not None and row.token_hash == hash_token(token)
        assert all(match["secret"][:4] not in str(v) for v in (row.public_id, row.name))

    revoked = _cli(app, "token", "revoke", match["id"])
    assert revoked.exit_code == 0 and match["id"] in revoked.output, revoked.output
    # The very next request is refused: the revocation is read on every request.
    response = app.client.get("/jobs", headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert re.search(rf"^{match['id']}\s.*laptop.*\d{{4}}-\d\d-\d\d \d\d:\d\d$",
                     _cli(app, "token", "list").output, re.M)
    assert _cli(app, "token", "revoke", match["id"]).exit_code == 0  # twice is fine
    unknown = _cli(app, "token", "revoke", "000000000000")
    assert unknown.exit_code == 1 and "no token with id" in unknown.output


def test_revoked_token_mid_session(app: App) -> None:
    """A token that worked a moment ago gets 401 on its next request, on every route family."""
    headers = app.token("mid-session")
    job_id = app.client.post("/jobs", json={"spec": TINY_SPEC}, headers=headers).json()["id"]
    assert app.client.get("/jobs", headers=headers).status_code == 200
    with app.sessions() as session:
        row = find_token(session=session, token=headers["Authorization"][7:])
        assert row is not None
        public_id = row.public_id
    assert _cli(app, "token", "revoke", public_id).exit_code == 0
    for method, path in (("GET", "/jobs"), ("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel")):
        assert app.client.request(method, path, headers=headers).status_code == 401


def _old_token_round_trip(url: str) -> None:
    """A token made before migration 0002 (its first characters in `prefix`) still works after it."""
    migrate.upgrade(url, "0001")
    old = "fdmd_" + "Q" * 43
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO api_tokens (name, token_hash, prefix, created_at) "
                              "VALUES ('old', :h, :p, CURRENT_TIMESTAMP)"), {"h": hash_token(old), "p": old[:9]})
        migrate.upgrade(url)
        with make_sessionmaker(engine)() as session:
            row = find_token(session=session, token=old)
            assert row is not None and row.name == "old"
            assert re.fullmatch(r"[0-9a-f]{12}", row.public_id) and "QQQQ" not in row.public_id
        migrate.downgrade(url, "0001")  # and back: the column is `prefix` again, the token still found by hash
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM api_tokens WHERE token_hash = :h"),
                                {"h": hash_token(old)}).scalar() == 1
    finally:
        engine.dispose()


def test_old_tokens_survive_the_migration_postgres() -> None:
    with fresh_pg_database() as url:
        _old_token_round_trip(url)


def test_old_tokens_survive_the_migration_sqlite(tmp_path: Path) -> None:
    _old_token_round_trip(f"sqlite:///{tmp_path / 'flashdmd.db'}")


def test_flashdmd_token_needs_32_characters(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(data_dir=tmp_path, token="short-secret")
    assert Settings(data_dir=tmp_path, token="x" * 32).token == "x" * 32
    env = {"FLASHDMD_DATA_DIR": str(tmp_path), "FLASHDMD_TOKEN": "hunter2"}
    for command in (["serve"], ["up"], ["token", "list"]):
        result = CliRunner().invoke(cli, command, env=env)
        assert result.exit_code == 1, (command, result.output)
        assert "FLASHDMD_TOKEN must have at least 32 characters" in result.output
        assert "Traceback" not in result.output


def test_a_revoked_flashdmd_token_is_not_recreated(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    migrate.upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    token = "y" * 40
    try:
        with make_sessionmaker(engine)() as session:
            row = ensure_token(session=session, token=token, name="FLASHDMD_TOKEN")
            assert ensure_token(session=session, token=token, name="FLASHDMD_TOKEN").id == row.id
        result = CliRunner().invoke(cli, ["token", "revoke", row.public_id], env={"FLASHDMD_DATA_DIR": str(tmp_path)})
        assert result.exit_code == 0, result.output
        with make_sessionmaker(engine)() as session, pytest.raises(TokenError, match="was revoked"):
            ensure_token(session=session, token=token, name="FLASHDMD_TOKEN")
    finally:
        engine.dispose()


def test_embedded_data_dir_and_database_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "flashdmd"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    (data_dir / "flashdmd.db").touch(mode=0o644)
    (data_dir / "flashdmd.db").chmod(0o644)  # as an older version (or a umask of 022) left them
    settings = Settings(data_dir=data_dir)
    secure_data_dir(settings)
    migrate.upgrade(settings.sqlalchemy_url)
    engine = make_engine(settings.sqlalchemy_url)
    with engine.begin() as conn:  # WAL mode: -wal and -shm appear, with the database file's mode
        conn.execute(text("SELECT count(*) FROM api_tokens"))
        for name in ("flashdmd.db", "flashdmd.db-wal", "flashdmd.db-shm"):
            if (data_dir / name).exists():
                assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
    engine.dispose()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    # A fresh data dir is created private as well.
    fresh = Settings(data_dir=tmp_path / "new" / "dir")
    secure_data_dir(fresh)
    assert stat.S_IMODE(fresh.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh.data_dir / "flashdmd.db").stat().st_mode) == 0o600
