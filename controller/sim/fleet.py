"""`SimFleet`: the simulator's fleet. It executes the control cycle's commands on simulated engines
(`agent.sim.engine_core.SimEngine`) with their delays, routes requests by the cycle's routing table, and
reports the fleet view and events back, exactly as the live fleet and router will for real engines.

Where it sits: `controller.sim.kernel` owns the virtual clock and calls, in time order, `advance` (run
every engine to a time; report draining instances gone idle), `ready_until` (starts that finished
loading), `view` (per instance its queue and the requests routed to it), `apply` (a `TickResult`:
commands in order, then the new routing table, then the requests the commands displaced are routed
again) and `admit` (one arriving request). It also keeps the books the report needs: outcomes per
request, GPUs and servers held over time, power of loading engines, retired engines' energy.

Routing: among the class's primary instances (its pool) that can hold the request, the one with the
least outstanding tokens x weight (1 / capacity: instances fill in proportion to their capacity); if
none, the same over the fallback (larger pools). Escalation's moves look at both at once.
Queue discipline, the same for every policy: each request carries its TTFT deadline (arrival + its
class's TTFT target) and waits in earliest-deadline-first order (docs/simulator.md, "Equal terms").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from agent.sim.engine_core import EngineConfig, PerfModelLike, SimEngine, WaitingRequest
from agent.sim.native import make_engine
from controller.control.cycle import TickResult
from controller.model.cluster import InstanceSpec
from controller.model.fleet import (
    AbortStart,
    DrainInstance,
    FleetEvent,
    FleetView,
    InstanceIdle,
    InstanceReady,
    InstanceView,
    MoveWaiting,
    RejectPastDeadline,
    RoutingTable,
    SetClock,
    StartInstance,
)
from controller.sim.report import TbtHistogram

# A request that could not be served anywhere, or was rejected past its deadline.
NO_ROUTE = -1
# An engine's TBT log is folded into the run's histogram once it holds this many entries (1 MiB).
TBT_FOLD_ENTRIES = 1 << 16


class Outcomes:
    """Per request (trace order): served where, completed, latencies; and the run's counters."""

    def __init__(self, n: int) -> None:
        self.completed = np.zeros(n, dtype=bool)
        self.ttft_s = np.full(n, np.nan)
        self.tbt_mean_s = np.full(n, np.nan)
        self.chosen = np.full(n, NO_ROUTE, dtype=np.int32)
        self.rejected = 0
        self.escalations: Counter[str] = Counter({"max_clock": 0, "moved": 0, "rejected_past_deadline": 0})
        self.tbt = TbtHistogram()
        self.done_lengths: list[tuple[int, int]] = []  # (input, output) since the predictor last learned
        # Since the control cycle last learned (the SLO guard): requests completed, and those refused
        # after admission (rejected past their deadline, or no instance could take them).
        self.finished: list[int] = []
        self.dropped: list[int] = []


