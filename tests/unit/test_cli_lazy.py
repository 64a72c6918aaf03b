"""`flashdmd` loads sub-commands lazily: the client and token commands import no torch, diffusers or transformers,
and `--help` lists every command (with its real help) without importing the packages that define them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest

from api.cli import LAZY_COMMANDS, LAZY_SUBCOMMANDS, cli

HEAVY = ("torch", "diffusers", "transformers")
CHILD = """
import json, sys
from api.cli import cli
try:
    cli(sys.argv[1:], prog_name="flashdmd")
except SystemExit:
    pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "list", "--help"], ["jobs", "--help"],
                                  ["token", "list", "--help"]])
def test_client_commands_import_no_ml_stack(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", CHILD.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    *shown, last = done.stdout.strip().splitlines()
    assert json.loads(last) == [], f"flashdmd {' '.join(argv)} imported {last}"
    assert "Usage: flashdmd" in "\n".join(shown)
    if argv == ["--help"]:
        listed = {line.split()[0] for line in shown if line.startswith("  ") and line.split()[0].isidentifier()}
        assert set(LAZY_COMMANDS) <= listed | {"-h"}, listed


def test_the_static_table_matches_each_commands_own_help() -> None:
    ctx = click.Context(cli)
    for name, (_, help_text) in LAZY_COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None, name
        assert (command.help or "").split("\n\n")[0].strip() == help_text.strip(), name
    toy = cli.get_command(ctx, "toy")
    assert isinstance(toy, click.Group)
    assert set(LAZY_SUBCOMMANDS["toy"]) <= set(toy.list_commands(ctx))
