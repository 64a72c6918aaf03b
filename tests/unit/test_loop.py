"""The loop's explicit inputs: timeouts and test hooks come from the process entry, not the environment."""

from __future__ import annotations

import ast
from pathlib import Path

from trainer.cli import hooks_from_env
from trainer.hooks import DEFAULT_STARTUP_TIMEOUT_S, DEFAULT_TIMEOUT_S, Hooks, parse_hooks

TRAINER = Path(__file__).resolve().parents[2] / "trainer"


def test_parse_hooks_reads_every_variable_and_defaults_to_a_production_run():
    assert parse_hooks({}) == Hooks()
    assert Hooks().dist_timeout_s == DEFAULT_TIMEOUT_S and Hooks().startup_timeout_s == DEFAULT_STARTUP_TIMEOUT_S
    hooks = parse_hooks({"FLASHDMD_DIST_TIMEOUT_S": "10", "FLASHDMD_STARTUP_TIMEOUT_S": "5",
                         "FLASHDMD_TEST_STOP_AT": "1:2", "FLASHDMD_TEST_HANG_AT": "0:3",
                         "FLASHDMD_TEST_SLOW_START": "1:120", "FLASHDMD_TEST_NONFINITE": "0:1, 1:4",
                         "FLASHDMD_TEST_SLOW_CHECKPOINT_S": "40"})
    assert hooks == Hooks(dist_timeout_s=10.0, startup_timeout_s=5.0, stop_at=(1, 2), hang_at=(0, 3),
                          slow_start=(1, 120.0), nonfinite_at=frozenset({(0, 1), (1, 4)}), slow_checkpoint_s=40.0)


def test_the_process_entry_reads_the_environment(monkeypatch):
    monkeypatch.setenv("FLASHDMD_TEST_STOP_AT", "0:7")
    monkeypatch.setenv("FLASHDMD_DIST_TIMEOUT_S", "12")
    hooks = hooks_from_env()
    assert hooks.stop_at == (0, 7) and hooks.dist_timeout_s == 12.0


def _reads_environ(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
    return lines


def test_library_modules_do_not_read_the_environment():
    # trainer/cli.py and entry.py are the process entry (roots, cache root, timeouts, hooks: read once, passed
    # down); trace and plan_cli are the memory tool's own entry (`python -m trainer.trace`) and its launcher.
    allowed = {"cli.py", "entry.py", "trace.py", "plan_cli.py"}
    readers = {p.name: lines for p in TRAINER.rglob("*.py") if p.name not in allowed and (lines := _reads_environ(p))}
    assert readers == {}
    inference = {p.name: lines for p in (TRAINER.parent / "inference").rglob("*.py") if (lines := _reads_environ(p))}
    assert inference == {}
