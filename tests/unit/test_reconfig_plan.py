"""Reconfiguration planning (controller/orchestrator/plan.py): matching, ordering, capacity, hysteresis."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api.errors import InvalidArgumentError
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.state import InstanceObs, Phase
from controller.orchestrator import Action, Hysteresis, ReconfigCosts, plan_reconfiguration

CLOCKS = (800, 1200, 1600, 1980)
TPS = (2, 4, 8)
POOL_CLASSES = {"a": ("SS",), "b": ("LL",)}
NO_HYSTERESIS = Hysteresis(min_dwell_s=0.0, saving_ratio=0.0)


class FakeModel:
    """Capacity and power both grow with tp x clock (never equal for two different specs here), so a
    change that removes capacity always saves power."""

    def capacity_rps(self, pool: str, spec: InstanceSpec) -> float:
        return spec.tp * spec.clock_mhz * (1 + spec.tp / 100) / 1000

    def power_w(self, pool: str, spec: InstanceSpec) -> float:
        return spec.tp * spec.clock_mhz * (1 + spec.tp / 100) / 10


MODEL = FakeModel()
specs = st.builds(InstanceSpec, tp=st.sampled_from(TPS), clock_mhz=st.sampled_from(CLOCKS))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[InstanceObs], ClusterPlan]:
    current: list[InstanceObs] = []
    for pool in POOL_CLASSES:
        for spec in draw(st.lists(specs, max_size=5)):
            phase = draw(st.sampled_from((Phase.ACTIVE, Phase.ACTIVE, Phase.STARTING)))
            current.append(InstanceObs(len(current), pool, spec, phase, 1.0, 0, 0))
    pools = tuple(
        PoolPlan(name=name, class_names=classes, instances=tuple(draw(st.lists(specs, max_size=5))))
        for name, classes in POOL_CLASSES.items()
        if draw(st.booleans()) or name == "a"
    )
    return current, ClusterPlan(pools=pools)


def plan_of(current: list[InstanceObs]) -> ClusterPlan:
    by_pool: dict[str, list[InstanceSpec]] = defaultdict(list)
    for i in current:
        by_pool[i.pool].append(i.spec)
    return ClusterPlan(
        pools=tuple(
            PoolPlan(name=p, class_names=POOL_CLASSES[p], instances=tuple(s)) for p, s in by_pool.items()
        )
    )


def apply(current: list[InstanceObs], actions: tuple[Action, ...]) -> dict[str, Counter[InstanceSpec]]:
    """End state of each pool once every action has run."""
    state = {i.instance_id: (i.pool, i.spec) for i in current if i.phase is not Phase.DRAINING}
    added: list[tuple[str, InstanceSpec]] = []
    for a in actions:
        if a.kind == "start":
            added.append((a.pool, a.spec))
        elif a.kind == "stop":
            assert a.instance_id is not None
            del state[a.instance_id]
        else:
            assert a.instance_id is not None
            state[a.instance_id] = (a.pool, a.spec)
    out: dict[str, Counter[InstanceSpec]] = defaultdict(Counter)
    for pool, spec in [*state.values(), *added]:
        out[pool][spec] += 1
    return out


def capacity_timeline(current: list[InstanceObs], actions: tuple[Action, ...], pool: str) -> list[float]:
    """The pool's serving capacity after each distinct event time (starts count once they are up)."""
    events: list[tuple[float, float]] = []
    specs_by_id = {i.instance_id: i.spec for i in current}
    for a in actions:
        if a.pool != pool:
            continue
        new = MODEL.capacity_rps(pool, a.spec)
        old = 0.0 if a.instance_id is None else MODEL.capacity_rps(pool, specs_by_id[a.instance_id])
        if a.kind == "start":
            events.append((a.not_before_s + a.duration_s, new))
        elif a.kind == "stop":
            events.append((a.not_before_s, -old))
        elif a.kind == "clock":
            events.append((a.not_before_s, new - old))
        else:
            events += [(a.not_before_s, -old), (a.not_before_s + a.duration_s, new)]
    level = sum(MODEL.capacity_rps(pool, i.spec) for i in current if i.pool == pool)
    out = [level]
    for t in sorted({t for t, _ in events}):
        level += sum(d for te, d in events if te == t)
        out.append(level)
    return out


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_end_state_is_the_desired_plan_and_capacity_never_dips(
    scenario: tuple[list[InstanceObs], ClusterPlan],
) -> None:
    current, desired = scenario
    actions = plan_reconfiguration(
        current, desired, costs=ReconfigCosts(), model=MODEL, now_s=100.0, hysteresis=NO_HYSTERESIS
    )
    end = apply(current, actions)
    for pool in desired.pools:
        assert end[pool.name] == Counter(pool.instances)
    for gone in {i.pool for i in current} - {p.name for p in desired.pools}:
        assert not end[gone]
    # Ordered by time; scale out before scale in; stops staggered.
    assert [a.not_before_s for a in actions] == sorted(a.not_before_s for a in actions)
    for name in POOL_CLASSES:
        starts = [a.not_before_s for a in actions if a.pool == name and a.kind == "start"]
        stops = [a.not_before_s for a in actions if a.pool == name and a.kind == "stop"]
        if starts and stops:
            assert max(starts) <= min(stops)
    disruptive = sorted(a.not_before_s for a in actions if a.kind in ("stop", "retp"))
    assert all(b - a >= ReconfigCosts().stagger_s - 1e-9 for a, b in itertools.pairwise(disruptive))
    # Without a GPU limit TP changes are make-before-break: capacity never below min(need, now).
    assert not [a for a in actions if a.kind == "retp"]
    for pool in desired.pools:
        need = sum(MODEL.capacity_rps(pool.name, s) for s in pool.instances)
        timeline = capacity_timeline(current, actions, pool.name)
        floor = min(need, timeline[0])
        assert min(timeline) >= floor - 1e-9


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_desired_equal_to_current_gives_no_actions(scenario: tuple[list[InstanceObs], ClusterPlan]) -> None:
    current, _ = scenario
    if not current:
        return
    assert (
        plan_reconfiguration(current, plan_of(current), costs=ReconfigCosts(), model=MODEL, now_s=5.0) == ()
    )


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(min_value=0, max_value=10_000))
def test_deterministic(scenario: tuple[list[InstanceObs], ClusterPlan], budget: int) -> None:
    current, desired = scenario
    kwargs = {"costs": ReconfigCosts(), "model": MODEL, "now_s": 0.0, "gpu_budget": budget}
    assert plan_reconfiguration(current, desired, **kwargs) == plan_reconfiguration(  # type: ignore[arg-type]
        list(reversed(current)),
        desired,
        **kwargs,  # type: ignore[arg-type]
    )


