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
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.singlepool import singlepool_plan
from controller.profiles import default_profile

PROFILE = default_profile("llama2-70b", "h100-sxm")
MAX = max(PROFILE.clocks_mhz)
LOW = min(PROFILE.clocks_mhz)
PERIODS = Periods(cluster_s=60.0, pool_s=20.0, instance_s=5.0)


@dataclass
class Scripted:
    """A policy whose pool steps return the next plan of a script; it records what it was shown."""

    plans: list[ClusterPlan]
    clocks: dict[int, int] = field(default_factory=dict)
    seen: list[ClusterObs] = field(default_factory=list)
    periods: Periods = PERIODS
    costs: ReconfigCosts = ReconfigCosts(warm_start_s=30.0, stagger_s=0.0)
    name: str = "scripted"

    @property
    def reconfiguration_free(self) -> bool:
        return False

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
    assert [(c.instance_id, c.gpus.node, c.gpus.first_gpu, c.load_s) for c in starts] == [(0, 0, 0, 0.0), (1, 1, 0, 0.0)]
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
    assert result.routes is not None and all(row == ((0, pytest.approx(row[0][1])),) for row in result.routes.primary)
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
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False), origin_s=1000.0)
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
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False, history_bin_s=10.0))
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
