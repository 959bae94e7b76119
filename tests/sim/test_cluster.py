"""The cluster simulator: golden tiny traces on simple physics (exact timings, routing, energy parts),
energy identities, the drain bound, determinism, and singlepool sizing meeting the SLO on real physics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError
from agent.sim.engine_core import EngineConfig
from agent.sim.physics import load_perf_model
from controller.model.classes import CLASS_NAMES, ClassBins
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import StepRecord
from controller.policy.singlepool import SinglePool, size_singlepool
from controller.profiles import default_profile
from controller.sim.cluster import (
    SimConfig,
    _SizingSearch,
    check_profile_engine,
    run_policy,
    simulate,
    size_by_simulation,
)
from controller.sim.report import SimResult, meets_slo, slo_attainment
from controller.sim.traces import Trace, load_trace

IDLE_W = 75.0
BUSY_W = 300.0
DECODE_S = 0.02
PREFILL_S_PER_TOKEN = 1e-4


class FlatPhysics:
    """Iteration = 20 ms + 0.1 ms per prefill token at 300 W per GPU; 75 W idle: timings by hand."""

    def __init__(self, tp: int, kv_capacity_tokens: int = 100_000) -> None:
        self._tp = tp
        self._kv = kv_capacity_tokens

    @property
    def tp(self) -> int:
        return self._tp

    @property
    def idle_power_w(self) -> float:
        return IDLE_W

    @property
    def kv_capacity_tokens(self) -> int:
        return self._kv

    @property
    def min_clock_mhz(self) -> int:
        return 800

    @property
    def max_clock_mhz(self) -> int:
        return 1980

    def iteration(
        self,
        clock_mhz: float,
        prefill_tokens: int,
        prefill_attn_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float]:
        return DECODE_S + PREFILL_S_PER_TOKEN * prefill_tokens, BUSY_W


FLAT = {tp: FlatPhysics(tp) for tp in (1, 2, 4, 8)}
# With physics given, the model only sets the context limit of admission (4,096 tokens for Llama-2-70B).
MODEL = "llama2-70b"
NO_JITTER = SimConfig(engine=EngineConfig(jitter_cv=0.0))
PROFILE = default_profile(MODEL, "h100-sxm")


def _trace(arrival_s: list[float], inputs: list[int], outputs: list[int], end_s: float) -> Trace:
    return Trace(
        "tiny",
        np.array(arrival_s, dtype=np.float64),
        np.array(inputs, dtype=np.int32),
        np.array(outputs, dtype=np.int32),
        None,
        end_s,
    )


def _plan(*tps: int, classes: tuple[str, ...] = CLASS_NAMES) -> ClusterPlan:
    return ClusterPlan((PoolPlan("all", classes, tuple(InstanceSpec(tp, 1980) for tp in tps)),))


def _flat(trace: Trace, plan: ClusterPlan, config: SimConfig = NO_JITTER) -> SimResult:
    return simulate(trace, plan, model=MODEL, gpu="flat", config=config, perf=FLAT)


def test_golden_two_requests_on_one_instance() -> None:
    # r0 prefills alone in [0, 0.03); r1 arrives meanwhile and prefills next to r0's decode in
    # [0.03, 0.06); both decode together in [0.06, 0.08) and finish; the engine idles to the trace end.
    r = _flat(_trace([0.0, 0.005], [100, 100], [3, 2], end_s=1.0), _plan(8))
    assert r.completed.all()
    assert r.ttft_s == pytest.approx([0.03, 0.055])
    assert r.tbt_mean_s == pytest.approx([0.025, 0.02])
    assert r.duration_s == 1.0
    busy_j = 0.08 * 8 * BUSY_W
    idle_j = (1.0 - 0.08) * 8 * IDLE_W
    assert r.energy_j == pytest.approx(busy_j + idle_j)
    assert r.energy_unused_gpus_j == 0.0
    assert float(r.energy_by_bin_j.sum()) == pytest.approx(r.energy_j)
    assert r.rejected == 0
    # token-weighted decode iterations: r0 alone in [0.03, 0.06) (1 token), both in [0.06, 0.08) (2)
    # (the run's TBT histogram keeps each gap within 0.05% of its value)
    assert sorted(zip(r.tbt_gap_s.tolist(), r.tbt_tokens.tolist(), strict=True)) == [
        pytest.approx((0.02, 2), rel=5e-4),
        pytest.approx((0.03, 1), rel=5e-4),
    ]


def test_routing_goes_to_least_outstanding_tokens_ties_to_lowest_index() -> None:
    # r1 arrives while instance 0 still holds r0; r2 arrives when both are idle again.
    r = _flat(_trace([0.0, 0.005, 5.0], [100, 100, 100], [50, 50, 50], end_s=10.0), _plan(4, 4))
    assert r.instance_index.tolist() == [0, 1, 0]
    assert r.completed.all()
    # nothing queued behind anything: each request prefills alone as soon as it arrives
    assert r.ttft_s == pytest.approx([0.03, 0.03, 0.03])


def test_requests_are_served_in_arrival_order_on_one_instance() -> None:
    # three simultaneous long prompts on one instance with a 2048-token budget: FCFS chunked prefill
    r = _flat(_trace([0.0, 0.0, 0.0], [2000, 2000, 2000], [2, 2, 2], end_s=5.0), _plan(8))
    assert r.completed.all()
    assert np.all(np.diff(r.ttft_s) > 0)


def test_energy_is_the_sum_of_instances_and_unused_gpus() -> None:
    # TP4 + TP2 leave 2 GPUs of the one server unused: they draw idle power throughout.
    trace = _trace([0.1, 0.2, 0.3], [500, 300, 200], [20, 30, 40], end_s=20.0)
    r = _flat(trace, _plan(4, 2))
    assert r.plan.servers == 1
    assert r.energy_unused_gpus_j == pytest.approx(2 * IDLE_W * r.duration_s)
    assert r.energy_j == pytest.approx(r.energy_instances_j + r.energy_unused_gpus_j)
    assert float(r.energy_by_bin_j.sum()) == pytest.approx(r.energy_j)
    assert len(r.energy_by_bin_j) == math.ceil(r.duration_s)
    assert r.gpu_s == pytest.approx(6 * r.duration_s)
    assert r.server_s == pytest.approx(1 * r.duration_s)


@pytest.mark.parametrize("tps", [(8,), (4, 2), (8, 8, 4, 1)])
def test_idle_cluster_energy_is_gpus_times_idle_power_times_time(tps: tuple[int, ...]) -> None:
    plan = _plan(*tps)
    r = _flat(_trace([], [], [], end_s=123.5), plan)
    assert r.duration_s == 123.5
    assert r.energy_j == pytest.approx(plan.allocated_gpus * IDLE_W * 123.5, rel=1e-12)
    assert r.energy_by_bin_j[:-1] == pytest.approx(plan.allocated_gpus * IDLE_W)
    assert r.energy_by_bin_j[-1] == pytest.approx(plan.allocated_gpus * IDLE_W * 0.5)


def test_idle_cluster_on_the_fitted_physics() -> None:
    plan = _plan(4, 2)
    r = simulate(_trace([], [], [], end_s=60.0), plan, model="llama2-70b", gpu="h100-sxm")
    idle_w = load_perf_model(model="llama2-70b", gpu="h100-sxm", tp=8).idle_power_w
    assert r.energy_j == pytest.approx(8 * idle_w * 60.0, rel=1e-12)


def test_drain_is_bounded_and_unfinished_requests_count_as_incomplete() -> None:
    # 2000 output tokens take >= 40 s of decode; the drain allows 5 s after the trace's end at 1 s.
    trace = _trace([0.0, 0.5], [100, 100], [5, 2000], end_s=1.0)
    r = _flat(trace, _plan(8), SimConfig(engine=EngineConfig(jitter_cv=0.0), max_drain_s=5.0))
    assert r.completed.tolist() == [True, False]
    assert np.isnan(r.ttft_s[1])
    assert 6.0 <= r.duration_s < 6.0 + 0.1
    assert r.energy_j == pytest.approx(float(r.energy_by_bin_j.sum()))


def test_classes_without_a_pool_go_to_a_larger_pool_and_oversized_requests_are_rejected() -> None:
    bins = ClassBins()
    small = FlatPhysics(8, kv_capacity_tokens=2000)  # holds requests of up to 1980 tokens
    trace = _trace([0.0, 0.1, 0.2], [100, 300, 1100], [10, 10, 10], end_s=2.0)
    assert [bins.classify(i, 10).name for i in (100, 300, 1100)] == ["SS", "MS", "LS"]
    # MS has no pool of its own: the routing table sends it to the pool serving a larger class (LS).
    plan = _plan(8, classes=("SS", "LS"))
    r = simulate(trace, plan, model=MODEL, gpu="flat", config=NO_JITTER, perf={8: small})
    assert r.completed.tolist() == [True, True, True]
    assert r.rejected == 0
    assert r.instance_index.tolist() == [0, 0, 0]
    # No instance anywhere: nothing can be routed, every request is rejected.
    empty = ClusterPlan((PoolPlan("all", ("SS", "LS"), ()),))
    r0 = simulate(trace, empty, model=MODEL, gpu="flat", config=NO_JITTER, perf={8: small})
    assert r0.rejected == 3 and not r0.completed.any()
    assert r0.instance_index.tolist() == [-1, -1, -1]
    # a request larger than the KV cache is rejected, not an error
    big = _trace([0.0], [1980], [10], end_s=2.0)
    r2 = simulate(big, _plan(8), model=MODEL, gpu="flat", config=NO_JITTER, perf={8: small})
    assert r2.rejected == 1 and not r2.completed.any()
    assert r2.admitted_mask.all() and r2.refused == {}


def test_requests_beyond_the_models_context_are_refused_at_admission() -> None:
    # Llama-2-70B's context is 4,096 tokens: 4,000 + 96 fits, 4,000 + 97 does not.
    trace = _trace([0.0, 0.1, 0.2], [4000, 4000, 100], [96, 97, 10], end_s=5.0)
    r = _flat(trace, _plan(8))
    assert r.refused == {"context_length": 1}
    assert r.admitted_mask.tolist() == [True, False, True]
    assert r.completed.tolist() == [True, False, True]
    assert r.rejected == 0 and r.instance_index.tolist() == [0, -1, 0]
    # Attainment is over the admitted requests: the refused one neither helps nor hurts.
    slos = {c: PROFILE.slo(c) for c in CLASS_NAMES}
    ok = meets_slo(r, slos)
    assert not ok[1]
    assert slo_attainment(r, slos) == pytest.approx(float(ok[[0, 2]].mean()))


def test_with_a_profile_a_static_run_serves_the_earliest_deadline_first() -> None:
    # r0 (LS) prefills in chunks of 512 tokens; meanwhile r1 (LS, TTFT target 2.67 s) and then r2 (SS,
    # 0.23 s) wait. Without a profile (how profiles are measured) the queue is first come first served;
    # with one, every request carries its TTFT deadline and r2 overtakes r1, as under any policy.
    trace = _trace([0.0, 0.001, 0.002], [1500, 1500, 100], [2, 2, 2], end_s=3.0)
    assert [ClassBins().classify(i, 2).name for i in (1500, 1500, 100)] == ["LS", "LS", "SS"]
    fcfs = _flat(trace, _plan(8))
    edf = simulate(trace, _plan(8), model=MODEL, gpu="flat", config=NO_JITTER, perf=FLAT, profile=PROFILE)
    assert fcfs.completed.all() and edf.completed.all()
    assert fcfs.ttft_s[1] < fcfs.ttft_s[2]
    assert edf.ttft_s[2] < edf.ttft_s[1]


def test_with_a_profile_a_static_run_escalates_like_a_dynamic_one() -> None:
    # 150 SS requests per second for 12 s overload one instance: the queue outgrows the 0.23-s TTFT
    # target. With a profile, each tick rejects the requests already past their deadline; without one
    # (profiling), nothing is ever rejected and every request is served late.
    n = 1800
    trace = _trace([i / 150.0 for i in range(n)], [100] * n, [40] * n, end_s=12.0)
    config = SimConfig(engine=EngineConfig(jitter_cv=0.0), max_drain_s=600.0)
    plain = _flat(trace, _plan(8), config)
    assert plain.rejected == 0 and plain.completed.all()
    assert plain.escalations["rejected_past_deadline"] == 0
    escalated = simulate(
        trace,
        _plan(8),
        model=MODEL,
        gpu="flat",
        config=config,
        perf=FLAT,
        profile=PROFILE,
        policy="singlepool",
    )
    past = escalated.escalations["rejected_past_deadline"]
    assert past > 0 and escalated.rejected == past
    assert int(escalated.completed.sum()) == n - past
    # The static plan's run records its decisions: the initial plan, never changed.
    levels = {d.level for d in escalated.decisions if isinstance(d, StepRecord)}
    assert "initial" in levels
    assert all(d.step.plan == _plan(8) for d in escalated.decisions if isinstance(d, StepRecord))
    assert escalated.reconfigurations_by_kind == {"start": 0, "stop": 0, "retp": 0, "clock": 0}


def _real_run(seed: int) -> SimResult:
    trace = load_trace("synthetic:conversation", duration_s=120.0, seed=1)
    return simulate(trace, _plan(8, 8), model="llama2-70b", gpu="h100-sxm", config=SimConfig(seed=seed))


def test_same_seed_same_result_different_seed_different_jitter() -> None:
    a, b, c = _real_run(7), _real_run(7), _real_run(8)
    for field in ("ttft_s", "tbt_mean_s", "energy_by_bin_j", "tbt_gap_s", "instance_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.energy_j == b.energy_j and a.duration_s == b.duration_s
    assert a.energy_j != c.energy_j


def test_progress_callback_sees_simulated_time_increase_to_the_end() -> None:
    seen: list[float] = []
    trace = load_trace("synthetic:conversation", duration_s=60.0, seed=1)
    r = simulate(
        trace,
        _plan(8),
        model="llama2-70b",
        gpu="h100-sxm",
        config=SimConfig(progress_step_s=10.0),
        on_progress=seen.append,
    )
    assert seen == sorted(seen)
    assert len(seen) >= 5
    assert seen[-1] == r.duration_s


def test_singlepool_sized_for_the_peak_meets_the_slo_on_a_synthetic_trace() -> None:
    profile = default_profile("llama2-70b", "h100-sxm")
    trace = load_trace("synthetic:conversation", duration_s=600.0, seed=3)
    run = run_policy(trace, SinglePool(), profile, config=SimConfig(seed=3))
    result, stats = run.result, run.arrivals
    sizing = size_singlepool(stats, profile)
    assert run.rule_plan == sizing.plan and run.sizing_trials == ()
    assert result.plan == sizing.plan
    n = sizing.plan.instances
    assert n == math.ceil(stats.peak_rate_rps / sizing.capacity_rps)
    slos = {c: profile.slo(c) for c in CLASS_NAMES}
    # The synthetic conversations hold prompts beyond the model's context: refused, never planned for.
    refused = int((~result.admitted_mask).sum())
    assert result.refused == {"context_length": refused} and stats.requests == len(trace) - refused
    assert (result.completed == result.admitted_mask).all()
    assert slo_attainment(result, slos) >= 0.99


def test_short_window_of_the_real_conversation_trace(shared_data: Path) -> None:
    trace = load_trace(
        shared_data / "traces" / "AzureLLMInferenceTrace_conv.csv", start_s=600.0, duration_s=300.0
    )
    profile = default_profile("llama2-70b", "h100-sxm")
    run = run_policy(trace, SinglePool(), profile, slo_target=0.99)
    result, stats = run.result, run.arrivals
    # Requests beyond the model's context are refused at admission and left out of the statistics.
    assert stats.requests == int(result.admitted_mask.sum()) == len(trace) - sum(result.refused.values())
    assert stats.requests > 1000
    # the chosen size meets the target and one instance fewer (if tried) does not
    chosen = result.plan.instances
    by_count = {t.instances: t.slo_attainment for t in run.sizing_trials}
    assert by_count[chosen] >= 0.99
    assert chosen == 1 or by_count.get(chosen - 1, 0.0) < 0.99
    # Every admitted request is served, on time or not, or rejected past its deadline (escalation).
    assert int(result.completed.sum()) == stats.requests - result.escalations["rejected_past_deadline"]
    assert result.plan.instances >= 2
    assert result.start_unix_s == pytest.approx(1700158546.68059 + 600.0, abs=1.0)
    mean_power_w = result.energy_j / result.duration_s
    # between all GPUs idle and all at TDP
    assert IDLE_W * result.plan.allocated_gpus < mean_power_w < 700.0 * result.plan.allocated_gpus


def test_sizing_search_finds_the_smallest_count_meeting_the_target() -> None:
    profile = default_profile("llama2-70b", "h100-sxm")
    trace = load_trace("synthetic:coding", duration_s=900.0, seed=1)
    slos = {c: profile.slo(c) for c in CLASS_NAMES}
    policy = SinglePool()
    sizes: list[int] = []

    def simulate_with(n: int) -> SimResult:
        sizes.append(n)
        plan = policy.plan_with(n, profile)
        return simulate(trace, plan, model="llama2-70b", gpu="h100-sxm", profile=profile, policy=policy.name)

    result, trials = size_by_simulation(simulate_with, 1, slos, slo_target=0.99, max_instances=64)
    chosen = result.plan.instances
    attained = {t.instances: t.slo_attainment for t in trials}
    assert attained[chosen] >= 0.99 and chosen - 1 in attained and attained[chosen - 1] < 0.99
    assert attained[chosen] == slo_attainment(result, slos)
    assert [t.instances for t in trials] == sizes  # one simulation per trial, in order
    assert [t.instances for t in trials][:2] == [1, 2]  # doubling from the first guess
    with pytest.raises(InvalidArgumentError, match="--slo-target"):
        size_by_simulation(simulate_with, 1, slos, slo_target=0.99, max_instances=chosen - 1)
    with pytest.raises(InvalidArgumentError, match="slo_target"):
        size_by_simulation(simulate_with, 1, slos, slo_target=0.0, max_instances=64)


def test_parallel_sizing_gives_the_sequential_answer_and_trials() -> None:
    """With jobs > 1 the trials run in forked processes, the next ones speculatively; the search reads
    them in its own order: the same answer, the same trials, the same result."""
    profile = default_profile("llama2-70b", "h100-sxm")
    trace = load_trace("synthetic:coding", duration_s=600.0, seed=2)
    slos = {c: profile.slo(c) for c in CLASS_NAMES}
    policy = SinglePool()

    def simulate_with(n: int) -> SimResult:
        plan = policy.plan_with(n, profile)
        return simulate(trace, plan, model="llama2-70b", gpu="h100-sxm", profile=profile, policy=policy.name)

    one, one_trials = size_by_simulation(simulate_with, 1, slos, slo_target=0.99, max_instances=64)
    three, three_trials = size_by_simulation(
        simulate_with, 1, slos, slo_target=0.99, max_instances=64, jobs=3
    )
    assert three_trials == one_trials and len(one_trials) >= 3
    assert three.plan == one.plan and three.energy_j == one.energy_j
    assert np.array_equal(three.ttft_s, one.ttft_s, equal_nan=True)


def test_sizing_search_looks_ahead_breadth_first() -> None:
    search = _SizingSearch(0, 4, True, 64)
    # 4 first; then 2 if it meets, 8 if it misses; then 1 / 3 after 2 and 6 / 16 after 8
    assert search.upcoming(3, set()) == [4, 2, 8]
    assert search.upcoming(7, set()) == [4, 2, 8, 1, 3, 6, 16]
    assert search.upcoming(2, {4, 2}) == [8, 1]
    assert _SizingSearch(0, 64, True, 64).after(False).failed
    assert _SizingSearch(3, 4, False, 64).candidate() is None  # settled on 4


def test_profile_measured_on_another_engine_is_refused() -> None:
    profile = default_profile("llama2-70b", "h100-sxm")
    check_profile_engine(profile, EngineConfig(), "built-in")
    with pytest.raises(InvalidArgumentError, match="max_num_batched_tokens=2048"):
        check_profile_engine(profile, EngineConfig(max_num_batched_tokens=2048), "built-in")
