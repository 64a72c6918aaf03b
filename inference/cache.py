"""A thread-safe LRU of loaded pipelines, bounded by a memory budget in bytes.

Loading takes seconds, so it happens outside the cache-wide lock: one lock per key
makes concurrent requests for the same checkpoint wait for a single load, while
requests for other (cached) checkpoints go on. Entries are evicted least-recently
used first until the new one fits, before the load when an `estimate` of its size is
given (so the budget also bounds the peak while loading) and again after it; one entry larger than the whole budget is still
served (there is nothing better to do with it) but evicts everything else. An evicted
pipeline is dropped from the cache only: requests that hold it finish normally and
its memory goes when the last one lets go.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0


class PipelineCache(Generic[T]):
    def __init__(self, budget_bytes: int, load: Callable[[object], T], size: Callable[[T], int],
                 estimate: Callable[[object], int] | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.budget = budget_bytes
        self._load, self._size, self._estimate = load, size, estimate
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.stats = CacheStats()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._entries.values())

    def get(self, key: Hashable, source: object = None) -> T:
        """The entry of `key`, loaded on a miss. `load` and `estimate` get `source` when one is given (e.g. a
        checkpoint's already-read info, so a load does not read it again), else the key."""
        hit = self._hit(key)
        if hit is not None:
            return hit
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            hit = self._hit(key)  # another thread may have loaded it while we waited
            if hit is not None:
                return hit
            if self._estimate is not None:
                guess = int(self._estimate(key if source is None else source))
                with self._lock:
                    self._make_room(guess)
            try:
                value = self._load(key if source is None else source)
                nbytes = int(self._size(value))
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            with self._lock:
                self.stats.loads += 1
                self._make_room(nbytes)
                self._entries[key] = (value, nbytes)
            return value

    def _hit(self, key: Hashable) -> T | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def _make_room(self, nbytes: int) -> None:
        used = sum(n for _, n in self._entries.values())
        evicted = False
        while self._entries and used + nbytes > self.budget:
            _, (_, n) = self._entries.popitem(last=False)
            used -= n
            self.stats.evictions += 1
            evicted = True
        if evicted:
            gc.collect()  # module graphs have cycles; give their memory back before the new one grows

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        gc.collect()
