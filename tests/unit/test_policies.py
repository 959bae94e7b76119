"""The policies (controller/policy/dynamollm.py, baselines.py, the oracle of controller/sim/oracle.py) on
hand-built observations with the default profile."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import PlanStep
from controller.model.state import ClusterObs, InstanceObs, Periods, Phase
from controller.orchestrator import ReconfigCosts
from controller.policy.base import ArrivalStats, DynamicPolicy
from controller.policy.baselines import MultiPool, ScaleFreq, ScaleInst, ScaleShard
from controller.policy.bursts import class_burst_rps, poisson_quantile
from controller.policy.dynamollm import DynamoLLM
from controller.policy.forecast import forecast_next_peak_rps, forecast_next_rate_rps
from controller.policy.instance_model import instance_model
from controller.policy.observed import keep_current_clocks
from controller.policy.registry import POLICIES, PolicySettings, make_policy, policy_settings_from_doc
from controller.profiles import default_profile
from controller.sim.oracle import Oracle, Truth
from controller.sim.policies import SIM_POLICIES, sim_policy

PROFILE = default_profile("llama2-70b", "h100-sxm")
MAX_CLOCK = max(PROFILE.clocks_mhz)
RATES = (2.0, 1.0, 0.3, 0.8, 0.5, 0.2, 0.3, 0.2, 0.05)


def stats(scale: float = 1.0) -> ArrivalStats:
    return ArrivalStats(
        duration_s=3600.0,
        window_s=60.0,
        requests_by_class=tuple(round(r * scale * 3600) for r in RATES),
        peak_rate_rps=sum(RATES) * scale * 1.2,
        peak_rate_rps_by_class=tuple(r * scale * 1.2 for r in RATES),
    )


def observe(
    plan: ClusterPlan, *, now_s: float, bins: int, scale: float = 1.0, load_rps: float = 1.0
) -> ClusterObs:
    instances = tuple(
        InstanceObs(k, pool.name, spec, Phase.ACTIVE, load_rps, 0, 0)
        for k, (pool, spec) in enumerate((p, s) for p in plan.pools for s in p.instances)
    )
    # A steady load with a little alternating noise, so the forecaster sees some spread.
    history = tuple(tuple(r * scale * (1.1 if b % 2 else 0.9) for b in range(bins)) for r in RATES)
    # The epochs in force, as the control cycle with the default periods has them (started at t = 0).
    periods = Periods()
    epoch_start_s = math.floor(now_s / periods.cluster_s) * periods.cluster_s
    return ClusterObs(
        now_s=now_s,
        start_unix_s=1.7e9,
        plan=plan,
        instances=instances,
        history_bin_s=60.0,
        class_rate_history_rps=history,
        total_gpus=256,
        epoch_start_s=epoch_start_s,
        pool_period_start_s=math.floor(now_s / periods.pool_s) * periods.pool_s,
    )


class KnownFuture:
    """The oracle's foresight in a test: the same coming period whenever asked, each question recorded."""

    def __init__(
        self,
        rates_rps: tuple[float, ...],
        burst_windows_s: tuple[float, ...] = (),
        bursts_rps: tuple[tuple[float, ...], ...] = (),
    ) -> None:
        self.rates_rps = rates_rps
        self.burst_windows_s = burst_windows_s
        self.bursts_rps = bursts_rps
        self.asked: list[tuple[float, float]] = []

    def coming(self, now_s: float, period_s: float) -> Truth:
        self.asked.append((now_s, period_s))
        return Truth(period_s, self.rates_rps, self.burst_windows_s, self.bursts_rps)


def true_rates(scale: float = 1.0) -> tuple[float, ...]:
    """What the old observation's truth held for `observe(..., scale)`: the rates 20% up."""
    return tuple(r * scale * 1.2 for r in RATES)


