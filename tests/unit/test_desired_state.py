"""controller/fleet/desired.py: the cycle's commands folded into per-node engine targets and GPU clocks."""

from __future__ import annotations

import pytest

from agent.api.errors import InvalidArgumentError
from controller.fleet.desired import Addressed, DesiredState, EngineTarget, engine_id, instance_of
from controller.model.cluster import InstanceSpec
from controller.model.fleet import (
    AbortStart,
    DrainInstance,
    GpuSet,
    MoveWaiting,
    RejectPastDeadline,
    SetClock,
    StartInstance,
)

DRAIN_S = 45.0


def _start(instance_id: int, node: int, first_gpu: int, tp: int, clock: int = 1980) -> StartInstance:
    return StartInstance(
        instance_id, "pool-a", InstanceSpec(tp, clock), GpuSet(node, first_gpu, tp), 1.0, 60.0
    )


def _state(nodes: int = 2) -> DesiredState:
    return DesiredState(nodes, drain_timeout_s=DRAIN_S)


def test_engine_ids_round_trip_and_foreign_names_are_not_instances() -> None:
    assert engine_id(12) == "i12"
    assert instance_of("i12") == 12
    for name in ("x12", "i", "i1a", "vllm-0", "I12", "i-1"):
        assert instance_of(name) is None


def test_a_state_needs_at_least_one_node() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        DesiredState(0, drain_timeout_s=DRAIN_S)
    assert info.value.field == "nodes"


def test_start_sets_a_running_target_on_its_node_and_its_gpus_clock() -> None:
    state = _state()
    assert state.apply(_start(3, node=1, first_gpu=4, tp=4, clock=1500), generation=7, command_id=21)
    assert state.nodes[1].engines == {
        "i3": EngineTarget("i3", 3, "pool-a", 1, (4, 5, 6, 7), 4, True, 7, 21, 60.0, DRAIN_S, 61.0)
    }
    assert state.nodes[1].clocks_mhz == {4: 1500, 5: 1500, 6: 1500, 7: 1500}
    assert state.nodes[0].engines == {} and state.nodes[0].clocks_mhz == {}


def test_start_on_a_node_outside_the_fleet_names_gpus_node() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _state(nodes=2).apply(_start(0, node=2, first_gpu=0, tp=8), generation=1)
    assert info.value.field == "gpus.node"
    assert info.value.allowed == "0..1"


def test_drain_stops_the_target_with_the_drain_timeout_and_its_own_generation() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=2), generation=1, command_id=5)
    assert state.apply(DrainInstance(1, 9.0), generation=2, command_id=6)
    target = state.engine(1)
    assert target is not None
    assert (target.running, target.generation, target.command_id, target.drain_timeout_s) == (
        False,
        2,
        6,
        DRAIN_S,
    )
    assert target.gpu_indices == (0, 1) and target.node == 0


def test_an_aborted_start_stops_at_once_without_drain_time() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=8), generation=1)
    assert state.apply(AbortStart(1, 2.0), generation=4, command_id=8)
    target = state.engine(1)
    assert target is not None
    assert (target.running, target.generation, target.command_id, target.drain_timeout_s) == (
        False,
        4,
        8,
        0.0,
    )


def test_set_clock_changes_only_the_instances_gpus_and_records_its_command() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=4, clock=1980), generation=1)
    state.apply(_start(2, node=0, first_gpu=4, tp=4, clock=1980), generation=2)
    assert state.apply(SetClock(2, 1200, 5.0, 0.065), generation=3, command_id=31)
    assert state.nodes[0].clocks_mhz == {
        0: 1980,
        1: 1980,
        2: 1980,
        3: 1980,
        4: 1200,
        5: 1200,
        6: 1200,
        7: 1200,
    }
    assert state.nodes[0].clock_command_ids == [31]
    target = state.engine(2)
    assert target is not None and target.generation == 2 and target.running  # the engine is untouched


def test_set_clock_without_a_command_id_records_none() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=8), generation=1)
    assert state.apply(SetClock(1, 1200, 5.0, 0.0), generation=2)
    assert state.nodes[0].clock_command_ids == []


def test_commands_for_an_unknown_instance_change_nothing() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=8), generation=1)
    before = (dict(state.nodes[0].engines), dict(state.nodes[0].clocks_mhz))
    for command in (DrainInstance(9, 1.0), AbortStart(9, 1.0), SetClock(9, 1200, 1.0, 0.0)):
        assert state.apply(command, generation=5) is False
    assert (state.nodes[0].engines, state.nodes[0].clocks_mhz) == before


def test_queue_commands_of_a_known_instance_are_not_the_fleets() -> None:
    state = _state()
    state.apply(_start(1, node=1, first_gpu=0, tp=8), generation=1)
    for command in (RejectPastDeadline(1, 2.0), MoveWaiting(1, 2.0, 7.0)):
        assert state.apply(command, generation=2) is False
        assert state.address(command) == Addressed(-1, "")
    target = state.engine(1)
    assert target is not None and target.running and target.generation == 1


def test_address_names_the_node_and_engine_of_each_command() -> None:
    state = _state()
    start = _start(4, node=1, first_gpu=0, tp=8)
    assert state.address(start) == Addressed(1, "i4")  # a start addresses its GPUs' node before it is applied
    assert state.address(DrainInstance(4, 1.0)) == Addressed(-1, "")  # not yet known
    state.apply(start, generation=1)
    assert state.address(DrainInstance(4, 1.0)) == Addressed(1, "i4")
    assert state.address(AbortStart(4, 1.0)) == Addressed(1, "i4")
    assert state.address(SetClock(4, 1200, 1.0, 0.0)) == Addressed(1, "i4")


def test_regenerate_replaces_only_the_generation() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=8), generation=3, command_id=11)
    before = state.engine(1)
    state.regenerate(0, "i1", 40)
    after = state.engine(1)
    assert before is not None and after is not None
    assert after.generation == 40
    assert (after.running, after.command_id, after.gpu_indices) == (True, 11, before.gpu_indices)
    state.regenerate(0, "i99", 50)  # an engine it does not hold: nothing happens
    assert set(state.nodes[0].engines) == {"i1"}


def test_forget_drops_the_target_but_the_gpus_keep_their_clock_until_the_next_start() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=8, clock=1300), generation=1)
    state.apply(DrainInstance(1, 2.0), generation=2)
    state.forget(0, "i1")
    state.forget(0, "i1")  # twice: harmless
    assert state.engine(1) is None and state.nodes[0].engines == {}
    assert state.nodes[0].clocks_mhz[0] == 1300
    state.apply(_start(2, node=0, first_gpu=0, tp=4, clock=1700), generation=3)
    assert state.nodes[0].clocks_mhz == {
        0: 1700,
        1: 1700,
        2: 1700,
        3: 1700,
        4: 1300,
        5: 1300,
        6: 1300,
        7: 1300,
    }


def test_pool_of_gpu_is_the_running_engines_pool() -> None:
    state = _state()
    state.apply(_start(1, node=0, first_gpu=0, tp=4), generation=1)
    assert [state.pool_of_gpu(0, g) for g in (0, 3, 4)] == ["pool-a", "pool-a", ""]
    assert state.pool_of_gpu(1, 0) == ""
    state.apply(DrainInstance(1, 2.0), generation=2)
    assert state.pool_of_gpu(0, 0) == ""  # a stopped target holds no GPU for the ledger
