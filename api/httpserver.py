"""uvicorn's HTTP protocol with a header-read timeout (`FLASHDMD_HTTP_HEADER_TIMEOUT_SECONDS`).

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but it has no limit on how long a
client may take to send a request's headers: a client that opens a socket and sends nothing, or a header
byte every few seconds, holds a connection (and its memory) for ever, and a few thousand such sockets
starve everyone else (slowloris). This protocol closes a connection whose next request's headers have not
all arrived within the timeout: from the moment it opens, and again from the end of each response.

`flashdmd serve` and `flashdmd up` run uvicorn with `http=PROTOCOL`; a deployment that runs uvicorn itself
passes `--http api.httpserver:HeaderTimeoutProtocol` (deploy/README.md "Waits and timeouts").
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

PROTOCOL = "api.httpserver:HeaderTimeoutProtocol"


@lru_cache(maxsize=1)
def header_timeout() -> float:
    from api.settings import Settings

    return Settings().http_header_timeout_seconds


class HeaderTimeoutProtocol(H11Protocol):
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        # The request cycle at arming time: a new request's complete headers replace it (handle_events).
        self._header_timer = self.loop.call_later(header_timeout(), self._expire, self.cycle)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self, cycle: Any) -> None:
        self._header_timer = None
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """The timeouts every uvicorn we start runs with."""
    return {"http": PROTOCOL, "timeout_keep_alive": settings.http_keep_alive_seconds}
