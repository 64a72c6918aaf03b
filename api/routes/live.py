"""Live views of one job for the dashboard and terminal clients: an SSE stream and the trainer log.

`GET /jobs/{id}/stream` polls the database every `stream_poll_seconds` in a fresh, short read
session (never one held open across polls: on SQLite a long read would pin the WAL, on Postgres it
would hold a connection per viewer) and sends what changed. It ends once the job is terminal and
everything up to that moment has been sent, and stops polling as soon as the client goes away.

`GET /jobs/{id}/logs` serves byte ranges of the run's trainer.log, so a tail is `offset = X-Next-Offset`
of the previous call; the contract (offset, limit, X-Next-Offset) is shared with `flashdmd jobs logs`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api import crud
from api.deps import CurrentToken, SettingsDep
from api.errors import APIError
from api.models import TERMINAL, ApiToken
from api.routes.jobs import INT64_MAX, errors
from api.runner import LOG_FILE
from api.schemas import EventPublic, JobPublic, MetricPoint
from trainer.jobspec.limits import INT32_MAX

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=errors)  # type: ignore[arg-type]

LOG_DEFAULT_LIMIT = 64 * 1024
LOG_MAX_LIMIT = 1024 * 1024
# Per poll and key: a long run's history arrives over a few polls instead of one huge message.
POINTS_PER_POLL = 5000
EVENTS_PER_POLL = 500
# A comment line this often keeps proxies from closing an idle stream and makes a vanished client's
# socket fail on write, which ends the generator even where the server never sees the disconnect message.
KEEPALIVE_SECONDS = 15.0

STREAM_DOC = """Server-sent events with what changed in the job, until it is terminal.

Messages (`event:` name → JSON `data:`):
- `job`: the job as `GET /jobs/{id}` returns it (JobPublic), sent first and whenever it changes;
- `events`: a list of new events (EventPublic), oldest first;
- `metrics`: `{key: [MetricPoint, ...]}` with the new points of each metric key;
- `end`: `{"status": ...}`, the last message, once the job is terminal and all of the above was sent.

