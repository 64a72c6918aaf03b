"""inference/ is a library under the API: it imports nothing from api/, reads no environment, and its serving
options (serving.py) and pipeline (pipeline.py) do not import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

INFERENCE = Path(__file__).resolve().parents[2] / "inference"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _reads_environment(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            lines.append(node.lineno)
    return lines


def test_no_upward_import_and_no_environment() -> None:
    modules = sorted(INFERENCE.glob("*.py"))
    assert modules
    for path in modules:
        upward = sorted(m for m in _imports(path) if m == "api" or m.startswith("api."))
        assert not upward, f"{path.name} imports {upward}"
        assert not _reads_environment(path), f"{path.name} touches os.environ at lines {_reads_environment(path)}"


def test_serving_and_pipeline_are_not_a_circle() -> None:
    assert "inference.serving" in _imports(INFERENCE / "pipeline.py")
    assert "inference.pipeline" not in _imports(INFERENCE / "serving.py")
