"""The discrete-event cluster simulator: a trace replayed over pools of simulated engines on a virtual clock.

Flow (`dctl simulate`): trace -> `arrival_stats` -> policy `initial_plan` -> `simulate` builds one
`SimEngine` per planned instance (physics from `load_perf_model(model, gpu, tp)`), then for each arrival
in time order: classify it (input bin and, in this issue, the output bin from the trace), advance the
engines of its class's pool to the arrival time, and submit it to the instance with the fewest
outstanding tokens (ties: the lowest index). After the last arrival the engines drain, bounded by
`max_drain_s`; what is still running then counts as incomplete. Energy: every engine (busy and idle)
plus every GPU of an allocated server that hosts no instance, at the physics' idle power.

Deterministic: one `numpy.random.Generator` from the seed, one child generator per instance in plan
order; no wall clock. Progress is reported through an optional callback (the CLI draws the bar).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass, field, fields

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from agent.sim.engine_core import EngineConfig, PerfModelLike, SimEngine
from agent.sim.physics import GPU_NAMES, MODEL_NAMES, load_perf_model
from controller.model.classes import REQUEST_CLASSES, ClassBins, ClassSlo
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan
from controller.model.profile import Profile
from controller.policy.base import (
    DEFAULT_PEAK_WINDOW_S,
    ArrivalStats,
    SimPolicy,
    SizablePolicy,
    arrival_stats,
)
from controller.sim.report import SimResult, meets_slo
from controller.sim.traces import Trace

# Re-exported for controller.dctl, which must not import agent.sim itself (DESIGN §3 layering).
__all__ = [
    "GPU_NAMES",
    "MODEL_NAMES",
    "PolicyRun",
    "SimConfig",
    "SizingTrial",
    "check_profile_engine",
    "perf_models",
    "run_policy",
    "simulate",
    "size_by_simulation",
]

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Knobs of one run that are not the trace, the plan or the hardware."""

    seed: int = 0
    # After the last arrival, requests get this long to finish before they count as incomplete.
    max_drain_s: float = 600.0
    drain_step_s: float = 1.0
    power_bin_s: float = 1.0
    # How often (simulated seconds) the progress callback is called.
    progress_step_s: float = 10.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    bins: ClassBins = field(default_factory=ClassBins)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise InvalidArgumentError("seed", self.seed, "a non-negative integer")
        for name in ("max_drain_s", "drain_step_s", "power_bin_s", "progress_step_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgumentError(name, value, "a positive finite number of seconds")


def perf_models(model: str, gpu: str, tps: Iterable[int]) -> dict[int, PerfModelLike]:
    """The physics of each TP degree (and of a whole server, whose idle power prices unused GPUs)."""
    return {tp: load_perf_model(model=model, gpu=gpu, tp=tp) for tp in sorted({*tps, GPUS_PER_SERVER})}


def _padded_sum(arrays: list[npt.NDArray[np.float64]], n_bins: int) -> npt.NDArray[np.float64]:
    total = np.zeros(n_bins)
    for a in arrays:
        m = min(len(a), n_bins)
        total[:m] += a[:m]
    return total


def simulate(
    trace: Trace,
    plan: ClusterPlan,
    *,
    model: str,
    gpu: str,
    config: SimConfig | None = None,
    on_progress: ProgressCallback | None = None,
    perf: Mapping[int, PerfModelLike] | None = None,
) -> SimResult:
    """Replay `trace` over the static `plan` and return the raw outcome.

    `perf` (TP degree -> physics, including TP 8 for the idle power of unused GPUs) defaults to the
    fitted model of `model` on `gpu`; tests pass simpler physics through it.
    """
    cfg = config or SimConfig()
    if perf is None:
        perf = perf_models(model, gpu, (spec.tp for p in plan.pools for spec in p.instances))
    n = len(trace)
    class_index = cfg.bins.class_indices(trace.input_tokens, trace.output_tokens)

    root = np.random.default_rng(cfg.seed)
    specs = [(p.name, spec) for p in plan.pools for spec in p.instances]
    rngs = root.spawn(len(specs))
    engines: list[SimEngine] = []
    # Per pool, its engines with their place in plan order.
    by_pool: dict[str, list[tuple[int, SimEngine]]] = {p.name: [] for p in plan.pools}
    for (pool, spec), rng in zip(specs, rngs, strict=True):
        engine = SimEngine(
            perf[spec.tp], spec.clock_mhz, rng, config=cfg.engine, start_s=0.0, power_bin_s=cfg.power_bin_s
        )
        by_pool[pool].append((len(engines), engine))
        engines.append(engine)
    pool_of = plan.pool_of_class()
    # Per class index, the engines that may serve it (none: the class is not planned, requests are lost),
    # and the largest request (input + output tokens) every one of them can hold in its KV cache.
    route = [by_pool[pool_of[c.name]] if c.name in pool_of else [] for c in REQUEST_CLASSES]
    fits_tokens = [min((e.max_request_tokens for _, e in r), default=0) for r in route]

    arrival = trace.arrival_s.tolist()
    inputs = trace.input_tokens.tolist()
    outputs = trace.output_tokens.tolist()
    classes = class_index.tolist()
    next_progress_s = cfg.progress_step_s
    rejected = 0
    chosen = [-1] * n
    for i in range(n):
        t = arrival[i]
        if on_progress is not None and t >= next_progress_s:
            on_progress(t)
            next_progress_s = (math.floor(t / cfg.progress_step_s) + 1) * cfg.progress_step_s
        c = classes[i]
        size = inputs[i] + outputs[i]
        # Not served: no instance in the pool, an empty prompt or answer, or larger than the KV cache.
        if size > fits_tokens[c] or inputs[i] < 1 or outputs[i] < 1:
            rejected += 1
            continue
        candidates = iter(route[c])
        best_k, best = next(candidates)
        best.advance_to(t)
        best_load = best.outstanding_tokens
        for k, engine in candidates:
            engine.advance_to(t)
            load = engine.outstanding_tokens
            if load < best_load:
                best_k, best, best_load = k, engine, load
        best.submit(i, t, inputs[i], outputs[i])
        chosen[i] = best_k

    end_s = _drain(engines, trace.duration_s, cfg)
    if on_progress is not None:
        on_progress(end_s)
    for engine in engines:
        engine.close(end_s)

    completed = np.zeros(n, dtype=bool)
    ttft_s = np.full(n, np.nan)
    tbt_mean_s = np.full(n, np.nan)
    gaps: list[npt.NDArray[np.float64]] = []
    tokens: list[npt.NDArray[np.int64]] = []
    for engine in engines:
        for r in engine.pop_completed():
            completed[r.request_id] = True
            ttft_s[r.request_id] = r.ttft_s
            tbt_mean_s[r.request_id] = r.tbt_mean_s
        gap_s, n_tokens = engine.tbt_histogram
        gaps.append(np.asarray(gap_s, dtype=np.float64))
        tokens.append(np.asarray(n_tokens, dtype=np.int64))

    n_bins = max(1, math.ceil(end_s / cfg.power_bin_s))
    bin_len_s = np.full(n_bins, cfg.power_bin_s)
    bin_len_s[-1] = end_s - cfg.power_bin_s * (n_bins - 1)
    unused_gpus = plan.allocated_gpus - plan.gpus
    unused_w = unused_gpus * perf[GPUS_PER_SERVER].idle_power_w
    energy_by_bin_j = _padded_sum([np.asarray(e.energy_by_bin_j, dtype=np.float64) for e in engines], n_bins)
    energy_by_bin_j += unused_w * bin_len_s
    return SimResult(
        trace_name=trace.name,
        trace_duration_s=trace.duration_s,
        duration_s=end_s,
        start_unix_s=trace.start_unix_s,
        plan=plan,
        class_index=class_index,
        instance_index=np.array(chosen, dtype=np.int32),
        output_tokens=np.asarray(trace.output_tokens, dtype=np.int32),
        completed=completed,
        ttft_s=ttft_s,
        tbt_mean_s=tbt_mean_s,
        tbt_gap_s=np.concatenate(gaps) if gaps else np.zeros(0),
        tbt_tokens=np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64),
        energy_by_bin_j=energy_by_bin_j,
        power_bin_s=cfg.power_bin_s,
        energy_instances_j=float(sum(e.energy_j for e in engines)),
        energy_unused_gpus_j=unused_w * end_s,
        gpu_s=plan.gpus * end_s,
        server_s=plan.servers * end_s,
        rejected=rejected,
        reconfigurations=0,
        engine_iterations=sum(e.iterations for e in engines),
    )


