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

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from agent.sim.engine_core import EngineConfig, PerfModelLike, SimEngine, WaitingRequest
from agent.sim.physics import GPU_NAMES, MODEL_NAMES, load_perf_model
from controller.model.classes import CLASS_NAMES, REQUEST_CLASSES, ClassBins, ClassSlo
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec
from controller.model.profile import Profile
from controller.model.state import (
    DEFAULT_BURST_WINDOWS_S,
    ORACLE_BURST_WINDOWS_S,
    ClusterObs,
    InstanceObs,
    Periods,
    Phase,
)
from controller.orchestrator.plan import ACTION_KINDS, Action, Hysteresis, ReconfigCosts, plan_reconfiguration
from controller.policy.base import (
    DEFAULT_PEAK_WINDOW_S,
    ArrivalStats,
    DynamicPolicy,
    SimPolicy,
    SizablePolicy,
    arrival_stats,
    peak_rate_rps,
)
from controller.policy.capacity import ConfigCapacity, pool_capacities
from controller.policy.forecast import forecast_error, forecast_next_peak_rps
from controller.policy.frequency import escalate
from controller.policy.predict import (
    OutputPredictor,
    accuracy_of,
    inject_accuracy,
    predict_output_bins,
    update_many,
)
from controller.sim.report import (
    ForecastScore,
    PoolMixSeries,
    PredictorScore,
    RunSeries,
    SimResult,
    TbtHistogram,
    meets_slo,
)
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
    "simulate_dynamic",
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
    # Bin of the report's time series (power, GPUs, servers, pool mixes): per minute keeps a week small.
    series_bin_s: float = 60.0
    # --- dynamic policies only ---
    # Output-bin prediction used for routing: None = the online learned predictor (DESIGN §5); a share in
    # [0, 1] = the true bin kept with that probability, else a wrong bin (the sensitivity study's knob).
    predictor_accuracy: float | None = None
    # The control periods; None = the policy's own.
    periods: Periods | None = None
    # TP changes by the paper's GPU-to-GPU re-shard (~50 ms) instead of drain + restart.
    fast_reshard: bool = False
    # Instance-level escalation on predicted TTFT misses (DESIGN §5): deadline order, max clock, moving
    # waiting requests to a less loaded instance, rejecting requests past their deadline.
    escalation: bool = True
    # GPUs the cluster may hold at once (the cluster manager's budget).
    total_gpus: int = 4096
    # Arrival-rate history handed to the policy: bins of history_bin_s, at most history_max_s of them
    # (a week and a day: enough for a weekly template).
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


# An engine's TBT log is folded into the run's histogram once it holds this many entries (1 MiB).
_TBT_FOLD_ENTRIES = 1 << 16


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
    completed = np.zeros(n, dtype=bool)
    ttft_s = np.full(n, np.nan)
    tbt_mean_s = np.full(n, np.nan)
    tbt = TbtHistogram()

    def collect(engine: SimEngine) -> None:
        """Finished requests and the TBT log out of the engine, so its memory stays bounded."""
        for r in engine.pop_completed():
            completed[r.request_id] = True
            ttft_s[r.request_id] = r.ttft_s
            tbt_mean_s[r.request_id] = r.tbt_mean_s
        tbt.fold(engine.take_tbt_log())

    for i in range(n):
        t = arrival[i]
        if t >= next_progress_s:
            if on_progress is not None:
                on_progress(t)
            next_progress_s = (math.floor(t / cfg.progress_step_s) + 1) * cfg.progress_step_s
            for engine in engines:
                if engine.tbt_log_len >= _TBT_FOLD_ENTRIES:
                    collect(engine)
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

    for engine in engines:
        collect(engine)
    tbt_gap_s, tbt_tokens = tbt.arrays()

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
        tbt_gap_s=tbt_gap_s,
        tbt_tokens=tbt_tokens,
        energy_by_bin_j=energy_by_bin_j,
        power_bin_s=cfg.power_bin_s,
        energy_instances_j=float(sum(e.energy_j for e in engines)),
        energy_unused_gpus_j=unused_w * end_s,
        gpu_s=plan.gpus * end_s,
        server_s=plan.servers * end_s,
        rejected=rejected,
        reconfigurations=0,
        engine_iterations=sum(e.iterations for e in engines),
        series=_static_series(plan, end_s, cfg.series_bin_s),
    )


