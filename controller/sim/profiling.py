"""Profile generation by measurement on the simulated engine.

Where it sits: `dctl profile generate` calls `generate_profile`, which runs `agent.sim.engine_core.SimEngine`
(driven by the physics model, with its per-iteration jitter; compiled where built, `agent.sim.native`,
with the same results) at several load levels for every request
class x TP degree x SM clock and records what a client and a power meter would see. The result is a
`controller.model.profile.Profile`; files are written and read by `controller.profiles` (`save_profile`,
`load_profile`, `default_profile`), which the daemon shares and which never imports this package. The
committed default profile is regenerated with one command:

    PYTHONPATH=. .venv/bin/python -m controller.dctl.main profile generate --model llama2-70b \\
        --gpu h100-sxm --out controller/profile_data/llama2-70b_h100-sxm.json --jobs 2

Measurement (docs/profile-format.md has the full description):
  * SLOs: DEFAULT_SLO_SCALE x the unloaded TTFT and mean TBT on TP8 at the GPU's maximum clock, from
    `reference_requests` isolated requests of the class's representative lengths.
  * Request lengths under load: drawn from the Azure 2023 length model (`controller.sim.synthetic`,
    conversation and coding pooled by their request rates) restricted to the class's bins, so a class is
    measured with the spread of lengths its real requests have, not only its p90.
  * Saturation estimate per (class, TP, clock): 2 x max_num_seqs requests submitted at once; completed
    requests / makespan. Load levels are fixed fractions of it (from near zero to beyond saturation),
    extended upwards while the top level still meets the SLO, then bisected (`refine_steps` levels)
    between the last level meeting the SLO and the first one missing it.
  * Each level: Poisson arrivals at the level's rate; `warmup_requests` are discarded, the next
    `requests_per_level` are measured. SLO attainment = share of the measured requests with TTFT <= the
    class's ttft_s and mean inter-token time <= its tbt_s (the cluster simulator's per-request rule); a
    level meets the SLO when it reaches SLO_ATTAINMENT_TARGET. Also recorded: p99 TTFT over the measured
    requests; p99 TBT token-weighted over the decode iterations between the first and the last measured
    arrival; power and energy over that window.
Every run has its own seed derived from (seed, class, TP, clock, run), so results do not depend on the
grid, the order of the runs or the number of worker processes. The request lengths are one sequence per
(seed, class), replayed at every level and configuration of the class (common random numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from agent.api.errors import InternalError, InvalidArgumentError
from agent.sim.engine_core import EngineConfig, SimEngine
from agent.sim.native import make_engine
from agent.sim.physics import GPU_NAMES, MODEL_NAMES, PerfModel, load_perf_model
from agent.sim.physics.specs import arch_for
from controller.model.classes import CLASS_NAMES, DEFAULT_SLO_SCALE, ClassBins, ClassSlo, class_by_name
from controller.model.profile import (
    SLO_ATTAINMENT_TARGET,
    ClassProfile,
    ConfigProfile,
    Profile,
    ProfilePoint,
    max_load_meeting_slo,
)
from controller.sim.synthetic import PROFILED_SERVICES, WORKLOADS, sample_lengths

REFERENCE_TP = 8
DEFAULT_TPS = (2, 4, 8)

# Stream tags of the derived seeds, one per kind of run.
_REFERENCE_RUN, _CAPACITY_RUN, _LEVEL_RUN, _LENGTHS_RUN = 0, 1, 2, 3
# The lengths stream is keyed by class only (TP and clock 0): every configuration and every load level of a
# class replays the same length sequence (common random numbers), so the rare very long requests that
# decide a 99% attainment do not differ between levels and configurations by chance.
_ANY_TP = _ANY_CLOCK_MHZ = 0
# Measured values are stored with 6 significant digits (far below the run-to-run noise), SLOs with 4.
_MEASURED_DIGITS = 6
_SLO_DIGITS = 4
# Drain step after the last arrival; the engine idles to each step's end once empty.
_DRAIN_STEP_S = 30.0
# Candidate lengths drawn per round of rejection sampling (the rarest class, SL, keeps ~1.5% of them).
_LENGTH_BATCH = 4096
# The classes are defined on the default bins (docs/architecture.md, request classes), so profiles are too.
_BINS = ClassBins()


_DEFAULT_ENGINE = EngineConfig()


@dataclass(frozen=True, slots=True)
class ProfilingSettings:
    """How long and at which loads to measure. The defaults give p99s from >= 6 requests above them."""

    requests_per_level: int = 600
    warmup_requests: int = 100
    reference_requests: int = 30
    # load levels as fractions of the estimated saturation load; the first is the near-zero level
    level_fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15)
    # while the top level still meets the SLO, add levels 15% apart, at most this many
    max_extra_levels: int = 8
    # levels added by bisection between the last level meeting the SLO and the first missing it
    refine_steps: int = 3
    engine: EngineConfig = _DEFAULT_ENGINE

    def __post_init__(self) -> None:
        if self.requests_per_level < 100:
            raise InvalidArgumentError("requests_per_level", self.requests_per_level, ">= 100 (for a p99)")
        if self.warmup_requests < 0:
            raise InvalidArgumentError("warmup_requests", self.warmup_requests, ">= 0")
        if self.reference_requests < 1:
            raise InvalidArgumentError("reference_requests", self.reference_requests, ">= 1")
        fr = self.level_fractions
        if len(fr) < 2 or fr[0] <= 0 or any(b <= a for a, b in pairwise(fr)):
            raise InvalidArgumentError("level_fractions", fr, "at least two increasing positive fractions")
        if self.max_extra_levels < 0:
            raise InvalidArgumentError("max_extra_levels", self.max_extra_levels, ">= 0")
        if self.refine_steps < 0:
            raise InvalidArgumentError("refine_steps", self.refine_steps, ">= 0")


DEFAULT_SETTINGS = ProfilingSettings()


def _round(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def _rng(seed: int, class_name: str, tp: int, clock_mhz: int, run: int, index: int) -> np.random.Generator:
    key = [seed, CLASS_NAMES.index(class_name), tp, clock_mhz, run, index]
    return np.random.default_rng(np.random.SeedSequence(key))


def weighted_quantile(values: npt.NDArray[np.float64], weights: npt.NDArray[np.int64], q: float) -> float:
    """The smallest value v such that values <= v carry at least a share q of the total weight."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    if len(cum) == 0 or cum[-1] <= 0:
        raise InternalError("weighted quantile of an empty sample")
    return float(values[order][np.searchsorted(cum, q * cum[-1], side="left")])


