"""The control plane's POST /generate when the inference tier runs elsewhere: forward, do not serve.

The edge (api/edge.py) has already authenticated the caller and bounded the body before this route runs, so an
anonymous request never reaches the GPUs, and the body is validated here with the same pydantic model the
inference service uses, so a malformed one gets its 422 (naming the field) without a round trip. Everything that
needs the checkpoint (which checkpoint the token may read, steps, size, the pixel budget) is decided by the
inference service, which runs the very same route as the in-process mode (api/routes/generate.py) against the
same database. Ownership therefore holds even where an ingress sends /generate to the inference tier directly,
and since the answer is passed through unchanged, the control plane cannot reveal more about another owner's
checkpoint than the inference service does.

The upstream client is one pooled `httpx.AsyncClient` per event loop with a bounded timeout. An inference tier
that is down, refuses connections or does not answer in time becomes 503 + Retry-After, never a 500: clients
retry a 503, and a scaled-to-zero or restarting tier is an expected state, not a bug.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from fastapi import APIRouter, Request, Response
from starlette.datastructures import Headers

from api.deps import CurrentToken
from api.errors import APIError
from api.schemas import ErrorBody
from api.schemas_generate import GenerateRequest, GenerateResponse
from api.settings import Settings

log = logging.getLogger(__name__)

# What the client needs of the inference service's answer; hop-by-hop and server headers stay behind.
PASSED_BACK = ("content-type", "retry-after", "www-authenticate", "x-seed", "x-checkpoint", "x-steps")
# What the inference service needs of the client's request: who is asking (it authenticates again) and what.
FORWARDED = ("authorization", "content-type", "accept", "x-request-id")


class InferenceProxy:
    def __init__(self, settings: Settings) -> None:
        assert settings.inference_url
        self.url = settings.inference_url.rstrip("/") + "/generate"
        self.timeout = httpx.Timeout(settings.inference_timeout_seconds,
                                     connect=settings.inference_connect_timeout_seconds)
        self.limits = httpx.Limits(max_connections=settings.inference_max_connections,
                                   max_keepalive_connections=settings.inference_max_connections)
        self.retry_after = settings.inference_retry_after_seconds
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client's pooled connections belong to the loop that opened them (a restarted test client
            # runs a new loop); the old client is dropped, its sockets closed by the garbage collector.
            # retries=1 retries a failed *connect* only (the request was never sent): a pod that just went
            # away behind the Service costs one more connect, not a 503.
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=self.limits,
                                             transport=httpx.AsyncHTTPTransport(retries=1, limits=self.limits))
            self._loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None

    def _unavailable(self, message: str) -> APIError:
        # No exception text: it would name the upstream host and port.
        return APIError("inference_unavailable", message, 503, headers={"Retry-After": str(self.retry_after)})

    async def forward(self, body: bytes, headers: Headers) -> Response:
        sent = {name: headers[name] for name in FORWARDED if name in headers}
        try:
            answer = await self.client().post(self.url, content=body, headers=sent)
        except httpx.TimeoutException as err:
            log.warning("inference service timed out (%s): %s", type(err).__name__, err)
            raise self._unavailable(f"the inference service did not answer within {self.timeout.read:g} s; "
                                    "try again later") from None
        except httpx.TransportError as err:
            log.warning("inference service unreachable (%s): %s", type(err).__name__, err)
            raise self._unavailable("the inference service is unavailable; try again later") from None
        passed = {name: answer.headers[name] for name in PASSED_BACK if name in answer.headers}
        return Response(answer.content, status_code=answer.status_code, headers=passed)


router = APIRouter(tags=["generate"], responses={
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429, 503)})  # type: ignore[arg-type]


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {
    "image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "one image: its bytes, with X-Seed and "
    "X-Checkpoint headers; several: JSON with base64 images and their seeds"}})
async def generate(body: GenerateRequest, request: Request, _token: CurrentToken) -> Response:
    """Generate images with a checkpoint's K-step sampler (served by the inference tier). The same seed gives the
    same bytes."""
    del body  # validated at the edge; the bytes the client sent are forwarded as they are
    proxy: InferenceProxy = request.app.state.inference_proxy
    return await proxy.forward(await request.body(), request.headers)