def one_pool(*instances: InstanceSpec) -> ClusterPlan:
    return ClusterPlan(pools=(PoolPlan(name="a", class_names=("SS",), instances=instances),))


def obs(instance_id: int, spec: InstanceSpec, phase: Phase = Phase.ACTIVE) -> InstanceObs:
    return InstanceObs(instance_id, "a", spec, phase, 1.0, 0, 0)


def test_clock_change_pairs_same_tp_and_is_costed() -> None:
    current = [obs(7, InstanceSpec(8, 1980))]
    (action,) = plan_reconfiguration(
        current, one_pool(InstanceSpec(8, 1200)), costs=ReconfigCosts(), model=MODEL, now_s=10.0
    )
    assert (action.kind, action.instance_id, action.spec) == ("clock", 7, InstanceSpec(8, 1200))
    assert action.duration_s == pytest.approx(0.065)
    assert action.energy_j == pytest.approx(8 * 75.0 * 0.065)


def test_hysteresis_blocks_only_changes_that_remove_capacity() -> None:
    current = [obs(1, InstanceSpec(8, 1600)), obs(2, InstanceSpec(8, 1600))]
    recently = {1: 90.0, 2: 90.0}
    down = one_pool(InstanceSpec(8, 1200), InstanceSpec(8, 1200))
    up = one_pool(InstanceSpec(8, 1980), InstanceSpec(8, 1980), InstanceSpec(4, 1980))
    h = Hysteresis(min_dwell_s=60.0)
    assert (
        plan_reconfiguration(
            current,
            down,
            costs=ReconfigCosts(),
            model=MODEL,
            now_s=100.0,
            hysteresis=h,
            changed_at_s=recently,
        )
        == ()
    )
    later = plan_reconfiguration(
        current, down, costs=ReconfigCosts(), model=MODEL, now_s=200.0, hysteresis=h, changed_at_s=recently
    )
    assert [a.kind for a in later] == ["clock", "clock"]
    kinds = Counter(
        a.kind
        for a in plan_reconfiguration(
            current, up, costs=ReconfigCosts(), model=MODEL, now_s=100.0, hysteresis=h, changed_at_s=recently
        )
    )
    assert kinds == {"clock": 2, "start": 1}