def sample_class_lengths(
    class_name: str, n: int, rng: np.random.Generator, max_context_tokens: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """n (input, output) token lengths of requests of the class: the Azure 2023 conversation and coding
    length models pooled by their request rates, rejection-sampled into the class's bins and the model's
    context (input + output <= `max_context_tokens`). A longer request is refused at admission and never
    reaches an engine, so it has no place in what an engine's capacity is measured with."""
    index = class_by_name(class_name).index
    services = [WORKLOADS[name] for name in PROFILED_SERVICES]
    rates_rps = np.array([w.rate_rps for w in services])
    inputs: list[npt.NDArray[np.int32]] = []
    outputs: list[npt.NDArray[np.int32]] = []
    kept = 0
    while kept < n:
        counts = rng.multinomial(_LENGTH_BATCH, rates_rps / rates_rps.sum())
        for params, count in zip(services, counts.tolist(), strict=True):
            n_in, n_out = sample_lengths(params, count, rng)
            mine = (_BINS.class_indices(n_in, n_out) == index) & (n_in + n_out <= max_context_tokens)
            inputs.append(n_in[mine])
            outputs.append(n_out[mine])
            kept += int(mine.sum())
    return np.concatenate(inputs)[:n], np.concatenate(outputs)[:n]


def _drain(eng: SimEngine) -> None:
    while eng.num_running or eng.num_waiting:
        eng.advance_to(eng.now_s + _DRAIN_STEP_S)


# ------------------------------------------------------------------ measurement runs (worker side)
def measure_unloaded(
    model: str, gpu: str, class_name: str, seed: int, settings: ProfilingSettings
) -> ClassSlo:
    """Mean TTFT and mean TBT of isolated requests on TP8 at the maximum clock (not yet scaled)."""
    cls = class_by_name(class_name)
    perf = load_perf_model(model=model, gpu=gpu, tp=REFERENCE_TP)
    clock = perf.max_clock_mhz
    eng = make_engine(
        perf,
        clock,
        _rng(seed, class_name, REFERENCE_TP, clock, _REFERENCE_RUN, 0),
        settings.engine,
        start_s=0.0,
        power_bin_s=1.0,
    )
    ttft_s: list[float] = []
    tbt_s: list[float] = []
    for k in range(settings.reference_requests):
        eng.submit(k, eng.now_s, cls.representative_input_tokens, cls.representative_output_tokens)
        _drain(eng)
        (done,) = eng.pop_completed()
        ttft_s.append(done.ttft_s)
        tbt_s.append(done.tbt_mean_s)
    return ClassSlo(ttft_s=float(np.mean(ttft_s)), tbt_s=float(np.mean(tbt_s)))


def estimate_saturation_rps(
    perf: PerfModel,
    clock_mhz: int,
    input_tokens: Sequence[int],
    output_tokens: Sequence[int],
    rng: np.random.Generator,
    config: EngineConfig,
) -> float:
    """Throughput (requests/s) of the engine kept full: the first 2 x max_num_seqs requests of the given
    lengths at once / makespan."""
    n = 2 * config.max_num_seqs
    if len(input_tokens) < n:
        raise InternalError(f"saturation estimate needs {n} request lengths, got {len(input_tokens)}")
    eng = make_engine(perf, clock_mhz, rng, config, start_s=0.0, power_bin_s=1.0)
    fitting = [
        (i, o)
        for i, o in zip(input_tokens[:n], output_tokens[:n], strict=True)
        if i + o <= eng.max_request_tokens
    ]
    for k, (i, o) in enumerate(fitting):
        eng.submit(k, 0.0, i, o)
    _drain(eng)
    makespan_s = max(r.finish_s for r in eng.pop_completed())
    return len(fitting) / makespan_s


def measure_level(
    perf: PerfModel,
    clock_mhz: int,
    load_rps: float,
    slo: ClassSlo,
    input_tokens: Sequence[int],
    output_tokens: Sequence[int],
    rng: np.random.Generator,
    settings: ProfilingSettings,
) -> ProfilePoint:
    """One load level: Poisson arrivals of requests with the given lengths (warm-up first), warm-up
    discarded; SLO attainment, p99s, power and energy of the measured window. A request too large for the
    KV cache is not submitted and counts as a miss, as the cluster simulator's router rejects it."""
    w, n = settings.warmup_requests, settings.requests_per_level
    if len(input_tokens) != w + n or len(output_tokens) != w + n:
        raise InternalError(f"a level needs {w + n} request lengths, got {len(input_tokens)}")
    arrivals_s = np.cumsum(rng.exponential(1.0 / load_rps, w + n)).tolist()
    eng = make_engine(perf, clock_mhz, rng, settings.engine, start_s=0.0, power_bin_s=1.0)
    limit = eng.max_request_tokens
    e0_j = t0_s = 0.0
    hist0 = submitted = 0
    for k, (t, i, o) in enumerate(zip(arrivals_s, input_tokens, output_tokens, strict=True)):
        eng.advance_to(t)
        if k == w:
            e0_j, t0_s, hist0 = eng.energy_j, eng.now_s, len(eng.tbt_histogram[1])
        if i + o <= limit:
            eng.submit(k, t, i, o)
            submitted += int(k >= w)
    e1_j, t1_s = eng.energy_j, eng.now_s
    gaps_s, tokens = eng.tbt_histogram
    _drain(eng)
    done = [r for r in eng.pop_completed() if r.request_id >= w]
    if len(done) != submitted or not done:
        raise InternalError(f"profiling run lost requests: {len(done)} of {submitted} completed")
    ttft_s = np.array([r.ttft_s for r in done])
    # the evaluation's per-request rule (controller.sim.report): a one-token answer has no gap to judge
    met = sum(r.ttft_s <= slo.ttft_s and (r.output_tokens <= 1 or r.tbt_mean_s <= slo.tbt_s) for r in done)
    power_w = (e1_j - e0_j) / (t1_s - t0_s) / perf.tp
    # energy of the window / requests arriving in it (the realised rate, not the nominal one)
    arrival_rate_rps = (n - 1) / (arrivals_s[-1] - arrivals_s[w])
    return ProfilePoint(
        ttft_p99_s=_round(float(np.percentile(ttft_s, 99)), _MEASURED_DIGITS),
        tbt_p99_s=_round(weighted_quantile(gaps_s[hist0:], tokens[hist0:], 0.99), _MEASURED_DIGITS),
        slo_attainment=_round(met / n, _MEASURED_DIGITS),
        power_w=_round(power_w, _MEASURED_DIGITS),
        energy_per_request_j=_round(power_w * perf.tp / arrival_rate_rps, _MEASURED_DIGITS),
    )


@dataclass(frozen=True, slots=True)
class _ConfigTask:
    model: str
    gpu: str
    class_name: str
    tp: int
    clock_mhz: int
    seed: int
    slo: ClassSlo
    settings: ProfilingSettings


def _level_lengths(
    model: str, class_name: str, seed: int, s: ProfilingSettings
) -> tuple[list[int], list[int]]:
    """The (input, output) lengths every configuration of the class is measured with: one sequence per
    (seed, class), the first `warmup_requests + requests_per_level` of them at each load level."""
    n_lengths = max(s.warmup_requests + s.requests_per_level, 2 * s.engine.max_num_seqs)
    lengths_rng = _rng(seed, class_name, _ANY_TP, _ANY_CLOCK_MHZ, _LENGTHS_RUN, 0)
    context_tokens = arch_for(model).max_context_tokens
    n_in, n_out = sample_class_lengths(class_name, n_lengths, lengths_rng, context_tokens)
    return n_in.tolist(), n_out.tolist()


def load_input_mean(model: str, class_name: str, seed: int, s: ProfilingSettings) -> float:
    """Mean prompt length of the requests a load level of the class measures (warm-up excluded)."""
    n_in, _ = _level_lengths(model, class_name, seed, s)
    measured = n_in[s.warmup_requests : s.warmup_requests + s.requests_per_level]
    return float(np.mean(measured))


def measure_config(task: _ConfigTask) -> ConfigProfile:
    """All load levels of one (class, TP, clock): the fixed fractions of saturation, extended upwards while
    the top level meets the SLO, plus `refine_steps` bisection levels around the first SLO miss.

    A class whose representative request does not fit in the KV cache is not servable here (no levels)."""
    s = task.settings
    cls = class_by_name(task.class_name)
    perf = load_perf_model(model=task.model, gpu=task.gpu, tp=task.tp)
    engine_limit = s.engine.max_request_tokens(perf.kv_capacity_tokens)
    if cls.representative_input_tokens + cls.representative_output_tokens > engine_limit:
        # a single request of this class does not fit in the KV cache: the class cannot be served here
        return ConfigProfile(tp=task.tp, clock_mhz=task.clock_mhz, max_load_rps=0.0, load_rps=(), points=())

    def rng(run: int, index: int) -> np.random.Generator:
        return _rng(task.seed, task.class_name, task.tp, task.clock_mhz, run, index)

    n_in, n_out = _level_lengths(task.model, task.class_name, task.seed, s)
    level_in = n_in[: s.warmup_requests + s.requests_per_level]
    level_out = n_out[: s.warmup_requests + s.requests_per_level]
    saturation_rps = estimate_saturation_rps(
        perf, task.clock_mhz, n_in, n_out, rng(_CAPACITY_RUN, 0), s.engine
    )
    levels: dict[float, ProfilePoint] = {}

    def measure(load: float) -> ProfilePoint:
        point = measure_level(
            perf, task.clock_mhz, load, task.slo, level_in, level_out, rng(_LEVEL_RUN, len(levels)), s
        )
        levels[load] = point
        return point

    for fraction in s.level_fractions:
        top = measure(_round(fraction * saturation_rps, 4))
    extra = 0
    while top.meets_slo and extra < s.max_extra_levels:
        extra += 1
        top = measure(_round(s.level_fractions[-1] * 1.15**extra * saturation_rps, 4))
    # Bisect the bracket of the first SLO miss: that is where max_load_rps is read off the curve.
    loads = sorted(levels)
    first_miss = next((k for k, x in enumerate(loads) if not levels[x].meets_slo), None)
    if first_miss is not None and first_miss > 0:
        lo, hi = loads[first_miss - 1], loads[first_miss]
        for _ in range(s.refine_steps):
            mid = _round((lo + hi) / 2.0, 4)
            if mid in (lo, hi):
                break
            if measure(mid).meets_slo:
                lo = mid
            else:
                hi = mid
    loads = sorted(levels)
    points = [levels[x] for x in loads]
    max_load = max_load_meeting_slo(loads, points)
    return ConfigProfile(
        tp=task.tp,
        clock_mhz=task.clock_mhz,
        max_load_rps=max_load,
        load_rps=tuple(loads),
        points=tuple(points),
    )


def _measure_reference(args: tuple[str, str, str, int, ProfilingSettings]) -> ClassSlo:
    return measure_unloaded(*args)


# ------------------------------------------------------------------------------- orchestration
def generate_profile(
    model: str,
    gpu: str,
    *,
    tps: Sequence[int] = DEFAULT_TPS,
    clocks_mhz: Sequence[int] | None = None,
    classes: Sequence[str] = CLASS_NAMES,
    seed: int = 0,
    jobs: int = 1,
    settings: ProfilingSettings = DEFAULT_SETTINGS,
    progress: Callable[[int, int], None] | None = None,
) -> Profile:
    """Measure a profile on the simulated engine. `clocks_mhz` defaults to the GPU's profile clocks.

    `progress(done, total)` is called after each finished (class, TP, clock) and reference run. Results are
    identical for any `jobs` (worker processes).
    """
    if model not in MODEL_NAMES:
        raise InvalidArgumentError("model", model, MODEL_NAMES)
    if gpu not in GPU_NAMES:
        raise InvalidArgumentError("gpu", gpu, GPU_NAMES)
    if jobs < 1:
        raise InvalidArgumentError("jobs", jobs, ">= 1")
    if seed < 0:
        raise InvalidArgumentError("seed", seed, ">= 0")
    if not classes or len(set(classes)) != len(classes) or any(c not in CLASS_NAMES for c in classes):
        raise InvalidArgumentError("classes", list(classes), f"distinct names among {', '.join(CLASS_NAMES)}")
    if not tps or len(set(tps)) != len(tps):
        raise InvalidArgumentError("tps", list(tps), "distinct TP degrees")
    ref = load_perf_model(model=model, gpu=gpu, tp=REFERENCE_TP)
    for tp in tps:
        load_perf_model(model=model, gpu=gpu, tp=tp)  # rejects a TP degree the model cannot use
    clocks = tuple(ref.profile_clocks_mhz) if clocks_mhz is None else tuple(clocks_mhz)
    if not clocks or len(set(clocks)) != len(clocks):
        raise InvalidArgumentError("clocks_mhz", list(clocks), "distinct clocks in MHz")
    for clk in clocks:
        if not ref.min_clock_mhz <= clk <= ref.max_clock_mhz:
            raise InvalidArgumentError(
                "clocks_mhz", clk, f"{ref.min_clock_mhz}..{ref.max_clock_mhz} MHz for {gpu}"
            )
    tps_sorted = tuple(sorted(tps))
    clocks_sorted = tuple(sorted(clocks))
    ordered_classes = [c for c in CLASS_NAMES if c in classes]

    # Reference runs first (they fix the SLOs every level run is judged against), then the grid.
    total = len(ordered_classes) * (1 + len(tps_sorted) * len(clocks_sorted))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    ref_args = [(model, gpu, c, seed, settings) for c in ordered_classes]
    with _executor(jobs) as pool:
        unloaded: dict[str, ClassSlo] = {}
        for c, slo in zip(ordered_classes, _map(pool, _measure_reference, ref_args, tick), strict=True):
            unloaded[c] = slo
        slos = {
            c: ClassSlo(
                ttft_s=_round(DEFAULT_SLO_SCALE * u.ttft_s, _SLO_DIGITS),
                tbt_s=_round(DEFAULT_SLO_SCALE * u.tbt_s, _SLO_DIGITS),
            )
            for c, u in unloaded.items()
        }
        tasks = [
            _ConfigTask(model, gpu, c, tp, clk, seed, slos[c], settings)
            for c in ordered_classes
            for tp in tps_sorted
            for clk in clocks_sorted
        ]
        # the runs with the longest answers take the most iterations: start them first
        tasks.sort(key=lambda t: -class_by_name(t.class_name).representative_output_tokens)
        results = _map(pool, measure_config, tasks, tick)

    class_profiles: dict[str, ClassProfile] = {}
    for c in ordered_classes:
        rc = class_by_name(c)
        configs = {(t.tp, t.clock_mhz): r for t, r in zip(tasks, results, strict=True) if t.class_name == c}
        class_profiles[c] = ClassProfile(
            name=c,
            input_tokens=rc.representative_input_tokens,
            output_tokens=rc.representative_output_tokens,
            slo=slos[c],
            configs=configs,
            load_input_tokens_mean=_round(load_input_mean(model, c, seed, settings), _SLO_DIGITS),
        )
    e = settings.engine
    provenance: dict[str, str | int | float | bool] = {
        "generator": "controller.sim.profiling: agent.sim.engine_core.SimEngine on agent.sim.physics",
        "seed": seed,
        "slo_rule": (
            f"{DEFAULT_SLO_SCALE:g} x unloaded TTFT and mean TBT "
            f"on TP{REFERENCE_TP} at {ref.max_clock_mhz} MHz"
        ),
        "reference_requests": settings.reference_requests,
        "requests_per_level": settings.requests_per_level,
        "warmup_requests": settings.warmup_requests,
        "level_fractions_of_saturation": ",".join(f"{f:g}" for f in settings.level_fractions),
        "max_extra_levels": settings.max_extra_levels,
        "refine_steps": settings.refine_steps,
        "lengths": (
            "SLO reference at the class's representative (p90) lengths; load levels with lengths drawn "
            "from the Azure 2023 conversation + coding length models (pooled by request rate) within "
            "the class's bins and the model's context (their mean prompt: load_input_tokens_mean)"
        ),
        "max_load_rule": (
            f"largest load with SLO attainment >= {SLO_ATTAINMENT_TARGET:g} "
            "(TTFT <= ttft_s and mean inter-token time <= tbt_s per request)"
        ),
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "max_num_seqs": e.max_num_seqs,
        "jitter_cv": e.jitter_cv,
        "kv_watermark_fraction": e.kv_watermark_fraction,
    }
    return Profile(
        model=model,
        gpu=gpu,
        tps=tps_sorted,
        clocks_mhz=clocks_sorted,
        classes=class_profiles,
        provenance=provenance,
    )


class _InProcess:
    """Stand-in for a process pool when jobs == 1: runs the tasks here, in order."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _executor(jobs: int) -> ProcessPoolExecutor | _InProcess:
    return _InProcess() if jobs == 1 else ProcessPoolExecutor(max_workers=jobs)


_T = TypeVar("_T")
_R = TypeVar("_R")


def _map(
    pool: ProcessPoolExecutor | _InProcess,
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    tick: Callable[[], None],
) -> list[_R]:
    """fn over items, results in item order, tick() after each one finishes."""
    if isinstance(pool, _InProcess):
        out: list[_R] = []
        for item in items:
            out.append(fn(item))
            tick()
        return out
    futures = {pool.submit(fn, item): k for k, item in enumerate(items)}
    results: dict[int, _R] = {}
    for fut in as_completed(futures):
        results[futures[fut]] = fut.result()
        tick()
    return [results[k] for k in range(len(items))]
