"""The router's wait queue of one pool: requests no instance can take yet, earliest TTFT deadline first
(the simulator's queue discipline). Pure: the app pushes requests, pops the most urgent when an instance
frees up, and takes out those whose deadline has passed (escalation's last resort: refused with 503 +
Retry-After, as they would miss anyway and delay everyone behind them).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True, slots=True)
class _Entry(Generic[T]):
    deadline_s: float
    seq: int
    item: T = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class DeadlineQueue(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, deadline_s: float, item: T) -> _Entry[T]:
        entry = _Entry(deadline_s, next(self._seq), item)
        heapq.heappush(self._heap, entry)
        self._live += 1
        return entry

    def cancel(self, entry: _Entry[T]) -> None:
        """A waiting request its client abandoned."""
        if not entry.cancelled:
            entry.cancelled = True
            self._live -= 1

    def _skip_cancelled(self) -> None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)

    def peek(self) -> T | None:
        """The most urgent waiting request, left in place."""
        self._skip_cancelled()
        return self._heap[0].item if self._heap else None

    def pop(self) -> T | None:
        self._skip_cancelled()
        if not self._heap:
            return None
        self._live -= 1
        return heapq.heappop(self._heap).item

    def expired(self, now_s: float) -> list[T]:
        """Take out every request whose deadline is before `now_s`."""
        out: list[T] = []
        self._skip_cancelled()
        while self._heap and self._heap[0].deadline_s < now_s:
            out.append(heapq.heappop(self._heap).item)
            self._live -= 1
            self._skip_cancelled()
        return out
