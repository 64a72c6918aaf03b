"""One Settings: /generate's settings live in api.settings.Settings, one warm-up grammar with its deprecated
predecessors, and docs/settings.md documents every field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.settings import DEPRECATED, Settings, WarmShape

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_generate_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLASHDMD_GENERATE_MAX_BATCH", "3")
    monkeypatch.setenv("FLASHDMD_GENERATE_DEVICE", "cpu")
    settings = Settings(data_dir=tmp_path)
    assert (settings.generate_max_batch, settings.generate_device, settings.generate_max_queue) == (3, "cpu", 16)
    monkeypatch.setenv("FLASHDMD_GENERATE_MAX_BATCH", "0")
    with pytest.raises(ValidationError, match="generate_max_batch"):
        Settings(data_dir=tmp_path)


def test_one_warm_grammar_and_the_deprecated_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLASHDMD_GENERATE_WARM_SHAPES", "512x512x1, 1024x768")
    assert Settings(data_dir=tmp_path).warm_shapes() == [WarmShape(512, 512, 1), WarmShape(1024, 768, None)]
    monkeypatch.setenv("FLASHDMD_GENERATE_WARM_SHAPES", "512")
    with pytest.raises(ValidationError, match="FLASHDMD_GENERATE_WARM_SHAPES.*WIDTHxHEIGHT"):
        Settings(data_dir=tmp_path)
    monkeypatch.delenv("FLASHDMD_GENERATE_WARM_SHAPES")
    monkeypatch.setenv("FLASHDMD_GENERATE_WARM_BATCHES", "2,4")
    with pytest.warns(DeprecationWarning, match="FLASHDMD_GENERATE_WARM_BATCHES .*FLASHDMD_GENERATE_WARM_SHAPES"):
        settings = Settings(data_dir=tmp_path)
    # No size given: the batches apply at the checkpoint's own size.
    assert settings.warm_shapes() == [WarmShape(None, None, 2), WarmShape(None, None, 4)]
    monkeypatch.setenv("FLASHDMD_GENERATE_WARM_BATCHES", "two")
    with pytest.raises(ValidationError, match="FLASHDMD_GENERATE_WARM_BATCHES"):
        Settings(data_dir=tmp_path)


def test_docs_list_every_setting_and_mark_the_deprecated_ones() -> None:
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| ~*`(FLASHDMD_[A-Z0-9_]+)`", text, flags=re.M))
    fields = {"FLASHDMD_" + name.upper() for name in Settings.model_fields}
    assert fields <= documented, sorted(fields - documented)
    for old, new in DEPRECATED.items():
        row = next(line for line in text.splitlines() if f"`{old}`" in line and line.startswith("|"))
        assert "deprecated" in row and new in row, row
