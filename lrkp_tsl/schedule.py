"""When the engine must look at something again: one heap of deadlines, one per key. Pure.

The engine has one timer (the server arms it at `next()`); every call, held packet and
retry that needs waking up has a key here. Replacing a key's deadline pushes a new heap
entry and leaves the old one to be skipped when it surfaces, so `set` and `clear` are
O(log n) and nothing scans all calls per tick. Stale entries are bounded: when they
outnumber live ones the heap is rebuilt (amortised O(1) per change), so churn over a long
maximum lifetime cannot grow memory without bound.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Rebuild when the heap holds this many times more entries than live deadlines (+ slack).
COMPACT_RATIO = 4
COMPACT_SLACK = 1024


class Schedule(Generic[K]):
    def __init__(self) -> None:
        self._when: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def get(self, key: K) -> float | None:
        return self._when.get(key)

    def set(self, key: K, when: float) -> None:
        """Wake `key` at `when` (replacing any earlier setting for it)."""
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))
        if len(self._heap) > COMPACT_RATIO * len(self._when) + COMPACT_SLACK:
            self._compact()

    def set_earlier(self, key: K, when: float) -> None:
        """Like `set`, unless `key` is already due sooner."""
        current = self._when.get(key)
        if current is None or when < current:
            self.set(key, when)

    def clear(self, key: K) -> None:
        self._when.pop(key, None)

    def next(self) -> float | None:
        """The earliest deadline, or None when nothing is scheduled."""
        while self._heap:
            when, _order, key = self._heap[0]
            if self._when.get(key) == when:
                return when
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float, limit: int) -> list[K]:
        """Up to `limit` keys due at `now`, earliest first; each is unscheduled."""
        due: list[K] = []
        while self._heap and len(due) < limit:
            when, _order, key = self._heap[0]
            if self._when.get(key) != when:
                heapq.heappop(self._heap)
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._when[key]
            due.append(key)
        return due

    def _compact(self) -> None:
        self._heap = [(when, next(self._order), key) for key, when in self._when.items()]
        heapq.heapify(self._heap)
