"""Node cordoning in the pure core: placement skips cordoned nodes, the executor moves instances off
drained and lost nodes, and the control cycle's GPU budget shrinks by the cordoned nodes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from agent.api.errors import InvalidArgumentError
from controller.control.cycle import ControlCycle, CycleConfig
from controller.model.cluster import ClusterPlan, InstanceSpec
from controller.model.decisions import PlanStep
from controller.model.fleet import (
    AbortStart,
    Arrivals,
    DrainInstance,
    FleetView,
    GpuSet,
    InstanceIdle,
    InstanceReady,
    InstanceView,
    StartInstance,
)
from controller.model.profile import Profile
from controller.model.state import ClusterObs, Periods, Phase
from controller.orchestrator.executor import Executor
from controller.orchestrator.placement import Placement
from controller.orchestrator.plan import Action, ReconfigCosts
from controller.policy.singlepool import singlepool_plan
from controller.profiles import default_profile

PROFILE = default_profile("llama2-70b", "h100-sxm")
MAX = max(PROFILE.clocks_mhz)
TP8, TP4 = InstanceSpec(8, MAX), InstanceSpec(4, MAX)
COSTS = ReconfigCosts(warm_start_s=30.0, stagger_s=0.0)
START_S = COSTS.start_s
NONE: frozenset[int] = frozenset()
PERIODS = Periods(cluster_s=60.0, pool_s=20.0, instance_s=5.0)


# ------------------------------------------------------------------------------------------ placement


def test_allocation_skips_a_cordoned_node_even_when_it_fits_best() -> None:
    p = Placement(max_nodes=3)
    assert p.allocate(4) == GpuSet(0, 0, 4)
    p.cordoned = frozenset({0})
    assert p.allocate(4) == GpuSet(1, 0, 4)  # node 0 is the fullest with room, but cordoned
    assert p.copy().allocate(4) == GpuSet(1, 4, 4)  # a copy keeps the cordon


def test_a_cordoned_empty_node_is_not_opened() -> None:
    p = Placement(max_nodes=2)
    p.cordoned = frozenset({0})
    assert p.allocate(8) == GpuSet(1, 0, 8)
    assert p.allocate(8) is None  # node 0 is empty but cordoned: no room
    p.cordoned = NONE
    assert p.allocate(8) == GpuSet(0, 0, 8)


def test_an_unbounded_placement_adds_a_node_past_the_cordoned_ones() -> None:
    p = Placement()
    p.allocate(4)
    p.cordoned = frozenset({0})
    assert p.allocate(4) == GpuSet(1, 0, 4)


# ------------------------------------------------------------------------------------------ executor


def _executor(max_nodes: int) -> Executor:
    return Executor(COSTS, gpu_budget=8 * max_nodes, free=False, placement=Placement(max_nodes))


def test_a_lost_nodes_instances_are_gone_at_once_and_start_again_elsewhere() -> None:
    ex = _executor(3)
    ex.initial("a", TP4, 0.0)  # node 0, GPUs 0-3
    ex.initial("b", TP4, 0.0)  # node 0, GPUs 4-7
    ex.initial("c", TP4, 0.0)  # node 1, GPUs 0-3
    commands = ex.set_cordoned(frozenset({0}), frozenset({0}), 10.0)
    assert commands == [
        StartInstance(3, "a", TP4, GpuSet(1, 4, 4), 10.0, START_S),
        StartInstance(4, "b", TP4, GpuSet(2, 0, 4), 10.0, START_S),
    ]  # no drain or abort: the lost node's engines are not asked anything
    assert set(ex.instances) == {2, 3, 4}
    assert ex.instances[3].phase is Phase.STARTING and ex.instances[4].phase is Phase.STARTING
    assert ex.placement.gpus_held == 12 and ex.placement.used_gpus(0) == 0
    assert ex.executed["start"] == 2


def test_a_lost_nodes_instance_waits_for_room_and_starts_when_gpus_are_freed() -> None:
    ex = _executor(2)
    ex.initial("a", TP8, 0.0)  # node 0
    ex.initial("b", TP8, 0.0)  # node 1
    assert ex.apply([Action("stop", "a", 0, TP8, 0.0, 0.0, 0.0)], 0.0) == [DrainInstance(0, 0.0)]
    assert ex.set_cordoned(frozenset({1}), frozenset({1}), 5.0) == []  # node 0 still held, node 1 lost
    assert set(ex.instances) == {0}
    assert ex.on_event(InstanceIdle(0, 20.0)) == [StartInstance(2, "b", TP8, GpuSet(0, 0, 8), 20.0, START_S)]


def test_a_lost_nodes_draining_instance_is_just_gone() -> None:
    ex = _executor(2)
    ex.initial("a", TP8, 0.0)
    ex.apply([Action("stop", "a", 0, TP8, 0.0, 0.0, 0.0)], 0.0)
    assert ex.set_cordoned(frozenset({0}), frozenset({0}), 5.0) == []
    assert ex.instances == {} and ex.placement.gpus_held == 0
    assert ex.executed == {"stop": 1}


def test_a_lost_nodes_starting_instance_starts_again_elsewhere_without_an_abort() -> None:
    ex = _executor(2)
    (start,) = ex.apply([Action("start", "a", None, TP8, 0.0, 60.0, 0.0)], 0.0)
    assert isinstance(start, StartInstance) and start.gpus.node == 0
    assert ex.set_cordoned(frozenset({0}), frozenset({0}), 5.0) == [
        StartInstance(1, "a", TP8, GpuSet(1, 0, 8), 5.0, START_S)
    ]
    assert set(ex.instances) == {1} and ex.executed["start"] == 2


def test_a_drained_nodes_active_instance_gets_a_twin_and_drains_once_it_is_ready() -> None:
    ex = _executor(3)  # room for more than one twin
    ex.initial("a", TP8, 0.0)  # node 0
    assert ex.set_cordoned(frozenset({0}), NONE, 10.0) == [
        StartInstance(1, "a", TP8, GpuSet(1, 0, 8), 10.0, START_S)
    ]
    assert ex.instances[0].phase is Phase.ACTIVE  # serves until its twin is up
    assert ex.set_cordoned(frozenset({0}), NONE, 11.0) == []  # already has a twin: no second one
    assert ex.on_event(InstanceReady(1, 40.0)) == [DrainInstance(0, 40.0)]
    ex.on_event(InstanceIdle(0, 50.0))
    assert set(ex.instances) == {1} and ex.placement.used_gpus(0) == 0
    assert ex.executed == {"start": 1, "stop": 1}


def test_a_drained_nodes_active_instance_stays_when_there_is_no_room_for_a_twin() -> None:
    ex = _executor(2)
    ex.initial("a", TP8, 0.0)
    ex.initial("b", TP8, 0.0)
    assert ex.set_cordoned(frozenset({0}), NONE, 10.0) == []
    assert ex.instances[0].phase is Phase.ACTIVE and ex.instances[0].gpus == GpuSet(0, 0, 8)


def test_a_drained_nodes_starting_instance_is_aborted_and_started_elsewhere() -> None:
    ex = _executor(2)
    ex.apply([Action("start", "a", None, TP8, 0.0, 60.0, 0.0)], 0.0)
    assert ex.set_cordoned(frozenset({0}), NONE, 5.0) == [
        AbortStart(0, 5.0),
        StartInstance(1, "a", TP8, GpuSet(1, 0, 8), 5.0, START_S),
    ]
    assert set(ex.instances) == {1}


def test_a_drained_nodes_draining_instance_is_left_to_finish() -> None:
    ex = _executor(2)
    ex.initial("a", TP8, 0.0)
    ex.apply([Action("stop", "a", 0, TP8, 0.0, 0.0, 0.0)], 0.0)
    assert ex.set_cordoned(frozenset({0}), NONE, 5.0) == []
    assert ex.instances[0].phase is Phase.DRAINING


def test_instances_on_other_nodes_are_untouched_and_new_starts_avoid_the_cordon() -> None:
    ex = _executor(3)
    ex.initial("a", TP4, 0.0)  # node 0
    ex.initial("b", TP8, 0.0)  # node 1
    ex.set_cordoned(frozenset({0}), frozenset({0}), 5.0)  # a restarts on node 2
    assert ex.instances[1].phase is Phase.ACTIVE and ex.instances[1].gpus == GpuSet(1, 0, 8)
    (start,) = ex.apply([Action("start", "c", None, TP4, 6.0, 60.0, 0.0)], 6.0)
    assert isinstance(start, StartInstance) and start.gpus == GpuSet(2, 4, 4)
    ex.set_cordoned(NONE, NONE, 7.0)  # back: node 0 takes instances again
    (again,) = ex.apply([Action("start", "d", None, TP8, 8.0, 60.0, 0.0)], 8.0)
    assert isinstance(again, StartInstance) and again.gpus == GpuSet(0, 0, 8)


# ------------------------------------------------------------------------------------------ cycle


@dataclass
class Recording:
    """A policy that keeps its plan and records every observation it is shown."""

    seen: list[ClusterObs] = field(default_factory=list)
    periods: Periods = PERIODS
    costs: ReconfigCosts = COSTS
    name: str = "recording"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: object, profile: Profile) -> ClusterPlan:
        raise AssertionError("not called")

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self.pool_step(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        self.seen.append(obs)
        return PlanStep(plan=obs.plan, pools=())

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        self.seen.append(obs)
        return {}


def _cycle(instances: int, total_gpus: int = 24) -> tuple[ControlCycle, Recording]:
    policy = Recording()
    config = CycleConfig(total_gpus=total_gpus, max_nodes=3, escalation=False)
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(instances, 8, MAX), config)
    cycle.start(0.0)
    return cycle, policy


def _quiet(ids: list[int]) -> FleetView:
    return FleetView({i: InstanceView(i, 0, 0, math.inf, 0) for i in ids})


def test_lost_must_be_among_the_cordoned_nodes() -> None:
    cycle, _ = _cycle(1)
    with pytest.raises(InvalidArgumentError) as info:
        cycle.set_nodes(frozenset({1}), frozenset({1, 2}), 1.0)
    assert info.value.field == "lost"
    assert "[1]" in info.value.allowed


def test_each_cordoned_node_takes_eight_gpus_out_of_the_policys_budget() -> None:
    cycle, policy = _cycle(1)
    cycle.tick(5.0, _quiet([0]), Arrivals.none())
    assert policy.seen[-1].total_gpus == 24
    cycle.set_nodes(frozenset({2}), NONE, 6.0)
    cycle.tick(10.0, _quiet([0]), Arrivals.none())
    assert policy.seen[-1].total_gpus == 16
    cycle.set_nodes(frozenset({1, 2}), frozenset({1}), 11.0)
    policy.seen.clear()
    cycle.tick(20.0, _quiet([0]), Arrivals.none())  # a pool step and the instance step
    assert [o.total_gpus for o in policy.seen] == [8, 8]
    cycle.set_nodes(NONE, NONE, 21.0)
    cycle.tick(25.0, _quiet([0]), Arrivals.none())
    assert policy.seen[-1].total_gpus == 24


def test_the_budget_never_goes_below_zero() -> None:
    cycle, policy = _cycle(1, total_gpus=8)
    cycle.set_nodes(frozenset({1, 2}), NONE, 1.0)
    cycle.tick(5.0, _quiet([0]), Arrivals.none())
    assert policy.seen[-1].total_gpus == 0


def test_a_lost_node_restarts_its_instance_and_leaves_the_routing_table() -> None:
    cycle, _ = _cycle(2)  # instances 0 and 1 on nodes 0 and 1
    pool = cycle.plan.pools[0].name
    result = cycle.set_nodes(frozenset({0}), frozenset({0}), 3.0)
    assert result.commands == (StartInstance(2, pool, TP8, GpuSet(2, 0, 8), 3.0, START_S),)
    assert result.routes is not None
    assert all({i for i, _ in row} == {1} for row in result.routes.primary)
    ready = cycle.on_events([InstanceReady(2, 33.0)])
    assert ready.routes is not None and all({i for i, _ in row} == {1, 2} for row in ready.routes.primary)


def test_a_drained_node_with_nothing_on_it_changes_no_instance_but_republishes_routes() -> None:
    cycle, _ = _cycle(1)
    result = cycle.set_nodes(frozenset({2}), NONE, 1.0)
    assert result.commands == ()
    assert result.routes is not None and all({i for i, _ in row} == {0} for row in result.routes.primary)


# ------------------------------------------------------------------------------------------ known gaps


def _serving(ex: Executor) -> list[int]:
    return sorted(i for i, r in ex.instances.items() if r.phase is not Phase.DRAINING)


def test_a_drained_nodes_instance_still_moves_when_its_twins_node_is_lost() -> None:
    ex = _executor(4)
    ex.initial("a", TP8, 0.0)  # node 0
    ex.set_cordoned(frozenset({0}), NONE, 1.0)  # twin 1 on node 1
    ex.set_cordoned(frozenset({0, 1}), frozenset({1}), 2.0)  # the twin's node is lost
    for i in [i for i, r in ex.instances.items() if r.phase is Phase.STARTING]:
        ex.on_event(InstanceReady(i, 70.0))
    assert ex.instances[0].phase is Phase.DRAINING  # the drained node empties
    assert len(_serving(ex)) == 1


def test_a_lost_instance_with_a_twin_under_way_is_not_started_twice() -> None:
    ex = _executor(4)
    ex.initial("a", TP8, 0.0)  # node 0
    ex.set_cordoned(frozenset({0}), NONE, 1.0)  # twin 1 on node 1
    ex.set_cordoned(frozenset({0}), frozenset({0}), 2.0)  # node 0 is then lost
    assert _serving(ex) == [1]  # the twin already replaces it
