from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment a user's shell would have, with the tiny-model cache in a temp dir."""
    env = dict(os.environ)
    env["FLASHDMD_CACHE"] = str(tmp_path_factory.mktemp("flashdmd-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env):
    def run(*args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=cli_env,
                              capture_output=True, text=True, timeout=timeout, **kw)

    return run
