"""The executor state machine: from the planner's timed actions to fleet commands, and back from fleet
events to the next commands. Pure (time is an argument, no I/O), owned by `controller.control.ControlCycle`.

Instances: each has an id (assigned here, never reused), a pool, a spec, a phase and, while it holds
them, a `GpuSet` (`controller.orchestrator.placement`). Phases: STARTING (GPUs held, loading, serving
nothing) -> ACTIVE (serving) -> DRAINING (admits nothing, finishes its requests) -> gone once the fleet
reports it idle (its GPUs are free from that moment).

Actions (`controller.orchestrator.plan.Action`) of one plan form a generation. A new plan supersedes
the previous generation's actions not yet due and its starts still waiting for GPUs. Per kind:
- start: a new STARTING instance on free GPUs (`StartInstance`, ready after the start time); with no
  GPUs free within the budget it waits, and is retried whenever GPUs are freed, in order;
- stop: a STARTING instance is aborted at once (`AbortStart`); an ACTIVE one drains (`DrainInstance`);
- clock: the new clock (`SetClock`, with the engine stall of the change);
- retp (TP change): the old instance drains; its successor, a new instance with the new TP, starts
  when the old one is idle (restart path: vLLM cannot re-shard a live engine, so the GPUs must be free)
  or at once beside it (the GPU-to-GPU fast path, a simulator option), taking the re-shard time.
A `reconfiguration_free` policy (the oracle) gets every change at once: starts are ACTIVE immediately.

Consolidation (`consolidate`, server packing): instances come and go, and best-fit placement alone
leaves them spread over more nodes than they need; each held node costs its rental and the idle power
of its unused GPUs. When the fleet is settled (no action pending, nothing starting, draining or waiting
for GPUs) and its instances would fit on fewer nodes (`placement.nodes_needed`), the instances of the
sparsest node that can be emptied each get a twin (same pool and spec) on the other nodes; each old
instance drains once its twin is ready, so no capacity is missing meanwhile. A move costs a warm start
of the moved GPUs (~60 s of their idle power); it frees a node for the rest of the plan's life. The
moves are counted as the starts and stops they are. A plan arriving meanwhile may stop either of a
pair like any other instance.
Every action carried out is counted by kind (`executed`; a start when it is issued, even if it waits
for GPUs); one that finds its instance gone or draining does nothing and is not counted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from controller.model.cluster import InstanceSpec
from controller.model.fleet import (
    AbortStart,
    Command,
    DrainInstance,
    FleetEvent,
    GpuSet,
    InstanceIdle,
    InstanceReady,
    SetClock,
    StartInstance,
)
from controller.model.state import InstanceObs, Phase
from controller.orchestrator.placement import Placement, nodes_needed
from controller.orchestrator.plan import Action, ActionKind, ReconfigCosts


@dataclass(slots=True)
class InstanceRecord:
    """The executor's knowledge of one instance (mutable: the executor is its only writer)."""

    instance_id: int
    pool: str
    spec: InstanceSpec
    phase: Phase
    changed_s: float  # last start, change of clock/phase: the planner's dwell time counts from here
    gpus: GpuSet | None = None
    successor: int | None = None  # restart-path TP change: started when this one is idle
    replaces: int | None = None  # consolidation twin: the instance that drains once this one is ready


