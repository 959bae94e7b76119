"""Desired shape of a cluster: pools of engine instances, each instance a TP degree and an SM clock.

Pure data produced by the policy core (`controller.policy`) and consumed by the simulator
(`controller.sim.cluster`) and, later, by the orchestrator. Hardware unit: a DGX H100 server of 8 GPUs;
an instance occupies `tp` GPUs of ONE server (tensor parallelism over NVLink never spans servers), so the
server count is a bin packing of the instances, not simply GPUs / 8.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES

GPUS_PER_SERVER = 8
# TP degrees that tile an 8-GPU server exactly (powers of two dividing 8).
ALLOWED_TP = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """One engine instance: `tp` GPUs of one server running at SM clock `clock_mhz`."""

    tp: int
    clock_mhz: int

    def __post_init__(self) -> None:
        if self.tp not in ALLOWED_TP:
            raise InvalidArgumentError("tp", self.tp, ALLOWED_TP)
        if self.clock_mhz <= 0:
            raise InvalidArgumentError("clock_mhz", self.clock_mhz, "a positive SM clock in MHz")


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """A pool: the request classes it serves and its instances (possibly none while the pool is idle)."""

    name: str
    class_names: tuple[str, ...]
    instances: tuple[InstanceSpec, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgumentError("pool.name", self.name, "a non-empty name")
        if not self.class_names:
            raise InvalidArgumentError(f"pool {self.name}: class_names", self.class_names, CLASS_NAMES)
        for c in self.class_names:
            if c not in CLASS_NAMES:
                raise InvalidArgumentError(f"pool {self.name}: class_names", c, CLASS_NAMES)
        if len(set(self.class_names)) != len(self.class_names):
            raise InvalidArgumentError(f"pool {self.name}: class_names", self.class_names, "no duplicates")

    @property
    def gpus(self) -> int:
        return sum(i.tp for i in self.instances)

    def instance_counts(self) -> dict[InstanceSpec, int]:
        """How many instances of each (tp, clock); the compact form used in reports."""
        return dict(Counter(self.instances))


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    """All pools of the cluster. Each request class is served by at most one pool."""

    pools: tuple[PoolPlan, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise InvalidArgumentError("pools", names, "unique pool names")
        seen: set[str] = set()
        for p in self.pools:
            for c in p.class_names:
                if c in seen:
                    raise InvalidArgumentError("pools", c, "each request class in at most one pool")
                seen.add(c)

    @property
    def gpus(self) -> int:
        """GPUs used by instances."""
        return sum(p.gpus for p in self.pools)

    @property
    def instances(self) -> int:
        return sum(len(p.instances) for p in self.pools)

    @property
    def servers(self) -> int:
        """Servers needed to host every instance without splitting one across servers."""
        return len(pack_servers(self))

    @property
    def allocated_gpus(self) -> int:
        """GPUs of the allocated servers, used or not (idle ones still draw idle power)."""
        return self.servers * GPUS_PER_SERVER

    def pool_of_class(self) -> dict[str, str]:
        """Request class name -> name of the pool serving it."""
        return {c: p.name for p in self.pools for c in p.class_names}


def pack_servers(plan: ClusterPlan) -> list[list[tuple[str, int]]]:
    """Place instances on servers, largest first; each server lists (pool name, instance index in pool).

    Largest-first packing of power-of-two sizes that divide the server size leaves no gap except in the
    last server, so the count is optimal (= ceil(gpus / 8)); instances of different pools may share a
    server, as TP groups on one DGX are independent.
    """
    items = sorted(
        ((inst.tp, p.name, i) for p in plan.pools for i, inst in enumerate(p.instances)),
        key=lambda x: -x[0],
    )
    servers: list[list[tuple[str, int]]] = []
    free_in_last = 0
    for tp, pool, idx in items:
        # Sizes are decreasing powers of two dividing the server size, so every server but the last is full.
        if free_in_last < tp:
            servers.append([])
            free_in_last = GPUS_PER_SERVER
        servers[-1].append((pool, idx))
        free_in_last -= tp
    return servers
