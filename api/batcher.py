"""Dynamic batching for POST /generate: concurrent requests that can share a sampler call share one.

Requests are grouped by a key (checkpoint, size, steps, guidance and negative prompt: everything that must be
the same for every row of one sampler call); rows (prompt, seed) may differ. A group is sent when it holds
`max_batch` rows or when its oldest request has waited `max_wait` seconds, whichever comes first, to one of
`workers` sampler slots; while every slot is busy, groups keep filling, so under load the batches grow by
themselves. A request's rows are never split across calls, and a call never holds rows of two keys, so each
request gets exactly its own images back, in order.

Everything except the sampler call runs in the event loop with no await between a check and its update, so
no lock is needed; the sampler call runs in a worker thread. The bounded queue is the limiter's
(api/generate_limits.py): a request holds its place there while it waits here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

from api.observability import GenerateMetrics

R = TypeVar("R")  # one row of a request (the route's: (prompt, seed))
T = TypeVar("T")  # one result per row (the route's: a uint8 image)
Run = Callable[[Hashable, list[R]], Sequence[T]]


class QueueTimeout(Exception):
    """The request was not sent to the sampler within its timeout (it is no longer queued)."""


@dataclass(eq=False)
class _Item(Generic[R, T]):
    rows: list[R]
    future: asyncio.Future[list[T]]
    since: float = field(default_factory=time.monotonic)


class Batcher(Generic[R, T]):
    def __init__(self, run: Run[R, T], *, max_batch: int, max_wait: float, workers: int,
                 metrics: GenerateMetrics | None = None) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be at least 1")
        self.run, self.max_batch, self.max_wait, self.workers, self.metrics = run, max_batch, max_wait, workers, metrics
        self._pending: dict[Hashable, list[_Item[R, T]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _start(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._wake is None:
            # First use, or a new event loop (a test client restarted): tasks of a closed loop never run again.
            self._loop, self._wake, self._pending = loop, asyncio.Event(), {}
            self._tasks = [loop.create_task(self._worker()) for _ in range(self.workers)]
        return self._wake

    @property
    def queued(self) -> int:
        """Requests waiting for a sampler call (not those in one)."""
        return sum(len(items) for items in self._pending.values())

    async def submit(self, key: Hashable, rows: list[R], timeout: float | None = None) -> list[T]:
        """This request's results, one per row. A request of more than max_batch rows goes in chunks of it,
        one after the other: a single request never holds more than one sampler slot, so it cannot take
        every slot from the other clients."""
        if len(rows) > self.max_batch:
            out: list[T] = []
            for i in range(0, len(rows), self.max_batch):
                out += await self.submit(key, rows[i:i + self.max_batch], timeout)
            return out
        wake = self._start()
        item: _Item[R, T] = _Item(rows, asyncio.get_running_loop().create_future())
        self._pending.setdefault(key, []).append(item)
        wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as err:
            if self._drop(key, item):
                if isinstance(err, asyncio.TimeoutError):
                    raise QueueTimeout from None
                raise
            # Already in a sampler call: its rows are computed anyway. Wait for it, so the caller's place in
            # the limiter is held until the work it stands for is done (a burst of cancelled requests cannot
            # pile up more work than the queue allows).
            await asyncio.wait([item.future])
            if isinstance(err, asyncio.CancelledError):
                raise
            return item.future.result()

    def _drop(self, key: Hashable, item: _Item[R, T]) -> bool:
        items = self._pending.get(key, [])
        if item not in items:
            return False
        items.remove(item)
        if not items:
            del self._pending[key]
        return True

    def _ready(self) -> tuple[Hashable | None, float | None]:
        """The key to send now (full, or its oldest request waited max_wait; the oldest such first), else the
        seconds until the next one will be ready."""
        now = time.monotonic()
        best: tuple[float, Hashable] | None = None
        soonest: float | None = None
        for key, items in self._pending.items():
            oldest = items[0].since
            if sum(len(i.rows) for i in items) >= self.max_batch or now - oldest >= self.max_wait:
                if best is None or oldest < best[0]:
                    best = (oldest, key)
            else:
                left = oldest + self.max_wait - now
                soonest = left if soonest is None else min(soonest, left)
        return (best[1], None) if best is not None else (None, soonest)

    def _take(self, key: Hashable) -> list[_Item[R, T]]:
        """The oldest requests of `key` whose rows fit in one call (at least one: none exceeds max_batch)."""
        items = self._pending[key]
        taken: list[_Item[R, T]] = []
        rows = 0
        while items and rows + len(items[0].rows) <= self.max_batch:
            rows += len(items[0].rows)
            taken.append(items.pop(0))
        if not items:
            del self._pending[key]
        return taken

    async def _worker(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            key, wait = self._ready()
            if key is None:
                wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                continue
            items = self._take(key)
            await self._call(key, items)

    async def _call(self, key: Hashable, items: list[_Item[R, T]]) -> None:
        started = time.monotonic()
        rows = [r for item in items for r in item.rows]
        if self.metrics is not None:
            for item in items:
                self.metrics.queue_seconds.observe(started - item.since)
            self.metrics.batch_images.observe(len(rows))
        try:
            results = list(await run_in_threadpool(self.run, key, rows))
            if len(results) != len(rows):
                raise RuntimeError(f"the sampler returned {len(results)} results for {len(rows)} rows")
        except Exception as err:  # every request of the call gets the error (e.g. a checkpoint that won't load)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            if self.metrics is not None:
                self.metrics.model_seconds.observe(time.monotonic() - started)
        at = 0
        for item in items:
            if not item.future.done():
                item.future.set_result(results[at:at + len(item.rows)])
            at += len(item.rows)
