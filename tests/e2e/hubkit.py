"""A local stand-in for the few model-hub endpoints that HfApi.create_repo and upload_folder call.

A real HTTP server (stdlib, in a thread) that keeps what it is sent: the repos created and, per repo, the
files of every commit, decoded from the commit's NDJSON body. It answers "regular" to every preupload so
that file contents travel inline in the commit (the hub's own choice for small files), which keeps LFS and
Xet storage out of the picture. Unknown endpoints get a 404 and are recorded, so a test sees them.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHA = "f" * 40
# huggingface_hub fetches this list for its User-Agent at most once a day, whatever the call; not an upload step.
AGENT_REGISTRY = "/api/agent-harnesses"


@dataclass
class HubState:
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> create payload
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> bytes
    commits: list[dict[str, Any]] = field(default_factory=list)  # the NDJSON header of each commit
    auth: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def _handler(state: HubState, base: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.auth.append(self.headers.get("Authorization", ""))
            path = self.path.split("?")[0]
            parts = path.strip("/").split("/")
            if path == "/api/repos/create":
                body = json.loads(raw)
                repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                # Older clients send "private": bool, newer ones "visibility": "private" | "public".
                state.repos[repo] = {**body, "is_private": bool(body.get("private")) or body.get("visibility") == "private"}
                return self._reply(200, {"url": f"{base[0]}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                files = json.loads(raw)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                repo = f"{parts[2]}/{parts[3]}"
                if repo not in state.repos:
                    return self._reply(404, {"error": f"Repository {repo} not found"})
                store = state.files.setdefault(repo, {})
                for line in raw.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        state.commits.append(item["value"])
                    elif item["key"] == "file":
                        store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    else:
                        return self._reply(400, {"error": f"unexpected commit operation {item['key']}"})
                return self._reply(200, {"commitUrl": f"{base[0]}/{repo}/commit/{SHA}", "commitOid": SHA})
            state.unknown.append(f"POST {self.path}")
            return self._reply(404, {"error": "not implemented by the stand-in"})

        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != AGENT_REGISTRY:
                state.unknown.append(f"GET {self.path}")
            self._reply(404, {"error": "not implemented by the stand-in"})

    return Handler


class LocalHub:
    """`with LocalHub() as hub:` serves on 127.0.0.1 at hub.url; hub.state has what arrived."""

    def __init__(self) -> None:
        self.state = HubState()
        base: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, base))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        base.append(self.url)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
