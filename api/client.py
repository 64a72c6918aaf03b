"""A small HTTP client of the jobs API, for `flashdmd jobs` (api/client_cli.py).

It speaks only the REST contract (DESIGN §5) over httpx and imports nothing of the service, so it works
against any flashdmd server: the embedded `flashdmd up` by default (found through the service file it writes in
its data dir), or FLASHDMD_URL with FLASHDMD_TOKEN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# Where `flashdmd up` listens and keeps its bootstrap token (api/cli.py up_command, api/embedded.py).
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = "~/.flashdmd"
TOKEN_FILE = "token"
# What a running `flashdmd up` writes in its data dir (api/embedded.py): {"url", "token_file", "pid"}, mode 0600,
# removed when it stops. With it, `--data-dir` (or FLASHDMD_DATA_DIR) alone finds a service on any port.
SERVICE_FILE = "service.json"
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """A request the server refused, or a server we could not reach; `str()` is what the user should read."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.fields = message, status, code, fields or []

    def render(self) -> str:
        head = f"error ({self.code}, HTTP {self.status})" if self.status else "error"
        lines = [f"{head}: {self.message}"]
        lines += [f"  field: {field}" for field in self.fields]
        return "\n".join(lines)


def embedded_token(data_dir: Path) -> str | None:
    """The token `flashdmd up` saved in its data dir, if it is there."""
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:  # not there, or not ours to read: the caller says how to pass a token instead
        return None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive (and its token file will not be readable anyway)
        return True
    return True


def embedded_service(data_dir: Path) -> tuple[str | None, str | None]:
    """(url, token) of the `flashdmd up` serving from `data_dir`, from the SERVICE_FILE it wrote there; (None,
    None) when there is none, or it was left by a process that is gone (killed before it could remove it)."""
    try:
        info = json.loads((data_dir / SERVICE_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(info, dict) or not _alive(info.get("pid")) or not isinstance(info.get("url"), str):
        return None, None
    token = None
    if isinstance(info.get("token_file"), str):
        try:
            token = Path(info["token_file"]).read_text().strip() or None
        except OSError:
            token = None
    return info["url"], token


@dataclass(frozen=True)
class Target:
    url: str
    token: str


def resolve_target(url: str | None, token: str | None, env: Mapping[str, str] | None = None,
                   data_dir: Path | None = None) -> Target:
    """URL and token: the options (which click fills from FLASHDMD_URL/FLASHDMD_TOKEN) win; else what the
    `flashdmd up` serving from the data dir (--data-dir, FLASHDMD_DATA_DIR or ~/.flashdmd) wrote there."""
    env = os.environ if env is None else env
    folder = Path(data_dir or env.get("FLASHDMD_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    found_url, found_token = embedded_service(folder)
    token = token or found_token or embedded_token(folder)
    if not token:
        raise ClientError(
            "no API token: set FLASHDMD_TOKEN or pass --token (`flashdmd up` prints one and keeps it in "
            f"{folder}/{TOKEN_FILE}; `flashdmd token create` makes another)", code="unauthorized")
    return Target(url=(url or found_url or DEFAULT_URL).rstrip("/"), token=token)


def _error(response: httpx.Response) -> ClientError:
    """The server's {"error": {code, message, fields}} body, or what there is when a proxy answered instead."""
    try:
        body = response.json()
    except ValueError:
        body = None
    info = body.get("error") if isinstance(body, dict) else None
    if isinstance(info, dict) and "message" in info:
        message = str(info["message"])
        if response.status_code == 401:
            message += " (check FLASHDMD_TOKEN or --token)"
        return ClientError(message, status=response.status_code, code=str(info.get("code", "error")),
                           fields=[str(f) for f in info.get("fields") or []])
    text = response.text.strip()[:500] or response.reason_phrase
    return ClientError(text, status=response.status_code, code="http_error")


class JobsClient:
    """One method per route the terminal client uses; each returns the decoded body or raises ClientError."""

    def __init__(self, target: Target, *, timeout: float = 30.0) -> None:
        self.target = target
        self.http = httpx.Client(base_url=target.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {target.token}"})

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TransportError as err:
            raise ClientError(f"cannot reach the flashdmd API at {self.target.url} ({type(err).__name__}: {err}); "
                              "is `flashdmd up` running, or is FLASHDMD_URL right?") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def submit(self, spec: dict[str, Any], *, name: str | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json={"spec": spec, "name": name}, headers=headers).json()

    def jobs(self, *, status: str | None = None, limit: int = 20, every: bool = False) -> Iterator[dict[str, Any]]:
        """The caller's jobs, newest first; every=True follows `has_more` through all pages."""
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        while True:
            page = self.request("GET", "/jobs", params=params).json()
            yield from page["data"]
            if not (every and page["has_more"] and page["data"]):
                return
            params["after"] = page["data"][-1]["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def resume(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/resume").json()

    def metrics(self, job_id: str, *, key: str | None = None, since_step: int | None = None,
                limit: int = 1000) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if key is not None:
            params["key"] = key
        if since_step is not None:
            params["since_step"] = since_step
        return self.request("GET", f"/jobs/{job_id}/metrics", params=params).json()

    def logs(self, job_id: str, *, offset: int, limit: int = 65536) -> tuple[bytes, int]:
        """Bytes of trainer.log from `offset`, and the offset to ask for next (the X-Next-Offset header)."""
        response = self.request("GET", f"/jobs/{job_id}/logs", params={"offset": offset, "limit": limit})
        next_offset = response.headers.get("X-Next-Offset")
        return response.content, int(next_offset) if next_offset is not None else offset + len(response.content)