def assert_valid(plan: ClusterPlan, total_gpus: int) -> None:
    assert sorted(plan.pool_of_class()) == sorted(CLASS_NAMES)
    assert plan.gpus <= total_gpus
    for pool in plan.pools:
        assert pool.instances, pool.name
        for spec in pool.instances:
            assert spec.tp in PROFILE.tps
            assert spec.clock_mhz in PROFILE.clocks_mhz


def test_registry_and_factory() -> None:
    # The policy core's registry has no oracle (it needs the future); the simulator's adds it.
    assert set(POLICIES) == {"singlepool", "multipool", "scaleinst", "scaleshard", "scalefreq", "dynamollm"}
    assert set(SIM_POLICIES) == {*POLICIES, "oracle"}
    for name in SIM_POLICIES:
        policy = sim_policy(name)
        assert policy.name == name
        if name in POLICIES:
            assert make_policy(name).name == name
        if name not in ("singlepool", "multipool"):
            assert isinstance(policy, DynamicPolicy)
    with pytest.raises(InvalidArgumentError, match="--policy"):
        make_policy("bogus")
    with pytest.raises(InvalidArgumentError, match="--policy"):
        make_policy("oracle")
    settings = PolicySettings(periods=Periods(600.0, 60.0, 5.0), costs=ReconfigCosts(fast_reshard=True))
    fast = make_policy("dynamollm", settings)
    assert isinstance(fast, DynamoLLM)
    assert fast.periods.pool_s == 60.0 and fast.costs.fast_reshard
    oracle = sim_policy("oracle", settings)
    assert isinstance(oracle, Oracle)
    assert oracle.periods.pool_s == 60.0 and oracle.costs.fast_reshard
    assert make_policy("multipool", PolicySettings()) == MultiPool()
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.mix_window_s = 1.0  # type: ignore[misc]


def assert_step(step: PlanStep, total_gpus: int) -> ClusterPlan:
    """A decided step: a valid plan and one decision record per pool, matching the plan."""
    assert_valid(step.plan, total_gpus)
    assert [d.pool for d in step.pools] == [p.name for p in step.plan.pools]
    for decision, pool in zip(step.pools, step.plan.pools, strict=True):
        assert decision.class_names == pool.class_names
        assert decision.gpu_budget >= pool.gpus
        assert decision.forecast_rps >= 0.0 and decision.shortfall_rps >= 0.0
    return step.plan


def test_dynamollm_plans_are_valid_deterministic_and_follow_load() -> None:
    policy = DynamoLLM()
    start = policy.initial_plan(stats(), PROFILE)
    assert_valid(start, 10**6)
    step = policy.cluster_step(observe(start, now_s=1800.0, bins=30), PROFILE)
    low = assert_step(step, 256)
    assert step.forecast_kind == "rate" and len(step.class_forecast_rps) == len(CLASS_NAMES)
    assert step == policy.cluster_step(observe(start, now_s=1800.0, bins=30), PROFILE)
    high = assert_step(policy.cluster_step(observe(start, now_s=1800.0, bins=30, scale=4.0), PROFILE), 256)
    assert high.gpus > low.gpus
    # Empty history: the initial plan stands, and nothing is decided.
    empty = policy.cluster_step(observe(start, now_s=0.0, bins=0), PROFILE)
    assert empty.plan == start and empty.pools == ()


def test_pool_step_keeps_the_epochs_pools() -> None:
    policy = DynamoLLM(merge_fill=0.5)
    start = policy.initial_plan(stats(), PROFILE)
    at_boundary = policy.cluster_step(observe(start, now_s=1800.0, bins=30), PROFILE).plan
    # Ten minutes later the load has quadrupled; pool composition stays what the boundary decided.
    obs = observe(at_boundary, now_s=2400.0, bins=40)
    busier = dataclasses.replace(
        obs,
        class_rate_history_rps=tuple(
            s[:30] + tuple(4 * x for x in s[30:]) for s in obs.class_rate_history_rps
        ),
    )
    mid = policy.pool_step(busier, PROFILE).plan
    assert [(p.name, p.class_names) for p in mid.pools] == [
        (p.name, p.class_names) for p in at_boundary.pools
    ]
    assert mid.gpus > at_boundary.gpus


