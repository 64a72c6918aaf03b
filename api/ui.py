"""The dashboard (`/ui`): a static single-page app shipped in the package (api/static/), same origin as the API.

The page is a shell of ES modules with a vendored uPlot; it has no data of its own and calls the REST API
with the token the user typed (kept in sessionStorage, sent as a bearer header). The routes here are public
(api/edge.py `is_public`). The CSP allows only this origin's scripts, styles and fetches, and images from
blob: URLs, which is how the page shows samples and generated images it fetched with the bearer header.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from api.edge import UI_PREFIX
from api.schemas import TINY_SPEC_EXAMPLE

STATIC_DIR = Path(__file__).with_name("static")
# The repository's presets/ (a source checkout or the images, which copy it); absent from a bare wheel.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
# uPlot positions its cursor and legend with inline style attributes, hence 'unsafe-inline' for styles only.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class _SecuredStatic:
    """StaticFiles with the dashboard's security headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      *[(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]]
            await send(message)

        await self.app(scope, receive, with_headers)


def preset_groups(directory: Path = PRESETS_DIR) -> list[tuple[str, str]]:
    """(group, file stem) in presets/README.md's order: its `## Group (...)` headings and their "- `x.yaml`" items.
    The README is the one place presets are grouped; the form shows the same groups."""
    readme = directory / "README.md"
    out: list[tuple[str, str]] = []
    group = "Other"
    for line in readme.read_text().splitlines() if readme.is_file() else []:
        if line.startswith("## "):
            group = line[3:].split("(")[0].strip()
        elif (m := re.match(r"- `([\w.-]+)\.yaml`", line)):
            out.append((group, m.group(1)))
    return out


@functools.cache
def presets(directory: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    """"Group / name" -> spec for the New job page, in presets/README.md's order (the first is the form's
    default: the digits recipe, real images on a CPU in minutes), the API's tiny smoke test after it.

    The editor shows them as JSON (comments are lost); it also takes YAML, which POST /specs/parse translates.
    """
    specs: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        spec = yaml.safe_load(path.read_text())
        if isinstance(spec, dict):
            specs[path.stem] = spec
    tiny = ("CPU / tiny (smoke test, seconds)", TINY_SPEC_EXAMPLE)
    ordered = [(f"{group} / {stem}", specs.pop(stem)) for group, stem in preset_groups(directory) if stem in specs]
    after = next((i + 1 for i, (name, _) in enumerate(ordered) if name.endswith("/ digits-4step")), 0)
    ordered.insert(after, tiny)  # right after the digits recipe: the other CPU choice
    found = dict(ordered)
    found.update({f"Other / {stem}": spec for stem, spec in specs.items()})
    return found


def install_ui(app: FastAPI) -> None:
    index = STATIC_DIR / "index.html"

    @app.get(UI_PREFIX, include_in_schema=False)
    def ui_index() -> FileResponse:
        # no-cache: a new release's shell must not be paired with the old one's cached modules.
        return FileResponse(index, media_type="text/html; charset=utf-8",
                            headers={**HEADERS, "Cache-Control": "no-cache"})

    @app.get(f"{UI_PREFIX}/presets.json", include_in_schema=False)
    def ui_presets() -> dict[str, dict[str, Any]]:
        return presets()

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        # Public (api/edge.py): browsers ask for it without a token. The page links favicon.svg itself.
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml",
                            headers={**HEADERS, "Cache-Control": "max-age=86400"})

    app.mount(f"{UI_PREFIX}/static", _SecuredStatic(StaticFiles(directory=STATIC_DIR)), name="ui-static")
