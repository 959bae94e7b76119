"""The controller's event bus: decisions, commands and their results, routing tables, mode and node
changes, fanned out to every `WatchEvents` subscriber (dctl cluster watch, routers, dashboards).

A subscriber that reads slower than events come loses the oldest ones (its queue is bounded): a slow
watcher never slows the control loop or other watchers. The last routing table is kept so that a new
subscriber starts from it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from controller.model.fleet import RoutingTable

KINDS = ("decision", "command", "routes", "mode", "node")


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts_unix_ns: int
    kind: str
    summary: str
    detail_json: str
    routes: RoutingTable | None = None


class EventBus:
    def __init__(self, *, queue_size: int = 1024, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._seq = itertools.count(1)
        self._queue_size = queue_size
        self._clock_ns = clock_ns
        self.last_routes: Event | None = None

    def publish(
        self,
        kind: str,
        summary: str,
        detail: dict[str, Any] | None = None,
        routes: RoutingTable | None = None,
    ) -> None:
        event = Event(next(self._seq), self._clock_ns(), kind, summary, json.dumps(detail or {}), routes)
        if routes is not None:
            self.last_routes = event
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()  # drop the oldest for this slow subscriber
            queue.put_nowait(event)

    async def subscribe(self, kinds: frozenset[str]) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            if self.last_routes is not None and (not kinds or "routes" in kinds):
                yield self.last_routes
            while True:
                event = await queue.get()
                if not kinds or event.kind in kinds:
                    yield event
        finally:
            self._subscribers.discard(queue)