def test_instance_step_lowers_clocks_at_low_load() -> None:
    policy = DynamoLLM()
    plan = policy.initial_plan(stats(), PROFILE)
    idle = policy.instance_step(observe(plan, now_s=60.0, bins=1, load_rps=0.01), PROFILE)
    busy = policy.instance_step(observe(plan, now_s=60.0, bins=1, load_rps=50.0), PROFILE)
    assert set(idle) == set(busy) == set(range(plan.instances))
    assert all(idle[i] <= busy[i] for i in idle)
    assert set(busy.values()) <= set(PROFILE.clocks_mhz)
    assert min(idle.values()) < MAX_CLOCK


def test_oracle_uses_true_rates_and_bursts_and_is_free() -> None:
    assert Oracle().reconfiguration_free and not DynamoLLM().reconfiguration_free
    known = KnownFuture(true_rates())
    oracle = Oracle(foresight=known)
    plan = oracle.initial_plan(stats(), PROFILE)
    obs = observe(plan, now_s=1800.0, bins=30)
    small = oracle.cluster_step(obs, PROFILE)
    # It asks the simulator for the coming period of the level it decides, from now.
    assert known.asked == [(1800.0, Periods().cluster_s)]
    assert small.forecast_kind == "true" and small.class_forecast_rps == true_rates()
    big = Oracle(foresight=KnownFuture(true_rates(4.0))).cluster_step(obs, PROFILE)
    assert_step(big, 256)
    assert big.plan.gpus > small.plan.gpus
    # A true burst of the coming period (60 LL requests within 5 s) is provisioned for; none is not.
    windows = (1.0, 5.0)
    calm = tuple(true_rates() for _ in windows)
    ll = CLASS_NAMES.index("LL")
    burst = (calm[0], tuple(12.0 if c == ll else r for c, r in enumerate(calm[1])))
    with_calm = Oracle(foresight=KnownFuture(true_rates(), windows, calm))
    with_burst = Oracle(foresight=KnownFuture(true_rates(), windows, burst))
    assert with_burst.pool_step(obs, PROFILE).plan.gpus > with_calm.pool_step(obs, PROFILE).plan.gpus
    pool_known = KnownFuture(true_rates())
    Oracle(foresight=pool_known).pool_step(obs, PROFILE)
    assert pool_known.asked == [(1800.0, Periods().pool_s)]
    # Without the simulator's foresight there is nothing to decide from (the observation holds no truth).
    with pytest.raises(InvalidArgumentError, match="foresight"):
        Oracle().pool_step(obs, PROFILE)
    # Even with no history yet the oracle decides: it knows what is coming.
    assert (
        Oracle(foresight=KnownFuture(true_rates()))
        .cluster_step(observe(plan, now_s=0.0, bins=0), PROFILE)
        .pools
    )


