"""Admission control for POST /generate: global places (running + queued), a share per token, and a rate per token.

All of it runs in the event loop with no await between a check and its update, so
no lock is needed. The answers differ on purpose:

- 429 + Retry-After: *this* token is over its rate or holds its share of slots; the
  service could take other tokens' requests;
- 503 + Retry-After: the service as a whole is saturated (every slot and waiting
  place taken, or no slot freed within the queue timeout).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from api.errors import APIError


class Busy(APIError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__("overloaded", message, 503, headers={"Retry-After": str(retry_after)})


class RateLimited(APIError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__("rate_limited", message, 429, headers={"Retry-After": str(max(1, retry_after))})


class TokenBucket:
    """Per-key token buckets: `burst` requests at once, refilled at `per_minute`. 0 per minute: no limit."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = per_minute / 60.0, float(burst), clock
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: object) -> float:
        """0 when the request may go now (and is counted), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:  # drop full buckets: they hold no information
            self._buckets = {k: v for k, v in self._buckets.items()
                             if min(self.burst, v[0] + (now - v[1]) * self.rate) < self.burst}
        return 0.0


class Limiter:
    """`concurrency` slots and a waiting room of `queue`, of which one key may hold `owner_share`."""

    def __init__(self, concurrency: int, queue: int, timeout: float, retry_after: int, *,
                 owner_share: float = 1.0, per_minute: float = 0.0, burst: int = 1,
                 work_capacity: float = math.inf) -> None:
        self.concurrency, self.queue, self.timeout, self.retry_after = concurrency, queue, timeout, retry_after
        # At least one place each, so a share below one slot still lets every token through when idle.
        self.owner_cap = max(1, math.floor(owner_share * (concurrency + queue)))
        # The share applies to work too (api/generate_cost.py units): a token's admitted requests may add up to
        # its share of what the slots do at once. Its first request always fits, however large (within the
        # per-request budget), so no token is locked out.
        self.owner_work_cap = owner_share * work_capacity
        self.rate = TokenBucket(per_minute, burst)
        self._sem = asyncio.Semaphore(concurrency)
        self.admitted = 0  # running + waiting
        self.by_owner: dict[object, int] = {}
        self.work_by_owner: dict[object, float] = {}

    @asynccontextmanager
    async def place(self, owner: object = None, work: float = 0.0) -> AsyncIterator[None]:
        """A place among the `concurrency + queue` admitted requests, without waiting for a slot: the batcher
        (api/batcher.py) holds requests in its own queue and runs `concurrency` sampler calls at once."""
        wait = self.rate.take(owner)
        if wait > 0:
            raise RateLimited(f"more than the {self.rate.rate * 60:g} /generate requests a minute this token may "
                              "send; try again later", math.ceil(wait))
        # Saturation first: when every place is taken, the honest answer is "the service is busy" (503).
        if self.admitted >= self.concurrency + self.queue:
            raise Busy(f"{self.admitted} generations running or queued; try again later", self.retry_after)
        mine = self.by_owner.get(owner, 0)
        if mine >= self.owner_cap:
            raise RateLimited(f"this token already has {mine} generations running or queued (its share is "
                              f"{self.owner_cap}); try again later", self.retry_after)
        held = self.work_by_owner.get(owner, 0.0)
        if mine and held + work > self.owner_work_cap:
            raise RateLimited(f"this token's generations running or queued already hold {held:g} units of work "
                              f"(its share is {self.owner_work_cap:g}); try again later", self.retry_after)
        self.admitted += 1
        self.by_owner[owner] = mine + 1
        self.work_by_owner[owner] = held + work
        try:
            yield
        finally:
            self.admitted -= 1
            left = self.by_owner[owner] - 1
            if left:
                self.by_owner[owner] = left
                self.work_by_owner[owner] -= work
            else:
                del self.by_owner[owner]
                del self.work_by_owner[owner]

    def busy(self, why: str) -> Busy:
        return Busy(why, self.retry_after)

    @asynccontextmanager
    async def slot(self, owner: object = None) -> AsyncIterator[None]:
        """A place, then one of the `concurrency` slots (503 when none frees within the timeout)."""
        async with self.place(owner):
            try:
                await asyncio.wait_for(self._sem.acquire(), self.timeout)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise Busy(f"no generation slot within {self.timeout:g} s", self.retry_after) from None
            try:
                yield
            finally:
                self._sem.release()
