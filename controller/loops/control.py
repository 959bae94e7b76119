"""`ControlLoop`: the control cycle on the wall clock, its commands carried out through the fleet.

Where it sits: `controller.app` builds it from the settings and the store; it owns the `ControlCycle`
(pure) and the `DesiredState`, and is the fleet's listener. Its task wakes at the cycle's next tick or
action, or when the fleet reports something, and per step:

1. folds in what the fleet reported: instances ready or idle (apply mode: from the agents; observe mode:
   from the cycle's own model of start and drain times, since nothing is started), nodes lost or back,
   nodes drained by the operator;
2. runs the due actions, and the tick when its time has come: the tick runs at its grid time (the
   cycle's `next_tick_s`; ticks missed behind a long solve are caught up one by one, a controller more
   than a minute behind steps once at the latest grid point), with the traffic reported up to it, in a
   worker thread (the pool MILP must not stall the event loop);
3. hands every command a generation from the store, folds it into the desired state, and commits the
   decisions, the commands and the snapshot of (cycle, desired state) in ONE transaction before anything
   is sent (write-ahead: killed at any point, the controller restarts from a state whose every command
   is either not yet issued or recorded with the generation it will be retried with);
4. wakes the fleet (apply mode), publishes events, updates metrics.

Time: the cycle's clock is `(wall - origin) x time_scale` seconds; the origin is kept in the store, so
a restarted controller continues the same timeline (a late tick steps once and keeps the grid). A new
store's origin may lie ahead (`control.origin_unix_s`): the first plan starts at once, at negative cycle
time, and the first tick comes at the origin plus one instance period.
Modes: observe decides and records (commands stored as skipped), apply acts, paused runs no step at all
(the fleet still renews leases); switching is audited in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import pickle
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from agent.api.clock import Clock
from agent.api.errors import InvalidArgumentError
from controller.control.cycle import ControlCycle, TickResult
from controller.fleet.desired import DesiredState
from controller.fleet.grpc_fleet import GrpcFleet
from controller.loops.events import EventBus
from controller.loops.traffic import TrafficBuffer
from controller.metrics import RECONFIGURATION_KINDS, ControllerMetrics
from controller.model.cluster import InstanceSpec
from controller.model.decisions import ClockDecision, Decision, StepRecord
from controller.model.fleet import (
    AbortStart,
    Command,
    DrainInstance,
    FleetEvent,
    FleetView,
    InstanceIdle,
    InstanceReady,
    MoveWaiting,
    RejectPastDeadline,
    RoutingTable,
    SetClock,
    StartInstance,
)
from controller.store import EnergyRow, NewCommand, NewDecision, Store, TrafficRow

log = structlog.get_logger("controller.loops")

MODES = ("observe", "apply", "paused")
SNAPSHOT_FORMAT = 1
MAX_CATCH_UP_TICKS = 12  # one minute of 5-s ticks
MAX_TIMED_COMMANDS = 10_000  # reconfigurations awaiting confirmation whose duration is still timed
COMMAND_KINDS: dict[type, str] = {
    StartInstance: "start",
    DrainInstance: "drain",
    AbortStart: "abort",
    SetClock: "set_clock",
    RejectPastDeadline: "reject",
    MoveWaiting: "move",
}


@dataclass(frozen=True, slots=True)
class LoopSettings:
    node_names: tuple[str, ...]
    code_version: str
    time_scale: float = 1.0
    snapshot_interval_s: float = 30.0  # wall seconds between snapshots when nothing else is committed
    ledger_interval_s: float = 60.0  # wall seconds per energy-ledger interval


def snapshot_version(code_version: str) -> str:
    return f"{code_version}/{SNAPSHOT_FORMAT}"


class ControlLoop:
    """See the module docstring. Also the fleet's `FleetListener`."""

    def __init__(
        self,
        cycle: ControlCycle,
        desired: DesiredState,
        store: Store,
        settings: LoopSettings,
        *,
        origin_unix_s: float,
        clock: Clock,
        metrics: ControllerMetrics,
        events: EventBus,
    ) -> None:
        self.cycle = cycle
        self.desired = desired
        self.store = store
        self.settings = settings
        self.origin_unix_s = origin_unix_s
        self.clock = clock
        self.metrics = metrics
        self.events = events
        self.fleet: GrpcFleet | None = None
        self.traffic = TrafficBuffer()
        self.mode = store.mode()
        self.routes: RoutingTable | None = None
        self.last_decision_unix_ns = 0
        self._wake = asyncio.Event()
        self._events: list[FleetEvent] = []
        self._forget: list[tuple[int, str]] = []
        # (at_s, seq, event) heap: observe mode's modelled effects, and readiness held to its modelled time
        self._shadow: list[tuple[float, int, FleetEvent]] = []
        self._shadow_seq = 0
        self._lost: set[int] = set()
        self._drained: set[int] = set(json.loads(store.get_meta("drained_nodes") or "[]"))
        self._nodes_applied: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())
        self._energy_j: defaultdict[tuple[int, str], float] = defaultdict(float)
        self._ledger_traffic: Counter[tuple[str, str, str]] = Counter()  # (pool, class, what)
        self._ledger_start_unix_s = clock.wall_ns() / 1e9
        # reconfiguration commands sent to the agents: generation -> (kind, when issued, monotonic s)
        self._issued: dict[int, tuple[str, float]] = {}
        self._last_snapshot_s = -math.inf
        metrics.set_mode(self.mode)

    # ------------------------------------------------------------------ time
    def now_s(self) -> float:
        return (self.clock.wall_ns() / 1e9 - self.origin_unix_s) * self.settings.time_scale

    def cycle_time_of(self, unix_s: float) -> float:
        return (unix_s - self.origin_unix_s) * self.settings.time_scale

    def _wall_delay_s(self, cycle_s: float) -> float:
        return max(0.0, (cycle_s - self.now_s()) / self.settings.time_scale)

    # ------------------------------------------------------------------ FleetListener
    def instance_ready(self, instance_id: int) -> None:
        """An engine answers: the instance serves from now, or from the end of its modelled start if
        that is later (the cycle planned with that time: taking it earlier would make the plan's
        timing, and so its decisions, depend on how fast a host happened to start a process)."""
        now = self.now_s()
        target = self.desired.engine(instance_id)
        at = max(now, target.ready_not_before_s) if target is not None else now
        if at > now:
            self._schedule(at, InstanceReady(instance_id, at))
        else:
            self._events.append(InstanceReady(instance_id, now))
        self._wake.set()

    def instance_idle(self, node: int, engine_id: str, instance_id: int) -> None:
        self._events.append(InstanceIdle(instance_id, self.now_s()))
        self._forget.append((node, engine_id))
        self._wake.set()

    def node_state(self, node: int, available: bool) -> None:
        (self._lost.discard if available else self._lost.add)(node)
        name = self.settings.node_names[node]
        self.events.publish("node", f"node {name} {'ready' if available else 'unavailable'}", {"node": name})
        self._wake.set()

    def command_result(self, command_key: int, status: str, result: str) -> None:
        kind = self.store.finish_command_by_generation(command_key, status, result)
        issued = self._issued.pop(command_key, None)
        if issued is not None and status == "done":
            self.metrics.reconfiguration_duration.labels(issued[0]).observe(
                self.clock.monotonic_s() - issued[1]
            )
        if kind:
            self.metrics.commands.labels(kind, status).inc()
            self.events.publish("command", f"{kind} #{command_key} {status}", {"generation": command_key})

    def command_attempt(self, command_key: int, result: str) -> None:
        self.store.note_attempt_by_generation(command_key, result)

    def next_generation(self, at_least: int) -> int:
        return self.store.next_generations(1, at_least=at_least)[0]

    def energy(self, node: int, pool: str, energy_j: float) -> None:
        self._energy_j[(node, pool)] += energy_j
        self.metrics.pool_energy.labels(pool or "idle").inc(energy_j)

    # ------------------------------------------------------------------ modes and nodes
    def set_mode(self, mode: str, *, caller: str, reason: str) -> str:
        if mode not in MODES:
            raise InvalidArgumentError("mode", mode, MODES)
        previous = self.store.set_mode(mode, caller=caller, reason=reason)
        if previous == mode:
            return previous
        if previous == "apply":
            # Nothing confirms starts and drains in flight any more: the cycle's model does, at once.
            self._shadow_in_flight()
        self.mode = mode
        self.metrics.set_mode(mode)
        if self.fleet is not None:
            self.fleet.set_apply(mode == "apply")
        if mode == "apply":
            self._shadow = [e for e in self._shadow if isinstance(e[2], InstanceReady)]
            heapq.heapify(self._shadow)
        log.info("mode_changed", previous=previous, mode=mode, caller=caller, reason=reason)
        self.events.publish(
            "mode", f"mode {previous} -> {mode} by {caller}", {"mode": mode, "reason": reason}
        )
        self._wake.set()
        return previous

    def drain_node(self, node: int, undrain: bool) -> bool:
        (self._drained.discard if undrain else self._drained.add)(node)
        self.store.set_meta("drained_nodes", json.dumps(sorted(self._drained)))
        self._wake.set()
        return node in self._drained

    def drained(self, node: int) -> bool:
        return node in self._drained

    def _shadow_in_flight(self) -> None:
        now = self.now_s()
        for record in self.cycle.executor.instances.values():
            if record.phase.name == "STARTING" and record.gpus is not None:
                self._schedule(now, InstanceReady(record.instance_id, now))
            elif record.phase.name == "DRAINING":
                self._schedule(now, InstanceIdle(record.instance_id, now))

    def _schedule(self, at_s: float, event: FleetEvent) -> None:
        self._shadow_seq += 1
        heapq.heappush(self._shadow, (at_s, self._shadow_seq, event))

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        """The initial plan of a controller with no snapshot (a fresh store)."""
        self._handle(self.cycle.start(self.now_s()), self.now_s(), force_snapshot=True)

    async def run(self) -> None:
        if self.fleet is not None:
            self.fleet.set_apply(self.mode == "apply")
        while True:
            await self._sleep()
            await self.step()

    async def _sleep(self) -> None:
        targets = [
            self._wall_delay_s(self.cycle.next_tick_s()),
            self._wall_delay_s(self.cycle.next_action_s()),
        ]
        if self._shadow:
            targets.append(self._wall_delay_s(self._shadow[0][0]))
        ledger_s = self._ledger_start_unix_s + self.settings.ledger_interval_s - self.clock.wall_ns() / 1e9
        timeout_s = max(0.0, min([*targets, ledger_s, self.settings.snapshot_interval_s]))
        if self._events or self._forget:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        self._wake.clear()

    async def step(self) -> None:
        """Everything due now (module docstring)."""
        now = self.now_s()
        self._fold_fleet(now)
        if self.mode != "paused":
            if self.cycle.next_action_s() <= now:
                self._handle(self.cycle.due(now), now)
            while self.cycle.next_tick_s() <= now:
                await self._tick(now)
                self._fold_fleet(self.now_s())
        if self.clock.wall_ns() / 1e9 >= self._ledger_start_unix_s + self.settings.ledger_interval_s:
            self.flush_ledger()
        if self.clock.monotonic_s() - self._last_snapshot_s >= self.settings.snapshot_interval_s:
            self._commit([], [], force_snapshot=True, now_s=now)

    def _fold_fleet(self, now: float) -> None:
        while self._shadow and self._shadow[0][0] <= now:
            self._events.append(heapq.heappop(self._shadow)[2])
        if self._events:
            events, self._events = self._events, []
            self._handle(self.cycle.on_events(events), now)
        for node, engine in self._forget:
            self.desired.forget(node, engine)
        self._forget.clear()
        lost = frozenset(self._lost)
        cordoned = lost | frozenset(self._drained)
        if (cordoned, lost) != self._nodes_applied:
            self._nodes_applied = (cordoned, lost)
            log.info("nodes_cordoned", cordoned=sorted(cordoned), lost=sorted(lost))
            result = self.cycle.set_nodes(cordoned, lost, now)
            self._drop_gone_targets(lost)
            self._handle(result, now)

    def _drop_gone_targets(self, lost: frozenset[int]) -> None:
        """A lost node's instances are gone from the cycle (they start again elsewhere): their targets
        go too, so that the fleet stops their engines, as engines it does not know, if the node comes
        back rather than start them again beside their replacements; their pending commands fail."""
        live = self.cycle.executor.instances
        for node in lost:
            for eid, target in list(self.desired.nodes[node].engines.items()):
                if target.instance_id in live:
                    continue
                self.desired.forget(node, eid)
                if target.command_id:
                    self.command_result(target.command_id, "failed", "node lost")

    async def _tick(self, now: float) -> None:
        grid_s = self.cycle.next_tick_s()
        period_s = self.cycle.periods.instance_s
        behind = math.floor((now - grid_s) / period_s + 1e-9)
        # A tick that ran late (a long solve) is caught up tick by tick, each with the traffic up to its
        # own time, as the simulator runs them; one far behind (a paused or stalled controller) steps
        # once at the latest grid point instead of replaying what nobody can act on any more.
        tick_s = grid_s if behind <= MAX_CATCH_UP_TICKS else grid_s + behind * period_s
        traffic = self.traffic.take(tick_s)
        for (pool, cls), n in traffic.finished.items():
            self._ledger_traffic[(pool, cls, "requests")] += n
        for (pool, cls), n in traffic.output_tokens.items():
            self._ledger_traffic[(pool, cls, "tokens")] += n
        view = self.fleet.view(traffic.routed) if self.fleet is not None else None
        started_s = self.clock.monotonic_s()
        result = await asyncio.to_thread(
            self.cycle.tick,
            tick_s,
            view if view is not None else FleetView(),
            traffic.arrivals,
            traffic.completions,
        )
        levels = [d.level for d in result.decisions if isinstance(d, StepRecord)]
        level = levels[-1] if levels else "instance"
        self.metrics.decision_duration.labels(level).observe(self.clock.monotonic_s() - started_s)
        self._handle(result, tick_s)

    # ------------------------------------------------------------------ results
    def _handle(self, result: TickResult, now_s: float, *, force_snapshot: bool = False) -> None:
        commands = self._issue(result.commands, now_s)
        decisions = [self._decision_row(d) for d in result.decisions]
        self._commit(
            commands, decisions, force_snapshot=force_snapshot or bool(result.decisions), now_s=now_s
        )
        for d, row in zip(result.decisions, decisions, strict=True):
            self.events.publish("decision", row.summary, json.loads(row.detail_json))
            if isinstance(d, StepRecord):
                for pool in d.step.pools:
                    self.metrics.solver_status.labels(pool.solver_status).inc()
        if result.decisions:
            self.last_decision_unix_ns = self.clock.wall_ns()
        for c in commands:
            self.events.publish(
                "command",
                f"{c.kind} {c.target or ''} on {c.node or '-'} ({c.status})".strip(),
                json.loads(c.request_json),
            )
            if c.status == "skipped":
                self.metrics.commands.labels(c.kind, "skipped").inc()
            if c.kind in RECONFIGURATION_KINDS:
                self._count_reconfiguration(c)
        if result.routes is not None:
            self.routes = result.routes
            self.events.publish("routes", f"routing table v{result.routes.version}", routes=result.routes)
        self.metrics.set_instances(
            (r.pool, r.spec.tp, r.spec.clock_mhz, r.phase.name)
            for r in self.cycle.executor.instances.values()
        )
        self.metrics.set_guard(self.cycle.guard.state, (p.name for p in self.cycle.plan.pools))
        if commands and self.fleet is not None and self.mode == "apply":
            self.fleet.wake()

    def _count_reconfiguration(self, command: NewCommand) -> None:
        """Counted in every mode (what the policy decided); timed only when sent to an agent."""
        self.metrics.reconfigurations.labels(command.kind).inc()
        if command.status == "pending":
            self._issued[command.generation] = (command.kind, self.clock.monotonic_s())
            while len(self._issued) > MAX_TIMED_COMMANDS:  # never confirmed (superseded): oldest go
                del self._issued[next(iter(self._issued))]

    def _issue(self, commands: Sequence[Command], now_s: float) -> list[NewCommand]:
        """Generations for the commands, folded into the desired state (and, in observe mode, into the
        model of their effects); the rows to store."""
        if not commands:
            return []
        generations = self.store.next_generations(len(commands))
        rows: list[NewCommand] = []
        for command, generation in zip(commands, generations, strict=True):
            addressed = self.desired.address(command)
            acted = self.desired.apply(command, generation, generation)
            node = self.settings.node_names[addressed.node] if acted and addressed.node >= 0 else ""
            status = "pending" if self.mode == "apply" and node else "skipped"
            if self.mode != "apply":
                self._model_effect(command)
            rows.append(
                NewCommand(
                    cycle_time_s=now_s,
                    generation=generation,
                    node=node,
                    kind=COMMAND_KINDS[type(command)],
                    target=addressed.target,
                    request_json=json.dumps(_command_json(command)),
                    status=status,
                )
            )
        return rows

    def _model_effect(self, command: Command) -> None:
        """Observe mode: the instance is taken as up once its modelled start time has passed and as
        gone once drained, so that the cycle carries on as it would with the commands applied."""
        if isinstance(command, StartInstance) and command.load_s > 0:
            self._schedule(
                command.at_s + command.load_s,
                InstanceReady(command.instance_id, command.at_s + command.load_s),
            )
        elif isinstance(command, DrainInstance):
            self._schedule(command.at_s, InstanceIdle(command.instance_id, command.at_s))
            target = self.desired.engine(command.instance_id)
            if target is not None:
                self._forget.append((target.node, target.engine_id))

    def _decision_row(self, decision: Decision) -> NewDecision:
        if isinstance(decision, ClockDecision):
            d = decision
            summary = f"instance {d.instance_id}: {d.from_mhz} -> {d.to_mhz} MHz ({d.reason})"
            return NewDecision(decision.t_s, "instance", summary, json.dumps(decision.to_json()))
        pools = "; ".join(
            f"{p.pool}: " + _mix(p.chosen.counts) + f" ({p.solver_status})" for p in decision.step.pools
        )
        if not pools:
            pools = "; ".join(
                f"{p.name}: " + _mix(p.instance_counts().items()) for p in decision.step.plan.pools
            )
        return NewDecision(
            decision.t_s, decision.level, f"{decision.level} step: {pools}", json.dumps(decision.to_json())
        )

    def _commit(
        self, commands: list[NewCommand], decisions: list[NewDecision], *, force_snapshot: bool, now_s: float
    ) -> None:
        snapshot = None
        if commands or force_snapshot:
            blob = pickle.dumps((self.cycle, self.desired), protocol=pickle.HIGHEST_PROTOCOL)
            snapshot = (blob, now_s, snapshot_version(self.settings.code_version))
            self._last_snapshot_s = self.clock.monotonic_s()
        if snapshot is None and not decisions:
            return
        self.store.commit_step(snapshot=snapshot, decisions=decisions, commands=commands)

    def snapshot(self) -> None:
        """Commit a snapshot now (graceful stop)."""
        self._commit([], [], force_snapshot=True, now_s=self.now_s())

    # ------------------------------------------------------------------ ledger
    def flush_ledger(self) -> None:
        now_unix_s = self.clock.wall_ns() / 1e9
        start, interval_s = self._ledger_start_unix_s, now_unix_s - self._ledger_start_unix_s
        names = self.settings.node_names
        energy = [
            EnergyRow(start, interval_s, names[n], pool, j) for (n, pool), j in sorted(self._energy_j.items())
        ]
        keys = sorted({(pool, cls) for pool, cls, _ in self._ledger_traffic})
        traffic = [
            TrafficRow(
                start,
                interval_s,
                pool,
                cls,
                self._ledger_traffic[(pool, cls, "requests")],
                self._ledger_traffic[(pool, cls, "tokens")],
            )
            for pool, cls in keys
        ]
        if energy:
            self.store.add_energy(energy)
        if traffic:
            self.store.add_traffic(traffic)
        pool_energy_j: defaultdict[str, float] = defaultdict(float)
        for (_, pool), j in self._energy_j.items():
            pool_energy_j[pool] += j
        self.metrics.ledger_interval(
            pool_energy_j,
            {(pool, cls): self._ledger_traffic[(pool, cls, "requests")] for pool, cls in keys},
            {(pool, cls): self._ledger_traffic[(pool, cls, "tokens")] for pool, cls in keys},
        )
        self._energy_j.clear()
        self._ledger_traffic.clear()
        self._ledger_start_unix_s = now_unix_s


def _mix(counts: Iterable[tuple[InstanceSpec, int]]) -> str:
    """`2x TP2@1600, 1x TP4@1980`: in (TP, clock) order (specs have no order of their own)."""
    ordered = sorted(counts, key=lambda item: (item[0].tp, item[0].clock_mhz))
    return ", ".join(f"{n}x TP{s.tp}@{s.clock_mhz}" for s, n in ordered)


def _command_json(command: Command) -> dict[str, Any]:
    out = asdict(command)
    out["kind"] = COMMAND_KINDS[type(command)]
    return out
