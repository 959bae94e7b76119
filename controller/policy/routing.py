"""The routing table: which instances serve each request class, and which to try when those cannot.

Where it sits: `controller.control.ControlCycle` rebuilds it whenever instances change (started, ready,
draining, clock) and hands it to the fleet's router (the simulator's `SimFleet`, later
`dynamollm-router`), which picks per request the instance with the least outstanding work x weight.

Rule: a class goes to the ACTIVE instances of the pool the plan gives it; when none of them can take a
request, to those of LARGER pools (a pool ranks by the largest class it serves: a larger pool serves
longer requests), nearest first; when neither has an instance, to any active instance. A class the plan
does not place ranks as itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.model.classes import CLASS_NAMES, REQUEST_CLASSES
from controller.model.cluster import ClusterPlan
from controller.model.fleet import RoutingTable


def pool_rank(plan: ClusterPlan) -> dict[str, int]:
    """Pools ordered by the largest class they serve."""
    return {p.name: max(CLASS_NAMES.index(c) for c in p.class_names) for p in plan.pools}


def routing_table(version: int, plan: ClusterPlan, active: Sequence[tuple[int, str, float]]) -> RoutingTable:
    """The table for `plan` over the `active` instances, given as (instance id, pool, routing weight)."""
    by_pool: dict[str, list[tuple[int, float]]] = {}
    for iid, pool, weight in active:
        by_pool.setdefault(pool, []).append((iid, weight))
    rank = pool_rank(plan)
    pool_of = plan.pool_of_class()
    primary: list[tuple[tuple[int, float], ...]] = []
    fallback: list[tuple[tuple[int, float], ...]] = []
    for c in REQUEST_CLASSES:
        own = pool_of.get(c.name)
        own_rank = rank[own] if own is not None else c.index
        mine = tuple(by_pool.get(own, ())) if own is not None else ()
        larger = sorted((r, name) for name, r in rank.items() if r >= own_rank and name != own)
        others = tuple(x for _, name in larger for x in by_pool.get(name, ()))
        if not others and not mine:
            others = tuple((i, w) for i, _, w in active)
        primary.append(mine)
        fallback.append(others)
    return RoutingTable(version=version, primary=tuple(primary), fallback=tuple(fallback))
