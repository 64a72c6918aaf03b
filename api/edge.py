"""The edge of the API: authentication and the body limit, before routing and before any body is read.

FastAPI reads and parses a request's body before it solves the route's dependencies,
so a bearer-token dependency alone lets an anonymous client make the server buffer
and parse any body it sends (a 300 MB JSON body with a bad token once took 1.2 GB).
This pure ASGI middleware runs first instead:

1. every route but the public ones needs a valid token, checked from the headers
   alone; a bad or missing one gets 401 and the body is never read (uvicorn pauses
   reading at its high-water mark and closes the connection after the response);
2. a declared Content-Length over `max_body_bytes` gets 413 at once;
3. otherwise the route gets a `receive` that counts the bytes as they stream in and
   raises `BodyTooLarge` (413) the moment the count passes the limit, so a chunked
   body cannot get past it either.

The token row is handed to the route in the ASGI scope (`CurrentToken` reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.db import UNAVAILABLE
from api.errors import APIError, database_unavailable
from api.models import ApiToken

# Health checks (probes carry no token) and the API docs (public by design).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                          "/favicon.ico"})
# The dashboard's shell and static assets (api/ui.py): they hold no data, and a browser cannot attach a
# bearer header to a page load; everything the page shows comes from the API with the token.
UI_PREFIX = "/ui"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == UI_PREFIX or path.startswith(UI_PREFIX + "/")
TOKEN_STATE = "flashdmd_token"  # key in scope["state"]
CHALLENGE = {"WWW-Authenticate": "Bearer"}

Authenticate = Callable[[str], Awaitable[ApiToken | None]]


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`; FastAPI re-raises HTTPExceptions from body reading, so the handler renders 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


DRAIN_BYTES = 64 * 1024  # what a rejected request may still send before the answer: one ordinary JSON body
DRAIN_SECONDS = 2.0


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1  # unparseable: treated as too large below, never trusted
    return None


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, authenticate: Authenticate,
                 retry_after: int, public_base_url: str | None = None) -> None:
        self.app, self.limit, self.authenticate, self.retry_after = app, max_body_bytes, authenticate, retry_after
        self.public_base_url = public_base_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not is_public(scope["path"]):
            token = bearer_token(scope)
            if token is None:
                await self._reject(scope, receive, send, APIError("unauthorized", "missing bearer token",
                                                                  headers=CHALLENGE))
                return
            try:
                row = await self.authenticate(token)
            except UNAVAILABLE:
                await self._reject(scope, receive, send, database_unavailable(self.retry_after))
                return
            if row is None:
                await self._reject(scope, receive, send, APIError("unauthorized", "invalid or revoked token",
                                                                  headers=CHALLENGE))
                return
            scope.setdefault("state", {})[TOKEN_STATE] = row
        declared = _content_length(scope)
        if declared is not None and (declared < 0 or declared > self.limit):
            await self._reject(scope, receive, send, _too_large(self.limit))
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [
                    (k, public_location(v, self.public_base_url) if k == b"location" else v)
                    for k, v in message.get("headers", ())]}
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # Only when the route read the body outside FastAPI's handler (which renders the 413 itself).
            if started:
                raise
            await self._reject(scope, receive, send, _too_large(self.limit))

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        # A small declared body (an ordinary JSON request with a bad token) is drained first: closing with it
        # unread in the socket makes the kernel answer with a reset, and the client may see "connection reset"
        # instead of its 401. A body above DRAIN_BYTES, or one that does not arrive within DRAIN_SECONDS, stays
        # unread, as point 1 above wants.
        declared = _content_length(scope)
        if declared is not None and 0 < declared <= DRAIN_BYTES:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    while (await receive()).get("more_body", False):
                        pass
        response = error.response()
        # The body is left unread: tell the client (and uvicorn) this connection ends with the response.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def public_url(path: str, base: str | None) -> str:
    """A URL for a response: the configured public base URL + path, or the bare path (relative to the host the
    client used). Never built from the request's Host header, which the client chooses (a cache or a link in
    a shared page would carry an attacker's host)."""
    return f"{base.rstrip('/')}{path}" if base else path


def public_location(value: bytes, base: str | None) -> bytes:
    """A Location header without the request's scheme and host (Starlette's slash redirects build them from Host)."""
    parts = urlsplit(value.decode("latin-1"))
    if not parts.netloc:
        return value
    path = urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))
    return public_url(path, base).encode("latin-1")


def _too_large(limit: int) -> APIError:
    return APIError("payload_too_large", f"the request body is larger than {limit} bytes")
