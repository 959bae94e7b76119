"""The dynamic cluster simulator: reconfiguration actions executed with their delays (instantly for a
reconfiguration-free policy), energy and GPU identities, determinism, the predictor knob, and the engine
extensions escalation relies on (deadline order, moving and rejecting waiting requests, clock stalls,
drain). Simple flat physics and a scripted policy make the expected numbers computable by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest

from agent.sim.engine_core import EngineConfig, SimEngine
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import ClockDecision, PlanStep, StepRecord
from controller.model.profile import Profile
from controller.model.state import DEFAULT_BURST_WINDOWS_S, ClusterObs, Periods, Phase
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.base import ArrivalStats
from controller.profiles import default_profile
from controller.sim.cluster import SimConfig, run_policy, simulate_dynamic
from controller.sim.policies import sim_policy, sim_settings
from controller.sim.report import SimResult
from controller.sim.traces import Trace
from tests.sim.test_cluster import DECODE_S, FLAT, IDLE_W, FlatPhysics

PROFILE = default_profile("llama2-70b", "h100-sxm")
MAX_MHZ = max(PROFILE.clocks_mhz)
TP8 = InstanceSpec(8, MAX_MHZ)
PERIODS = Periods(cluster_s=120.0, pool_s=30.0, instance_s=5.0)
NO_JITTER = EngineConfig(jitter_cv=0.0)
# The policy's reconfiguration costs: the executor times (and a policy prices) every change with them.
COSTS = ReconfigCosts()


def _plan(n: int, spec: InstanceSpec = TP8) -> ClusterPlan:
    return ClusterPlan(pools=(PoolPlan("all", CLASS_NAMES, (spec,) * n),))


@dataclass(frozen=True, slots=True)
class Scripted:
    """A dynamic policy that asks for `later` instances from `switch_s` on, and `clock_mhz` per instance."""

    first: int = 1
    later: int = 2
    switch_s: float = 30.0
    clock_mhz: int = MAX_MHZ
    free: bool = False
    periods: Periods = PERIODS
    costs: ReconfigCosts = COSTS

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def reconfiguration_free(self) -> bool:
        return self.free

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return _plan(self.first)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return PlanStep(plan=obs.plan, pools=())

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        # Level-based: the pool plan carries the clock the instance manager runs the instances at.
        n = self.later if obs.now_s >= self.switch_s else self.first
        return PlanStep(plan=_plan(n, InstanceSpec(8, self.clock_mhz)), pools=())

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return {i.instance_id: self.clock_mhz for i in obs.instances if i.phase is Phase.ACTIVE}


def _trace(rate_rps: float, duration_s: float, seed: int = 0, output_tokens: int = 50) -> Trace:
    rng = np.random.default_rng(seed)
    n = int(rate_rps * duration_s)
    arrival = np.sort(rng.uniform(0.0, duration_s, n))
    inputs = rng.integers(100, 2000, n).astype(np.int32)
    outputs = np.full(n, output_tokens, dtype=np.int32)
    return Trace("synthetic-test", arrival, inputs, outputs, None, duration_s)


def _run(policy: Scripted, trace: Trace, **cfg: object) -> SimResult:
    config = SimConfig(engine=NO_JITTER, max_drain_s=120.0, **cfg)  # type: ignore[arg-type]
    return simulate_dynamic(trace, policy, PROFILE, _plan(policy.first), config=config, perf=FLAT)


def test_a_start_holds_gpus_idle_for_the_warm_start_then_serves() -> None:
    trace = _trace(2.0, 120.0)
    result = _run(Scripted(), trace)
    assert result.reconfigurations_by_kind["start"] == 1
    assert result.reconfigurations_by_kind["stop"] == 0
    # The second instance is asked for at the 30-s pool step and holds its 8 GPUs from then on.
    assert result.gpu_s == pytest.approx(8 * result.duration_s + 8 * (result.duration_s - 30.0))
    # Nothing is routed to it before its 60-s warm start is over.
    second = result.instance_index == 1
    assert second.any()
    assert trace.arrival_s[second].min() >= 90.0
    # Its 60 s of start-up are charged at idle power, inside the instances' energy.
    assert result.energy_j == pytest.approx(result.energy_by_bin_j.sum(), rel=1e-9)
    assert result.energy_instances_j > 8 * IDLE_W * 60.0
    # Per-minute means: 8 GPUs for 30 s then 16; 16 from the second minute on.
    assert result.series is not None
    assert result.series.gpus[0] == pytest.approx(12.0) and result.series.gpus[1] == pytest.approx(16.0)


def test_a_reconfiguration_free_policy_gets_its_change_at_once() -> None:
    trace = _trace(2.0, 120.0)
    slow = _run(Scripted(), trace)
    fast = _run(Scripted(free=True), trace)
    assert fast.gpu_s == pytest.approx(slow.gpu_s)  # the GPUs are held from the same moment ...
    second = fast.instance_index == 1
    assert trace.arrival_s[second].min() < 40.0  # ... but serve right away
    assert fast.energy_j == pytest.approx(fast.energy_by_bin_j.sum(), rel=1e-9)


def test_scale_in_drains_then_releases_the_gpus() -> None:
    trace = _trace(2.0, 120.0)
    result = _run(Scripted(first=2, later=1, switch_s=30.0), trace)
    assert result.reconfigurations_by_kind["stop"] == 1
    # One instance leaves at the first pool step after its 60-s minimum dwell (hysteresis), plus the
    # drain of its few requests (a few seconds).
    assert 8 * result.duration_s + 8 * 60.0 <= result.gpu_s <= 8 * result.duration_s + 8 * 70.0
    assert result.completed.all()
    assert result.server_s == pytest.approx(result.gpu_s / 8)


def test_clock_changes_are_counted_and_slow_the_engine() -> None:
    trace = _trace(2.0, 60.0)
    fast = _run(Scripted(later=1), trace, escalation=False)
    slow = _run(Scripted(later=1, clock_mhz=800), trace, escalation=False)
    assert fast.reconfigurations_by_kind["clock"] == 0
    assert slow.reconfigurations_by_kind["clock"] == 1  # set once at the first instance step
    assert slow.escalations["max_clock"] == 0
    # The instance level's change is recorded with its reason.
    assert [d for d in slow.decisions if isinstance(d, ClockDecision)] == [
        ClockDecision(PERIODS.instance_s, 0, MAX_MHZ, 800, "load")
    ]
    escalated = _run(Scripted(later=1, clock_mhz=800), _trace(20.0, 60.0))
    assert escalated.escalations["max_clock"] > 0  # an overloaded queue takes the clock back up
    assert escalated.reconfigurations_by_kind["clock"] > 1
    # The count holds the instance level's changes (recorded with their reasons) and the plan's.
    reasons = [d.reason for d in escalated.decisions if isinstance(d, ClockDecision)]
    assert reasons.count("escalation") == escalated.escalations["max_clock"]
    assert len(reasons) <= escalated.reconfigurations_by_kind["clock"]


def test_same_seed_same_result_and_every_request_accounted() -> None:
    trace = _trace(3.0, 90.0)
    a = _run(Scripted(), trace, seed=3)
    b = _run(Scripted(), trace, seed=3)
    assert a.energy_j == b.energy_j
    np.testing.assert_array_equal(a.ttft_s, b.ttft_s)
    np.testing.assert_array_equal(a.instance_index, b.instance_index)
    assert a.completed.sum() + a.rejected <= len(trace)
    assert (a.instance_index >= 0).sum() + a.rejected == len(trace)


def test_predictor_knob_sets_the_routing_accuracy() -> None:
    trace = _trace(3.0, 60.0)
    rng = np.random.default_rng(1)
    trace = Trace(
        trace.name,
        trace.arrival_s,
        trace.input_tokens,
        rng.integers(10, 600, len(trace)).astype(np.int32),
        None,
        trace.duration_s,
    )
    exact = _run(Scripted(later=1), trace, predictor_accuracy=1.0)
    poor = _run(Scripted(later=1), trace, predictor_accuracy=0.5)
    online = _run(Scripted(later=1), trace)
    assert exact.predictor is not None and exact.predictor.accuracy == 1.0
    assert poor.predictor is not None and 0.35 < poor.predictor.accuracy < 0.65
    assert online.predictor is not None and online.predictor.accuracy_knob is None


def test_dynamollm_runs_on_the_real_profile_and_physics() -> None:
    trace = _trace(3.0, 600.0, output_tokens=200)
    policy = sim_policy("dynamollm", sim_settings("llama2-70b", "h100-sxm"))
    run = run_policy(trace, policy, PROFILE, config=SimConfig(max_drain_s=120.0))
    r = run.result
    assert r.periods is not None and r.forecast
    # Its forecasts are scored from its decision records: mean rates over the pool steps' horizons.
    assert {f.kind for f in r.forecast} == {"rate"}
    steps = [d for d in r.decisions if isinstance(d, StepRecord)]
    assert steps[0].level == "initial" and steps[0].t_s == 0.0
    # Ten minutes of trace: the cluster epoch (30 min) in force throughout, a pool step every 5 min,
    # and in between only the SLO guard's early pool steps, each after it raised a pool's load.
    assert [(d.t_s, d.level) for d in steps[1:] if d.level != "guard"] == [(300.0, "pool"), (600.0, "pool")]
    assert all(any(p.guard_factor > 1.0 for p in d.step.pools) for d in steps if d.level == "guard")
    for d in steps:
        if d.level != "initial":
            assert d.step.forecast_kind == "rate" and len(d.step.class_forecast_rps) == len(CLASS_NAMES)
            assert [p.pool for p in d.step.pools] == [p.name for p in d.step.plan.pools]
    assert r.admitted_mask.all() and r.refused == {}
    assert r.completed.mean() > 0.95
    assert r.energy_j == pytest.approx(r.energy_by_bin_j.sum(), rel=1e-6)
    assert r.gpu_s > 0 and r.server_s * 8 >= r.gpu_s


# ---- engine extensions ------------------------------------------------------------------------------


def _engine(decode_s: float = DECODE_S) -> SimEngine:
    return SimEngine(FlatPhysics(8), MAX_MHZ, np.random.default_rng(0), config=NO_JITTER)


def test_waiting_requests_queue_by_deadline_and_can_be_taken_or_rejected() -> None:
    e = _engine()
    # Fill the batch so later requests wait: one huge prompt blocks the budget.
    e.submit(0, 0.0, 5000, 5)
    e.submit(1, 0.0, 10, 5, deadline_s=9.0)
    e.submit(2, 0.0, 10, 5, deadline_s=3.0)
    e.submit(3, 0.0, 10, 5, deadline_s=6.0)
    assert e.earliest_deadline_s == 3.0
    taken = e.take_waiting(max_deadline_s=6.0)
    assert [w.request_id for w in taken] == [2, 3]
    assert e.reject_past_deadline(10.0) == [1]
    assert e.earliest_deadline_s == math.inf or e.num_waiting == 0


def test_clock_change_stall_delays_the_next_iteration_at_idle_power() -> None:
    e = _engine()
    e.set_clock(1000, stall_s=0.5)
    e.submit(0, 0.0, 10, 1)
    e.advance_to(0.6)
    done = e.pop_completed()
    assert len(done) == 1 and done[0].first_token_s == pytest.approx(0.5 + DECODE_S + 1e-4 * 10)
    assert e.energy_j >= 8 * IDLE_W * 0.5


def test_drain_reports_when_the_engine_went_idle() -> None:
    e = _engine()
    e.submit(0, 0.0, 10, 3)
    assert e.drain(0.01) is None
    idle_s = e.drain(10.0)
    assert idle_s is not None and idle_s == pytest.approx(3 * DECODE_S + 1e-3)


@dataclass(frozen=True, slots=True)
class Recording(Scripted):
    """`Scripted`, keeping every pool-step observation it is given."""

    seen: list[ClusterObs] = field(default_factory=list)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        self.seen.append(obs)
        return Scripted.pool_step(self, obs, profile)


def test_observations_carry_causal_short_window_peaks() -> None:
    steady = _trace(1.0, 180.0)
    # 30 requests within 0.3 s at t = 70 s: a burst the 60-s rates show only as +0.5 req/s.
    burst_s = 70.0 + np.linspace(0.0, 0.3, 30)
    arrival = np.sort(np.concatenate((steady.arrival_s, burst_s)))
    n = len(arrival)
    trace = Trace("bursty", arrival, np.full(n, 500, np.int32), np.full(n, 50, np.int32), None, 180.0)
    policy = Recording(first=2, later=2)
    _run(policy, trace)
    assert policy.seen
    for obs in policy.seen:
        assert obs.burst_windows_s == DEFAULT_BURST_WINDOWS_S
        assert len(obs.class_burst_history_rps) == len(DEFAULT_BURST_WINDOWS_S)
    last = policy.seen[-1]
    one_s = DEFAULT_BURST_WINDOWS_S.index(1.0)
    per_class = np.array(last.class_burst_history_rps[one_s])  # (class, bin) peaks in 1-s windows
    # Exact most arrivals in a 1-s window ending at an arrival, per minute, all classes together.
    counts = np.arange(1, n + 1) - np.searchsorted(arrival, arrival - 1.0, side="right")
    minute = (arrival // 60).astype(int)
    for b in range(per_class.shape[1]):
        exact = counts[minute == b].max()
        # Classes split a window's arrivals: each sees at most all of them, together at least all.
        assert per_class[:, b].max() <= exact
        assert per_class[:, b].sum() >= exact
    assert per_class.shape == (len(CLASS_NAMES), 3)  # the last pool step, at 180 s, saw three minutes
    assert per_class[:, 1].sum() >= 30  # the burst's minute
    assert per_class[:, 0].sum() < 30
    # The 60-s rates of the same minutes barely move.
    rates = np.array(last.class_rate_history_rps).sum(axis=0)
    assert rates[1] < 2.0
