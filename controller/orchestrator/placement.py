"""Placement of instances on 8-GPU nodes: which GPUs of which node an instance of TP t takes.

Where it sits: the executor (`controller.orchestrator.executor`) asks for a GPU set when it starts an
instance and gives it back when the instance is gone; the resulting `GpuSet` travels in the start
command, so the simulator's fleet and the live fleet put the instance on the same GPUs. Pure.

Rule: an instance takes `tp` aligned consecutive GPUs of one node (TP never spans nodes). Best fit: the
fullest node with room, else the lowest-numbered empty one, so instances pack onto as few nodes as the
plan allows and a node whose last instance leaves is free to be released. Best fit alone still leaves
holes as instances come and go; the executor's consolidation (`Executor.consolidate`) moves the
instances of a sparse node elsewhere when fewer nodes would hold them all (`nodes_needed`).
"""

from __future__ import annotations

from agent.api.errors import InvalidArgumentError
from controller.model.cluster import GPUS_PER_SERVER
from controller.model.fleet import GpuSet

_FULL = (1 << GPUS_PER_SERVER) - 1


class Placement:
    """Free GPUs per node as bit masks. `max_nodes` None: nodes are added as needed (a simulated
    cluster); else at most that many (a fleet of known nodes)."""

    def __init__(self, max_nodes: int | None = None) -> None:
        if max_nodes is not None and max_nodes < 0:
            raise InvalidArgumentError("max_nodes", max_nodes, "a count >= 0, or None")
        self._max_nodes = max_nodes
        self._free: list[int] = [] if max_nodes is None else [_FULL] * max_nodes
        self.gpus_held = 0
        # Nodes that take no new instance: drained by the operator, or unreachable (the live fleet).
        self.cordoned: frozenset[int] = frozenset()

    @property
    def nodes_held(self) -> int:
        return sum(1 for free in self._free if free != _FULL)

    def used_gpus(self, node: int) -> int:
        return GPUS_PER_SERVER - self._free[node].bit_count()

    def copy(self) -> Placement:
        twin = Placement(self._max_nodes)
        twin._free = list(self._free)
        twin.gpus_held = self.gpus_held
        twin.cordoned = self.cordoned
        return twin

    def allocate(self, tp: int, avoid_node: int | None = None, held_only: bool = False) -> GpuSet | None:
        """The GPUs for an instance of TP `tp`, taken; None when no node has room. `avoid_node`: a node
        not to use (the one being emptied); `held_only`: only nodes already in use (consolidation never
        opens a node to empty another)."""
        if tp not in (1, 2, 4, 8) or tp > GPUS_PER_SERVER:
            raise InvalidArgumentError("tp", tp, "1, 2, 4 or 8")
        block = (1 << tp) - 1
        best: tuple[int, int, int] | None = None  # (free GPUs, node, offset)
        for k, free in enumerate(self._free):
            if free == _FULL or k == avoid_node or k in self.cordoned:
                continue
            for offset in range(0, GPUS_PER_SERVER, tp):
                if (free >> offset) & block == block:
                    n_free = free.bit_count()
                    if best is None or n_free < best[0]:
                        best = (n_free, k, offset)
                    break
        if best is None and held_only:
            return None
        if best is None:
            empty = next(
                (
                    k
                    for k, free in enumerate(self._free)
                    if free == _FULL and k != avoid_node and k not in self.cordoned
                ),
                None,
            )
            if empty is None:
                if self._max_nodes is not None:
                    return None
                self._free.append(_FULL)
                empty = len(self._free) - 1
            best = (GPUS_PER_SERVER, empty, 0)
        _, k, offset = best
        self._free[k] &= ~(block << offset)
        self.gpus_held += tp
        return GpuSet(node=k, first_gpu=offset, count=tp)

    def release(self, gpus: GpuSet) -> None:
        mask = ((1 << gpus.count) - 1) << gpus.first_gpu
        if self._free[gpus.node] & mask:
            raise InvalidArgumentError("gpus", gpus, "a GPU set this placement handed out")
        self._free[gpus.node] |= mask
        self.gpus_held -= gpus.count


def nodes_needed(tps: list[int]) -> int:
    """The fewest 8-GPU nodes that hold instances of these TP degrees: largest first, each into the
    fullest node with room (exact for power-of-two sizes dividing the node)."""
    free: list[int] = []
    for tp in sorted(tps, reverse=True):
        fits = [k for k, f in enumerate(free) if f >= tp]
        if fits:
            k = min(fits, key=lambda k: free[k])
            free[k] -= tp
        else:
            free.append(GPUS_PER_SERVER - tp)
    return len(free)
