"""Settings from the environment, and the location rules for model and data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.embedded import bootstrap_token
from api.settings import Settings
from api.spec_paths import resolve_location

pytestmark = pytest.mark.service


def test_defaults_derive_from_the_data_dir(monkeypatch, tmp_path) -> None:
    for key in list(os.environ):
        if key.startswith("FLASHDMD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLASHDMD_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path}/flashdmd.db"
    assert settings.broker_url == "filesystem://" and settings.broker_folder == tmp_path / "broker"
    assert settings.run_dir("job_x") == tmp_path / "storage" / "jobs" / "job_x"
    assert settings.allowed_model_roots == [] and settings.queue == "train"


def test_env_names_and_list_formats(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FLASHDMD_DATABASE_URL", "postgresql://u:p@db:5432/flashdmd")
    monkeypatch.setenv("FLASHDMD_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FLASHDMD_STORAGE_ROOT", str(tmp_path / "s"))
    monkeypatch.setenv("FLASHDMD_ALLOWED_MODEL_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    monkeypatch.setenv("FLASHDMD_ALLOWED_DATA_ROOTS", f'["{tmp_path}/c"]')
    monkeypatch.setenv("FLASHDMD_HEARTBEAT_SECONDS", "2")
    monkeypatch.setenv("FLASHDMD_STALE_AFTER_SECONDS", "9")
    monkeypatch.setenv("FLASHDMD_CANCEL_GRACE_SECONDS", "7")
    settings = Settings()
    assert settings.sqlalchemy_url == "postgresql+psycopg://u:p@db:5432/flashdmd"
    assert settings.storage_root == tmp_path / "s" and not settings.is_embedded_broker
    assert settings.allowed_model_roots == [tmp_path / "a", tmp_path / "b"]
    assert settings.allowed_data_roots == [tmp_path / "c"]
    assert (settings.heartbeat_seconds, settings.stale_after_seconds, settings.cancel_grace_seconds) == (2, 9, 7)
    monkeypatch.setenv("FLASHDMD_STALE_AFTER_SECONDS", "3")
    with pytest.raises(ValueError, match="at least twice"):
        Settings()


@pytest.mark.parametrize(
    ("value", "ok"),
    [("org/name", True), ("org/name.v1-2_x", True), ("tiny:sdxl", True), ("name", False), ("a/b/c", False),
     ("../a", False), (".x/y", False), ("a/..", False), ("a../b", False), ("/abs/outside", False)],
)
def test_hub_ids(value: str, ok: bool) -> None:
    assert (resolve_location(value, roots=[], hub_ok=True, tiny_ok=True) is not None) == ok


def test_tiny_and_hub_ids_only_where_allowed(tmp_path: Path) -> None:
    assert resolve_location("tiny:sdxl", roots=[tmp_path], hub_ok=True, tiny_ok=False) is None
    assert resolve_location("org/name", roots=[tmp_path], hub_ok=False, tiny_ok=False) is None
    assert resolve_location(str(tmp_path / "m"), roots=[tmp_path], hub_ok=False, tiny_ok=False) == str(tmp_path / "m")
    # A root is a folder, not a string prefix: /roots/models2 is not under /roots/models.
    assert resolve_location(f"{tmp_path}2/m", roots=[tmp_path], hub_ok=False, tiny_ok=False) is None


def test_up_token_bootstrap(monkeypatch, tmp_path) -> None:
    from api import migrate

    settings = Settings(data_dir=tmp_path)
    migrate.upgrade(settings.sqlalchemy_url)
    token, source = bootstrap_token(settings)
    token_file = tmp_path / "token"
    assert source == str(token_file) and token_file.read_text().strip() == token
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert bootstrap_token(settings) == (token, source)  # kept across restarts: the jobs stay visible
    preset = Settings(data_dir=tmp_path, token="my-own-secret-token-of-32-characters")
    assert bootstrap_token(preset) == ("my-own-secret-token-of-32-characters", "FLASHDMD_TOKEN")
    assert bootstrap_token(preset) == ("my-own-secret-token-of-32-characters", "FLASHDMD_TOKEN")