def test_hysteresis_skips_changes_saving_less_than_they_cost() -> None:
    current = [obs(1, InstanceSpec(8, 1600))]
    desired = one_pool(InstanceSpec(8, 1200))
    # Saving 8*400*1.08/10 W = 345.6 W; the clock change costs 39 J.
    cheap = Hysteresis(min_dwell_s=0.0, epoch_s=1.0, saving_ratio=1.0)
    assert (
        len(
            plan_reconfiguration(
                current, desired, costs=ReconfigCosts(), model=MODEL, now_s=0.0, hysteresis=cheap
            )
        )
        == 1
    )
    dear = ReconfigCosts(clock_change_s=10.0)  # 8 GPUs x 75 W x 10 s = 6000 J > 345.6 J
    assert plan_reconfiguration(current, desired, costs=dear, model=MODEL, now_s=0.0, hysteresis=cheap) == ()


def test_tp_change_is_make_before_break_when_gpus_allow_else_restart() -> None:
    current = [obs(1, InstanceSpec(8, 1980)), obs(2, InstanceSpec(8, 1980))]
    desired = one_pool(InstanceSpec(8, 1980), InstanceSpec(4, 1980), InstanceSpec(4, 1980))
    roomy = plan_reconfiguration(
        current, desired, costs=ReconfigCosts(), model=MODEL, now_s=0.0, hysteresis=NO_HYSTERESIS
    )
    assert Counter(a.kind for a in roomy) == {"start": 2, "stop": 1}  # the old TP8 serves until then
    tight = plan_reconfiguration(
        current,
        desired,
        costs=ReconfigCosts(),
        model=MODEL,
        now_s=0.0,
        hysteresis=NO_HYSTERESIS,
        gpu_budget=16,
    )
    kinds = Counter(a.kind for a in tight)
    assert kinds == {"retp": 1, "start": 1}
    start = next(a for a in tight if a.kind == "start")
    retp = next(a for a in tight if a.kind == "retp")
    assert retp.duration_s == pytest.approx(90.0)
    # The start needs the 4 GPUs the re-shard frees: it is released after it.
    assert start.not_before_s >= retp.not_before_s


def test_fast_reshard_uses_the_gpu_to_gpu_path() -> None:
    current = [obs(1, InstanceSpec(8, 1980))]
    (action,) = plan_reconfiguration(
        current,
        one_pool(InstanceSpec(4, 1980)),
        costs=ReconfigCosts(fast_reshard=True),
        model=MODEL,
        now_s=0.0,
        hysteresis=NO_HYSTERESIS,
    )
    assert action.kind == "retp"
    assert action.duration_s == pytest.approx(0.05)


def test_restart_tp_changes_without_margin_run_one_at_a_time() -> None:
    current = [obs(i, InstanceSpec(8, 1980)) for i in range(3)]
    desired = one_pool(*(InstanceSpec(4, 1980),) * 3)
    actions = plan_reconfiguration(
        current,
        desired,
        costs=ReconfigCosts(),
        model=MODEL,
        now_s=0.0,
        hysteresis=NO_HYSTERESIS,
        gpu_budget=24,
    )
    retps = [a for a in actions if a.kind == "retp"]
    assert len(retps) == 3
    for a, b in itertools.pairwise(retps):
        assert b.not_before_s >= a.not_before_s + a.duration_s


def test_draining_instances_are_ignored_and_dropped_pools_stopped() -> None:
    current = [
        obs(1, InstanceSpec(8, 1980), Phase.DRAINING),
        InstanceObs(2, "old", InstanceSpec(4, 1980), Phase.ACTIVE, 0.0, 0, 0),
    ]
    actions = plan_reconfiguration(
        current, one_pool(InstanceSpec(8, 1980)), costs=ReconfigCosts(), model=MODEL, now_s=0.0
    )
    assert [(a.kind, a.pool, a.instance_id) for a in actions] == [("start", "a", None), ("stop", "old", 2)]


def test_bad_input_is_rejected() -> None:
    current = [obs(1, InstanceSpec(8, 1980)), obs(1, InstanceSpec(8, 1980))]
    with pytest.raises(InvalidArgumentError, match="current"):
        plan_reconfiguration(current, one_pool(), costs=ReconfigCosts(), model=MODEL, now_s=0.0)
    with pytest.raises(InvalidArgumentError, match="now_s"):
        plan_reconfiguration([], one_pool(), costs=ReconfigCosts(), model=MODEL, now_s=float("nan"))
    with pytest.raises(InvalidArgumentError, match=r"costs\.warm_start_s"):
        ReconfigCosts(warm_start_s=-1.0)
    with pytest.raises(InvalidArgumentError, match=r"hysteresis\.min_dwell_s"):
        Hysteresis(min_dwell_s=float("inf"))
