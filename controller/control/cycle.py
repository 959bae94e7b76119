"""The control cycle: the ONE place that orders the control steps, shared by the simulator and the live
controller. Pure: no I/O, no clock, no asyncio; time comes in as `now_s`, the fleet as a `FleetView`.

    fleet view + arrivals and completions since the last tick
          |
    ControlCycle.tick(now_s, view, arrivals, completions)
      arrival history, SLO guard -> observation -> [cluster step] -> [pool step] -> plan_reconfiguration
        -> executor (generations, deferred starts, successors, placement)
        -> [instance step: clocks] -> escalation -> routing table
          |
    TickResult(commands, decisions, routes)

The driver (the simulator's kernel, or the daemon's loops) calls:
- `start(now_s)` once: the initial plan, up at once (a warm cluster);
- `tick(...)` at `next_tick_s()`: every instance period; the cluster and pool steps run when their
  epochs are due. Epoch boundaries are explicit state (`epoch_start_s`, `pool_period_start_s`,
  `next_cluster_s`, `next_pool_s`), so a restarted controller keeps them;
- `due(now_s)` at `next_action_s()`: staggered actions of the current plan falling due;
- `on_events(events)` whenever the fleet reports instances ready or idle.
Each returns the commands to execute in order, the decisions taken (data, with reasons) and, when it
changed, the routing table. A static policy runs through the same cycle (`FixedPlan`): its plan never
changes, so the only difference between policies is what they decide.

SLO guard (`controller/control/guard.py`): the completions since the last tick (met / total per routed
class) feed a sliding window; per pool of the plan in force, its windowed attainment sets the pool's
guard state (clock floor, planned-load factor), which the policy reads in the observation.

Escalation (under-prediction, per ACTIVE instance at each tick, when enabled): requests already past
their TTFT deadline are rejected (they would miss anyway and delay the rest); an instance whose most
urgent waiting request falls due before the next tick goes to the maximum clock and its at-risk
requests are routed again to the least loaded instance of their pool or a larger one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError
from controller.control.guard import GuardConfig, SloGuard
from controller.control.history import ArrivalHistory
from controller.control.served import ServedMix
from controller.model.classes import REQUEST_CLASSES
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec
from controller.model.decisions import ClockDecision, ClockReason, Decision, Level, PlanStep, StepRecord
from controller.model.fleet import (
    Arrivals,
    Command,
    Completions,
    FleetEvent,
    FleetView,
    MoveWaiting,
    RejectPastDeadline,
    RoutingTable,
)
from controller.model.profile import Profile
from controller.model.state import DEFAULT_BURST_WINDOWS_S, ClusterObs, Periods, Phase
from controller.orchestrator.executor import Executor, InstanceRecord
from controller.orchestrator.placement import Placement
from controller.orchestrator.plan import Hysteresis, InstanceModel, ReconfigCosts, plan_reconfiguration
from controller.policy.base import DynamicPolicy
from controller.policy.frequency import escalate
from controller.policy.instance_model import CapacityCache, instance_model
from controller.policy.routing import routing_table

_DEFAULT_GUARD = GuardConfig()
# Epoch boundaries are compared with a tolerance: `now_s` accumulates float periods.
_EPS_S = 1e-9
# The instance level looks at the last hour of history: its windows (mix, sustained load) are minutes.
INSTANCE_HISTORY_S = 3600.0
# The planner's instance model uses the mix of the last few history bins.
_MODEL_MIX_BINS = 5


@dataclass(frozen=True, slots=True)
class CycleConfig:
    """Knobs of a cycle that are not the policy's."""

    total_gpus: int = 4096
    history_bin_s: float = 60.0
    history_max_s: float = 8 * 86400.0  # a week and a day: enough for a weekly template
    escalation: bool = True
    start_unix_s: float | None = None  # wall time of t = 0 (weekly templates align to it)
    max_nodes: int | None = None  # None: nodes are added as needed (a simulated cluster)
    guard: GuardConfig = _DEFAULT_GUARD  # the closed-loop SLO guard (controller/control/guard.py)

    def __post_init__(self) -> None:
        for name in ("history_bin_s", "history_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgumentError(name, value, "a positive finite number of seconds")
        if self.total_gpus < 1:
            raise InvalidArgumentError("total_gpus", self.total_gpus, ">= 1")


@dataclass(frozen=True, slots=True)
class TickResult:
    commands: tuple[Command, ...] = ()
    decisions: tuple[Decision, ...] = ()
    routes: RoutingTable | None = None


class ControlCycle:
    """See the module docstring. `policy`'s periods and reconfiguration costs are the cycle's. Without a
    `profile` (a static plan measured as it is, e.g. while profiling), every instance weighs the same in
    routing and the maximum clock is the plan's."""

    def __init__(
        self,
        policy: DynamicPolicy,
        profile: Profile | None,
        initial_plan: ClusterPlan,
        config: CycleConfig | None = None,
        *,
        origin_s: float = 0.0,
    ) -> None:
        if profile is None and not isinstance(policy, FixedPlan):
            raise InvalidArgumentError("profile", None, f"a profile for the policy {policy.name!r}")
        self.policy = policy
        self.profile = profile
        # A fixed plan has nothing to decide: its steps are skipped (the boundaries still advance).
        self._fixed = isinstance(policy, FixedPlan)
        self.config = cfg = config or CycleConfig()
        self.periods: Periods = policy.periods
        self.costs: ReconfigCosts = policy.costs
        self.plan = initial_plan
        self.executor = Executor(
            self.costs,
            gpu_budget=cfg.total_gpus,
            free=policy.reconfiguration_free,
            placement=Placement(cfg.max_nodes),
        )
        max_bins = max(1, round(cfg.history_max_s / cfg.history_bin_s))
        self.history = ArrivalHistory(cfg.history_bin_s, max_bins, DEFAULT_BURST_WINDOWS_S, origin_s)
        self.hysteresis = Hysteresis(epoch_s=self.periods.pool_s)
        clocks = (
            profile.clocks_mhz
            if profile is not None
            else [spec.clock_mhz for pool in initial_plan.pools for spec in pool.instances]
        )
        self.max_clock_mhz = max(clocks, default=0)
        self.epoch_start_s = origin_s
        self.pool_period_start_s = origin_s
        self.next_cluster_s = origin_s + self.periods.cluster_s
        self.next_pool_s = origin_s + self.periods.pool_s
        self._next_tick_s = origin_s + self.periods.instance_s
        self._capacities = CapacityCache()
        self._model = self._instance_model((0.0,) * len(REQUEST_CLASSES))  # nothing observed: an even mix
        self._routes_version = 0
        self._routes_dirty = True
        self.guard = SloGuard(clocks, cfg.guard)
        # What each routed class really served, as of the last plan step (fixed in between, so the
        # instance level reuses the pool step's capacity tables).
        self.served = ServedMix()
        self._served_mix: tuple[tuple[float, ...], ...] = ()
        self._input_tokens_mean: tuple[float, ...] = ()  # likewise, the classes' prompt lengths
        self._cordoned: frozenset[int] = frozenset()  # live fleet: nodes out of the budget (set_nodes)

    # ------------------------------------------------------------------ driver API
    def next_tick_s(self) -> float:
        return self._next_tick_s

    def next_action_s(self) -> float:
        return self.executor.next_due_s()

    def start(self, now_s: float) -> TickResult:
        """The initial plan, every instance up and serving at `now_s`."""
        commands: list[Command] = [
            self.executor.initial(pool.name, spec, now_s)
            for pool in self.plan.pools
            for spec in pool.instances
        ]
        step = PlanStep(plan=self.plan, pools=())
        record = StepRecord(now_s, "initial", 0.0, step, self.executor.generation)
        return self._result(commands, [record])

    def due(self, now_s: float) -> TickResult:
        return self._result(self.executor.due(now_s), [])

    def set_nodes(self, cordoned: frozenset[int], lost: frozenset[int], now_s: float) -> TickResult:
        """The live fleet's nodes that take no new instance (drained by the operator, or `lost`: not
        answering); their GPUs leave the budget the policy plans with (`Executor.set_cordoned`)."""
        if not lost <= cordoned:
            raise InvalidArgumentError(
                "lost", sorted(lost), f"a subset of the cordoned nodes {sorted(cordoned)}"
            )
        self._cordoned = cordoned
        self._routes_dirty = True
        return self._result(self.executor.set_cordoned(cordoned, lost, now_s), [])

    def on_events(self, events: Iterable[FleetEvent]) -> TickResult:
        commands: list[Command] = []
        for event in events:
            commands += self.executor.on_event(event)
            self._routes_dirty = True
        return self._result(commands, [])

    def tick(
        self, now_s: float, view: FleetView, arrivals: Arrivals, completions: Completions | None = None
    ) -> TickResult:
        """The decision point of an instance period (and of the cluster/pool epochs due at `now_s`).
        `completions`: the requests finished since the last tick, for the SLO guard (None: none)."""
        if now_s + _EPS_S < self._next_tick_s:
            raise InvalidArgumentError("now_s", now_s, f">= the next tick time {self._next_tick_s}")
        self.history.add(arrivals)
        done = completions or Completions()
        self.guard.observe(now_s, done)
        self.served.observe(now_s, done.served)
        before = {name: g.factor for name, g in self.guard.state.items()}
        self._update_guard(now_s)
        # The guard raised a pool's planned load: for a policy that acts on it, the pool step runs now
        # (the pool grid stays); the others keep their own periods, as on equal terms they must.
        raised = any(g.factor > before.get(name, 1.0) for name, g in self.guard.state.items())
        commands: list[Command] = []
        decisions: list[Decision] = []
        levels: list[Level] = []
        if now_s >= self.next_cluster_s - _EPS_S:
            levels.append("cluster")
        if now_s >= self.next_pool_s - _EPS_S:
            levels.append("pool")
        elif raised and not self._fixed and self.policy.uses_slo_guard:
            levels.append("guard")
        if levels:
            plan_commands, records = self._plan_steps(now_s, view, levels)
            commands += plan_commands
            decisions += records
        clock_commands, clock_decisions = self._instance_step(now_s, view)
        commands += clock_commands
        decisions += clock_decisions
        if not self._fixed:
            commands += self.executor.consolidate(now_s)
        self._next_tick_s = now_s + self.periods.instance_s
        return self._result(commands, decisions)

    # ------------------------------------------------------------------ steps
    def _update_guard(self, now_s: float) -> None:
        """The guard's per-pool state for the plan in force (checked when a check is due)."""
        lowest: dict[str, int] = {}
        for r in self.executor.instances.values():
            if r.phase is Phase.ACTIVE:
                lowest[r.pool] = min(lowest.get(r.pool, r.spec.clock_mhz), r.spec.clock_mhz)
        self.guard.update(now_s, {p.name: p.class_names for p in self.plan.pools}, lowest)

    def _gpu_budget(self) -> int:
        return max(0, self.config.total_gpus - GPUS_PER_SERVER * len(self._cordoned))

    def _observe(self, now_s: float, view: FleetView, history_s: float | None) -> ClusterObs:
        """The observation at `now_s`; `history_s` None: the whole history with burst peaks (cluster and
        pool steps), else only its last `history_s` without them (the instance level)."""
        keep = None if history_s is None else max(1, round(history_s / self.config.history_bin_s))
        rates = self.history.rates_rps(now_s, keep)
        bursts = self.history.bursts_rps(now_s) if history_s is None else ()
        period_s = self.periods.instance_s
        load = {i: view.of(i).routed / period_s for i in self.executor.instances}
        queues = {i: (view.of(i).waiting, view.of(i).running) for i in self.executor.instances}
        return ClusterObs(
            now_s=now_s,
            start_unix_s=self.config.start_unix_s,
            plan=self.plan,
            instances=self.executor.observed(load, queues),
            history_bin_s=self.config.history_bin_s,
            class_rate_history_rps=rates,
            total_gpus=self._gpu_budget(),
            burst_windows_s=self.history.burst_windows_s if history_s is None else (),
            class_burst_history_rps=bursts,
            epoch_start_s=self.epoch_start_s,
            pool_period_start_s=self.pool_period_start_s,
            guard=dict(self.guard.state),
            served_mix=self._served_mix,
            class_input_tokens_mean=self._input_tokens_mean,
        )

    def _plan_steps(
        self, now_s: float, view: FleetView, levels: Sequence[Level]
    ) -> tuple[list[Command], list[Decision]]:
        """The cluster and/or pool step (or the guard's early pool step, which moves no boundary), then
        the reconfiguration towards the new plan."""
        records: list[Decision] = []
        # Both boundaries move first: a cluster step at a pool boundary already sees the new pool period.
        if "cluster" in levels:
            self.epoch_start_s = now_s
            self.next_cluster_s = _next_boundary(self.next_cluster_s, self.periods.cluster_s, now_s)
        if "pool" in levels:
            self.pool_period_start_s = now_s
            self.next_pool_s = _next_boundary(self.next_pool_s, self.periods.pool_s, now_s)
        if self._fixed:
            return [], records
        self._served_mix = self.served.shares()
        self._input_tokens_mean = self.history.input_tokens_mean(now_s, _LENGTH_BINS)
        for level in levels:
            step = self._step(level, self._observe(now_s, view, None))
            self.plan = step.plan
            self._update_guard(now_s)  # the new plan's pools take over their classes' guard state
            horizon_s = self.periods.cluster_s if level == "cluster" else self.periods.pool_s
            records.append(StepRecord(now_s, level, horizon_s, step, self.executor.generation + 1))
        rates = self.history.rates_rps(now_s, _MODEL_MIX_BINS)
        recent = tuple(sum(row[-_MODEL_MIX_BINS:]) / max(1, len(row[-_MODEL_MIX_BINS:])) for row in rates)
        self._model = self._instance_model(recent)
        obs = self._observe(now_s, view, INSTANCE_HISTORY_S)
        actions = plan_reconfiguration(
            obs.instances,
            self.plan,
            costs=self.costs,
            model=self._model,
            now_s=now_s,
            hysteresis=self.hysteresis,
            changed_at_s=self.executor.changed_at_s(),
            gpu_budget=self._gpu_budget(),
        )
        self._routes_dirty = True
        return self.executor.apply(list(actions), now_s), records

    def _instance_step(self, now_s: float, view: FleetView) -> tuple[list[Command], list[Decision]]:
        """Clocks from the policy's instance level, then escalation, per ACTIVE instance."""
        clocks: Mapping[int, int]
        if self._fixed or self.profile is None:
            clocks = self._planned_clocks()
        else:
            clocks = self.policy.instance_step(self._observe(now_s, view, INSTANCE_HISTORY_S), self.profile)
        commands: list[Command] = []
        decisions: list[Decision] = []
        horizon_s = now_s + self.periods.instance_s
        for record in sorted(self.executor.instances.values(), key=lambda r: r.instance_id):
            if record.phase is not Phase.ACTIVE:
                continue
            clock = int(clocks.get(record.instance_id, record.spec.clock_mhz))
            reason: ClockReason = "load"
            if self.config.escalation:
                deadline_s = view.of(record.instance_id).earliest_deadline_s
                if deadline_s < now_s:
                    commands.append(RejectPastDeadline(record.instance_id, now_s))
                at_risk = deadline_s < horizon_s
                escalated = escalate(int(at_risk), min(clock, self.max_clock_mhz), self.max_clock_mhz)
                if escalated != clock:
                    clock, reason = escalated, "escalation"
                if at_risk:
                    commands.append(MoveWaiting(record.instance_id, now_s, horizon_s))
            if clock != record.spec.clock_mhz:
                decisions.append(
                    ClockDecision(now_s, record.instance_id, record.spec.clock_mhz, clock, reason)
                )
                commands.append(self.executor.set_clock(record.instance_id, clock, now_s))
                self._routes_dirty = True
        return commands, decisions

    def _planned_clocks(self) -> dict[int, int]:
        """A fixed plan's clocks: each instance back at its pool's planned clock for its TP degree once
        an escalation is over (the lowest such clock where a pool plans several)."""
        planned: dict[tuple[str, int], int] = {}
        for pool in self.plan.pools:
            for spec in pool.instances:
                key = (pool.name, spec.tp)
                planned[key] = min(planned.get(key, spec.clock_mhz), spec.clock_mhz)
        return {
            i: planned.get((r.pool, r.spec.tp), r.spec.clock_mhz) for i, r in self.executor.instances.items()
        }

    def _step(self, level: Level, obs: ClusterObs) -> PlanStep:
        assert self.profile is not None  # only a fixed plan runs without one, and it skips its steps
        if level == "cluster":
            return self.policy.cluster_step(obs, self.profile)
        return self.policy.pool_step(obs, self.profile)

    # ------------------------------------------------------------------ routing
    def _instance_model(self, class_rates_rps: Sequence[float]) -> InstanceModel:
        if self.profile is None:
            return UNIFORM_MODEL
        return instance_model(self.profile, self.plan, class_rates_rps, self._capacities)

    def _weight(self, record: InstanceRecord) -> float:
        return 1.0 / max(_TINY_CAP_RPS, self._model.capacity_rps(record.pool, record.spec))

    def _result(self, commands: Sequence[Command], decisions: Sequence[Decision]) -> TickResult:
        routes = None
        # Escalation's queue commands leave the instances as they are; anything else may change them.
        if self._routes_dirty or any(not isinstance(c, RejectPastDeadline | MoveWaiting) for c in commands):
            self._routes_version += 1
            active = [
                (r.instance_id, r.pool, self._weight(r))
                for r in sorted(self.executor.instances.values(), key=lambda r: r.instance_id)
                if r.phase is Phase.ACTIVE
            ]
            routes = routing_table(self._routes_version, self.plan, active)
            self._routes_dirty = False
        return TickResult(tuple(commands), tuple(decisions), routes)

    # ------------------------------------------------------------------ reporting
    def capacities(self) -> Mapping[str, Mapping[InstanceSpec, tuple[float, float]]]:
        """Per pool of the plan in force, each configuration's SLO-meeting capacity (rps) for the pool's
        mix and its power at that load (W), as the planner last modelled them (empty without a profile)."""
        tables = getattr(self._model, "capacities", {})
        return {
            pool: {spec: (cap.max_load_rps, cap.power_w(cap.max_load_rps)) for spec, cap in table.items()}
            for pool, table in tables.items()
        }

    def reconfigurations_by_kind(self) -> Mapping[str, int]:
        return {str(kind): n for kind, n in self.executor.executed.items()}


def _next_boundary(boundary_s: float, period_s: float, now_s: float) -> float:
    """The first boundary of the grid `boundary_s + k period_s` after `now_s` (a driver that fell behind,
    e.g. a paused controller, steps once and keeps its grid, instead of running every missed step)."""
    return boundary_s + (math.floor((now_s - boundary_s) / period_s + _EPS_S) + 1) * period_s


# Prompt lengths are averaged over the last 15 history bins (15 min at the default 60-s bins): the
# policy's class-mix window.
_LENGTH_BINS = 60
DEFAULT_PERIODS = Periods()
DEFAULT_COSTS = ReconfigCosts()
# Capacity of a spec that cannot serve its pool's mix within the SLO: routed to only as a last resort.
_TINY_CAP_RPS = 1e-6


class _UniformModel:
    """The instance model without a profile: every instance the same capacity, no power estimate."""

    def capacity_rps(self, pool: str, spec: InstanceSpec) -> float:
        return 1.0

    def power_w(self, pool: str, spec: InstanceSpec) -> float:
        return 0.0


UNIFORM_MODEL = _UniformModel()


@dataclass(frozen=True, slots=True)
class FixedPlan:
    """A static policy (`singlepool`, `multipool`) as the cycle drives it: the plan never changes and the
    clocks stay as planned. `name` is the static policy's."""

    name: str
    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: object, profile: Profile) -> ClusterPlan:
        raise InvalidArgumentError(
            "policy", self.name, "a plan given to the cycle (a fixed plan has no rule)"
        )

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return PlanStep(plan=obs.plan, pools=())

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return PlanStep(plan=obs.plan, pools=())

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return {}  # not called: the cycle returns each instance to its planned clock itself
