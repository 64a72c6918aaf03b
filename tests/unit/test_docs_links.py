"""The README and docs/ are read on GitHub and in a clone: every link must resolve inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "presets" / "README.md"]
# [text](target) and ![alt](target); targets with a scheme or a bare anchor are not files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A tracker reference means nothing to a reader of a clone ("issue 12", "#12", "DESIGN §5").
TRACKER = re.compile(r"\bissues? \d+\b|(?<![\w&/])#\d+\b|DESIGN §")


def links(path: Path) -> list[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda d: str(d.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (doc.parent / target.split("#", 1)[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)} links to what is not in the repository: {bad}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda d: str(d.relative_to(ROOT)))
def test_no_tracker_numbers_or_paths_outside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text
    assert not TRACKER.findall(text), f"{doc.relative_to(ROOT)} cites tracker numbers: {TRACKER.findall(text)}"


def test_the_readme_stays_short() -> None:
    # A first-time reader gets the what, the two commands, a tour and the GPU story; the reference is in docs/.
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("[a](missing.md) ![b](img.png) [c](https://example.com) ```\n[d](in-code.md)\n```")
    assert links(doc) == ["missing.md", "img.png", "https://example.com"]