def _drain(engines: list[SimEngine], trace_end_s: float, cfg: SimConfig) -> float:
    """Advance past the trace's end until every engine is idle or the drain limit is reached; the end time."""
    limit_s = trace_end_s + cfg.max_drain_s
    for engine in engines:
        engine.advance_to(trace_end_s)
    busy = [e for e in engines if e.num_waiting or e.num_running]
    t = trace_end_s
    while busy and t < limit_s:
        t = min(t + cfg.drain_step_s, limit_s)
        for engine in busy:
            engine.advance_to(t)
        busy = [e for e in busy if e.num_waiting or e.num_running]
    # The run ends at the drain step in which the last engine went idle, or later if an iteration
    # started in that step ended after it.
    return max([trace_end_s, *(e.now_s for e in engines)]) if engines else trace_end_s


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
) -> PolicyRun:
    """Plan the cluster with `policy` from the trace's arrival statistics, then simulate it (`perf` as in
    `simulate`). A static policy (`SizablePolicy`) can instead be given its instance count, or be sized
    by simulation to the smallest count meeting `slo_target` (`size_by_simulation`)."""
    cfg = config or SimConfig()
    stats = arrival_stats(
        trace.arrival_s,
        cfg.bins.class_indices(trace.input_tokens, trace.output_tokens),
        trace.duration_s,
        window_s,
    )
    rule_plan = policy.initial_plan(stats, profile)
    trials: tuple[SizingTrial, ...] = ()
    if instances is None and slo_target is None:
        plan = rule_plan
    elif not isinstance(policy, SizablePolicy):
        raise InvalidArgumentError("--policy", policy.name, "a static policy, to fix or search its size")
    elif instances is not None:
        plan = policy.plan_with(instances, profile)
    else:
        assert slo_target is not None
        slos = {name: profile.slo(name) for name in profile.class_names}
        result, trials = size_by_simulation(
            trace,
            lambda n: policy.plan_with(n, profile),
            rule_plan.instances,
            slos,
            model=profile.model,
            gpu=profile.gpu,
            slo_target=slo_target,
            max_instances=MAX_SEARCH_INSTANCES,
            config=cfg,
            on_progress=on_progress,
            perf=perf,
        )
        return PolicyRun(result=result, arrivals=stats, rule_plan=rule_plan, sizing_trials=trials)
    result = simulate(
        trace, plan, model=profile.model, gpu=profile.gpu, config=cfg, on_progress=on_progress, perf=perf
    )
    return PolicyRun(result=result, arrivals=stats, rule_plan=rule_plan, sizing_trials=trials)


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
    trace: Trace,
    plan_with: Callable[[int], ClusterPlan],
    first_guess: int,
    slos: Mapping[str, ClassSlo],
    *,
    model: str,
    gpu: str,
    slo_target: float,
    max_instances: int,
    config: SimConfig | None = None,
    on_progress: ProgressCallback | None = None,
    perf: Mapping[int, PerfModelLike] | None = None,
) -> tuple[SimResult, tuple[SizingTrial, ...]]:
    """The smallest static cluster `plan_with(n)` whose simulation of `trace` meets `slo_target`.

    A static baseline "sized for the peak with the SLO met" (DESIGN §8) is the smallest count that
    actually meets the SLO on the trace: sizing from profile capacities and a peak window alone
    over-provisions a smooth trace and under-provisions a bursty one. Starts at `first_guess` (the
    profile-based rule), doubles up while short, then bisects, assuming attainment grows with the count.
    Returns the run at the chosen size and every trial in order. InvalidArgumentError if even
    `max_instances` misses the target.
    """
    if not 0.0 < slo_target <= 1.0:
        raise InvalidArgumentError("slo_target", slo_target, "a share in (0, 1]")
    runs: dict[int, SimResult] = {}
    trials: list[SizingTrial] = []

    def meets(n: int) -> bool:
        result = simulate(
            trace, plan_with(n), model=model, gpu=gpu, config=config, on_progress=on_progress, perf=perf
        )
        ok = meets_slo(result, slos)
        attainment = float(ok.mean()) if len(ok) else 1.0
        runs[n] = result
        trials.append(SizingTrial(instances=n, slo_attainment=attainment))
        return attainment >= slo_target

    lo, hi = 0, min(max(1, first_guess), max_instances)  # lo misses (or is 0), hi is the candidate
    while not meets(hi):
        if hi >= max_instances:
            raise InvalidArgumentError(
                "--slo-target",
                slo_target,
                f"an attainment reachable with at most {max_instances} instances "
                f"(reached {trials[-1].slo_attainment:.4f})",
            )
        lo, hi = hi, min(2 * hi, max_instances)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return runs[hi], tuple(trials)
