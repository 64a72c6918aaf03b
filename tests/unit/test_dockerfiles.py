"""Both images carry every package the `flashdmd` command imports, and the worker's extras exist.

`api/cli.py` imports `flashjob` at start-up, and the dashboard reads `presets/`: an image that leaves one out
builds fine and then fails at its first command, which no other static check sees.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _copied(dockerfile: str) -> set[str]:
    text = (ROOT / "deploy" / dockerfile).read_text()
    return {m.group(1).rstrip("/") for m in re.finditer(r"^COPY (?!--from)(\S+)\s", text, re.M)}


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_every_package_and_the_presets_are_copied(dockerfile):
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = (packages | {"presets", "migrations"}) - _copied(dockerfile)
    assert not missing, f"{dockerfile} does not COPY {sorted(missing)}"


def test_the_worker_extras_are_real_optional_dependencies():
    text = (ROOT / "deploy" / "Dockerfile.worker").read_text()
    extras = re.search(r'^ARG EXTRAS="([^"]*)"', text, re.M)
    assert extras, "Dockerfile.worker declares ARG EXTRAS"
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras.group(1).split()) <= set(optional), extras.group(1)
    assert {"tensorboard", "data"} <= set(extras.group(1).split())