def test_rate_forecast_leaves_the_poisson_noise_to_the_capacities() -> None:
    rng = np.random.default_rng(5)
    poisson = (rng.poisson(2.0 * 60.0, 120) / 60.0).tolist()  # 2 rps, Poisson, in 60 s bins
    peak = forecast_next_peak_rps(poisson, 60.0, 360.0)
    rate = forecast_next_rate_rps(poisson, 60.0, 360.0)
    assert rate < peak
    assert rate == pytest.approx(2.0, rel=0.1)
    # Genuine rate swings (a factor 2 every few minutes) are not Poisson noise: they stay in the margin.
    swinging = [r * (1.5 if (b // 3) % 2 else 0.5) for b, r in enumerate(poisson)]
    assert forecast_next_rate_rps(swinging, 60.0, 360.0) > 2.5
    assert forecast_next_rate_rps([3.0] * 20, 60.0, 360.0) == pytest.approx(3.0)


def test_small_bursts_within_the_miss_budget_are_left_to_queue() -> None:
    plan = DynamoLLM().initial_plan(stats(), PROFILE)
    obs = with_burst(observe(plan, now_s=1800.0, bins=30), CLASS_NAMES.index("MS"), 25, 9)
    provisioned = tuple(r * 1.2 for r in RATES)
    ms = CLASS_NAMES.index("MS")
    # 9 arrivals in 1 s are a burst beyond Poisson for MS (~1 rps), but their excess (~4 requests) is
    # within the tolerated share: 0.5% of the ~9,600 arrivals of the memory, over 9 classes.
    assert class_burst_rps(obs, PROFILE, 30, 1800.0, provisioned)[ms] > 0.0
    assert class_burst_rps(obs, PROFILE, 30, 1800.0, provisioned, miss_share=0.005)[ms] == 0.0
    with pytest.raises(InvalidArgumentError, match="miss_share"):
        class_burst_rps(obs, PROFILE, 30, 1800.0, provisioned, miss_share=1.0)


def test_one_knob_baselines_turn_only_their_knob() -> None:
    plan = ScaleInst().initial_plan(stats(), PROFILE)
    (pool,) = plan.pools
    assert set(pool.instances) == {InstanceSpec(8, MAX_CLOCK)}

    inst_step = ScaleInst().pool_step(observe(plan, now_s=600.0, bins=10, scale=3.0), PROFILE)
    inst = inst_step.plan
    assert set(inst.pools[0].instances) == {InstanceSpec(8, MAX_CLOCK)}
    assert inst.instances > plan.instances
    (decision,) = inst_step.pools
    assert decision.solver_status in ("optimal", "incumbent") and decision.forecast_rps > 0.0
    assert dict(decision.chosen.counts) == {InstanceSpec(8, MAX_CLOCK): inst.instances}

    shard_step = ScaleShard().pool_step(observe(plan, now_s=600.0, bins=10, scale=0.3), PROFILE)
    shard = shard_step.plan
    assert shard.gpus == plan.gpus
    assert len({s.tp for s in shard.pools[0].instances}) == 1
    assert {s.clock_mhz for s in shard.pools[0].instances} == {MAX_CLOCK}
    assert [d.solver_status for d in shard_step.pools] == ["rule"]

    freq = ScaleFreq()
    obs = observe(plan, now_s=600.0, bins=10, load_rps=0.5)
    assert freq.pool_step(obs, PROFILE).plan == plan == freq.cluster_step(obs, PROFILE).plan
    assert max(freq.instance_step(obs, PROFILE).values()) < MAX_CLOCK
    assert ScaleFreq().plan_with(3, PROFILE).instances == 3


def test_multipool_is_a_static_pool_per_class_at_max_performance() -> None:
    plan = MultiPool().initial_plan(stats(), PROFILE)
    assert sorted(p.class_names for p in plan.pools) == sorted((c,) for c in CLASS_NAMES)
    for pool in plan.pools:
        assert pool.instances and set(pool.instances) == {InstanceSpec(8, MAX_CLOCK)}
    assert not isinstance(MultiPool(), DynamicPolicy)


def test_instance_model_capacity_and_power() -> None:
    plan = DynamoLLM().initial_plan(stats(), PROFILE)
    pool = plan.pools[0]
    quiet = instance_model(PROFILE, plan, [r * 0.1 for r in RATES])
    busy = instance_model(PROFILE, plan, RATES)
    spec = pool.instances[0]
    assert busy.capacity_rps(pool.name, spec) > 0
    assert busy.power_w(pool.name, spec) > quiet.power_w(pool.name, spec) > 0
    assert busy.capacity_rps("no-such-pool", spec) == 0.0
    with pytest.raises(InvalidArgumentError, match="class_rates_rps"):
        instance_model(PROFILE, plan, [1.0])


def at_clock(plan: ClusterPlan, clock_mhz: int) -> ClusterPlan:
    return dataclasses.replace(
        plan,
        pools=tuple(
            dataclasses.replace(p, instances=tuple(InstanceSpec(s.tp, clock_mhz) for s in p.instances))
            for p in plan.pools
        ),
    )


def test_pool_step_leaves_clocks_to_the_instance_level() -> None:
    running = (InstanceSpec(4, 800), InstanceSpec(4, 1400), InstanceSpec(2, 1000))
    plan = ClusterPlan(pools=(PoolPlan("LL", CLASS_NAMES, running),))
    obs = observe(plan, now_s=600.0, bins=10)
    # The plan asks for one TP4 fewer, a new TP2 and every clock at the maximum.
    wanted = ClusterPlan(
        pools=(
            PoolPlan("LL", CLASS_NAMES, (InstanceSpec(2, MAX_CLOCK),) * 2 + (InstanceSpec(4, MAX_CLOCK),)),
        )
    )
    kept = keep_current_clocks(wanted, obs)
    # The TP4 that stays keeps its (highest) clock; the TP2 keeps its clock; only the new one is at the
    # plan's clock.
    assert sorted(kept.pools[0].instances, key=lambda s: (s.tp, s.clock_mhz)) == [
        InstanceSpec(2, 1000),
        InstanceSpec(2, MAX_CLOCK),
        InstanceSpec(4, 1400),
    ]
    # The whole pool step: every instance it keeps is at the clock it runs now.
    policy = DynamoLLM()
    start = policy.initial_plan(stats(), PROFILE)
    low = dataclasses.replace(
        start,
        pools=tuple(
            dataclasses.replace(p, instances=tuple(InstanceSpec(s.tp, 800) for s in p.instances))
            for p in start.pools
        ),
    )
    step = policy.pool_step(observe(low, now_s=600.0, bins=10), PROFILE).plan
    for before, after in zip(low.pools, step.pools, strict=True):
        for tp in {s.tp for s in before.instances}:
            stay = min(
                before.instances.count(InstanceSpec(tp, 800)), sum(s.tp == tp for s in after.instances)
            )
            assert after.instances.count(InstanceSpec(tp, 800)) >= stay


def test_instance_step_follows_the_sustained_load_not_one_quiet_period() -> None:
    policy = DynamoLLM()
    plan = policy.initial_plan(stats(), PROFILE)
    busy = observe(plan, now_s=600.0, bins=10, scale=3.0, load_rps=50.0)
    high = policy.instance_step(busy, PROFILE)
    at_high = dataclasses.replace(
        plan,
        pools=tuple(
            dataclasses.replace(p, instances=tuple(InstanceSpec(s.tp, MAX_CLOCK) for s in p.instances))
            for p in plan.pools
        ),
    )
    # One quiet 5-s period after a busy history: the clocks stay where the sustained load needs them.
    quiet = observe(at_high, now_s=600.0, bins=10, scale=3.0, load_rps=0.0)
    assert policy.instance_step(quiet, PROFILE) == policy.instance_step(
        observe(at_high, now_s=600.0, bins=10, scale=3.0, load_rps=0.5), PROFILE
    )
    assert set(high.values()) <= set(PROFILE.clocks_mhz)
    # Quiet history and a quiet period: the clocks come down.
    calm = observe(at_high, now_s=600.0, bins=10, scale=0.01, load_rps=0.0)
    calm_clocks = policy.instance_step(calm, PROFILE)
    assert min(calm_clocks.values()) < MAX_CLOCK
    # The same quiet period decides differently after a busy history than after a calm one.
    assert policy.instance_step(quiet, PROFILE) != calm_clocks


def with_burst(obs: ClusterObs, class_index: int, bin_index: int, count: int) -> ClusterObs:
    """`obs` with one short-term burst: `count` arrivals of one class within 1 s in one bin."""
    bins = len(obs.class_rate_history_rps[0])
    rows = tuple(
        tuple(float(count) if (c == class_index and b == bin_index) else 0.0 for b in range(bins))
        for c in range(len(CLASS_NAMES))
    )
    return dataclasses.replace(obs, burst_windows_s=(1.0,), class_burst_history_rps=(rows,))


def test_poisson_quantile() -> None:
    assert poisson_quantile(0.0, 0.99) == 0
    assert poisson_quantile(1.0, 0.5) == 1  # P(N <= 0) = 0.37, P(N <= 1) = 0.74
    assert poisson_quantile(1.0, 0.99) == 4  # P(N <= 3) = 0.981, P(N <= 4) = 0.996
    # The normal approximation above its threshold stays within a count or two of the exact quantile.
    assert abs(poisson_quantile(201.0, 0.99) - poisson_quantile(199.0, 0.99)) <= 6
    with pytest.raises(InvalidArgumentError, match="quantile"):
        poisson_quantile(1.0, 1.0)
    with pytest.raises(InvalidArgumentError, match="mean"):
        poisson_quantile(-1.0, 0.5)


def test_burst_rps_is_the_excess_over_poisson_drained_within_the_ttft_target() -> None:
    plan = DynamoLLM().initial_plan(stats(), PROFILE)
    obs = observe(plan, now_s=1800.0, bins=30)
    provisioned = tuple(r * 1.2 for r in RATES)
    # Not measured: nothing to add.
    assert class_burst_rps(obs, PROFILE, 30, 1800.0, provisioned) == (0.0,) * len(CLASS_NAMES)
    ms = CLASS_NAMES.index("MS")
    bursty = with_burst(obs, ms, 25, 40)
    extra = class_burst_rps(bursty, PROFILE, 30, 1800.0, provisioned)
    poisson_peak = poisson_quantile(provisioned[ms] * 1.0, 1.0 - 1.0 / 1800.0)
    assert extra[ms] == pytest.approx((40 - poisson_peak) / (1.0 + PROFILE.slo("MS").ttft_s))
    assert all(e == 0.0 for c, e in enumerate(extra) if c != ms)
    # A burst no larger than Poisson's own peak at the provisioned rate asks for nothing more.
    assert class_burst_rps(with_burst(obs, ms, 25, poisson_peak), PROFILE, 30, 1800.0, provisioned)[ms] == 0.0
    # Outside the memory (the last 10 bins) a burst is forgotten.
    assert class_burst_rps(bursty, PROFILE, 30, 600.0, provisioned)[ms] > 0.0
    assert class_burst_rps(with_burst(obs, ms, 15, 40), PROFILE, 30, 600.0, provisioned)[ms] == 0.0
    with pytest.raises(InvalidArgumentError, match="provisioned_rps"):
        class_burst_rps(bursty, PROFILE, 30, 1800.0, provisioned[:3])


def test_dynamollm_provisions_for_an_observed_burst() -> None:
    policy = DynamoLLM()
    start = policy.initial_plan(stats(), PROFILE)
    obs = observe(start, now_s=1800.0, bins=30)
    smooth = policy.cluster_step(with_burst(obs, CLASS_NAMES.index("MS"), 25, 0), PROFILE)
    bursty = policy.cluster_step(with_burst(obs, CLASS_NAMES.index("MS"), 25, 80), PROFILE)
    assert_step(bursty, 256)
    assert smooth == policy.cluster_step(obs, PROFILE)
    assert bursty.plan.gpus > smooth.plan.gpus
    ms = CLASS_NAMES.index("MS")
    assert bursty.class_forecast_rps[ms] > smooth.class_forecast_rps[ms]
    # The oracle plans on the true bursts of the coming period, not on the observed past ones.
    oracle = Oracle(foresight=KnownFuture(true_rates()))
    assert oracle.cluster_step(with_burst(obs, CLASS_NAMES.index("MS"), 25, 80), PROFILE) == (
        oracle.cluster_step(obs, PROFILE)
    )


def test_cluster_obs_checks_the_burst_history() -> None:
    plan = DynamoLLM().initial_plan(stats(), PROFILE)
    obs = with_burst(observe(plan, now_s=1800.0, bins=30), 0, 0, 3)
    rows = obs.class_burst_history_rps[0]
    with pytest.raises(InvalidArgumentError, match="class_burst_history_rps"):
        dataclasses.replace(obs, class_burst_history_rps=())
    with pytest.raises(InvalidArgumentError, match="class_burst_history_rps"):
        dataclasses.replace(obs, class_burst_history_rps=(tuple(r[:-1] for r in rows),))
    with pytest.raises(InvalidArgumentError, match="burst_windows_s"):
        dataclasses.replace(obs, burst_windows_s=(5.0, 1.0), class_burst_history_rps=(rows, rows))
    with pytest.raises(InvalidArgumentError, match="burst_windows_s"):
        dataclasses.replace(obs, burst_windows_s=(0.0,))


def test_cluster_obs_checks_the_epoch_boundaries() -> None:
    obs = observe(ClusterPlan(pools=()), now_s=2400.0, bins=40)
    assert (obs.epoch_start_s, obs.pool_period_start_s) == (1800.0, 2400.0)
    with pytest.raises(InvalidArgumentError, match="epoch_start_s"):
        dataclasses.replace(obs, pool_period_start_s=1500.0)
    with pytest.raises(InvalidArgumentError, match="epoch_start_s"):
        dataclasses.replace(obs, epoch_start_s=2700.0, pool_period_start_s=2700.0)


def test_policy_settings_from_a_document() -> None:
    doc = {"merge_fill": 1, "periods": {"pool_s": 60.0}, "costs": {"fast_reshard": True}}
    settings = policy_settings_from_doc(doc)
    assert settings.merge_fill == 1.0 and settings.periods == Periods(pool_s=60.0)
    assert settings.costs.fast_reshard and settings.costs.start_s == ReconfigCosts().start_s
    policy = make_policy("dynamollm", settings)
    assert isinstance(policy, DynamoLLM)
    assert policy.merge_fill == 1.0 and policy.periods.pool_s == 60.0
    with pytest.raises(InvalidArgumentError, match=r"policy\.bogus"):
        policy_settings_from_doc({"bogus": 1.0})
    with pytest.raises(InvalidArgumentError, match=r"costs\.fast_reshard"):
        policy_settings_from_doc({"costs": {"fast_reshard": 1}})
    with pytest.raises(InvalidArgumentError, match="periods"):
        policy_settings_from_doc({"periods": 5})
    with pytest.raises(InvalidArgumentError, match="clock_headroom"):
        PolicySettings(clock_headroom=1.0)


def test_the_objective_is_a_setting_with_its_prices() -> None:
    settings = policy_settings_from_doc({"objective": "cost", "merge_ttft_ratio": 3})
    policy = make_policy("dynamollm", settings)
    assert isinstance(policy, DynamoLLM)
    assert policy.objective == "cost" and policy.merge_ttft_ratio == 3.0
    # 88.5 USD per 8-GPU server-hour at 0.0407 USD/kWh: ~272 kJ of energy per GPU-second
    assert policy.gpu_hold_j_per_gpu_s == pytest.approx(88.5 / 8 / 3600 / (0.0407 / 3.6e6))
    assert make_policy("dynamollm", PolicySettings(objective="carbon")).gpu_hold_j_per_gpu_s == 0.0
    with pytest.raises(InvalidArgumentError, match=r"policy\.objective"):
        policy_settings_from_doc({"objective": "speed"})
    with pytest.raises(InvalidArgumentError, match=r"policy\.objective"):
        policy_settings_from_doc({"objective": 1.0})
    with pytest.raises(InvalidArgumentError, match="energy_usd_per_kwh"):
        PolicySettings(objective="cost", energy_usd_per_kwh=0.0)
    with pytest.raises(InvalidArgumentError, match="merge_ttft_ratio"):
        PolicySettings(merge_ttft_ratio=0.5)