class Executor:
    """See the module docstring. `gpu_budget`: GPUs the instances may hold at once."""

    def __init__(self, costs: ReconfigCosts, *, gpu_budget: int, free: bool, placement: Placement) -> None:
        self.costs = costs
        self.gpu_budget = gpu_budget
        self.free = free
        self.placement = placement
        self.instances: dict[int, InstanceRecord] = {}
        self.executed: Counter[ActionKind] = Counter()
        self.generation = 0
        self._next_id = 0
        self._pending: list[Action] = []  # this generation's actions not yet due, by time
        self._waiting_starts: list[Action] = []  # this generation's starts waiting for GPUs

    # ------------------------------------------------------------------ views
    def observed(
        self, load_rps: dict[int, float], queues: dict[int, tuple[int, int]]
    ) -> tuple[InstanceObs, ...]:
        """The instances as the policy and the planner see them, by id."""
        return tuple(
            InstanceObs(
                instance_id=r.instance_id,
                pool=r.pool,
                spec=r.spec,
                phase=r.phase,
                load_rps=load_rps.get(r.instance_id, 0.0),
                waiting=queues.get(r.instance_id, (0, 0))[0],
                running=queues.get(r.instance_id, (0, 0))[1],
            )
            for r in sorted(self.instances.values(), key=lambda r: r.instance_id)
        )

    def changed_at_s(self) -> dict[int, float]:
        return {i: r.changed_s for i, r in self.instances.items()}

    def next_due_s(self) -> float:
        """When the earliest pending action falls due (inf: none)."""
        return self._pending[0].not_before_s if self._pending else math.inf

    # ------------------------------------------------------------------ inputs
    def initial(self, pool: str, spec: InstanceSpec, now_s: float) -> StartInstance:
        """An instance of the initial plan: up and serving at `now_s` (a warm cluster)."""
        record = self._new(pool, spec, Phase.ACTIVE, now_s)
        gpus = self.placement.allocate(spec.tp)
        assert gpus is not None  # an unbounded placement always has room
        record.gpus = gpus
        return StartInstance(record.instance_id, pool, spec, gpus, now_s, 0.0)

    def apply(self, actions: list[Action], now_s: float) -> list[Command]:
        """A new plan's actions: the previous generation's pending ones are superseded."""
        self.generation += 1
        self._waiting_starts.clear()
        due: list[Action] = []
        later: list[Action] = []
        for action in actions:
            (due if self.free or action.not_before_s <= now_s else later).append(action)
        self._pending = sorted(later, key=lambda a: a.not_before_s)
        commands: list[Command] = []
        for action in due:
            commands += self._execute(action, now_s)
        return commands

    def due(self, now_s: float) -> list[Command]:
        """The pending actions whose time has come, carried out at their own times."""
        commands: list[Command] = []
        while self._pending and self._pending[0].not_before_s <= now_s:
            action = self._pending.pop(0)
            commands += self._execute(action, action.not_before_s)
        return commands

    def on_event(self, event: FleetEvent) -> list[Command]:
        record = self.instances.get(event.instance_id)
        if record is None:
            return []
        if isinstance(event, InstanceReady):
            if record.phase is Phase.STARTING:
                record.phase = Phase.ACTIVE
                record.changed_s = event.at_s
            moved = self.instances.get(record.replaces) if record.replaces is not None else None
            record.replaces = None
            if moved is not None and moved.phase is Phase.ACTIVE:
                self.executed["stop"] += 1
                return self._stop(moved, event.at_s)
            return []
        assert isinstance(event, InstanceIdle)
        return self._gone(record, event.at_s)

    def set_clock(self, instance_id: int, clock_mhz: int, now_s: float) -> SetClock:
        """The instance level's clock for an ACTIVE instance."""
        record = self.instances[instance_id]
        record.spec = InstanceSpec(record.spec.tp, clock_mhz)
        return SetClock(instance_id, clock_mhz, now_s, 0.0 if self.free else self.costs.clock_change_s)

    def consolidate(self, now_s: float) -> list[Command]:
        """Twins for the instances of the sparsest node that can be emptied, when the settled fleet
        would fit on fewer nodes (module docstring); nothing otherwise."""
        records = list(self.instances.values())
        unsettled = any(
            r.phase is not Phase.ACTIVE or r.successor is not None or r.replaces is not None or r.gpus is None
            for r in records
        )
        if self.free or unsettled or self._pending or self._waiting_starts:
            return []
        if self.placement.nodes_held <= nodes_needed([r.spec.tp for r in records]):
            return []
        by_node: dict[int, list[InstanceRecord]] = {}
        for r in records:
            assert r.gpus is not None
            by_node.setdefault(r.gpus.node, []).append(r)
        for node in sorted(by_node, key=lambda k: (self.placement.used_gpus(k), k)):
            movers = sorted(by_node[node], key=lambda r: (-r.spec.tp, r.instance_id))
            if self.placement.gpus_held + sum(r.spec.tp for r in movers) > self.gpu_budget:
                continue
            trial = self.placement.copy()
            if any(trial.allocate(r.spec.tp, avoid_node=node, held_only=True) is None for r in movers):
                continue
            commands: list[Command] = []
            for old in movers:
                commands += self._twin(old, now_s, avoid_node=node, held_only=True)
            return commands
        return []

    def set_cordoned(self, cordoned: frozenset[int], lost: frozenset[int], now_s: float) -> list[Command]:
        """Nodes that take no new instance (`cordoned`), of which `lost` stopped answering. A lost node's
        instances are gone at once (the agent's lease returns its GPUs to their defaults; the fleet
        stops its engines if it comes back) and start again elsewhere where there is room; a drained
        node's ACTIVE instances each get a twin elsewhere and drain once it is ready (as consolidation
        moves them), its STARTING ones start again elsewhere."""
        self.placement.cordoned = cordoned
        commands: list[Command] = []
        for record in sorted(self.instances.values(), key=lambda r: r.instance_id):
            if (
                record.gpus is None
                or record.gpus.node not in cordoned
                or record.instance_id not in self.instances
            ):
                continue
            if record.gpus.node in lost:
                commands += self._lose(record, now_s)
            elif record.phase is Phase.STARTING:
                commands += self._stop(record, now_s)
                self.executed["start"] += 1
                commands += self._start_or_wait(record.pool, record.spec, now_s, self.costs.start_s)
            elif record.phase is Phase.ACTIVE and not self._has_twin(record.instance_id):
                commands += self._twin(record, now_s)
        return commands

    def _lose(self, record: InstanceRecord, now_s: float) -> list[Command]:
        """`record`'s node stopped answering: it is gone; what it stood for starts again elsewhere. A twin
        under way replaces it (no second start); a lost twin is made anew for the instance it was to
        replace, which keeps serving meanwhile."""
        twin = next((r for r in self.instances.values() if r.replaces == record.instance_id), None)
        original = self.instances.get(record.replaces) if record.replaces is not None else None
        commands = self._gone(record, now_s)
        if record.phase is Phase.DRAINING:
            return commands
        if twin is not None:
            twin.replaces = None  # what it was to replace is gone: it simply serves once ready
            return commands
        if original is not None and original.phase is Phase.ACTIVE:
            return commands + self._twin(original, now_s)
        self.executed["start"] += 1
        return commands + self._start_or_wait(record.pool, record.spec, now_s, self.costs.start_s)

    def _has_twin(self, instance_id: int) -> bool:
        return any(r.replaces == instance_id for r in self.instances.values())

    def _twin(
        self, old: InstanceRecord, now_s: float, *, avoid_node: int | None = None, held_only: bool = False
    ) -> list[Command]:
        """A twin of `old` on another node (`old` drains once it is ready); nothing without room."""
        if self.placement.gpus_held + old.spec.tp > self.gpu_budget:
            return []
        gpus = self.placement.allocate(old.spec.tp, avoid_node, held_only)
        if gpus is None:
            return []
        twin = self._new(old.pool, old.spec, Phase.STARTING, now_s)
        twin.gpus, twin.replaces = gpus, old.instance_id
        self.executed["start"] += 1
        return [StartInstance(twin.instance_id, old.pool, old.spec, gpus, now_s, self.costs.start_s)]

    # ------------------------------------------------------------------ actions
    def _execute(self, action: Action, t_s: float) -> list[Command]:
        if action.kind == "start":
            self.executed["start"] += 1
            return self._start_or_wait(action.pool, action.spec, t_s, action.duration_s)
        assert action.instance_id is not None
        record = self.instances.get(action.instance_id)
        if record is None or record.phase is Phase.DRAINING:
            return []  # gone meanwhile: nothing to do
        self.executed[action.kind] += 1
        if action.kind == "stop":
            return self._stop(record, t_s)
        if action.kind == "clock":
            record.spec = action.spec
            record.changed_s = t_s
            stall_s = 0.0 if self.free else action.duration_s
            return [SetClock(record.instance_id, action.spec.clock_mhz, t_s, stall_s)]
        return self._retp(record, action.spec, t_s)

    def _start(self, pool: str, spec: InstanceSpec, t_s: float, load_s: float) -> list[Command] | None:
        """A new instance on free GPUs, or None when the budget or the nodes have no room."""
        if self.placement.gpus_held + spec.tp > self.gpu_budget:
            return None
        gpus = self.placement.allocate(spec.tp)
        if gpus is None:
            return None
        instant = self.free or load_s <= 0.0
        record = self._new(pool, spec, Phase.ACTIVE if instant else Phase.STARTING, t_s)
        record.gpus = gpus
        return [StartInstance(record.instance_id, pool, spec, gpus, t_s, 0.0 if instant else load_s)]

    def _start_or_wait(self, pool: str, spec: InstanceSpec, t_s: float, load_s: float) -> list[Command]:
        """A start now, or, with no GPUs free, one queued until GPUs are freed (in order)."""
        commands = self._start(pool, spec, t_s, load_s)
        if commands is None:
            self._waiting_starts.append(Action("start", pool, None, spec, t_s, load_s, 0.0))
            return []
        return commands

    def _stop(self, record: InstanceRecord, t_s: float) -> list[Command]:
        if record.phase is Phase.STARTING:
            commands: list[Command] = [AbortStart(record.instance_id, t_s)]
            return commands + self._gone(record, t_s)
        record.phase = Phase.DRAINING
        record.changed_s = t_s
        return [DrainInstance(record.instance_id, t_s)]

    def _retp(self, record: InstanceRecord, spec: InstanceSpec, t_s: float) -> list[Command]:
        if record.phase is Phase.STARTING:
            return self._stop(record, t_s) + self._start_or_wait(record.pool, spec, t_s, self.costs.start_s)
        commands = self._stop(record, t_s)
        if self.free or self.costs.fast_reshard:
            return commands + self._start_or_wait(record.pool, spec, t_s, self.costs.reshard_s)
        successor = self._new(record.pool, spec, Phase.STARTING, t_s)
        record.successor = successor.instance_id
        return commands

    def _gone(self, record: InstanceRecord, t_s: float) -> list[Command]:
        """The instance left at `t_s`: its GPUs are free; its successor and waiting starts may go."""
        if record.gpus is not None:
            self.placement.release(record.gpus)
        del self.instances[record.instance_id]
        commands: list[Command] = []
        successor = self.instances.get(record.successor) if record.successor is not None else None
        if successor is not None and successor.phase is Phase.STARTING and successor.gpus is None:
            del self.instances[successor.instance_id]
            started = self._restart(successor, t_s)
            commands += started
        while self._waiting_starts:
            started_or_none = self._start(
                self._waiting_starts[0].pool,
                self._waiting_starts[0].spec,
                t_s,
                self._waiting_starts[0].duration_s,
            )
            if started_or_none is None:
                break
            self._waiting_starts.pop(0)
            self.executed["start"] += 1
            commands += started_or_none
        return commands

    def _restart(self, successor: InstanceRecord, t_s: float) -> list[Command]:
        """A restart-path TP successor, now that its predecessor's GPUs are free."""
        gpus = self.placement.allocate(successor.spec.tp)
        if gpus is None:
            return []
        successor.gpus = gpus
        successor.changed_s = t_s
        self.instances[successor.instance_id] = successor
        load_s = self.costs.reshard_s
        return [StartInstance(successor.instance_id, successor.pool, successor.spec, gpus, t_s, load_s)]

    def _new(self, pool: str, spec: InstanceSpec, phase: Phase, t_s: float) -> InstanceRecord:
        record = InstanceRecord(self._next_id, pool, spec, phase, t_s)
        self._next_id += 1
        self.instances[record.instance_id] = record
        return record
