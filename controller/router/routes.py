"""Where requests go: the controller's routing table as the router holds it, and the choice of an
instance for one request. Pure (no I/O): the app feeds it tables and in-flight counts.

Rule (the simulator's `SimFleet` routes the same way): among the class's primary instances (its pool)
that can take one more request, the one with the least outstanding tokens x weight (weight = 1 /
SLO-meeting capacity, so instances fill in proportion to their capacity); if none can, the same over
the fallback instances (larger pools); if none of those either, the request waits in its pool's queue.
An instance can take a request while it has fewer than `max_inflight` requests in flight (the router's
view of the engine's batch: beyond it a request would only wait inside the engine, where the router can
no longer move it or judge its deadline).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.api.v1 import admin_pb2


@dataclass(frozen=True, slots=True)
class Endpoint:
    instance_id: int
    node: str
    url: str  # http://host:port
    weight_s: float


@dataclass(frozen=True, slots=True)
class ClassRoute:
    pool: str  # the pool the class's primary instances belong to ("" when it has none)
    primary: tuple[Endpoint, ...]
    fallback: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Routes:
    version: int
    by_class: dict[str, ClassRoute] = field(default_factory=dict)

    @staticmethod
    def from_pb(table: admin_pb2.RoutingTable) -> Routes:
        """The table as the controller published it; endpoints whose engine port is not known yet are
        left out."""

        def endpoints(items: Iterable[admin_pb2.RouteEndpoint]) -> tuple[Endpoint, ...]:
            return tuple(
                Endpoint(e.instance_id, e.node, f"http://{e.host}:{e.http_port}", e.weight_s)
                for e in items
                if e.http_port and e.host
            )

        by_class = {}
        for route in table.classes:
            pool = route.pool or route.class_name
            by_class[route.class_name] = ClassRoute(pool, endpoints(route.primary), endpoints(route.fallback))
        return Routes(table.version, by_class)


class Load:
    """Per instance: requests in flight and their outstanding tokens (prompt + answer still to come)."""

    def __init__(self) -> None:
        self.inflight: dict[int, int] = {}
        self.tokens: dict[int, int] = {}

    def add(self, instance_id: int, tokens: int) -> None:
        self.inflight[instance_id] = self.inflight.get(instance_id, 0) + 1
        self.tokens[instance_id] = self.tokens.get(instance_id, 0) + tokens

    def done(self, instance_id: int, tokens: int) -> None:
        self.inflight[instance_id] = max(0, self.inflight.get(instance_id, 0) - 1)
        self.tokens[instance_id] = max(0, self.tokens.get(instance_id, 0) - tokens)


def choose(route: ClassRoute, load: Load, tokens: int, max_inflight: int) -> Endpoint | None:
    """The instance for a request of `tokens` (module docstring), or None when it must wait."""
    for candidates in (route.primary, route.fallback):
        free = [e for e in candidates if load.inflight.get(e.instance_id, 0) < max_inflight]
        if free:
            return min(
                free, key=lambda e: ((load.tokens.get(e.instance_id, 0) + tokens) * e.weight_s, e.instance_id)
            )
    return None
