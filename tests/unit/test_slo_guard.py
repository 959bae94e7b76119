"""The closed-loop SLO guard (controller/control/guard.py): the pure rule, and the cycle feeding it
realised completions and handing its state to the policy through the observation."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.control.cycle import ControlCycle, CycleConfig
from controller.control.guard import GuardConfig, SloGuard, check
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.fleet import Arrivals, Completions, FleetView, InstanceView
from controller.model.state import GuardState
from controller.policy.baselines import ScaleFreq
from controller.policy.capacity import pool_capacities
from controller.policy.dynamollm import DynamoLLM
from controller.policy.singlepool import singlepool_plan
from tests.unit.test_control_cycle import COSTS, LOW, MAX, PERIODS, PROFILE, Scripted

CLOCKS = tuple(sorted(PROFILE.clocks_mhz))
N = len(CLASS_NAMES)


def one_class(met: int, total: int, c: int = 0) -> Completions:
    m, t = [0] * N, [0] * N
    m[c], t[c] = met, total
    return Completions(tuple(m), tuple(t))


states = st.builds(
    GuardState,
    factor=st.floats(1.0, 1.5),
    clock_floor_mhz=st.sampled_from((0, *CLOCKS)),
    calm_checks=st.integers(0, 10),
    since_s=st.floats(-1e4, 1e4),
    factor_raised_s=st.floats(-1e4, 1e4),
)


@settings(max_examples=300, deadline=None)
@given(
    state=states,
    total=st.integers(0, 5000),
    met_share=st.floats(0.0, 1.0),
    now_s=st.floats(-1e4, 2e4),
    lowest=st.sampled_from((0, *CLOCKS)),
)
def test_the_guard_never_lowers_capacity_while_below_target(
    state: GuardState, total: int, met_share: float, now_s: float, lowest: int
) -> None:
    config = GuardConfig()
    met = math.floor(total * met_share)
    new = check(state, met, total, now_s, CLOCKS, lowest, config)
    if total == 0 or met / total < config.target:
        assert new.factor >= state.factor
        assert new.clock_floor_mhz >= state.clock_floor_mhz
    assert 1.0 <= new.factor <= max(config.max_factor, state.factor)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.floats(0.0, 1.0)), min_size=1, max_size=40))
def test_a_guarded_pool_below_target_never_loses_capacity_over_a_run(
    ticks: list[tuple[int, float]],
) -> None:
    guard = SloGuard(CLOCKS, GuardConfig(interval_s=5.0))
    before = GuardState()
    for k, (total, share) in enumerate(ticks):
        now_s = 5.0 * (k + 1)
        guard.observe(now_s, one_class(math.floor(total * share), total))
        met, n = guard.windowed(before.since_s)
        after = guard.update(now_s, {"P": CLASS_NAMES}, {"P": LOW})["P"]
        if n[0] == 0 or met[0] / n[0] < guard.config.target:
            assert after.factor >= before.factor and after.clock_floor_mhz >= before.clock_floor_mhz
        before = after


def test_relaxes_only_after_several_checks_well_above_target() -> None:
    config = GuardConfig()
    state = GuardState(factor=1.3, clock_floor_mhz=CLOCKS[-1])
    for _ in range(config.relax_checks - 1):
        state = check(state, 1000, 1000, 0.0, CLOCKS, 0, config)
        assert (state.factor, state.clock_floor_mhz) == (1.3, CLOCKS[-1])
    state = check(state, 1000, 1000, 0.0, CLOCKS, 0, config)
    assert state.factor < 1.3 and state.clock_floor_mhz == CLOCKS[-2]
    # Between target and relax: held.
    held = check(state, 995, 1000, 0.0, CLOCKS, 0, config)
    assert (held.factor, held.clock_floor_mhz, held.calm_checks) == (state.factor, state.clock_floor_mhz, 0)


def test_a_pool_below_target_gets_a_higher_clock_floor_and_guard_factor() -> None:
    policy = Scripted([])
    plan = singlepool_plan(1, 8, LOW)
    pool = plan.pools[0].name
    cycle = ControlCycle(policy, PROFILE, plan, CycleConfig(escalation=False))
    cycle.start(0.0)
    view = FleetView({0: InstanceView(0, 0, 0, math.inf, 0)})
    cycle.tick(5.0, view, Arrivals.none(), one_class(900, 1000))
    guard = policy.seen[-1].guard[pool]
    assert guard.clock_floor_mhz > LOW and guard.factor > 1.0
    assert guard.attainment == 0.9 and guard.samples == 1000


def test_dynamollm_keeps_its_clocks_above_the_guard_floor() -> None:
    def run(met: int) -> int:
        policy = DynamoLLM(periods=PERIODS, costs=COSTS)
        cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, MAX), CycleConfig(escalation=False))
        cycle.start(0.0)
        view = FleetView({0: InstanceView(0, 0, 0, math.inf, 0)})
        arrivals = Arrivals.none()
        cycle.tick(5.0, view, arrivals, one_class(met, 1000))
        cycle.tick(10.0, view, arrivals)
        return cycle.executor.instances[0].spec.clock_mhz

    assert run(1000) < MAX  # idle and meeting its SLO: the instance level lowers the clock
    assert run(500) == MAX  # missing it: the guard's floor holds the clock


def test_the_raise_grows_with_the_miss_and_is_capped() -> None:
    config = GuardConfig()
    small = check(GuardState(), 985, 1000, 0.0, CLOCKS, 0, config)  # ~1x the allowed misses
    large = check(GuardState(), 900, 1000, 0.0, CLOCKS, 0, config)  # ~14x: capped at max_step_multiple
    assert small.factor == 1.0 + config.factor_step * ((config.target - 0.985) / (1 - config.target))
    assert large.factor == 1.0 + config.factor_step * config.max_step_multiple
    assert small.short and large.short
    # Within factor_interval_s of the raise, another miss raises the floor, not the factor.
    again = check(large, 0, 1000, config.factor_interval_s / 2, CLOCKS, 0, config)
    assert again.factor == large.factor and again.clock_floor_mhz > large.clock_floor_mhz
    # A check at target clears `short`.
    assert not check(large, 995, 1000, 100.0, CLOCKS, 0, config).short


def test_a_raise_runs_the_pool_step_at_once_and_keeps_the_pool_grid() -> None:
    policy = Scripted([])
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, LOW), CycleConfig(escalation=False))
    cycle.start(0.0)
    view = FleetView({0: InstanceView(0, 0, 0, math.inf, 0)})
    result = cycle.tick(5.0, view, Arrivals.none(), one_class(900, 1000))
    assert [d.level for d in result.decisions if hasattr(d, "level")] == ["guard"]
    assert cycle.next_pool_s == PERIODS.pool_s  # the regular boundary stays
    calm = cycle.tick(10.0, view, Arrivals.none(), one_class(1000, 1000))
    assert not [d for d in calm.decisions if hasattr(d, "level")]


def test_dynamollm_never_plans_less_than_it_runs_for_a_pool_below_target() -> None:
    """A pool the guard found short keeps at least its running capacity at the next pool step, even when
    the forecast (here: no arrivals at all) would shrink it."""

    tp8 = InstanceSpec(8, MAX)
    # The pools DynamoLLM itself plans with no load (one per TTFT tier, named after its heaviest class).
    tiers = (("SL", ("SS", "SM", "SL")), ("ML", ("MS", "MM", "ML")), ("LL", ("LS", "LM", "LL")))
    plan = ClusterPlan(pools=tuple(PoolPlan(name, classes, (tp8, tp8)) for name, classes in tiers))

    # No arrivals at all: the classes are weighted evenly (`capacity.pool_capacities`).
    table = {c.spec: c for c in pool_capacities(PROFILE, dict.fromkeys(("SS", "SM", "SL"), 0.0))}

    def capacity_after(met: int) -> float:
        """The SS pool's capacity after two minutes, each TP at its most capable clock (what the pool
        step counts: the instance level raises clocks within seconds)."""
        policy = DynamoLLM(periods=PERIODS, costs=COSTS)
        cycle = ControlCycle(policy, PROFILE, plan, CycleConfig(escalation=False))
        cycle.start(0.0)
        view = FleetView({i: InstanceView(i, 0, 0, math.inf, 0) for i in range(6)})
        arrivals = Arrivals.none()
        for k in range(1, 25):  # two minutes: history to decide on, and several pool steps
            cycle.tick(5.0 * k, view, arrivals, one_class(met, 1000))
        (pool,) = [p for p in cycle.plan.pools if "SS" in p.class_names]
        return sum(max(c.max_load_rps for c in table.values() if c.tp == s.tp) for s in pool.instances)

    running = 2 * table[tp8].max_load_rps
    # Completions of class SS only: its pool is judged, the others have no samples.
    assert capacity_after(1000) < running  # meeting its SLO with no load: the pool steps shrink it
    assert capacity_after(500) >= running * (1 - 1e-9)  # short: never less than it runs


def test_a_policy_that_ignores_the_guard_gets_no_early_pool_step() -> None:
    """Equal terms: a baseline steps at its own periods only, whatever the guard sees."""
    policy = ScaleFreq(periods=PERIODS, costs=COSTS)
    assert not policy.uses_slo_guard and DynamoLLM().uses_slo_guard
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, LOW), CycleConfig(escalation=False))
    cycle.start(0.0)
    view = FleetView({0: InstanceView(0, 0, 0, math.inf, 0)})
    result = cycle.tick(5.0, view, Arrivals.none(), one_class(900, 1000))
    assert cycle.guard.state[singlepool_plan(1, 8, LOW).pools[0].name].factor > 1.0  # the guard saw it
    assert not [d for d in result.decisions if hasattr(d, "level")]
