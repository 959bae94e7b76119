"""The control cycle (controller/control/cycle.py) driven by hand: a scripted policy and fleet view in,
commands, decisions and routing tables out. No simulator: this is how the live controller drives it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError
from controller.control.cycle import ControlCycle, CycleConfig, FixedPlan
from controller.model.cluster import ClusterPlan, InstanceSpec
from controller.model.decisions import ClockDecision, PlanStep, StepRecord
from controller.model.fleet import (
    Arrivals,
    DrainInstance,
    FleetView,
    GpuSet,
    InstanceIdle,
    InstanceReady,
    InstanceView,
    MoveWaiting,
    RejectPastDeadline,
    SetClock,
    StartInstance,
)
from controller.model.profile import Profile
from controller.model.state import ClusterObs, Periods
from controller.orchestrator.executor import Executor
from controller.orchestrator.placement import Placement, nodes_needed
from controller.orchestrator.plan import Action, ReconfigCosts
from controller.policy.singlepool import singlepool_plan
from controller.profiles import default_profile

PROFILE = default_profile("llama2-70b", "h100-sxm")
MAX = max(PROFILE.clocks_mhz)
LOW = min(PROFILE.clocks_mhz)
PERIODS = Periods(cluster_s=60.0, pool_s=20.0, instance_s=5.0)
COSTS = ReconfigCosts(warm_start_s=30.0, stagger_s=0.0)


@dataclass
class Scripted:
    """A policy whose pool steps return the next plan of a script; it records what it was shown."""

    plans: list[ClusterPlan]
    clocks: dict[int, int] = field(default_factory=dict)
    seen: list[ClusterObs] = field(default_factory=list)
    periods: Periods = PERIODS
    costs: ReconfigCosts = COSTS
    name: str = "scripted"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return True

    def initial_plan(self, arrivals: object, profile: Profile) -> ClusterPlan:
        return self.plans[0]

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self.pool_step(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        self.seen.append(obs)
        plan = self.plans.pop(0) if self.plans else obs.plan
        return PlanStep(plan=plan, pools=(), class_forecast_rps=(1.0,) * 9, forecast_kind="rate")

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        self.seen.append(obs)
        return dict(self.clocks)


def quiet(ids: list[int], routed: int = 0) -> FleetView:
    return FleetView({i: InstanceView(i, 0, 0, math.inf, routed) for i in ids})


def test_start_places_the_initial_plan_and_routes_every_class() -> None:
    cycle = ControlCycle(Scripted([]), PROFILE, singlepool_plan(2, 8, MAX), CycleConfig(escalation=False))
    result = cycle.start(0.0)
    starts = [c for c in result.commands if isinstance(c, StartInstance)]
    assert [(c.instance_id, c.gpus.node, c.gpus.first_gpu, c.load_s) for c in starts] == [
        (0, 0, 0, 0.0),
        (1, 1, 0, 0.0),
    ]
    assert isinstance(result.decisions[0], StepRecord) and result.decisions[0].level == "initial"
    assert result.routes is not None
    assert all({i for i, _ in row} == {0, 1} for row in result.routes.primary)


def test_scale_out_then_ready_then_scale_in() -> None:
    one, two = singlepool_plan(1, 8, MAX), singlepool_plan(2, 8, MAX)
    policy = Scripted([two, one])
    cycle = ControlCycle(policy, PROFILE, one, CycleConfig(escalation=False))
    cycle.start(0.0)
    for t in (5.0, 10.0, 15.0):
        assert cycle.tick(t, quiet([0]), Arrivals.none()).commands == ()
    result = cycle.tick(20.0, quiet([0]), Arrivals.none())  # the first pool step
    (start,) = result.commands
    assert isinstance(start, StartInstance) and start.instance_id == 1 and start.load_s == 30.0
    assert result.routes is not None and all(
        row == ((0, pytest.approx(row[0][1])),) for row in result.routes.primary
    )
    step = [d for d in result.decisions if isinstance(d, StepRecord)]
    assert [s.level for s in step] == ["pool"] and step[0].step.plan == two
    # The fleet reports it ready: it joins the routing table.
    ready = cycle.on_events([InstanceReady(1, 50.0)])
    assert ready.routes is not None and {i for i, _ in ready.routes.primary[0]} == {0, 1}
    # The next pool step asks for one instance again; the newest one drains once it has run the
    # planner's minimum dwell time (60 s from when it became ready at 50 s): at the pool step of 120 s.
    drains: list[DrainInstance] = []
    levels: list[str] = []
    t = 25.0
    while not drains:
        result = cycle.tick(t, quiet([0, 1]), Arrivals.none())
        drains = [c for c in result.commands if isinstance(c, DrainInstance)]
        levels += [d.level for d in result.decisions if isinstance(d, StepRecord)]
        t += 5.0
    assert t - 5.0 == 120.0 and drains == [DrainInstance(1, 120.0)]
    assert levels == ["pool", "cluster", "pool", "pool", "pool", "cluster", "pool"]
    # Idle: its GPUs are free and the executor forgets it.
    cycle.on_events([InstanceIdle(drains[0].instance_id, 61.0)])
    assert set(cycle.executor.instances) == {0, 1} - {drains[0].instance_id}
    assert cycle.executor.placement.gpus_held == 8


def test_instance_level_clock_changes_are_decisions() -> None:
    policy = Scripted([], clocks={0: LOW})
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False))
    cycle.start(0.0)
    result = cycle.tick(5.0, quiet([0]), Arrivals.none())
    assert result.commands == (SetClock(0, LOW, 5.0, ReconfigCosts().clock_change_s),)
    assert result.decisions == (ClockDecision(5.0, 0, MAX, LOW, "load"),)


def test_escalation_rejects_late_moves_at_risk_and_raises_the_clock() -> None:
    policy = Scripted([], clocks={0: LOW})
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, LOW), CycleConfig(escalation=True))
    cycle.start(0.0)
    view = FleetView({0: InstanceView(0, waiting=3, running=1, earliest_deadline_s=4.0, routed=4)})
    result = cycle.tick(5.0, view, Arrivals.none())
    assert result.commands[0] == RejectPastDeadline(0, 5.0)
    assert MoveWaiting(0, 5.0, 10.0) in result.commands
    assert result.commands[-1] == SetClock(0, MAX, 5.0, ReconfigCosts().clock_change_s)
    assert result.decisions == (ClockDecision(5.0, 0, LOW, MAX, "escalation"),)
    # An instance with time to spare is left alone.
    calm = FleetView({0: InstanceView(0, 1, 1, earliest_deadline_s=60.0, routed=1)})
    policy.clocks = {0: MAX}
    assert cycle.tick(10.0, calm, Arrivals.none()).commands == ()


def test_epoch_boundaries_are_state_not_time_modulo_period() -> None:
    """A cycle started at t = 1000 (e.g. a restarted controller) steps 20 s and 60 s after ITS start."""
    policy = Scripted([])
    cycle = ControlCycle(
        policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False), origin_s=1000.0
    )
    cycle.start(1000.0)
    levels: list[tuple[float, str]] = []
    t = 1005.0
    while t <= 1060.0:
        result = cycle.tick(t, quiet([0]), Arrivals.none())
        levels += [(d.t_s, d.level) for d in result.decisions if isinstance(d, StepRecord)]
        t += 5.0
    assert levels == [(1020.0, "pool"), (1040.0, "pool"), (1060.0, "cluster"), (1060.0, "pool")]
    pool_obs = [o for o in policy.seen if o.now_s == 1040.0 and o.burst_windows_s]
    assert pool_obs[0].pool_period_start_s == 1040.0 and pool_obs[0].epoch_start_s == 1000.0


def test_arrivals_become_the_history_the_policy_sees() -> None:
    policy = Scripted([])
    cycle = ControlCycle(
        policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False, history_bin_s=10.0)
    )
    cycle.start(0.0)
    times = np.array([0.5, 1.0, 7.0, 12.0])
    arrivals = Arrivals(times, np.array([0, 0, 4, 8], dtype=np.int64))
    cycle.tick(5.0, quiet([0]), Arrivals(times[:2], arrivals.class_index[:2]))
    cycle.tick(10.0, quiet([0]), Arrivals(times[2:3], arrivals.class_index[2:3]))
    cycle.tick(15.0, quiet([0]), Arrivals(times[3:], arrivals.class_index[3:]))
    history = policy.seen[-1].class_rate_history_rps
    assert history[0] == (0.2,) and history[4] == (0.1,) and history[8] == (0.0,)


def test_a_fixed_plan_never_changes_and_needs_no_profile() -> None:
    plan = singlepool_plan(2, 8, MAX)
    cycle = ControlCycle(FixedPlan("singlepool"), None, plan, CycleConfig())
    cycle.start(0.0)
    for k in range(1, 200):
        result = cycle.tick(5.0 * k, quiet([0, 1], routed=3), Arrivals.none())
        assert not [c for c in result.commands if not isinstance(c, MoveWaiting | RejectPastDeadline)]
    assert cycle.plan == plan
    with pytest.raises(InvalidArgumentError, match="profile"):
        ControlCycle(Scripted([]), None, plan)


# ---------------------------------------------------------------------------------------------- executor

TP8, TP4 = InstanceSpec(8, MAX), InstanceSpec(4, MAX)


def test_restart_path_tp_change_starts_the_successor_on_the_freed_gpus() -> None:
    ex = Executor(ReconfigCosts(), gpu_budget=64, free=False, placement=Placement())
    ex.initial("all", TP8, 0.0)
    assert ex.apply([Action("retp", "all", 0, TP4, 0.0, 90.0, 0.0)], 0.0) == [DrainInstance(0, 0.0)]
    (successor,) = [i for i in ex.instances if i != 0]
    assert ex.instances[successor].gpus is None  # waits for its predecessor's GPUs
    started = ex.on_event(InstanceIdle(0, 30.0))
    assert started == [StartInstance(successor, "all", TP4, GpuSet(0, 0, 4), 30.0, 90.0)]
    assert ex.executed == {"retp": 1}


def test_starts_beyond_the_budget_wait_for_freed_gpus_unless_a_new_plan_supersedes_them() -> None:
    ex = Executor(ReconfigCosts(), gpu_budget=8, free=False, placement=Placement())
    ex.initial("all", TP8, 0.0)
    start = Action("start", "all", None, TP4, 0.0, 60.0, 0.0)
    stop = Action("stop", "all", 0, TP8, 0.0, 0.0, 0.0)
    assert ex.apply([start, stop], 0.0) == [DrainInstance(0, 0.0)]
    assert ex.on_event(InstanceIdle(0, 12.0)) == [StartInstance(1, "all", TP4, GpuSet(0, 0, 4), 12.0, 60.0)]
    # A start still waiting when the next plan comes is dropped with its generation.
    ex.apply([Action("start", "all", None, TP8, 20.0, 60.0, 0.0)], 20.0)
    ex.apply([], 25.0)
    assert ex.on_event(InstanceIdle(1, 30.0)) == []


def test_actions_fall_due_at_their_own_time_and_a_gone_instance_is_skipped() -> None:
    ex = Executor(ReconfigCosts(), gpu_budget=64, free=False, placement=Placement())
    ex.initial("all", TP8, 0.0)
    ex.initial("all", TP8, 0.0)
    later = [Action("stop", "all", 0, TP8, 70.0, 0.0, 0.0), Action("stop", "all", 0, TP8, 80.0, 0.0, 0.0)]
    assert ex.apply(later, 10.0) == [] and ex.next_due_s() == 70.0
    assert ex.due(75.0) == [DrainInstance(0, 70.0)]
    assert ex.due(80.0) == []  # already draining: nothing done, not counted
    assert ex.executed == {"stop": 1} and math.isinf(ex.next_due_s())


def test_placement_packs_best_fit_and_frees_whole_nodes() -> None:
    p = Placement()
    a, b, c = p.allocate(4), p.allocate(2), p.allocate(8)
    assert (a, b, c) == (GpuSet(0, 0, 4), GpuSet(0, 4, 2), GpuSet(1, 0, 8))
    assert p.allocate(2) == GpuSet(0, 6, 2)  # the fullest node with room
    p.release(c)
    assert p.nodes_held == 1 and p.gpus_held == 8
    assert Placement(max_nodes=1).allocate(8) is not None
    full = Placement(max_nodes=1)
    full.allocate(8)
    assert full.allocate(2) is None
    with pytest.raises(InvalidArgumentError, match="gpus"):
        p.release(c)


def _fragmented() -> Executor:
    """Two nodes each half used: a TP4 on node 0, a TP2 and a TP2 on node 1 after its TP4 left."""
    ex = Executor(ReconfigCosts(), gpu_budget=64, free=False, placement=Placement())
    ex.initial("a", TP4, 0.0)  # node 0, GPUs 0-3
    ex.initial("b", TP4, 0.0)  # node 0, GPUs 4-7
    ex.initial("c", TP8, 0.0)  # node 1
    ex.initial("d", TP4, 0.0)  # node 2
    ex.apply([Action("stop", "b", 1, TP4, 0.0, 0.0, 0.0), Action("stop", "c", 2, TP8, 0.0, 0.0, 0.0)], 0.0)
    ex.on_event(InstanceIdle(1, 5.0))
    ex.on_event(InstanceIdle(2, 5.0))
    return ex


def test_consolidation_moves_a_sparse_nodes_instances_and_drains_them_once_their_twins_are_up() -> None:
    ex = _fragmented()  # TP4 on node 0 and TP4 on node 2: one node would hold both
    assert ex.placement.nodes_held == 2
    (twin,) = ex.consolidate(10.0)
    assert isinstance(twin, StartInstance) and twin.spec == TP4 and twin.load_s == ReconfigCosts().start_s
    moved_pool = twin.pool
    old = next(
        r.instance_id
        for r in ex.instances.values()
        if r.pool == moved_pool and r.instance_id != twin.instance_id
    )
    assert twin.gpus.node != ex.instances[old].gpus.node  # type: ignore[union-attr]
    assert ex.consolidate(11.0) == []  # one move at a time: the fleet is not settled
    # The old instance serves until its twin is ready, then drains; its node is free once it is idle.
    assert ex.on_event(InstanceReady(twin.instance_id, 70.0)) == [DrainInstance(old, 70.0)]
    ex.on_event(InstanceIdle(old, 80.0))
    assert ex.placement.nodes_held == 1 and ex.placement.gpus_held == 8
    assert ex.consolidate(90.0) == []  # packed: nothing more to do
    assert ex.executed["start"] == 1 and ex.executed["stop"] == 3


def test_consolidation_never_opens_a_node_and_waits_for_a_settled_fleet() -> None:
    ex = Executor(ReconfigCosts(), gpu_budget=64, free=False, placement=Placement())
    ex.initial("a", TP8, 0.0)
    ex.initial("b", TP8, 0.0)
    assert ex.consolidate(1.0) == []  # two full nodes: nothing fits elsewhere
    pending = _fragmented()
    pending.apply([Action("stop", "a", 0, TP4, 60.0, 0.0, 0.0)], 10.0)
    assert pending.consolidate(10.0) == []  # an action is pending
    tight = _fragmented()
    tight.gpu_budget = 8  # no room for a twin beside its original
    assert tight.consolidate(10.0) == []
    assert nodes_needed([4, 4, 2, 2, 8]) == 3 and nodes_needed([]) == 0


def test_a_late_tick_steps_once_and_keeps_the_grid() -> None:
    """A driver that fell behind (e.g. a paused controller) gets one pool step, on the same grid."""
    policy = Scripted([])
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False))
    cycle.start(0.0)
    late = cycle.tick(47.0, quiet([0]), Arrivals.none())
    assert [d.level for d in late.decisions if isinstance(d, StepRecord)] == ["pool"]
    assert cycle.next_pool_s == 60.0 and cycle.next_cluster_s == 60.0