class GpuLog:
    """GPUs held, servers held and the idle power of loading engines, as a log of changes over time, for
    integration (a drained instance's release is logged at the moment it went idle, which may precede
    changes already logged: the log is sorted when integrated)."""

    def __init__(self) -> None:
        self._log: list[tuple[float, int, int, float]] = []  # (time, d gpus, d servers, d loading W)
        self._node_gpus: Counter[int] = Counter()

    def hold(self, node: int, gpus: int, t_s: float) -> None:
        new = int(self._node_gpus[node] == 0)
        self._node_gpus[node] += gpus
        self._log.append((t_s, gpus, new, 0.0))

    def release(self, node: int, gpus: int, t_s: float) -> None:
        self._node_gpus[node] -= gpus
        gone = int(self._node_gpus[node] == 0)
        self._log.append((t_s, -gpus, -gone, 0.0))

    def loading_power(self, delta_w: float, t_s: float) -> None:
        self._log.append((t_s, 0, 0, delta_w))

    def integrals(self, edges_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Cumulative (GPU-seconds, server-seconds, loading J) at each of `edges_s` (sorted): shape
        (3, len(edges_s))."""
        if not self._log:
            return np.zeros((3, len(edges_s)))
        log = np.array(sorted(self._log, key=lambda e: e[0]), dtype=np.float64)
        times = log[:, 0]
        levels = np.cumsum(log[:, 1:], axis=0)  # level from each change on
        out = np.empty((3, len(edges_s)))
        for col in range(3):
            cum = np.concatenate(([0.0], np.cumsum(levels[:-1, col] * np.diff(times))))
            after = np.maximum(edges_s - times[-1], 0.0) * levels[-1, col]
            out[col] = np.interp(edges_s, times, cum, left=0.0) + after
        return out


class _Slot:
    """One instance of the fleet: its engine once loaded."""

    __slots__ = ("draining", "engine", "gpus", "pool", "ready_s", "routed", "spec")

    def __init__(self, command: StartInstance) -> None:
        self.pool = command.pool
        self.spec = command.spec
        self.gpus = command.gpus
        self.engine: SimEngine | None = None
        self.ready_s = command.at_s + command.load_s
        self.draining = False
        self.routed = 0


class SimFleet:
    """See the module docstring. `perf`: physics per TP degree (and TP 8: a whole server)."""

    def __init__(
        self,
        perf: Mapping[int, PerfModelLike],
        engine_config: EngineConfig,
        rng: np.random.Generator,
        outcomes: Outcomes,
        route_class: npt.NDArray[np.int64],
        *,
        power_bin_s: float,
        stepwise: bool = False,
    ) -> None:
        self._perf = perf
        # The class each request is routed by (the router's predicted classes, filled by the kernel).
        self.class_of = route_class
        self._engine_config = engine_config
        self._rng = rng
        self.outcomes = outcomes
        self._power_bin_s = power_bin_s
        self._stepwise = stepwise
        self.slots: dict[int, _Slot] = {}
        self.retired: list[SimEngine] = []
        self.gpu_log = GpuLog()
        self._routes = RoutingTable(0, (), ())
        self._loading: dict[int, _Slot] = {}

    # ------------------------------------------------------------------ time
    def next_ready_s(self) -> float:
        return min((s.ready_s for s in self._loading.values()), default=math.inf)

    def ready_until(self, t_s: float) -> list[FleetEvent]:
        """Instances whose loading ends by `t_s` start serving (at their own ready time)."""
        events: list[FleetEvent] = []
        for iid, slot in sorted(self._loading.items(), key=lambda kv: (kv[1].ready_s, kv[0])):
            if slot.ready_s > t_s:
                continue
            del self._loading[iid]
            self.gpu_log.loading_power(-self._idle_w(slot), slot.ready_s)
            self._make_engine(slot, slot.ready_s)
            events.append(InstanceReady(iid, slot.ready_s))
        return events

    def advance(self, t_s: float) -> list[FleetEvent]:
        """Every engine run to `t_s`; draining ones that went idle are closed and reported."""
        events: list[FleetEvent] = []
        for iid, slot in list(self.slots.items()):
            engine = slot.engine
            if engine is None:
                continue
            if slot.draining:
                idle_s = engine.drain(t_s)
                self._collect(engine)
                if idle_s is not None:
                    self._retire(iid, slot, idle_s)
                    events.append(InstanceIdle(iid, idle_s))
            else:
                engine.advance_to(t_s)
                self._collect(engine)
        return events

    def view(self) -> FleetView:
        """Per serving instance its queue and the requests routed to it since the last view."""
        out: dict[int, InstanceView] = {}
        for iid, slot in self.slots.items():
            e = slot.engine
            if e is None:
                continue
            out[iid] = InstanceView(iid, e.num_waiting, e.num_running, e.earliest_deadline_s, slot.routed)
            slot.routed = 0
        return FleetView(out)

    # ------------------------------------------------------------------ commands
    def apply(self, result: TickResult) -> None:
        displaced: list[tuple[WaitingRequest, float, int | None]] = []  # (request, time, moved from)
        for cmd in result.commands:
            if isinstance(cmd, StartInstance):
                self._start(cmd)
            elif isinstance(cmd, AbortStart):
                slot = self.slots.pop(cmd.instance_id)
                del self._loading[cmd.instance_id]
                self.gpu_log.loading_power(-self._idle_w(slot), cmd.at_s)
                self.gpu_log.release(slot.gpus.node, slot.gpus.count, cmd.at_s)
            elif isinstance(cmd, DrainInstance):
                slot = self.slots[cmd.instance_id]
                slot.draining = True
                if slot.engine is not None:
                    slot.engine.advance_to(cmd.at_s)
                    displaced += [(w, cmd.at_s, None) for w in slot.engine.take_waiting()]
            elif isinstance(cmd, SetClock):
                slot = self.slots[cmd.instance_id]
                slot.spec = InstanceSpec(slot.spec.tp, cmd.clock_mhz)
                if slot.engine is not None:
                    slot.engine.advance_to(cmd.at_s)
                    slot.engine.set_clock(cmd.clock_mhz, cmd.stall_s)
            elif isinstance(cmd, RejectPastDeadline):
                self._reject(cmd)
            else:
                assert isinstance(cmd, MoveWaiting)
                engine = self.slots[cmd.instance_id].engine
                assert engine is not None
                moved = engine.take_waiting(cmd.deadline_before_s)
                displaced += [(w, cmd.at_s, cmd.instance_id) for w in moved]
        if result.routes is not None:
            self._routes = result.routes
        for w, t_s, origin in displaced:
            self._reroute(w, t_s, origin)

    def _start(self, cmd: StartInstance) -> None:
        slot = _Slot(cmd)
        self.slots[cmd.instance_id] = slot
        self.gpu_log.hold(cmd.gpus.node, cmd.gpus.count, cmd.at_s)
        if cmd.load_s <= 0.0:
            self._make_engine(slot, cmd.at_s)
        else:
            self._loading[cmd.instance_id] = slot
            self.gpu_log.loading_power(self._idle_w(slot), cmd.at_s)

    def _reject(self, cmd: RejectPastDeadline) -> None:
        engine = self.slots[cmd.instance_id].engine
        assert engine is not None
        past = engine.reject_past_deadline(cmd.at_s)
        if past:
            self.outcomes.rejected += len(past)
            self.outcomes.escalations["rejected_past_deadline"] += len(past)
            self.outcomes.chosen[past] = NO_ROUTE
            self.outcomes.dropped.extend(int(r) for r in past)

    # ------------------------------------------------------------------ routing
    def admit(
        self, request_id: int, c: int, t_s: float, inputs: int, outputs: int, deadline_s: float
    ) -> bool:
        """Route an arriving request; False when no instance can take it."""
        iid = self._route(c, t_s, inputs + outputs, wide=False)
        if iid is None:
            return False
        slot = self.slots[iid]
        assert slot.engine is not None
        slot.engine.submit(request_id, t_s, inputs, outputs, deadline_s)
        slot.routed += 1
        self.outcomes.chosen[request_id] = iid
        return True

    def _reroute(self, w: WaitingRequest, t_s: float, origin: int | None) -> None:
        c = self.class_of[w.request_id]
        iid = self._route(int(c), t_s, w.input_tokens + w.output_tokens, wide=origin is not None)
        out = self.outcomes
        if iid is None:
            out.rejected += 1
            out.chosen[w.request_id] = NO_ROUTE
            out.dropped.append(w.request_id)
            return
        engine = self.slots[iid].engine
        assert engine is not None
        engine.advance_to(t_s)
        engine.submit(w.request_id, w.arrival_s, w.input_tokens, w.output_tokens, w.deadline_s)
        out.chosen[w.request_id] = iid
        if origin is not None and iid != origin:
            out.escalations["moved"] += 1

    def _route(self, c: int, t_s: float, size: int, *, wide: bool) -> int | None:
        table = self._routes
        if c >= len(table.primary):
            return None
        if wide:
            return self._least_loaded((*table.primary[c], *table.fallback[c]), t_s, size)
        best = self._least_loaded(table.primary[c], t_s, size)
        return best if best is not None else self._least_loaded(table.fallback[c], t_s, size)

    def _least_loaded(self, candidates: Sequence[tuple[int, float]], t_s: float, size: int) -> int | None:
        best: int | None = None
        best_load = math.inf
        for iid, weight in candidates:
            engine = self.slots[iid].engine
            assert engine is not None
            if size > engine.max_request_tokens:
                continue
            engine.advance_to(t_s)
            load = engine.outstanding_tokens * weight
            if load < best_load:
                best, best_load = iid, load
        return best

    # ------------------------------------------------------------------ books
    def fold_tbt_logs(self) -> None:
        """Keep the engines' TBT logs short (memory): fold the long ones into the run's histogram."""
        for slot in self.slots.values():
            if slot.engine is not None and slot.engine.tbt_log_len >= TBT_FOLD_ENTRIES:
                self.outcomes.tbt.fold(slot.engine.take_tbt_log())

    def mix(self) -> Counter[tuple[str, InstanceSpec]]:
        """Instances (loading or serving, not draining) by pool and spec."""
        return Counter((s.pool, s.spec) for s in self.slots.values() if not s.draining)

    def close(self, end_s: float) -> None:
        """The end of the run: every instance closed at `end_s` (or when it went idle, if draining)."""
        for iid, slot in list(self.slots.items()):
            if slot.engine is None:
                self.gpu_log.loading_power(-self._idle_w(slot), end_s)
                self.gpu_log.release(slot.gpus.node, slot.gpus.count, end_s)
                del self.slots[iid]
                continue
            idle_s = slot.engine.drain(end_s) if slot.draining else None
            self._collect(slot.engine)
            self._retire(iid, slot, idle_s if idle_s is not None else end_s)
        self._loading.clear()

    def _retire(self, iid: int, slot: _Slot, end_s: float) -> None:
        assert slot.engine is not None
        slot.engine.close(end_s)
        self._collect(slot.engine)
        self.outcomes.tbt.fold(slot.engine.take_tbt_log())
        self.gpu_log.release(slot.gpus.node, slot.gpus.count, end_s)
        self.retired.append(slot.engine)
        del self.slots[iid]

    def _collect(self, engine: SimEngine) -> None:
        out = self.outcomes
        for r in engine.pop_completed():
            out.completed[r.request_id] = True
            out.ttft_s[r.request_id] = r.ttft_s
            out.tbt_mean_s[r.request_id] = r.tbt_mean_s
            out.done_lengths.append((r.input_tokens, r.output_tokens))
            out.finished.append(r.request_id)

    def _make_engine(self, slot: _Slot, t_s: float) -> None:
        slot.engine = make_engine(
            self._perf[slot.spec.tp],
            slot.spec.clock_mhz,
            self._rng.spawn(1)[0],
            self._engine_config,
            start_s=t_s,
            power_bin_s=self._power_bin_s,
            stepwise=self._stepwise,
        )

    def _idle_w(self, slot: _Slot) -> float:
        return slot.spec.tp * self._perf[slot.spec.tp].idle_power_w