`after` (an event id) and `since_step` resume a stream without resending what the client has.
"""


@dataclass
class _Cursor:
    """What the client has already been sent."""

    after_event: int
    since_step: int
    job_json: str = ""
    steps: dict[str, int] = field(default_factory=dict)


@dataclass
class _News:
    job: JobPublic
    events: list[EventPublic]
    metrics: dict[str, list[MetricPoint]]
    more: bool  # a page limit was hit: poll again at once


def _owned(reads: sessionmaker[Session], owner: ApiToken, job_id: str) -> str:
    with reads() as session:
        return crud.get_job(session=session, owner=owner, job_id=job_id).id  # 404 for anyone else's


def _poll(reads: sessionmaker[Session], owner: ApiToken, job_id: str, cursor: _Cursor) -> _News | None:
    """One short read session: the job row, events after the cursor, and new points of every key.

    None once the token is revoked: a stream is one long request, and revoking must not wait for its end.
    """
    with reads() as session:
        if session.scalar(select(ApiToken.revoked_at).where(ApiToken.id == owner.id)) is not None:
            return None
        job = JobPublic.of(crud.get_job(session=session, owner=owner, job_id=job_id))
        rows, more = crud.list_events(session=session, job_id=job_id, after=cursor.after_event,
                                      limit=EVENTS_PER_POLL)
        events = [EventPublic.model_validate(e) for e in rows]
        metrics: dict[str, list[MetricPoint]] = {}
        for key in crud.metric_keys(session=session, job_id=job_id):
            points, key_more = crud.metric_points(
                session=session, job_id=job_id, key=key, since_step=cursor.steps.get(key, cursor.since_step),
                stride=1, limit=POINTS_PER_POLL)
            more = more or key_more
            if points:
                metrics[key] = [MetricPoint.of(*p) for p in points]
    return _News(job=job, events=events, metrics=metrics, more=more)


def _message(event: str, data: Any) -> bytes:
    # One `data:` line: json.dumps never emits a newline, which would split the SSE field.
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def open_streams(app: Any) -> int:
    """Streams being served now: one that outlives its client would show here (and in the tests)."""
    return getattr(app.state, "open_streams", 0)


async def _stream(request: Request, owner: ApiToken, job_id: str, cursor: _Cursor, poll: float) -> AsyncIterator[bytes]:
    state = request.app.state
    # No await between the read and the write: the event loop makes this count exact.
    state.open_streams = open_streams(request.app) + 1
    try:
        async for chunk in _messages(request, owner, job_id, cursor, poll):
            yield chunk
    finally:
        state.open_streams -= 1


async def _messages(request: Request, owner: ApiToken, job_id: str, cursor: _Cursor,
                    poll: float) -> AsyncIterator[bytes]:
    reads = request.app.state.read_sessionmaker
    idle = 0.0
    while True:
        if await request.is_disconnected():
            return
        news = await run_in_threadpool(_poll, reads, owner, job_id, cursor)
        if news is None:
            return  # revoked: no `end`, and the client's reconnect gets 401
        out: list[bytes] = []
        job_json = news.job.model_dump_json()
        if job_json != cursor.job_json:
            cursor.job_json = job_json
            out.append(_message("job", json.loads(job_json)))
        if news.events:
            cursor.after_event = news.events[-1].id
            out.append(_message("events", [e.model_dump(mode="json") for e in news.events]))
        if news.metrics:
            for key, points in news.metrics.items():
                cursor.steps[key] = points[-1].step
            out.append(_message("metrics", {k: [p.model_dump() for p in v] for k, v in news.metrics.items()}))
        # The job row was read before the events and metrics in the same session, so once it is terminal
        # and no page was cut short, nothing the job wrote can still be missing.
        done = news.job.status in TERMINAL and not news.more
        if done:
            out.append(_message("end", {"status": news.job.status}))
        if out:
            idle = 0.0
            yield b"".join(out)
        elif idle >= KEEPALIVE_SECONDS:
            idle = 0.0
            yield b": keepalive\n\n"
        if done:
            return
        if not news.more:
            await asyncio.sleep(poll)
            idle += poll


class _CountedStream(StreamingResponse):
    """A stream that gives its place back however it ends, even when its body never started (the client left
    before the first byte: the generator's own `finally` would then never run)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get("/{job_id}/stream", response_class=StreamingResponse, description=STREAM_DOC,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "an event stream (see above)"}})
async def stream_job(
    job_id: str,
    request: Request,
    token: CurrentToken,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=INT64_MAX, description="the last event id already seen")] = 0,
    since_step: Annotated[int, Query(ge=-1, le=INT32_MAX, description="metric points after this step")] = -1,
) -> StreamingResponse:
    # Checked before the response starts, so another owner's job gets a plain JSON 404, not a stream.
    owned = await run_in_threadpool(_owned, request.app.state.read_sessionmaker, token, job_id)
    cursor = _Cursor(after_event=after, since_step=since_step)
    # Each stream is a long request that polls the database: one token's many streams would slow every other
    # token's requests. The count and its update have no await between them, so the cap is exact.
    state = request.app.state
    by_token: dict[int, int] | None = getattr(state, "streams_by_token", None)
    if by_token is None:
        by_token = state.streams_by_token = {}
    held = by_token.get(token.id, 0)
    if held >= settings.max_streams_per_token:
        raise APIError("rate_limited", f"this token already has {held} open streams (FLASHDMD_MAX_STREAMS_PER_TOKEN); "
                       "close one first", 429, headers={"Retry-After": str(settings.db_retry_after_seconds)})
    by_token[token.id] = held + 1

    def release() -> None:
        left = by_token.get(token.id, 1) - 1
        if left > 0:
            by_token[token.id] = left
        else:
            by_token.pop(token.id, None)

    return _CountedStream(
        release,
        _stream(request, token, owned, cursor, settings.stream_poll_seconds),
        media_type="text/event-stream",
        # no-transform/X-Accel-Buffering: a buffering proxy would hold the messages back until it closes.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )


def _read_range(reads: sessionmaker[Session], owner: ApiToken, job_id: str, settings: Any,
                offset: int, limit: int) -> tuple[bytes, int]:
    """(bytes, next offset). The offset is bounded by the file's size before any seek: the OS refuses seeks
    far past the end (EINVAL around 2^44 on Linux), and past the end there is nothing to read anyway."""
    _owned(reads, owner, job_id)
    run_dir = settings.run_dir(job_id).resolve()
    path = (run_dir / LOG_FILE).resolve()
    # A run directory is ours, but a symlink planted in it must not make this read any file on the host.
    if not path.is_relative_to(run_dir) or not path.is_file():
        return b"", 0  # no log yet: the job has not started, and the log will begin at byte 0
    with path.open("rb") as log:
        size = os.fstat(log.fileno()).st_size
        if offset >= size:
            return b"", size  # past the end: nothing yet; ask again from the end
        log.seek(offset)
        data = log.read(limit)
        return data, offset + len(data)


@router.get("/{job_id}/logs", response_class=Response,
            responses={200: {"content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}},
                             "description": "bytes [offset, offset + limit) of trainer.log",
                             "headers": {"X-Next-Offset": {"schema": {"type": "integer"},
                                                           "description": "the offset to ask for next"}}}})
async def job_logs(
    job_id: str,
    request: Request,
    token: CurrentToken,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=INT64_MAX, description="first byte")] = 0,
    limit: Annotated[int, Query(ge=1, le=LOG_MAX_LIMIT, description="bytes at most")] = LOG_DEFAULT_LIMIT,
) -> Response:
    """The trainer's log from byte `offset`: at most `limit` bytes, empty past the end (or before it starts).

    The bytes are the file's own, so a range may end inside a UTF-8 sequence; tail the log by asking
    again from `X-Next-Offset`.
    """
    data, next_offset = await run_in_threadpool(_read_range, request.app.state.read_sessionmaker, token, job_id,
                                                settings, offset, limit)
    return Response(data, media_type="text/plain; charset=utf-8",
                    headers={"X-Next-Offset": str(next_offset), "Cache-Control": "no-store"})
