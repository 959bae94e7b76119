"""The cluster simulator's entry points: a trace replayed over a policy's cluster, on a virtual clock.

Flow (`dctl simulate`): trace -> `arrival_stats` -> the policy's initial plan -> `simulate_cycle`: a
`ControlCycle` (the same one the live controller runs) steps the policy, a `SimFleet` executes its
commands on simulated engines (physics from `load_perf_model(model, gpu, tp)`), and the event kernel
(`controller.sim.kernel`) orders time. Static policies (`singlepool`, `multipool`) go through the same
cycle with a plan that never changes (`FixedPlan`), so every policy runs on the same engines, the same
queue discipline (earliest TTFT deadline first), the same admission (context refusals) and the same
escalation, and is judged by the same SLO rule. `size_by_simulation` searches a static policy's size.

Energy: every engine (busy and idle), engines loading (idle power), plus every GPU of an allocated
server that hosts no instance, at the physics' idle power. Deterministic: same seed, same report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass, field, fields, replace

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from agent.sim.engine_core import EngineConfig, PerfModelLike, SimEngine
from agent.sim.physics import GPU_NAMES, MODEL_NAMES, load_perf_model
from agent.sim.physics.specs import arch_for
from controller.control.cycle import ControlCycle, CycleConfig, FixedPlan
from controller.model.classes import REQUEST_CLASSES, ClassBins, ClassSlo
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec
from controller.model.decisions import ClockDecision, Decision, StepRecord
from controller.model.profile import Profile
from controller.orchestrator.plan import ACTION_KINDS
from controller.policy.base import (
    DEFAULT_PEAK_WINDOW_S,
    ArrivalStats,
    DynamicPolicy,
    SimPolicy,
    SizablePolicy,
    arrival_stats,
)
from controller.sim.evaluation import accuracy_of, forecast_error
from controller.sim.fleet import GpuLog, Outcomes, SimFleet
from controller.sim.forkmap import fork_map
from controller.sim.kernel import KernelRun, KernelSettings, ProgressCallback, RouterClasses, run
from controller.sim.oracle import Oracle, TraceForesight
from controller.sim.report import (
    ForecastScore,
    PoolMixSeries,
    PredictorScore,
    RunSeries,
    SimResult,
    slo_attainment,
)
from controller.sim.traces import Trace

# Re-exported for controller.dctl, which must not import agent.sim itself (layering).
__all__ = [
    "GPU_NAMES",
    "MODEL_NAMES",
    "PolicyRun",
    "ProgressCallback",
    "SimConfig",
    "SizingTrial",
    "beyond_context",
    "check_profile_engine",
    "perf_models",
    "run_policy",
    "simulate",
    "simulate_dynamic",
    "size_by_simulation",
]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Knobs of one run that are not the trace, the plan, the policy or the hardware."""

    seed: int = 0
    # After the last arrival, requests get this long to finish before they count as incomplete.
    max_drain_s: float = 600.0
    drain_step_s: float = 1.0
    power_bin_s: float = 1.0
    # How often (simulated seconds) the progress callback is called.
    progress_step_s: float = 10.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Run every engine iteration on its own (the reference engine) instead of advancing over runs of
    # decode-only iterations in one step: slower, the same report bit for bit (docs/simulator.md).
    reference_engine: bool = False
    bins: ClassBins = field(default_factory=ClassBins)
    # Bin of the report's time series (power, GPUs, servers, pool mixes): per minute keeps a week small.
    series_bin_s: float = 60.0
    # Output-bin prediction used for routing: None = the online learned predictor; a share in [0, 1] =
    # the true bin kept with that probability, else a wrong bin (the sensitivity study's knob).
    predictor_accuracy: float | None = None
    # Instance-level escalation on predicted TTFT misses, for every policy alike: max clock, moving
    # waiting requests to a less loaded instance, rejecting requests past their deadline. (The queue
    # is always earliest-deadline-first.)
    escalation: bool = True
    # GPUs the cluster may hold at once (the cluster manager's budget).
    total_gpus: int = 4096
    # Servers instances are placed on (None: added as needed); a live fleet's count, to predict it.
    max_nodes: int | None = None
    # Arrival-rate history handed to the policy: bins of history_bin_s, at most history_max_s of them.
    history_bin_s: float = 60.0
    history_max_s: float = 8 * 86400.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise InvalidArgumentError("seed", self.seed, "a non-negative integer")
        for name in (
            "max_drain_s",
            "drain_step_s",
            "power_bin_s",
            "progress_step_s",
            "series_bin_s",
            "history_bin_s",
            "history_max_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgumentError(name, value, "a positive finite number of seconds")
        ratio = self.series_bin_s / self.power_bin_s
        if not (ratio >= 1.0 and math.isclose(ratio, round(ratio))):
            raise InvalidArgumentError("series_bin_s", self.series_bin_s, "a whole multiple of power_bin_s")
        acc = self.predictor_accuracy
        if acc is not None and not (math.isfinite(acc) and 0.0 <= acc <= 1.0):
            raise InvalidArgumentError("predictor_accuracy", acc, "a share in [0, 1], or None (online)")
        if self.total_gpus < GPUS_PER_SERVER:
            raise InvalidArgumentError("total_gpus", self.total_gpus, f"an integer >= {GPUS_PER_SERVER}")
        if self.max_nodes is not None and self.max_nodes < 1:
            raise InvalidArgumentError("max_nodes", self.max_nodes, "an integer >= 1, or None")


def beyond_context(trace: Trace, model: str) -> npt.NDArray[np.bool_]:
    """Per request: its input plus output exceeds `model`'s context, so admission refuses it."""
    return np.asarray(trace.input_tokens + trace.output_tokens > arch_for(model).max_context_tokens)


def perf_models(model: str, gpu: str, tps: Iterable[int]) -> dict[int, PerfModelLike]:
    """The physics of each TP degree (and of a whole server, whose idle power prices unused GPUs)."""
    return {tp: load_perf_model(model=model, gpu=gpu, tp=tp) for tp in sorted({*tps, GPUS_PER_SERVER})}


def simulate(
    trace: Trace,
    plan: ClusterPlan,
    *,
    model: str,
    gpu: str,
    config: SimConfig | None = None,
    on_progress: ProgressCallback | None = None,
    perf: Mapping[int, PerfModelLike] | None = None,
    profile: Profile | None = None,
    policy: str = "static",
) -> SimResult:
    """Replay `trace` over the static `plan` (the control cycle with a `FixedPlan` named `policy`).

    `perf` (TP degree -> physics, including TP 8 for the idle power of unused GPUs) defaults to the
    fitted model of `model` on `gpu`; tests pass simpler physics through it. `profile`: its SLOs give
    each request its TTFT deadline and its capacities weight the routing, as for a dynamic policy. None
    (how a profile is measured: one class on one engine): no deadlines, first come first served, no
    escalation.
    """
    cfg = config or SimConfig()
    if perf is None:
        perf = perf_models(model, gpu, (spec.tp for p in plan.pools for spec in p.instances))
    if profile is None:
        cfg = replace(cfg, escalation=False)
        ttft_s = [math.inf] * len(REQUEST_CLASSES)
    else:
        ttft_s = [profile.slo(c.name).ttft_s for c in REQUEST_CLASSES]
    return simulate_cycle(trace, FixedPlan(policy), plan, model, cfg, perf, ttft_s, on_progress, profile)


def simulate_dynamic(
    trace: Trace,
    policy: DynamicPolicy,
    profile: Profile,
    initial_plan: ClusterPlan,
    *,
    config: SimConfig | None = None,
    on_progress: ProgressCallback | None = None,
    perf: Mapping[int, PerfModelLike] | None = None,
) -> SimResult:
    """Replay `trace` over a cluster that `policy` reconfigures at its periods. `perf` as in `simulate`
    (it must cover every TP degree the policy may choose)."""
    cfg = config or SimConfig()
    if perf is None:
        perf = perf_models(profile.model, profile.gpu, profile.tps)
    ttft_s = [profile.slo(c.name).ttft_s for c in REQUEST_CLASSES]
    return simulate_cycle(trace, policy, initial_plan, profile.model, cfg, perf, ttft_s, on_progress, profile)


def simulate_cycle(
    trace: Trace,
    policy: DynamicPolicy,
    initial_plan: ClusterPlan,
    model: str,
    cfg: SimConfig,
    perf: Mapping[int, PerfModelLike],
    ttft_slo_s: list[float],
    on_progress: ProgressCallback | None,
    profile: Profile | None = None,
) -> SimResult:
    """One run: the cycle, the fleet and the kernel wired together, then the books turned into a result."""
    if cfg.max_nodes is not None and initial_plan.gpus > GPUS_PER_SERVER * cfg.max_nodes:
        raise InvalidArgumentError(
            "nodes", cfg.max_nodes, f"room for the first plan of {policy.name} ({initial_plan.gpus} GPUs)"
        )
    root = np.random.default_rng(cfg.seed)
    pred_rng, engine_rng = root.spawn(2)
    router = RouterClasses(trace, cfg.bins, cfg.predictor_accuracy, pred_rng)
    if isinstance(policy, Oracle):
        foresight = TraceForesight(trace.arrival_s, router.until, policy.periods.pool_s)
        policy = replace(policy, foresight=foresight)
    cycle = ControlCycle(
        policy,
        profile,
        initial_plan,
        CycleConfig(
            total_gpus=cfg.total_gpus,
            max_nodes=cfg.max_nodes,
            history_bin_s=cfg.history_bin_s,
            history_max_s=cfg.history_max_s,
            escalation=cfg.escalation,
            start_unix_s=trace.start_unix_s,
        ),
    )
    outcomes = Outcomes(len(trace))
    fleet = SimFleet(
        perf,
        cfg.engine,
        engine_rng,
        outcomes,
        router.routed,
        power_bin_s=cfg.power_bin_s,
        stepwise=cfg.reference_engine,
    )
    settings = KernelSettings(
        max_context_tokens=arch_for(model).max_context_tokens,
        ttft_slo_s=ttft_slo_s,
        max_drain_s=cfg.max_drain_s,
        drain_step_s=cfg.drain_step_s,
        series_bin_s=cfg.series_bin_s,
        progress_step_s=cfg.progress_step_s,
        tbt_slo_s=() if profile is None else [profile.slo(c.name).tbt_s for c in REQUEST_CLASSES],
    )
    kernel = run(trace, cycle, fleet, router, settings, on_progress)
    return _result(trace, initial_plan, cfg, policy, perf, fleet, kernel, router, cycle)


@dataclass(frozen=True, slots=True)
class PolicyRun:
    """One policy evaluated on one trace: the run, the statistics it was planned from, the policy's own
    plan from those statistics and, when the size was searched by simulation, every trial."""

    result: SimResult
    arrivals: ArrivalStats
    rule_plan: ClusterPlan
    sizing_trials: tuple[SizingTrial, ...]


# Largest static cluster the sizing search tries: 512 DGX servers, 4,096 GPUs.
MAX_SEARCH_INSTANCES = 512


def trace_arrival_stats(
    trace: Trace, profile: Profile, config: SimConfig, window_s: float = DEFAULT_PEAK_WINDOW_S
) -> ArrivalStats:
    """What policies size from: the trace's per-class counts and peak rates, by TRUE class, of the
    requests served (those beyond the model's context are refused at admission: no policy plans for
    them)."""
    served = ~beyond_context(trace, profile.model)
    return arrival_stats(
        trace.arrival_s[served],
        config.bins.class_indices(trace.input_tokens[served], trace.output_tokens[served]),
        trace.duration_s,
        window_s,
    )


def run_policy(
    trace: Trace,
    policy: SimPolicy,
    profile: Profile,
    *,
    config: SimConfig | None = None,
    window_s: float = DEFAULT_PEAK_WINDOW_S,
    on_progress: ProgressCallback | None = None,
    perf: Mapping[int, PerfModelLike] | None = None,
    instances: int | None = None,
    slo_target: float | None = None,
    jobs: int = 1,
) -> PolicyRun:
    """Plan the cluster with `policy` from the trace's arrival statistics, then simulate it (`perf` as in
    `simulate`). A static policy (`SizablePolicy`) can instead be given its instance count, or be sized
    by simulation to the smallest count meeting `slo_target` (`size_by_simulation`, its trials in up to
    `jobs` processes, which report no progress). Requests refused at admission (beyond the model's
    context) are left out of the statistics: no policy plans for them."""
    cfg = config or SimConfig()
    stats = trace_arrival_stats(trace, profile, cfg, window_s)
    rule_plan = policy.initial_plan(stats, profile)
    if isinstance(policy, DynamicPolicy):
        # A dynamic policy starts from its own plan, or from `instances` when it also has a static size
        # (e.g. scalefreq starting from singlepool's count); it is never sized by simulation.
        if instances is not None and isinstance(policy, SizablePolicy):
            rule_plan = policy.plan_with(instances, profile)
        result = simulate_dynamic(
            trace, policy, profile, rule_plan, config=cfg, on_progress=on_progress, perf=perf
        )
        return PolicyRun(result=result, arrivals=stats, rule_plan=rule_plan, sizing_trials=())
    if instances is None and slo_target is None:
        plan = rule_plan
    elif not isinstance(policy, SizablePolicy):
        raise InvalidArgumentError("--policy", policy.name, "a static policy, to fix or search its size")
    elif instances is not None:
        plan = policy.plan_with(instances, profile)
    else:
        assert slo_target is not None
        sizable = policy
        result, trials = size_by_simulation(
            lambda n: simulate(
                trace,
                sizable.plan_with(n, profile),
                model=profile.model,
                gpu=profile.gpu,
                config=cfg,
                on_progress=on_progress if jobs == 1 else None,
                perf=perf,
                profile=profile,
                policy=policy.name,
            ),
            rule_plan.instances,
            {name: profile.slo(name) for name in profile.class_names},
            slo_target=slo_target,
            max_instances=MAX_SEARCH_INSTANCES,
            jobs=jobs,
        )
        return PolicyRun(result=result, arrivals=stats, rule_plan=rule_plan, sizing_trials=trials)
    result = simulate(
        trace,
        plan,
        model=profile.model,
        gpu=profile.gpu,
        config=cfg,
        on_progress=on_progress,
        perf=perf,
        profile=profile,
        policy=policy.name,
    )
    return PolicyRun(result=result, arrivals=stats, rule_plan=rule_plan, sizing_trials=())


def check_profile_engine(profile: Profile, engine: EngineConfig, profile_name: str) -> None:
    """Refuse a profile measured on an engine configured unlike the simulator's: its capacities and
    latencies would not describe the instances being simulated."""
    recorded = profile.provenance
    names = [f.name for f in fields(engine)]
    differ = [n for n, v in zip(names, astuple(engine), strict=True) if n in recorded and recorded[n] != v]
    if differ or not all(n in recorded for n in names):
        wanted = ", ".join(f"{n}={v}" for n, v in zip(names, astuple(engine), strict=True))
        raise InvalidArgumentError(
            "--profile", profile_name, f"a profile measured with the engine settings {wanted}"
        )


@dataclass(frozen=True, slots=True)
class SizingTrial:
    """One simulated candidate size of a static cluster."""

    instances: int
    slo_attainment: float


def size_by_simulation(
    simulate_with: Callable[[int], SimResult],
    first_guess: int,
    slos: Mapping[str, ClassSlo],
    *,
    slo_target: float,
    max_instances: int,
    jobs: int = 1,
) -> tuple[SimResult, tuple[SizingTrial, ...]]:
    """The smallest static cluster whose simulation (`simulate_with(n)`, n instances) meets `slo_target`.

    A static baseline "sized for the peak with the SLO met" is the smallest count that actually meets
    the SLO on the trace: sizing from profile capacities and a peak window alone over-provisions a
    smooth trace and under-provisions a bursty one. Starts at `first_guess` (the profile-based rule),
    doubles up while short, then bisects, assuming attainment grows with the count. Attainment is over
    admitted requests, so requests refused at admission never make the search fail. Returns the run at
    the chosen size and every trial in order. InvalidArgumentError if even `max_instances` misses.

    With `jobs` > 1 each simulation the search needs runs in a forked process together with the next
    ones it may need after it, whichever way the trials come out (`_SizingSearch.upcoming`); the
    search then reads the results as if it had run them one by one, so the answer and the trials are
    those of `jobs` = 1, and a speculative run it turns out not to need is only time spent.
    """
    if not 0.0 < slo_target <= 1.0:
        raise InvalidArgumentError("slo_target", slo_target, "a share in (0, 1]")
    runs: dict[int, SimResult] = {}
    trials: list[SizingTrial] = []
    search = _SizingSearch(0, min(max(1, first_guess), max_instances), True, max_instances)
    while (n := search.candidate()) is not None:
        if n not in runs:
            batch = search.upcoming(jobs, set(runs))
            runs.update(zip(batch, fork_map(simulate_with, batch, jobs), strict=True))
        attainment = slo_attainment(runs[n], slos)
        trials.append(SizingTrial(instances=n, slo_attainment=attainment))
        search = search.after(attainment >= slo_target)
        if search.failed:
            raise InvalidArgumentError(
                "--slo-target",
                slo_target,
                f"an attainment reachable with at most {max_instances} instances (reached {attainment:.4f})",
            )
    return runs[search.hi], tuple(trials)


@dataclass(frozen=True, slots=True)
class _SizingSearch:
    """Where the sizing search stands: `lo` misses (or is 0) and `hi` is the candidate; `doubling` while
    no count has met the target yet. A pure value, so the trials ahead can be explored on copies."""

    lo: int
    hi: int
    doubling: bool
    max_instances: int
    failed: bool = False

    def candidate(self) -> int | None:
        """The count to simulate next; None when the search is over (its answer is `hi`)."""
        if self.failed:
            return None
        if self.doubling:
            return self.hi
        return (self.lo + self.hi) // 2 if self.hi - self.lo > 1 else None

    def after(self, met: bool) -> _SizingSearch:
        """The search once the candidate met the target or missed it."""
        n = self.candidate()
        assert n is not None
        if self.doubling:
            if met:
                return replace(self, doubling=False)
            if self.hi >= self.max_instances:
                return replace(self, failed=True)
            return replace(self, lo=self.hi, hi=min(2 * self.hi, self.max_instances))
        return replace(self, hi=n) if met else replace(self, lo=n)

    def upcoming(self, count: int, known: set[int]) -> list[int]:
        """Up to `count` counts to simulate: the candidate first, then the candidates that may follow,
        nearest first (breadth-first over both outcomes of each), none already in `known`."""
        out: list[int] = []
        frontier = [self]
        while frontier and len(out) < count:
            nxt: list[_SizingSearch] = []
            for search in frontier:
                n = search.candidate()
                if n is None:
                    continue
                if n not in known and n not in out and len(out) < count:
                    out.append(n)
                nxt += [search.after(True), search.after(False)]
            frontier = nxt
        return out


# ---------------------------------------------------------------------------------------------- results


def _shifted_bins(
    energy_j: npt.NDArray[np.float64], start_s: float, bin_s: float, n_bins: int
) -> npt.NDArray[np.float64]:
    """An engine's energy bins (from its own start) on the run's bins (from t = 0): each engine bin is
    split between the two run bins it overlaps, in proportion to the overlap."""
    out = np.zeros(n_bins + 1)
    k0 = int(start_s // bin_s)
    frac = start_s / bin_s - k0
    m = min(len(energy_j), max(0, n_bins - k0))
    if m > 0:
        out[k0 : k0 + m] += (1.0 - frac) * energy_j[:m]
        out[k0 + 1 : k0 + 1 + m] += frac * energy_j[:m]
    return out[:n_bins]


def forecast_scores(
    decisions: Iterable[Decision],
    counts: Callable[[float, float], npt.NDArray[np.int64]],
    trace_end_s: float,
) -> tuple[ForecastScore, ...]:
    """Each forecast the policy planned with (the cluster and pool steps' decision records) against what
    then arrived over its horizon, per class, by the classes the router used. A "rate" forecast is
    scored against the realised mean rate, a "peak" forecast against the peak bin rate; "true" (the
    oracle's) and "none" are not forecasts. Only horizons that end inside the trace count."""
    made: dict[tuple[float, str], list[tuple[float, tuple[float, ...]]]] = {}
    for d in decisions:
        if not isinstance(d, StepRecord) or d.step.forecast_kind not in ("rate", "peak"):
            continue
        if not d.step.class_forecast_rps or d.t_s + d.horizon_s > trace_end_s + 1e-9:
            continue
        made.setdefault((d.horizon_s, d.step.forecast_kind), []).append((d.t_s, d.step.class_forecast_rps))
    scores = []
    for (horizon_s, kind), steps in sorted(made.items()):
        realised: list[list[float]] = [[] for _ in REQUEST_CLASSES]
        for t_s, _ in steps:
            window = counts(t_s, t_s + horizon_s)
            bins = max(1, window.shape[1])
            bin_s = horizon_s / bins
            for c in REQUEST_CLASSES:
                row = window[c.index]
                value = float(row.max(initial=0)) / bin_s if kind == "peak" else float(row.sum()) / horizon_s
                realised[c.index].append(value)
        mape: dict[str, float | None] = {}
        bias: dict[str, float | None] = {}
        for c in REQUEST_CLASSES:
            err = forecast_error([f[c.index] for _, f in steps], realised[c.index])
            mape[c.name] = err.mape if err.scored else None
            bias[c.name] = err.bias if err.scored else None
        scores.append(ForecastScore(horizon_s, len(steps), mape, bias, kind))
    return tuple(scores)


def _mix_series(
    samples: list[tuple[float, Counter[tuple[str, InstanceSpec]]]],
    bin_s: float,
    gpus: npt.NDArray[np.float64],
    servers: npt.NDArray[np.float64],
) -> RunSeries:
    t_s = tuple(t for t, _ in samples)
    keys = sorted({k for _, c in samples for k in c}, key=lambda k: (k[0], k[1].tp, k[1].clock_mhz))
    pools: dict[str, dict[InstanceSpec, tuple[int, ...]]] = {}
    for pool, spec in keys:
        pools.setdefault(pool, {})[spec] = tuple(c.get((pool, spec), 0) for _, c in samples)
    return RunSeries(
        bin_s=bin_s,
        gpus=tuple(float(x) for x in gpus),
        servers=tuple(float(x) for x in servers),
        pools=tuple(PoolMixSeries(pool, t_s, counts) for pool, counts in pools.items()),
    )


def _energy(
    engines: list[SimEngine], log: GpuLog, end_s: float, cfg: SimConfig, unused_w_per_gpu: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Energy per power bin, and the cumulative (GPU-s, server-s, loading J, unused-GPU J) at the end."""
    bin_s = cfg.power_bin_s
    n_bins = max(1, math.ceil(end_s / bin_s))
    energy_by_bin_j = np.zeros(n_bins)
    for e in engines:
        energy_by_bin_j += _shifted_bins(
            np.asarray(e.energy_by_bin_j, dtype=np.float64), e.start_s, bin_s, n_bins
        )
    edges_s = np.minimum(np.arange(n_bins + 1, dtype=np.float64) * bin_s, end_s)
    gpu_cum, server_cum, loading_cum = log.integrals(edges_s)
    unused_cum = (GPUS_PER_SERVER * server_cum - gpu_cum) * unused_w_per_gpu
    energy_by_bin_j += np.diff(unused_cum) + np.diff(loading_cum)
    totals = np.array([gpu_cum[-1], server_cum[-1], loading_cum[-1], unused_cum[-1]])
    return energy_by_bin_j, totals


def _result(
    trace: Trace,
    initial_plan: ClusterPlan,
    cfg: SimConfig,
    policy: DynamicPolicy,
    perf: Mapping[int, PerfModelLike],
    fleet: SimFleet,
    kernel: KernelRun,
    router: RouterClasses,
    cycle: ControlCycle,
) -> SimResult:
    """Energy, GPU and server integrals, series and scores of a finished run."""
    end_s = kernel.end_s
    engines = fleet.retired
    energy_by_bin_j, (gpu_s, server_s, loading_j, unused_j) = _energy(
        engines, fleet.gpu_log, end_s, cfg, perf[GPUS_PER_SERVER].idle_power_w
    )
    series_edges = np.minimum(np.arange(0.0, end_s + cfg.series_bin_s, cfg.series_bin_s), end_s)
    series_edges = series_edges[: max(2, math.ceil(end_s / cfg.series_bin_s) + 1)]
    s_gpu, s_server, _ = fleet.gpu_log.integrals(series_edges)
    lengths_s = np.maximum(np.diff(series_edges), 1e-12)
    tbt_gap_s, tbt_tokens = fleet.outcomes.tbt.arrays()
    n_out = len(REQUEST_CLASSES) // 3
    admitted = kernel.admitted
    score = accuracy_of(router.true_class[admitted] % n_out, router.routed[admitted] % n_out)
    out = fleet.outcomes
    escalations = dict(out.escalations)
    clock_steps = [d for d in kernel.decisions if isinstance(d, ClockDecision)]
    escalations["max_clock"] = sum(1 for d in clock_steps if d.reason == "escalation")
    by_kind: dict[str, int] = dict.fromkeys(ACTION_KINDS, 0)
    by_kind.update(cycle.reconfigurations_by_kind())
    by_kind["clock"] += len(clock_steps)  # the instance level's clock changes
    return SimResult(
        trace_name=trace.name,
        trace_duration_s=trace.duration_s,
        duration_s=end_s,
        start_unix_s=trace.start_unix_s,
        plan=initial_plan,
        class_index=router.true_class.astype(np.int8),
        instance_index=out.chosen,
        output_tokens=np.asarray(trace.output_tokens, dtype=np.int32),
        completed=out.completed,
        ttft_s=out.ttft_s,
        tbt_mean_s=out.tbt_mean_s,
        tbt_gap_s=tbt_gap_s,
        tbt_tokens=tbt_tokens,
        energy_by_bin_j=energy_by_bin_j,
        power_bin_s=cfg.power_bin_s,
        energy_instances_j=float(sum(e.energy_j for e in engines)) + float(loading_j),
        energy_unused_gpus_j=float(unused_j),
        gpu_s=float(gpu_s),
        server_s=float(server_s),
        rejected=out.rejected,
        reconfigurations=sum(by_kind.values()),
        engine_iterations=sum(e.iterations for e in engines),
        reconfigurations_by_kind=by_kind,
        escalations=escalations,
        predictor=PredictorScore(
            accuracy_knob=cfg.predictor_accuracy,
            accuracy=score.accuracy,
            under_share=score.under_share,
            over_share=score.over_share,
        ),
        forecast=forecast_scores(kernel.decisions, cycle.history.counts, trace.duration_s),
        periods=policy.periods,
        # Only the DynamoLLM family has an objective; other policies report none.
        objective=getattr(policy, "objective", None),
        series=_mix_series(
            kernel.samples, cfg.series_bin_s, np.diff(s_gpu) / lengths_s, np.diff(s_server) / lengths_s
        ),
        refused=kernel.refused,
        admitted=admitted,
        decisions=tuple(kernel.decisions),
    )
