"""The ONE instance model: per pool, each (TP, clock)'s SLO-meeting capacity for the pool's class mix and
its power at the load it will carry. Used by the policies (clock choice, pool sizing), by the
reconfiguration planner (`controller.orchestrator.InstanceModel`: what a change adds or saves) and by
the routing table (routing weights), so deciding, planning and routing price an instance alike.

Power: capacity-weighted routing (`controller.policy.routing`) loads every instance of a pool to the same
fraction of its capacity, so an instance of spec s in a pool with load L and desired instances D draws
P_s(u x cap_s) with u = min(1, L / sum_{d in D} cap_d). Pure; the capacity tables come from the profile
(`capacity.pool_capacities`) through a memo the policy object owns (`CapacityCache`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec
from controller.model.profile import Profile
from controller.policy.capacity import ClassFits, ConfigCapacity, class_fits, pool_capacities

# Distinct (profile, pool mix) capacity tables a cache keeps: the instance level asks for the same mix
# every few seconds within a pool period; a week of pool periods times a few pools stays far below.
_CAPACITY_CACHE_SIZE = 256


class CapacityCache:
    """Memo of `pool_capacities` per (profile, class shares, capacity scales), least recently used
    dropped, and of the last profile's per-class fits the tables are derived from (the shares the
    instance level observes change every tick; the fits do not). Owned by one policy object (or
    cycle); the answer never depends on what is cached."""

    def __init__(self, size: int = _CAPACITY_CACHE_SIZE) -> None:
        self._size = size
        self._tables: OrderedDict[
            tuple[int, tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]],
            tuple[Profile, tuple[ConfigCapacity, ...]],
        ]
        self._tables = OrderedDict()
        self._fits: tuple[Profile, ClassFits] | None = None

    # The live controller pickles its cycle (this cache included) into every snapshot: the cache travels
    # empty (it is keyed by the profile's id, which a restored profile does not keep anyway).
    def __getstate__(self) -> int:
        return self._size

    def __setstate__(self, size: int) -> None:
        self.__init__(size)  # type: ignore[misc]

    def capacities(
        self, profile: Profile, class_shares: Mapping[str, float], scales: Mapping[str, float] | None = None
    ) -> tuple[ConfigCapacity, ...]:
        """`pool_capacities(profile, class_shares, scales)`, memoised."""
        key = (id(profile), tuple(sorted(class_shares.items())), tuple(sorted((scales or {}).items())))
        hit = self._tables.get(key)
        if hit is not None and hit[0] is profile:
            self._tables.move_to_end(key)
            return hit[1]
        if self._fits is None or self._fits[0] is not profile:
            self._fits = (profile, class_fits(profile))
        caps = pool_capacities(profile, class_shares, scales, self._fits[1])
        self._tables[key] = (profile, caps)
        if len(self._tables) > self._size:
            self._tables.popitem(last=False)
        return caps


def class_shares(class_names: Sequence[str], rates_rps: Sequence[float]) -> dict[str, float]:
    """The rates (CLASS_NAMES order) of the named classes, by name."""
    return {c: rates_rps[CLASS_NAMES.index(c)] for c in class_names}


def served_shares(
    class_names: Sequence[str], rates_rps: Sequence[float], served_mix: Sequence[Sequence[float]]
) -> dict[str, float]:
    """The rates of the TRUE classes a pool routed `class_names` carries: each routed class's rate
    spread over the classes its requests turned out to be (`served_mix`, `ClusterObs.served_mix`;
    empty: as routed)."""
    if not served_mix:
        return class_shares(class_names, rates_rps)
    out: dict[str, float] = {}
    for c in class_names:
        r = CLASS_NAMES.index(c)
        for t, share in enumerate(served_mix[r]):
            if share > 0.0:
                out[CLASS_NAMES[t]] = out.get(CLASS_NAMES[t], 0.0) + rates_rps[r] * share
    return out


@dataclass(frozen=True, slots=True)
class PoolInstanceModel:
    """`controller.orchestrator.InstanceModel`: capacity and power of each spec in each pool (module
    docstring). Pools absent from the plan it was built for have no capacity (nothing routes there)."""

    capacities: Mapping[str, Mapping[InstanceSpec, ConfigCapacity]]
    utilisation: Mapping[str, float]

    def capacity_rps(self, pool: str, spec: InstanceSpec) -> float:
        cap = self.capacities.get(pool, {}).get(spec)
        return 0.0 if cap is None else cap.max_load_rps

    def power_w(self, pool: str, spec: InstanceSpec) -> float:
        cap = self.capacities.get(pool, {}).get(spec)
        if cap is None:
            return 0.0
        return cap.power_w(self.utilisation.get(pool, 0.0) * cap.max_load_rps)


def instance_model(
    profile: Profile,
    plan: ClusterPlan,
    class_rates_rps: Sequence[float],
    cache: CapacityCache | None = None,
) -> PoolInstanceModel:
    """The model for `plan` (the desired state) with the classes' current rates (CLASS_NAMES order)."""
    if len(class_rates_rps) != len(CLASS_NAMES):
        raise InvalidArgumentError("class_rates_rps", len(class_rates_rps), f"{len(CLASS_NAMES)} classes")
    memo = cache if cache is not None else CapacityCache(size=len(plan.pools) or 1)
    capacities: dict[str, dict[InstanceSpec, ConfigCapacity]] = {}
    utilisation: dict[str, float] = {}
    for pool in plan.pools:
        shares = class_shares(pool.class_names, class_rates_rps)
        table = {c.spec: c for c in memo.capacities(profile, shares)}
        capacities[pool.name] = table
        total_rps = sum(table[s].max_load_rps for s in pool.instances if s in table)
        utilisation[pool.name] = min(1.0, sum(shares.values()) / total_rps) if total_rps > 0 else 0.0
    return PoolInstanceModel(capacities=capacities, utilisation=utilisation)