def _static_series(plan: ClusterPlan, end_s: float, bin_s: float) -> RunSeries:
    n = max(1, math.ceil(end_s / bin_s))
    t_s = tuple(k * bin_s for k in range(n))
    return RunSeries(
        bin_s=bin_s,
        gpus=(float(plan.gpus),) * n,
        servers=(float(plan.servers),) * n,
        pools=tuple(
            PoolMixSeries(p.name, t_s, {spec: (c,) * n for spec, c in p.instance_counts().items()})
            for p in plan.pools
        ),
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


# ----------------------------------------------------------------------------------------------------
# Dynamic policies: the cluster changes during the run.
#
# Flow of `simulate_dynamic`: the policy's initial plan starts ACTIVE at t = 0 (a warm cluster). Then,
# merged in time order: arrivals (routed to an ACTIVE instance of the pool of their PREDICTED class),
# decision points every `periods.instance_s` (cluster step, then pool step, at their own periods; the
# instance step every time), and the timed effects of reconfiguration actions. At a cluster or pool
# step the desired plan goes through `controller.orchestrator.plan_reconfiguration`; its actions run at
# their `not_before_s` (a re-plan cancels the ones not yet started): `start` holds the GPUs STARTING
# (idle power, serving nothing) for the start time; `stop` drains (admits nothing; its waiting requests
# go back to the router; GPUs released when its last request finishes); `retp` drains the instance and
# restarts it with the new TP on its GPUs (the fast re-shard option: the new engine is up after the
# re-shard time while the old one finishes its running requests beside it); `clock` stalls the engine
# for the clock-change time. A `reconfiguration_free` policy (oracle) gets every change at once.
# Escalation and SLO accounting: see `_Instance` users below and docs/simulator.md.
# ----------------------------------------------------------------------------------------------------


class _Instance:
    """A simulated instance's mutable state. `engine` is None while STARTING."""

    __slots__ = (
        "changed_s",
        "engine",
        "gpus",
        "iid",
        "inv_cap",
        "phase",
        "pool",
        "ready_s",
        "routed",
        "spec",
        "successor",
    )

    def __init__(self, iid: int, pool: str, spec: InstanceSpec, phase: Phase, now_s: float) -> None:
        self.iid = iid
        self.pool = pool
        self.spec = spec
        self.phase = phase
        self.engine: SimEngine | None = None
        self.gpus: tuple[int, int] | None = None  # (server index, first GPU) while it holds GPUs
        self.ready_s = math.inf  # when STARTING ends (inf: waiting for GPUs or for its predecessor)
        self.routed = 0  # requests routed to it since the last instance step
        self.inv_cap = 1.0  # 1 / SLO-meeting load (rps) of its spec for its pool's mix: routing weight
        self.changed_s = now_s
        self.successor: _Instance | None = None  # restart-path retp: restarts when this one has drained


class _Servers:
    """GPU placement on 8-GPU servers: an instance takes `tp` aligned GPUs of one server (TP never spans
    servers). Best fit: the fullest server with room, else the lowest-numbered empty one; a server whose
    last instance leaves is released. Logs every change of GPUs held, servers held and the idle power of
    STARTING instances, for integration over time (a drained instance's release is logged at the moment
    it went idle, which may precede changes already logged: the log is sorted when integrated)."""

    def __init__(self) -> None:
        self._free: list[int] = []  # per server: bit mask of free GPUs
        self.gpus = 0
        self.servers = 0
        self._log: list[tuple[float, int, int, float]] = []  # (time, d gpus, d servers, d starting W)

    def allocate(self, tp: int, t_s: float) -> tuple[int, int]:
        full = (1 << GPUS_PER_SERVER) - 1
        block = (1 << tp) - 1
        best: tuple[int, int, int] | None = None  # (free GPUs, server, offset)
        for k, free in enumerate(self._free):
            if free == full:
                continue
            for offset in range(0, GPUS_PER_SERVER, tp):
                if (free >> offset) & block == block:
                    n_free = bin(free).count("1")
                    if best is None or n_free < best[0]:
                        best = (n_free, k, offset)
                    break
        new_server = 0
        if best is None:
            empty = [k for k, free in enumerate(self._free) if free == full]
            if empty:
                k = empty[0]
            else:
                self._free.append(full)
                k = len(self._free) - 1
            new_server = 1
            best = (GPUS_PER_SERVER, k, 0)
        _, k, offset = best
        self._free[k] &= ~(block << offset)
        self.gpus += tp
        self.servers += new_server
        self._log.append((t_s, tp, new_server, 0.0))
        return k, offset

    def release(self, where: tuple[int, int], tp: int, t_s: float) -> None:
        k, offset = where
        self._free[k] |= ((1 << tp) - 1) << offset
        self.gpus -= tp
        gone = int(self._free[k] == (1 << GPUS_PER_SERVER) - 1)
        self.servers -= gone
        self._log.append((t_s, -tp, -gone, 0.0))

    def starting_power(self, delta_w: float, t_s: float) -> None:
        self._log.append((t_s, 0, 0, delta_w))

    def integrals(self, edges_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Cumulative (GPU-seconds, server-seconds, starting J) at each of `edges_s` (sorted): shape
        (3, len(edges_s))."""
        if not self._log:
            return np.zeros((3, len(edges_s)))
        log = np.array(sorted(self._log, key=lambda e: e[0]), dtype=np.float64)
        times = log[:, 0]
        levels = np.cumsum(log[:, 1:], axis=0)  # level from each change on
        out = np.empty((3, len(edges_s)))
        for col in range(3):
            cum = np.concatenate(([0.0], np.cumsum(levels[:-1, col] * np.diff(times))))
            after = np.maximum(edges_s - times[-1], 0.0) * levels[-1, col]
            out[col] = np.interp(edges_s, times, cum, left=0.0) + after
        return out


class _MixModel:
    """`controller.orchestrator.InstanceModel` for the planner, and routing weights: per pool, the
    SLO-meeting capacity and fitted power of each (TP, clock) for the pool's recent class mix."""

    def __init__(self, profile: Profile) -> None:
        self._profile = profile
        self._caps: dict[str, dict[InstanceSpec, ConfigCapacity]] = {}
        self._load_per_instance_rps: dict[str, float] = {}

    def update(self, plan: ClusterPlan, class_rate_rps: Sequence[float], live: Mapping[str, int]) -> None:
        for p in plan.pools:
            shares = {c: class_rate_rps[CLASS_NAMES.index(c)] for c in p.class_names}
            self._caps[p.name] = {c.spec: c for c in pool_capacities(self._profile, shares)}
            self._load_per_instance_rps[p.name] = sum(shares.values()) / max(1, live.get(p.name, 0))

    def capacity_rps(self, pool: str, spec: InstanceSpec) -> float:
        cap = self._caps.get(pool, {}).get(spec)
        return 0.0 if cap is None else cap.max_load_rps

    def power_w(self, pool: str, spec: InstanceSpec) -> float:
        cap = self._caps.get(pool, {}).get(spec)
        if cap is None:
            return 0.0
        return cap.power_w(min(self._load_per_instance_rps.get(pool, 0.0), cap.max_load_rps))


# Event kinds of the dynamic loop, in the order they run when simultaneous.
_EV_READY = 0
_EV_ACTION = 1
# A request that cannot be served anywhere (no instance of its pool nor of a larger one fits it).
_NO_ROUTE = -1
# Capacity weight of a spec that cannot serve its pool's mix within the SLO: routed to only as a last resort.
_TINY_CAP_RPS = 1e-6


def _pool_rank(plan: ClusterPlan) -> dict[str, int]:
    """Pools ordered by the largest class they serve: a "larger" pool serves longer requests."""
    return {p.name: max(CLASS_NAMES.index(c) for c in p.class_names) for p in plan.pools}


def _peak_rps(arrival_s: npt.NDArray[np.float64], t0_s: float, t1_s: float, window_s: float) -> float:
    lo, hi = np.searchsorted(arrival_s, (t0_s, t1_s))
    return peak_rate_rps(arrival_s[lo:hi], window_s)


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
    """Replay `trace` over a cluster that `policy` reconfigures at its periods (see the section comment).

    `perf` as in `simulate` (TP degree -> physics; it must cover every TP degree the policy may choose).
    Deterministic: the seed drives the engines' jitter (one child generator per instance, in creation
    order) and the injected predictor errors.
    """
    cfg = config or SimConfig()
    periods = cfg.periods or policy.periods
    free = policy.reconfiguration_free
    if perf is None:
        perf = perf_models(profile.model, profile.gpu, profile.tps)
    costs = ReconfigCosts(
        fast_reshard=cfg.fast_reshard, idle_power_w_per_gpu=perf[GPUS_PER_SERVER].idle_power_w
    )
    hysteresis = Hysteresis(epoch_s=periods.pool_s)
    max_clock_mhz = max(profile.clocks_mhz)
    n = len(trace)
    end_trace_s = trace.duration_s
    true_class = cfg.bins.class_indices(trace.input_tokens, trace.output_tokens).astype(np.int64)
    n_out = len(REQUEST_CLASSES) // 3
    root = np.random.default_rng(cfg.seed)
    pred_rng, engine_root = root.spawn(2)

    # Predicted classes: injected errors up front, or the online predictor one instance period ahead.
    pred_class = np.zeros(n, dtype=np.int64)
    predictor: OutputPredictor | None = None
    if cfg.predictor_accuracy is not None:
        wrong_out = inject_accuracy(true_class % n_out, cfg.predictor_accuracy, pred_rng)
        pred_class[:] = (true_class // n_out) * n_out + wrong_out
    else:
        predictor = OutputPredictor(bins=cfg.bins)
    predicted_upto = 0  # requests [0, predicted_upto) have their predicted class

    def predict_until(t_s: float) -> None:
        nonlocal predicted_upto
        if predictor is None:
            return
        hi = int(np.searchsorted(trace.arrival_s, t_s, side="left"))
        if hi > predicted_upto:
            lo = predicted_upto
            out = predict_output_bins(predictor, trace.input_tokens[lo:hi])
            pred_class[lo:hi] = (true_class[lo:hi] // n_out) * n_out + out
            predicted_upto = hi

    slos = [profile.slo(c.name) for c in REQUEST_CLASSES]
    ttft_slo_s = [s.ttft_s for s in slos]
    arrival = trace.arrival_s.tolist()
    inputs = trace.input_tokens.tolist()
    outputs = trace.output_tokens.tolist()

    # Outcomes, filled as requests complete.
    completed = np.zeros(n, dtype=bool)
    ttft_s = np.full(n, np.nan)
    tbt_mean_s = np.full(n, np.nan)
    chosen = np.full(n, -1, dtype=np.int32)
    rejected = 0
    counts_by_kind: dict[str, int] = dict.fromkeys(ACTION_KINDS, 0)
    escalations = {"max_clock": 0, "moved": 0, "rejected_past_deadline": 0}

    servers = _Servers()
    instances: dict[int, _Instance] = {}
    retired: list[_Instance] = []
    next_iid = 0
    mix = _MixModel(profile)
    plan = initial_plan
    rank = _pool_rank(plan)
    events: list[tuple[float, int, int, int, Any]] = []  # (time, kind, seq, generation, payload)
    seq = 0
    generation = 0
    waiting_starts: list[tuple[int, Action]] = []  # starts waiting for GPUs within total_gpus
    completed_batch: list[tuple[int, int]] = []  # (input, output) for the predictor
    tbt = TbtHistogram()  # every engine's TBT log, folded in as it grows

    def push(t_s: float, kind: int, payload: Any, gen: int = -1) -> None:
        nonlocal seq
        heapq.heappush(events, (t_s, kind, seq, gen, payload))
        seq += 1

    def make_engine(inst: _Instance, t_s: float) -> None:
        inst.engine = SimEngine(
            perf[inst.spec.tp],
            inst.spec.clock_mhz,
            engine_root.spawn(1)[0],
            config=cfg.engine,
            start_s=t_s,
            power_bin_s=cfg.power_bin_s,
        )

    def new_instance(pool: str, spec: InstanceSpec, t_s: float, *, active: bool) -> _Instance:
        nonlocal next_iid
        inst = _Instance(next_iid, pool, spec, Phase.ACTIVE if active else Phase.STARTING, t_s)
        next_iid += 1
        instances[inst.iid] = inst
        inst.inv_cap = 1.0 / max(_TINY_CAP_RPS, mix.capacity_rps(pool, spec))
        return inst

    def hold_gpus(inst: _Instance, t_s: float) -> None:
        inst.gpus = servers.allocate(inst.spec.tp, t_s)

    def release_gpus(inst: _Instance, t_s: float) -> None:
        if inst.gpus is not None:
            servers.release(inst.gpus, inst.spec.tp, t_s)
            inst.gpus = None
        retry_waiting_starts(t_s)

    def idle_w(inst: _Instance) -> float:
        return inst.spec.tp * perf[inst.spec.tp].idle_power_w

    def begin_start(inst: _Instance, t_s: float, duration_s: float) -> None:
        """GPUs held from now; serving after `duration_s` (at once when reconfiguration is free)."""
        hold_gpus(inst, t_s)
        if free or duration_s <= 0.0:
            make_engine(inst, t_s)
            inst.phase = Phase.ACTIVE
            inst.ready_s = t_s
            mark_routes()
            return
        servers.starting_power(idle_w(inst), t_s)
        inst.ready_s = t_s + duration_s
        push(inst.ready_s, _EV_READY, inst)

    def finish_start(inst: _Instance, t_s: float) -> None:
        if inst.phase is not Phase.STARTING or inst.ready_s != t_s:
            return  # stopped (or restarted) meanwhile
        servers.starting_power(-idle_w(inst), t_s)
        make_engine(inst, t_s)
        inst.phase = Phase.ACTIVE
        inst.changed_s = t_s
        mark_routes()

    def gpus_free() -> int:
        return cfg.total_gpus - servers.gpus

    def retry_waiting_starts(t_s: float) -> None:
        while (
            waiting_starts
            and waiting_starts[0][0] == generation
            and waiting_starts[0][1].spec.tp <= gpus_free()
        ):
            _, action = waiting_starts.pop(0)
            do_start(action, t_s)

    def do_start(action: Action, t_s: float) -> None:
        inst = new_instance(action.pool, action.spec, t_s, active=False)
        inst.changed_s = t_s
        begin_start(inst, t_s, action.duration_s)

    def begin_drain(inst: _Instance, t_s: float) -> None:
        """Admit nothing more; its waiting requests go back to the router."""
        inst.phase = Phase.DRAINING
        inst.changed_s = t_s
        mark_routes()
        if inst.engine is not None:
            moved = inst.engine.take_waiting()
            for w in moved:
                resubmit(w, t_s, exclude=inst)

    def finish_drain(inst: _Instance, idle_s: float) -> None:
        assert inst.engine is not None
        inst.engine.close(idle_s)
        release_gpus(inst, idle_s)
        del instances[inst.iid]
        retired.append(inst)
        succ = inst.successor
        if succ is not None and succ.iid in instances and succ.phase is Phase.STARTING:
            succ.changed_s = idle_s
            begin_start(succ, idle_s, costs.reshard_s)

    def stop_starting(inst: _Instance, t_s: float) -> None:
        if inst.gpus is not None:
            servers.starting_power(-idle_w(inst), t_s)
        release_gpus(inst, t_s)
        del instances[inst.iid]
        retired.append(inst)

    def execute(action: Action, t_s: float) -> None:
        counts_by_kind[action.kind] += 1
        if action.kind == "start":
            if action.spec.tp <= gpus_free():
                do_start(action, t_s)
            else:
                waiting_starts.append((generation, action))
            return
        assert action.instance_id is not None
        inst = instances.get(action.instance_id)
        if inst is None or inst.phase is Phase.DRAINING:
            counts_by_kind[action.kind] -= 1  # gone meanwhile: nothing done
            return
        if action.kind == "stop":
            if inst.phase is Phase.STARTING:
                stop_starting(inst, t_s)
            else:
                begin_drain(inst, t_s)
        elif action.kind == "clock":
            inst.spec = action.spec
            inst.changed_s = t_s
            inst.inv_cap = 1.0 / max(_TINY_CAP_RPS, mix.capacity_rps(inst.pool, inst.spec))
            if inst.engine is not None:
                inst.engine.advance_to(t_s)
                inst.engine.set_clock(action.spec.clock_mhz, 0.0 if free else action.duration_s)
        else:  # retp
            retp(inst, action.spec, t_s)

    def retp(inst: _Instance, spec: InstanceSpec, t_s: float) -> None:
        if inst.phase is Phase.STARTING:
            stop_starting(inst, t_s)
            do_start(Action("start", inst.pool, None, spec, t_s, costs.start_s, 0.0), t_s)
            return
        # The old engine drains under a new id; the instance id carries on with the new TP.
        old = new_instance(inst.pool, inst.spec, t_s, active=True)
        old.engine, old.gpus, old.inv_cap = inst.engine, inst.gpus, inst.inv_cap
        inst.engine, inst.gpus = None, None
        inst.spec = spec
        inst.phase = Phase.STARTING
        inst.changed_s = t_s
        inst.ready_s = math.inf
        inst.inv_cap = 1.0 / max(_TINY_CAP_RPS, mix.capacity_rps(inst.pool, spec))
        begin_drain(old, t_s)
        if free or cfg.fast_reshard:
            begin_start(inst, t_s, costs.reshard_s)
        else:
            old.successor = inst

    # ---- routing
    routes: list[list[_Instance]] = []
    fallbacks: list[list[_Instance]] = []
    routes_dirty = True

    def mark_routes() -> None:
        nonlocal routes_dirty
        routes_dirty = True

    def rebuild_routes() -> None:
        nonlocal routes, fallbacks, routes_dirty
        active_by_pool: dict[str, list[_Instance]] = {}
        for inst in instances.values():
            if inst.phase is Phase.ACTIVE:
                active_by_pool.setdefault(inst.pool, []).append(inst)
        pool_of = plan.pool_of_class()
        routes, fallbacks = [], []
        for c in REQUEST_CLASSES:
            own = pool_of.get(c.name)
            own_rank = rank[own] if own is not None else c.index
            routes.append(active_by_pool.get(own, []) if own is not None else [])
            larger = sorted((r, name) for name, r in rank.items() if r >= own_rank and name != own)
            others = [i for _, name in larger for i in active_by_pool.get(name, [])]
            if not others and not routes[-1]:
                others = [i for lst in active_by_pool.values() for i in lst]
            fallbacks.append(others)
        routes_dirty = False

    def best_instance(
        candidates: list[_Instance], t_s: float, size: int, exclude: _Instance | None
    ) -> _Instance | None:
        best: _Instance | None = None
        best_load = math.inf
        for inst in candidates:
            engine = inst.engine
            assert engine is not None
            if inst is exclude or size > engine.max_request_tokens:
                continue
            engine.advance_to(t_s)
            load = engine.outstanding_tokens * inst.inv_cap
            if load < best_load:
                best, best_load = inst, load
        return best

    def route(
        c: int, t_s: float, size: int, exclude: _Instance | None = None, *, wide: bool = False
    ) -> _Instance | None:
        """The least loaded (outstanding tokens / capacity) ACTIVE instance of the class's pool that fits
        the request; else of a larger pool. `wide`: both at once (escalation looks for any better place)."""
        if routes_dirty:
            rebuild_routes()
        if wide:
            return best_instance(routes[c] + fallbacks[c], t_s, size, exclude)
        best = best_instance(routes[c], t_s, size, exclude)
        if best is None:
            best = best_instance(fallbacks[c], t_s, size, exclude)
        return best

    def resubmit(w: WaitingRequest, t_s: float, exclude: _Instance | None, *, wide: bool = False) -> None:
        """Route a request taken out of an engine again (`exclude`: an instance it must not go to)."""
        nonlocal rejected
        i = w.request_id
        target = route(int(pred_class[i]), t_s, w.input_tokens + w.output_tokens, exclude, wide=wide)
        if target is None:
            rejected += 1
            chosen[i] = _NO_ROUTE
            return
        assert target.engine is not None
        target.engine.advance_to(t_s)
        target.engine.submit(i, w.arrival_s, w.input_tokens, w.output_tokens, w.deadline_s)
        chosen[i] = target.iid

    # ---- observation
    hist_bins = max(1, math.ceil(end_trace_s / cfg.history_bin_s) + 1)
    hist = np.zeros((len(REQUEST_CLASSES), hist_bins), dtype=np.int64)
    counted_upto = 0
    max_hist_bins = max(1, round(cfg.history_max_s / cfg.history_bin_s))
    history_cache: tuple[tuple[float, ...], ...] = tuple(() for _ in REQUEST_CLASSES)
    burst_cache: tuple[tuple[tuple[float, ...], ...], ...] = tuple(
        tuple(() for _ in REQUEST_CLASSES) for _ in DEFAULT_BURST_WINDOWS_S
    )

    # Short-term peaks per (window, class, bin): the most arrivals of a class in a window ENDING at one of
    # its arrivals in the bin, so a finished bin's value needs no arrival after it (causal). Each class
    # keeps only the arrival times within the longest window of its newest arrival.
    burst_windows = np.asarray(DEFAULT_BURST_WINDOWS_S, dtype=np.float64)
    burst = np.zeros((len(burst_windows), len(REQUEST_CLASSES), hist_bins), dtype=np.int64)
    burst_tail = [np.empty(0, dtype=np.float64) for _ in REQUEST_CLASSES]

    def count_arrivals(upto: int) -> None:
        nonlocal counted_upto
        if upto > counted_upto:
            times = trace.arrival_s[counted_upto:upto]
            classes = pred_class[counted_upto:upto]
            b = np.minimum((times // cfg.history_bin_s).astype(np.int64), hist_bins - 1)
            np.add.at(hist, (classes, b), 1)
            for c in np.unique(classes).tolist():
                mine = classes == c
                new_s = times[mine]
                seen = np.concatenate((burst_tail[c], new_s))
                ends = np.arange(len(seen) - len(new_s), len(seen)) + 1
                for k, w in enumerate(burst_windows):
                    counts = ends - np.searchsorted(seen, new_s - w, side="right")
                    np.maximum.at(burst[k, c], b[mine], counts)
                burst_tail[c] = seen[seen > seen[-1] - burst_windows[-1]]
            counted_upto = upto

    def history(t_s: float) -> tuple[tuple[float, ...], ...]:
        done_bins = min(hist_bins, int(t_s // cfg.history_bin_s))
        lo = max(0, done_bins - max_hist_bins)
        rates = hist[:, lo:done_bins] / cfg.history_bin_s
        return tuple(tuple(row) for row in rates.tolist())

    def burst_history(n_bins: int, t_s: float) -> tuple[tuple[tuple[float, ...], ...], ...]:
        """The short-term peaks (rps) of the `n_bins` history bins ending at `t_s`, per window."""
        done_bins = min(hist_bins, int(t_s // cfg.history_bin_s))
        lo = done_bins - n_bins
        return tuple(
            tuple(tuple(row) for row in (burst[k, :, lo:done_bins] / w).tolist())
            for k, w in enumerate(burst_windows.tolist())
        )

    def observe(t_s: float, horizon_s: float, hist_rows: tuple[tuple[float, ...], ...]) -> ClusterObs:
        obs_instances = []
        for inst in sorted(instances.values(), key=lambda x: x.iid):
            engine = inst.engine
            obs_instances.append(
                InstanceObs(
                    instance_id=inst.iid,
                    pool=inst.pool,
                    spec=inst.spec,
                    phase=inst.phase,
                    load_rps=inst.routed / periods.instance_s,
                    waiting=0 if engine is None else engine.num_waiting,
                    running=0 if engine is None else engine.num_running,
                )
            )
        truth: tuple[float, ...] | None = None
        true_bursts: tuple[tuple[float, ...], ...] = ()
        if free and horizon_s >= periods.pool_s:
            # The oracle's future, by the classes the router will use: the predictor runs ahead over
            # the coming period (with what it has learned so far) so the arrivals' pools are known.
            t1_s = t_s + horizon_s
            predict_until(t1_s)
            lo, hi = np.searchsorted(trace.arrival_s, (t_s, t1_s))
            times = trace.arrival_s[lo:hi]
            routed = pred_class[lo:hi]
            coming = [times[routed == c.index] for c in REQUEST_CLASSES]
            truth = tuple(_peak_rps(a, t_s, t1_s, periods.pool_s) for a in coming)
            true_bursts = tuple(
                tuple(_peak_rps(a, t_s, t1_s, w) for a in coming) for w in ORACLE_BURST_WINDOWS_S
            )
        return ClusterObs(
            now_s=t_s,
            start_unix_s=trace.start_unix_s,
            plan=plan,
            instances=tuple(obs_instances),
            history_bin_s=cfg.history_bin_s,
            class_rate_history_rps=hist_rows,
            total_gpus=cfg.total_gpus,
            true_next_rate_rps=truth,
            burst_windows_s=DEFAULT_BURST_WINDOWS_S,
            class_burst_history_rps=burst_cache,
            true_burst_windows_s=ORACLE_BURST_WINDOWS_S if truth is not None else (),
            true_next_burst_rps=true_bursts,
            true_period_s=horizon_s if truth is not None else 0.0,
        )

    # ---- forecast scoring (the forecaster the policy uses, on the same observed history)
    forecasts: dict[float, list[tuple[float, list[float]]]] = {periods.cluster_s: [], periods.pool_s: []}

    def record_forecast(t_s: float, horizon_s: float, hist_rows: tuple[tuple[float, ...], ...]) -> None:
        now_unix_s = None if trace.start_unix_s is None else trace.start_unix_s + t_s
        forecasts[horizon_s].append(
            (
                t_s,
                [
                    forecast_next_peak_rps(row, cfg.history_bin_s, horizon_s, now_unix_s=now_unix_s)
                    for row in hist_rows
                ],
            )
        )

    # ---- time series samples (instances by pool and spec at each series bin start)
    samples: list[tuple[float, Counter[tuple[str, InstanceSpec]]]] = []
    next_sample_s = 0.0

    def sample(t_s: float) -> None:
        nonlocal next_sample_s
        while next_sample_s <= t_s:
            samples.append(
                (
                    next_sample_s,
                    Counter((i.pool, i.spec) for i in instances.values() if i.phase is not Phase.DRAINING),
                )
            )
            next_sample_s += cfg.series_bin_s

    def collect(inst: _Instance) -> None:
        assert inst.engine is not None
        for r in inst.engine.pop_completed():
            completed[r.request_id] = True
            ttft_s[r.request_id] = r.ttft_s
            tbt_mean_s[r.request_id] = r.tbt_mean_s
            completed_batch.append((r.input_tokens, r.output_tokens))
        if inst.engine.tbt_log_len >= _TBT_FOLD_ENTRIES:
            tbt.fold(inst.engine.take_tbt_log())

    def instance_engines() -> list[_Instance]:
        return [i for i in instances.values() if i.engine is not None]

    # ---- the decision point
    next_cluster_s = periods.cluster_s
    next_pool_s = periods.pool_s

    def decide(t_s: float, i_next: int) -> None:
        nonlocal plan, rank, generation, history_cache, burst_cache, next_cluster_s, next_pool_s, rejected
        nonlocal predictor, completed_batch
        for inst in instance_engines():
            assert inst.engine is not None
            if inst.phase is Phase.DRAINING:
                idle_s = inst.engine.drain(t_s)
                collect(inst)
                if idle_s is not None:
                    finish_drain(inst, idle_s)
            else:
                inst.engine.advance_to(t_s)
                collect(inst)
        if predictor is not None and completed_batch:
            done = np.array(completed_batch, dtype=np.int64)
            predictor = update_many(predictor, done[:, 0], done[:, 1])
            completed_batch = []
        count_arrivals(i_next)
        sample(t_s)

        pool_step = t_s >= next_pool_s - 1e-9
        cluster_step = t_s >= next_cluster_s - 1e-9
        if pool_step or cluster_step:
            history_cache = history(t_s)
            burst_cache = burst_history(len(history_cache[0]), t_s)
            live: Counter[str] = Counter(i.pool for i in instances.values() if i.phase is not Phase.DRAINING)
            recent = [sum(row[-5:]) / max(1, len(row[-5:])) for row in history_cache]
            if cluster_step:
                record_forecast(t_s, periods.cluster_s, history_cache)
                plan = policy.cluster_step(observe(t_s, periods.cluster_s, history_cache), profile)
                next_cluster_s += periods.cluster_s
            if pool_step:
                record_forecast(t_s, periods.pool_s, history_cache)
                plan = policy.pool_step(observe(t_s, periods.pool_s, history_cache), profile)
                next_pool_s += periods.pool_s
            rank = _pool_rank(plan)
            mix.update(plan, recent, live)
            for inst in instances.values():
                inst.inv_cap = 1.0 / max(_TINY_CAP_RPS, mix.capacity_rps(inst.pool, inst.spec))
            mark_routes()
            current = observe(t_s, periods.pool_s, history_cache).instances
            actions = plan_reconfiguration(
                current,
                plan,
                costs=costs,
                model=mix,
                now_s=t_s,
                hysteresis=hysteresis,
                changed_at_s={i.iid: i.changed_s for i in instances.values()},
                gpu_budget=cfg.total_gpus,
            )
            generation += 1  # the actions of earlier plans not yet started are superseded
            waiting_starts.clear()
            for action in actions:
                if free or action.not_before_s <= t_s:
                    execute(action, t_s)
                else:
                    push(action.not_before_s, _EV_ACTION, action, generation)

        clocks = policy.instance_step(observe(t_s, periods.instance_s, history_cache), profile)
        for inst in list(instances.values()):
            if inst.phase is not Phase.ACTIVE:
                inst.routed = 0
                continue
            engine = inst.engine
            assert engine is not None
            clock = int(clocks.get(inst.iid, inst.spec.clock_mhz))
            if cfg.escalation:
                past = engine.reject_past_deadline(t_s)
                if past:
                    rejected += len(past)
                    escalations["rejected_past_deadline"] += len(past)
                    chosen[past] = _NO_ROUTE
                # Predicted to miss: the earliest deadline comes before the next instance step.
                at_risk = engine.earliest_deadline_s < t_s + periods.instance_s
                escalated = escalate(int(at_risk), min(clock, max_clock_mhz), max_clock_mhz)
                if escalated != clock:
                    escalations["max_clock"] += 1
                    clock = escalated
                if at_risk:
                    # Each at-risk request goes to the least loaded instance of its pool or a larger
                    # one, this instance included (it may well stay).
                    for w in engine.take_waiting(t_s + periods.instance_s):
                        resubmit(w, t_s, exclude=None, wide=True)
                        if chosen[w.request_id] != inst.iid:
                            escalations["moved"] += 1
            if clock != inst.spec.clock_mhz:
                counts_by_kind["clock"] += 1
                inst.spec = InstanceSpec(inst.spec.tp, clock)
                inst.inv_cap = 1.0 / max(_TINY_CAP_RPS, mix.capacity_rps(inst.pool, inst.spec))
                engine.set_clock(clock, 0.0 if free else costs.clock_change_s)
            inst.routed = 0

    # ---- initial cluster: the initial plan, up and warm at t = 0
    mix.update(plan, [0.0] * len(REQUEST_CLASSES), {})  # nothing observed yet: an even mix per pool
    for p in plan.pools:
        for spec in p.instances:
            inst = new_instance(p.name, spec, 0.0, active=True)
            hold_gpus(inst, 0.0)
            make_engine(inst, 0.0)
    predict_until(periods.instance_s)

    # ---- main loop: control events before the arrivals at the same time
    next_step_s = periods.instance_s
    next_progress_s = cfg.progress_step_s

    def run_control_until(t_s: float, i_next: int) -> None:
        nonlocal next_step_s
        while True:
            t_event = events[0][0] if events else math.inf
            t_step = next_step_s if next_step_s <= end_trace_s else math.inf
            if min(t_event, t_step) > t_s:
                return
            if t_event <= t_step:
                t_ev, kind, _, gen, payload = heapq.heappop(events)
                if kind == _EV_READY:
                    finish_start(payload, t_ev)
                elif gen == generation:
                    execute(payload, t_ev)
            else:
                decide(t_step, i_next)
                next_step_s += periods.instance_s
                predict_until(next_step_s)

    for i in range(n):
        t = arrival[i]
        if on_progress is not None and t >= next_progress_s:
            on_progress(t)
            next_progress_s = (math.floor(t / cfg.progress_step_s) + 1) * cfg.progress_step_s
        run_control_until(t, i)
        c = int(pred_class[i])
        size = inputs[i] + outputs[i]
        target = route(c, t, size) if inputs[i] >= 1 and outputs[i] >= 1 else None
        if target is None:
            rejected += 1
            continue
        assert target.engine is not None
        target.engine.submit(i, t, inputs[i], outputs[i], t + ttft_slo_s[c] if cfg.escalation else math.inf)
        target.routed += 1
        chosen[i] = target.iid
    run_control_until(end_trace_s, n)
    count_arrivals(n)

    # ---- drain: no more control; running work finishes, bounded by max_drain_s
    live_engines = [i.engine for i in instances.values() if i.engine is not None]
    end_s = _drain(live_engines, end_trace_s, cfg)
    if on_progress is not None:
        on_progress(end_s)
    for inst in list(instances.values()):
        if inst.engine is None:
            if inst.gpus is not None:  # still starting
                servers.starting_power(-idle_w(inst), end_s)
            release_gpus(inst, end_s)
            continue
        collect(inst)
        idle_s = inst.engine.drain(end_s) if inst.phase is Phase.DRAINING else None
        if idle_s is not None:
            inst.engine.close(idle_s)
            release_gpus(inst, idle_s)
        else:
            inst.engine.close(end_s)
            release_gpus(inst, end_s)
        collect(inst)
        retired.append(inst)
    sample(end_s - 1e-9)

    return _dynamic_result(
        trace,
        initial_plan,
        cfg,
        periods,
        perf,
        servers,
        retired,
        end_s=end_s,
        class_index=true_class,
        pred_class=pred_class,
        completed=completed,
        ttft_s=ttft_s,
        tbt_mean_s=tbt_mean_s,
        chosen=chosen,
        rejected=rejected,
        counts_by_kind=counts_by_kind,
        escalations=escalations,
        hist=hist,
        forecasts=forecasts,
        samples=samples,
        tbt=tbt,
    )


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


def _forecast_scores(
    forecasts: Mapping[float, list[tuple[float, list[float]]]],
    hist: npt.NDArray[np.int64],
    bin_s: float,
    trace_end_s: float,
) -> tuple[ForecastScore, ...]:
    """Each recorded forecast against the realised peak bin rate of its epoch (whole epochs inside the
    trace only), per class; the realised rates are the router's observed (predicted-class) arrivals, the
    same series the forecast was made from."""
    scores = []
    for horizon_s, made in sorted(forecasts.items()):
        epochs = [(t, f) for t, f in made if t + horizon_s <= trace_end_s + 1e-9]
        mape: dict[str, float | None] = {}
        bias: dict[str, float | None] = {}
        for c in REQUEST_CLASSES:
            predicted = [f[c.index] for _, f in epochs]
            realised = [
                float(hist[c.index, round(t / bin_s) : round((t + horizon_s) / bin_s)].max(initial=0)) / bin_s
                for t, _ in epochs
            ]
            err = forecast_error(predicted, realised)
            mape[c.name] = err.mape if err.scored else None
            bias[c.name] = err.bias if err.scored else None
        scores.append(ForecastScore(horizon_s, len(epochs), mape, bias))
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


def _dynamic_result(
    trace: Trace,
    initial_plan: ClusterPlan,
    cfg: SimConfig,
    periods: Periods,
    perf: Mapping[int, PerfModelLike],
    servers: _Servers,
    retired: list[_Instance],
    *,
    end_s: float,
    class_index: npt.NDArray[np.int64],
    pred_class: npt.NDArray[np.int64],
    completed: npt.NDArray[np.bool_],
    ttft_s: npt.NDArray[np.float64],
    tbt_mean_s: npt.NDArray[np.float64],
    chosen: npt.NDArray[np.int32],
    rejected: int,
    counts_by_kind: Mapping[str, int],
    escalations: Mapping[str, int],
    hist: npt.NDArray[np.int64],
    forecasts: Mapping[float, list[tuple[float, list[float]]]],
    samples: list[tuple[float, Counter[tuple[str, InstanceSpec]]]],
    tbt: TbtHistogram,
) -> SimResult:
    """Energy, GPU and server integrals, series and scores of a finished dynamic run."""
    bin_s = cfg.power_bin_s
    n_bins = max(1, math.ceil(end_s / bin_s))
    engines = [i.engine for i in retired if i.engine is not None]
    energy_by_bin_j = np.zeros(n_bins)
    for e in engines:
        energy_by_bin_j += _shifted_bins(
            np.asarray(e.energy_by_bin_j, dtype=np.float64), e.start_s, bin_s, n_bins
        )
    edges_s = np.minimum(np.arange(n_bins + 1, dtype=np.float64) * bin_s, end_s)
    gpu_cum, server_cum, starting_cum = servers.integrals(edges_s)
    unused_w_per_gpu = perf[GPUS_PER_SERVER].idle_power_w
    unused_cum = (GPUS_PER_SERVER * server_cum - gpu_cum) * unused_w_per_gpu
    energy_by_bin_j += np.diff(unused_cum) + np.diff(starting_cum)

    series_edges = np.minimum(np.arange(0.0, end_s + cfg.series_bin_s, cfg.series_bin_s), end_s)
    series_edges = series_edges[: max(2, math.ceil(end_s / cfg.series_bin_s) + 1)]
    s_gpu, s_server, _ = servers.integrals(series_edges)
    lengths_s = np.maximum(np.diff(series_edges), 1e-12)

    for e in engines:
        tbt.fold(e.take_tbt_log())
    tbt_gap_s, tbt_tokens = tbt.arrays()
    n_out = len(REQUEST_CLASSES) // 3
    score = accuracy_of(class_index % n_out, pred_class % n_out)
    return SimResult(
        trace_name=trace.name,
        trace_duration_s=trace.duration_s,
        duration_s=end_s,
        start_unix_s=trace.start_unix_s,
        plan=initial_plan,
        class_index=class_index.astype(np.int8),
        instance_index=chosen,
        output_tokens=np.asarray(trace.output_tokens, dtype=np.int32),
        completed=completed,
        ttft_s=ttft_s,
        tbt_mean_s=tbt_mean_s,
        tbt_gap_s=tbt_gap_s,
        tbt_tokens=tbt_tokens,
        energy_by_bin_j=energy_by_bin_j,
        power_bin_s=bin_s,
        energy_instances_j=float(sum(e.energy_j for e in engines)) + float(starting_cum[-1]),
        energy_unused_gpus_j=float(unused_cum[-1]),
        gpu_s=float(gpu_cum[-1]),
        server_s=float(server_cum[-1]),
        rejected=rejected,
        reconfigurations=sum(counts_by_kind.values()),
        engine_iterations=sum(e.iterations for e in engines),
        reconfigurations_by_kind=dict(counts_by_kind),
        escalations=dict(escalations),
        predictor=PredictorScore(
            accuracy_knob=cfg.predictor_accuracy,
            accuracy=score.accuracy,
            under_share=score.under_share,
            over_share=score.over_share,
        ),
        forecast=_forecast_scores(forecasts, hist, cfg.history_bin_s, trace.duration_s),
        periods=periods,
        series=_mix_series(
            samples, cfg.series_bin_s, np.diff(s_gpu) / lengths_s, np.diff(s_server) / lengths_s
        ),
    )
