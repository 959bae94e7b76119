"""The simulator drives the same control cycle as the live controller: what the report records is what
the cycle decided; every policy runs on equal terms (admission, queue discipline)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import ClockDecision, PlanStep, StepRecord
from controller.model.profile import Profile
from controller.model.state import ClusterObs, Periods
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.base import ArrivalStats
from controller.policy.dynamollm import DynamoLLM
from controller.policy.singlepool import SinglePool
from controller.profiles import default_profile
from controller.sim.carbon import ConstantCarbonIntensity, ConstantEnergyPrice
from controller.sim.cluster import SimConfig, run_policy, simulate
from controller.sim.report import Pricing, build_report, slo_attainment
from controller.sim.traces import Trace, load_trace

PROFILE = default_profile("llama2-70b", "h100-sxm")
SLOS = {name: PROFILE.slo(name) for name in PROFILE.class_names}
PERIODS = Periods(cluster_s=300.0, pool_s=60.0, instance_s=5.0)
PRICING = Pricing(ConstantCarbonIntensity(300.0), "test", ConstantEnergyPrice(0.1), "test", 88.5)


@dataclass
class Recording:
    """DynamoLLM, remembering every answer it gave the cycle."""

    inner: DynamoLLM
    steps: list[PlanStep] = field(default_factory=list)
    clocks: list[dict[int, int]] = field(default_factory=list)

    name = "dynamollm"

    @property
    def periods(self) -> Periods:
        return self.inner.periods

    @property
    def costs(self) -> ReconfigCosts:
        return self.inner.costs

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return self.inner.initial_plan(arrivals, profile)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        self.steps.append(self.inner.cluster_step(obs, profile))
        return self.steps[-1]

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        self.steps.append(self.inner.pool_step(obs, profile))
        return self.steps[-1]

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        self.clocks.append(dict(self.inner.instance_step(obs, profile)))
        return self.clocks[-1]


def _hour_slice(seconds: float) -> Trace:
    return load_trace("synthetic:conversation").window(0.0, seconds)


def test_the_report_records_exactly_what_the_cycle_decided() -> None:
    policy = Recording(DynamoLLM(periods=PERIODS))
    run = run_policy(_hour_slice(900.0), policy, PROFILE, config=SimConfig(max_drain_s=60.0))
    result = run.result
    steps = [d for d in result.decisions if isinstance(d, StepRecord) and d.level != "initial"]
    assert len(steps) == len(policy.steps) == 900 // 60 + 900 // 300  # pool steps + cluster steps
    assert all(d.step is s for d, s in zip(steps, policy.steps, strict=True))
    assert all(d.step.pools for d in steps)  # dynamollm explains every pool of every step
    # Every clock change the report holds was asked for by the instance level (or is an escalation).
    asked = {(k * 5.0 + 5.0, i, c) for k, row in enumerate(policy.clocks) for i, c in row.items()}
    for d in result.decisions:
        if isinstance(d, ClockDecision) and d.reason == "load":
            assert (d.t_s, d.instance_id, d.to_mhz) in asked
    report = build_report(
        result,
        policy="dynamollm",
        seed=0,
        model="llama2-70b",
        gpu="h100-sxm",
        slos=SLOS,
        pricing=PRICING,
        wall_s=0,
    )
    assert report["decisions"] == [d.to_json() for d in result.decisions if isinstance(d, StepRecord)]
    clock_changes = [d for d in result.decisions if isinstance(d, ClockDecision)]
    assert sum(report["clock_decisions"].values()) == len(clock_changes) > 0
    json.dumps(report, allow_nan=False)
    first = next(d for d in report["decisions"] if d.get("level") == "pool")["pools"][0]
    assert {"pool", "classes", "gpu_budget", "forecast_rps", "solver_status", "chosen", "runner_up"} <= set(
        first
    )


def _with_request(trace: Trace, at_s: float, input_tokens: int, output_tokens: int) -> Trace:
    k = int(np.searchsorted(trace.arrival_s, at_s))
    return Trace(
        trace.name,
        np.insert(trace.arrival_s, k, at_s),
        np.insert(trace.input_tokens, k, input_tokens),
        np.insert(trace.output_tokens, k, output_tokens),
        trace.start_unix_s,
        trace.end_s,
    )


def test_a_request_beyond_the_context_is_refused_for_every_policy() -> None:
    base = _hour_slice(300.0)
    base = Trace(
        base.name,
        base.arrival_s,
        np.minimum(base.input_tokens, 3000),
        np.minimum(base.output_tokens, 500),
        base.start_unix_s,
        base.end_s,
    )
    trace = _with_request(base, 100.0, 100_000, 200)
    config = SimConfig(max_drain_s=60.0)
    sized = run_policy(trace, SinglePool(), PROFILE, config=config, slo_target=0.99)
    dynamic = run_policy(trace, DynamoLLM(periods=PERIODS), PROFILE, config=config)
    for result in (sized.result, dynamic.result):
        assert result.refused == {"context_length": 1}
        big = int(np.flatnonzero(trace.input_tokens == 100_000)[0])
        assert not result.admitted_mask[big] and not result.completed[big]
        assert result.admitted_mask.sum() == len(trace) - 1
    assert slo_attainment(sized.result, SLOS) >= 0.99  # sizing judged the admitted requests only


def test_static_runs_queue_by_deadline_like_dynamic_ones() -> None:
    """One busy instance; a long prompt (loose TTFT target) arrives just before a short one (tight
    target): earliest deadline first serves the short one first, as the dynamic path does."""
    n = 40
    arrival = np.concatenate([np.zeros(n), [0.001, 0.002]])
    inputs = np.concatenate([np.full(n, 2000), [2000, 100]])
    outputs = np.concatenate([np.full(n, 50), [50, 50]])
    trace = Trace("edf", arrival, inputs, outputs, None, 60.0)
    tp8 = InstanceSpec(8, 1980)
    plan = ClusterPlan((PoolPlan("all", CLASS_NAMES, (tp8,)),))
    config = SimConfig(escalation=False, max_drain_s=120.0)
    edf = simulate(trace, plan, model="llama2-70b", gpu="h100-sxm", config=config, profile=PROFILE)
    fcfs = simulate(trace, plan, model="llama2-70b", gpu="h100-sxm", config=config)
    short, long_ = n + 1, n
    first_token = {name: r.ttft_s + arrival for name, r in (("edf", edf), ("fcfs", fcfs))}
    assert first_token["edf"][short] < first_token["edf"][long_] - 0.05
    assert first_token["fcfs"][short] >= first_token["fcfs"][long_]
