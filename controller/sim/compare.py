"""Several policies on one trace, side by side: `dctl simulate --compare [POLICY ...] --out DIR`.

Flow: the caller loads the trace once (`resolve_trace`: a file, `synthetic:KIND` or `azure-week:SERVICE`)
and builds the pricing; `run_compare` runs every policy on that same trace with the same `SimConfig`
(same seed, so the same engine jitter streams), turns each run into a `dynamollm.simreport/v1` report
(`build_report`), and, when given an output folder, writes `DIR/report.json` (the list of reports, in
run order), `DIR/table.txt` (the table normalised to the baseline) and the PNG plots of
`controller.sim.plots`, drawn from the reports' `timeseries`. `format_compare_table` is the table;
`normalised_rows` its numbers (pure). Files are written atomically and readable like the plots (0666
less the umask: 0644 under the usual umask 022).

Static policies that can be sized (`SizablePolicy`, e.g. `singlepool`) are sized by simulation to the
smallest instance count meeting `slo_target` (`controller.sim.cluster.size_by_simulation`), exactly as
`dctl simulate --policy` does, so the baseline is the cheapest static cluster that serves the trace.
The baseline (default `singlepool`) is always run, first, even when not listed: every ratio needs it.
Dynamic policies that tune a fleet of a given size (`scalefreq`, `scaleshard`: `SizablePolicy` and
`DynamicPolicy`) start from the instance count the baseline was sized to (docs/evaluation.md: the
paper's baselines tune singlepool's fleet).

One policy that cannot run (any `DynamoError`: e.g. `singlepool` cannot be sized to `slo_target` within
the search limit) does not stop the others: it becomes a failure entry (`dynamollm.simfailure/v1`:
policy, error type, message) in report.json at its place in the run order and a FAILED row in the
table, and `CompareOutcome.failures` is non-empty (`dctl simulate` then exits 1). Without the baseline
there is nothing to normalise to: the table then shows absolute figures only (every ratio column "-")
and says so in its first line; `scalefreq` / `scaleshard` start from their own profile-based plan.

The fluid lower bound (`controller.sim.bound`, the name `bound`) is part of every comparison: computed
from the trace and the profile after the runs (not simulated; naming it in `policies` is allowed and
adds nothing), it goes into every report as `bound` (the `dynamollm.simbound/v1` object) with the
report's `energy_x_bound` (its energy / the bound's), and into the table as a reference row and an
`x bound` column. A report below its bound (ratio < 1) gets a warning line under the table.

*Parallel*: with `jobs` > 1 the policies run in that many worker processes (forked where the platform
can, so they start with the trace loaded). The baseline and every policy that does not start from its
size go at once; `scalefreq` and `scaleshard` are submitted when the baseline is done, with its size, as
in a sequential run. Each run is the same simulation as in one process (same seed, same inputs), so the
reports are identical but for `wall_s`, which a worker measures with its own performance counter; the
reports keep the run order whatever order the runs end in. A sizing search stays sequential inside its
run (each trial's size depends on the last).

The only wall clock is `clock` (injected, default `time.perf_counter`), used for each report's `wall_s`
in a run in this process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.api.errors import DynamoError, InvalidArgumentError
from controller.model.profile import Profile
from controller.policy.base import DynamicPolicy, SimPolicy, SizablePolicy
from controller.policy.registry import PolicySettings
from controller.sim import plots
from controller.sim.bound import BOUND_NAME, DEFAULT_BOUND_PERIOD_S, FluidBound, fluid_bound
from controller.sim.cluster import PolicyRun, ProgressCallback, SimConfig, run_policy
from controller.sim.policies import SIM_POLICIES, sim_policy, sim_settings
from controller.sim.report import Pricing, build_report
from controller.sim.traces import Trace, load_trace
from controller.sim.week import WEEK_SPEC_PREFIX, load_week_spec
from controller.textfiles import write_text_atomic

DEFAULT_BASELINE = "singlepool"
# Policies whose per-pool TP and clock mix over time is drawn (the static ones never change).
MIX_POLICIES = ("dynamollm",)
REPORT_FILE = "report.json"
TABLE_FILE = "table.txt"
DEFAULT_SLO_TARGET = 0.99

PolicyFactory = Callable[[], SimPolicy]


def policy_registry(settings: PolicySettings | None = None) -> Mapping[str, PolicyFactory]:
    """`--policy` / `--compare` name -> factory of the simulator's policy with `settings`
    (`controller.sim.policies`; default `PolicySettings()`)."""
    return {name: partial(sim_policy, name, settings) for name in SIM_POLICIES}


def resolve_trace(
    spec: str,
    *,
    trace_dir: Path,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
) -> Trace:
    """The trace named by `spec`: `azure-week:conv|code` is built from the hourly week counts and the 2023
    per-request lengths in `trace_dir` (`controller.sim.week`); anything else goes to `load_trace`."""
    if spec.startswith(WEEK_SPEC_PREFIX):
        return load_week_spec(
            spec, trace_dir, rate_scale=rate_scale, start_s=start_s, duration_s=duration_s, seed=seed
        )
    return load_trace(spec, rate_scale=rate_scale, start_s=start_s, duration_s=duration_s, seed=seed)


FAILURE_SCHEMA = "dynamollm.simfailure/v1"


@dataclass(frozen=True, slots=True)
class PolicyFailure:
    """A policy of the comparison that could not run, and why (the DynamoError's type and message)."""

    policy: str
    error_type: str
    error: str
    wall_s: float

    def to_json(self, trace: str, seed: int) -> dict[str, Any]:
        """Its entry in report.json (`dynamollm.simfailure/v1`), in run order among the reports."""
        return {
            "schema": FAILURE_SCHEMA,
            "trace": trace,
            "policy": self.policy,
            "seed": seed,
            "failed": True,
            "error_type": self.error_type,
            "error": self.error,
            "wall_s": self.wall_s,
        }


@dataclass(frozen=True, slots=True)
class CompareOutcome:
    """The reports in run order (baseline first), the policies that failed, every report.json entry in
    run order (reports and failure entries), the files written (none without an output folder) and the
    trace's fluid lower bound (None only from callers that build an outcome by hand)."""

    baseline: str
    reports: tuple[dict[str, Any], ...]
    files: tuple[Path, ...]
    failures: tuple[PolicyFailure, ...] = ()
    entries: tuple[dict[str, Any], ...] = ()
    bound: FluidBound | None = None


class CompareProgress(Protocol):
    """What a caller hears while a comparison runs (`dctl simulate --compare` draws it on stderr)."""

    def policy_started(self, index: int, total: int, name: str) -> ProgressCallback | None:
        """Policy `index` of `total` (1-based) starts; may return the progress callback of its run."""
        ...

    def policy_finished(self, index: int, total: int, name: str, error: str | None, wall_s: float) -> None:
        """It ended after `wall_s`: `error` None when it ran, else why it could not."""
        ...


def run_compare(
    trace: Trace,
    policies: Sequence[str],
    profile: Profile,
    *,
    config: SimConfig,
    pricing: Pricing,
    out_dir: Path | None = None,
    slo_target: float = DEFAULT_SLO_TARGET,
    baseline: str = DEFAULT_BASELINE,
    workload: Mapping[str, Any] | None = None,
    registry: Mapping[str, PolicyFactory] | None = None,
    progress: CompareProgress | None = None,
    sizing_window_s: float | None = None,
    bound_period_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    jobs: int = 1,
) -> CompareOutcome:
    """Run `policies` (empty: every registered one) and `baseline` on `trace`; write DIR's files.

    `registry` maps names to policy factories (default: `policy_registry` with the settings of the
    profile's simulated hardware, `sim_settings`). `workload` (trace spec, rate scale, ...) is copied
    into every report's `workload`. `progress` hears each policy start (and returns that run's progress
    callback) and end. Every name is checked before anything runs; a policy that raises a DynamoError
    is recorded as a failure and the others still run.

    `sizing_window_s` (for week-long traces): a static policy is sized by simulating only the trace's
    busiest window of that length (most arrivals), then run once over the whole trace at that size; the
    report's attainment is the whole trace's. None: sized on the whole trace (each trial a full run).

    The fluid lower bound (`controller.sim.bound`) is computed after the runs, per period of
    `bound_period_s` (None: the pool period of the first report with control periods, else the default
    pool period; the bound's total does not depend on it), and goes into every report (`bound`,
    `energy_x_bound`). The name `bound` is accepted in `policies` and runs nothing.

    `jobs` > 1 runs the policies in that many worker processes (module docstring, *Parallel*); the
    reports are the same as with `jobs` = 1 but for their wall times.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgumentError("--jobs", jobs, "a whole number of processes >= 1")
    if sizing_window_s is not None and not (math.isfinite(sizing_window_s) and sizing_window_s > 0):
        raise InvalidArgumentError("--sizing-window", sizing_window_s, "a positive number of seconds")
    known = policy_registry(sim_settings(profile.model, profile.gpu)) if registry is None else registry
    if bound_period_s is not None and not (math.isfinite(bound_period_s) and bound_period_s > 0):
        raise InvalidArgumentError("bound_period_s", bound_period_s, "a positive number of seconds")
    accepted = tuple(dict.fromkeys([*known, BOUND_NAME]))
    names = tuple(n for n in order_policies(policies, accepted, baseline) if n != BOUND_NAME)

    def task(name: str, baseline_instances: int) -> _Task:
        return _Task(
            trace, name, known[name], profile, config, pricing, slo_target, baseline, baseline_instances,
            workload, sizing_window_s,
        )  # fmt: skip

    runner: _Runner = _Sequential(progress, clock) if jobs == 1 else _Parallel(jobs, progress)
    by_name = runner.run(names, task)
    outcomes = [by_name[n] for n in names]
    reports = [o[0] for o in outcomes if not isinstance(o, PolicyFailure)]
    failures = [o for o in outcomes if isinstance(o, PolicyFailure)]
    entries = [o.to_json(trace.name, config.seed) if isinstance(o, PolicyFailure) else o[0] for o in outcomes]
    bound = _attach_bound(trace, profile, reports, config, bound_period_s, clock)
    files: tuple[Path, ...] = ()
    if out_dir is not None:
        files = write_outputs(out_dir, entries, baseline)
    return CompareOutcome(
        baseline=baseline,
        reports=tuple(reports),
        files=files,
        failures=tuple(failures),
        entries=tuple(entries),
        bound=bound,
    )


def _attach_bound(
    trace: Trace,
    profile: Profile,
    reports: Sequence[dict[str, Any]],
    config: SimConfig,
    period_s: float | None,
    clock: Callable[[], float],
) -> FluidBound:
    """The trace's fluid lower bound, written into every report: `bound` (its JSON object) and
    `energy_x_bound` (the report's energy / the bound's; null for a zero bound)."""
    started_s = clock()
    if period_s is None:
        period_s = next(
            (float(r["periods"]["pool_s"]) for r in reports if r.get("periods")), DEFAULT_BOUND_PERIOD_S
        )
    bound = fluid_bound(trace, profile, period_s=period_s, bins=config.bins)
    doc = bound.to_json(seed=config.seed, wall_s=clock() - started_s)
    for r in reports:
        r["energy_x_bound"] = r["energy_j"] / bound.energy_j if bound.energy_j > 0.0 else None
        r["bound"] = doc
    return bound


@dataclass(frozen=True, slots=True)
class _Task:
    """One policy's run in a comparison: everything it needs, picklable (it may go to a worker)."""

    trace: Trace
    name: str
    factory: PolicyFactory
    profile: Profile
    config: SimConfig
    pricing: Pricing
    slo_target: float
    baseline: str
    baseline_instances: int
    workload: Mapping[str, Any] | None
    sizing_window_s: float | None


# A run's report and the instance count it ran with, or why it could not run.
Outcome = tuple[dict[str, Any], int] | PolicyFailure


def _attempt(task: _Task, on_progress: ProgressCallback | None, clock: Callable[[], float]) -> Outcome:
    started_s = clock()
    try:
        return _run_one(
            task.trace,
            task.name,
            task.factory,
            task.profile,
            config=task.config,
            pricing=task.pricing,
            slo_target=task.slo_target,
            baseline=task.baseline,
            baseline_instances=task.baseline_instances,
            workload=task.workload,
            on_progress=on_progress,
            sizing_window_s=task.sizing_window_s,
            started_s=started_s,
            clock=clock,
        )
    except DynamoError as err:
        return PolicyFailure(task.name, type(err).__name__, str(err), clock() - started_s)


def _attempt_in_worker(task: _Task) -> Outcome:
    """`_attempt` in a worker process: no progress bar, the process's own performance counter."""
    return _attempt(task, None, time.perf_counter)


def _needs_baseline_size(factory: PolicyFactory) -> bool:
    """A dynamic policy that tunes a fleet of a given size starts from the baseline's (module docstring)."""
    policy = factory()
    return isinstance(policy, SizablePolicy) and isinstance(policy, DynamicPolicy)


class _Runner(Protocol):
    def run(self, names: Sequence[str], task: Callable[[str, int], _Task]) -> dict[str, Outcome]:
        """Every policy of `names` (the baseline first), `task(name, baseline_instances)` its run."""
        ...


class _Sequential:
    """One policy after another in this process, each with its progress bar."""

    def __init__(self, progress: CompareProgress | None, clock: Callable[[], float]) -> None:
        self._progress, self._clock = progress, clock

    def run(self, names: Sequence[str], task: Callable[[str, int], _Task]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        baseline_instances = 0
        for index, name in enumerate(names, start=1):
            on_progress = (
                None if self._progress is None else self._progress.policy_started(index, len(names), name)
            )
            outcome = out[name] = _attempt(task(name, baseline_instances), on_progress, self._clock)
            if index == 1 and not isinstance(outcome, PolicyFailure):
                baseline_instances = outcome[1]
            _tell_finished(self._progress, index, len(names), name, outcome)
        return out


class _Parallel:
    """The policies in `jobs` worker processes: the baseline and every policy that does not start from
    its size at once, those that do (scalefreq, scaleshard) once the baseline is done."""

    def __init__(self, jobs: int, progress: CompareProgress | None) -> None:
        self._jobs, self._progress = jobs, progress

    def run(self, names: Sequence[str], task: Callable[[str, int], _Task]) -> dict[str, Outcome]:
        index = {name: i for i, name in enumerate(names, start=1)}
        later = [n for n in names[1:] if _needs_baseline_size(task(n, 0).factory)]
        out: dict[str, Outcome] = {}
        # fork where there is one: the workers start with the modules and the trace already loaded.
        # The parent has run no solver (no solver threads holding locks to inherit), and runs none
        # while the workers start: they are all started with the first submissions.
        context = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        )
        with ProcessPoolExecutor(max_workers=min(self._jobs, len(names)), mp_context=context) as pool:
            running = {pool.submit(_attempt_in_worker, task(n, 0)): n for n in names if n not in later}
            for name in running.values():
                self._started(index[name], len(names), name)
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    outcome = out[name] = future.result()
                    _tell_finished(self._progress, index[name], len(names), name, outcome)
                    if name == names[0]:
                        size = 0 if isinstance(outcome, PolicyFailure) else outcome[1]
                        for n in later:
                            running[pool.submit(_attempt_in_worker, task(n, size))] = n
                            self._started(index[n], len(names), n)
        return out

    def _started(self, index: int, total: int, name: str) -> None:
        if self._progress is not None:
            self._progress.policy_started(index, total, name)  # no bar: runs report only their end


def _tell_finished(
    progress: CompareProgress | None, index: int, total: int, name: str, outcome: Outcome
) -> None:
    if progress is None:
        return
    if isinstance(outcome, PolicyFailure):
        progress.policy_finished(index, total, name, outcome.error, outcome.wall_s)
    else:
        progress.policy_finished(index, total, name, None, outcome[0]["wall_s"])


def _run_one(
    trace: Trace,
    name: str,
    factory: PolicyFactory,
    profile: Profile,
    *,
    config: SimConfig,
    pricing: Pricing,
    slo_target: float,
    baseline: str,
    baseline_instances: int,
    workload: Mapping[str, Any] | None,
    on_progress: ProgressCallback | None,
    sizing_window_s: float | None,
    started_s: float,
    clock: Callable[[], float],
) -> tuple[dict[str, Any], int]:
    """One policy of the comparison: its report and the instance count it ran with."""
    policy = factory()
    # A dynamic policy with a size (scalefreq, scaleshard) tunes the baseline's fleet: it starts from
    # the instance count the baseline was sized to; only static ones are sized themselves.
    sizable = isinstance(policy, SizablePolicy) and not isinstance(policy, DynamicPolicy)
    sizing: dict[str, Any] | None = None
    if isinstance(policy, SizablePolicy) and isinstance(policy, DynamicPolicy):
        if baseline_instances:
            run = run_policy(
                trace, policy, profile, config=config, on_progress=on_progress, instances=baseline_instances
            )
            sizing = sizing_json(f"the {baseline} baseline's instance count", run)
        else:
            run = run_policy(trace, policy, profile, config=config, on_progress=on_progress)
            sizing = sizing_json(
                f"its own profile-based initial plan: the {baseline} baseline did not run, so there is "
                "no baseline instance count to start from",
                run,
            )
    elif sizable and sizing_window_s is not None and trace.duration_s > sizing_window_s:
        window_start_s = busiest_window_start_s(trace.arrival_s, sizing_window_s)
        sized = run_policy(
            trace.window(window_start_s, sizing_window_s),
            policy,
            profile,
            config=config,
            on_progress=on_progress,
            slo_target=slo_target,
        )
        run = run_policy(
            trace,
            policy,
            profile,
            config=config,
            on_progress=on_progress,
            instances=sized.result.plan.instances,
        )
        sizing = sizing_json(
            f"smallest instance count whose simulation of the busiest {sizing_window_s:g} s "
            f"(from {window_start_s:g} s) meets slo_attainment >= {slo_target:g}",
            sized,
        )
    else:
        run = run_policy(
            trace,
            policy,
            profile,
            config=config,
            on_progress=on_progress,
            slo_target=slo_target if sizable else None,
        )
        if sizable:
            sizing = sizing_json(
                f"smallest instance count whose simulation meets slo_attainment >= {slo_target:g}", run
            )
    stats = run.arrivals
    run_workload: dict[str, Any] = {
        **(workload or {}),
        "peak_window_s": stats.window_s,
        "peak_rate_rps": stats.peak_rate_rps,
        "mean_rate_rps": stats.mean_rate_rps,
    }
    if sizing is not None:
        run_workload["sizing"] = sizing
    report = build_report(
        run.result,
        policy=name,
        seed=config.seed,
        model=profile.model,
        gpu=profile.gpu,
        slos={c: profile.slo(c) for c in profile.class_names},
        pricing=pricing,
        wall_s=clock() - started_s,
        workload=run_workload,
    )
    return report, run.result.plan.instances


def sizing_json(rule: str, run: PolicyRun) -> dict[str, Any]:
    """A report's `workload.sizing`: how the run's size was chosen, and every sizing trial."""
    return {
        "rule": rule,
        "peak_rule_instances": run.rule_plan.instances,
        "trials": [{"instances": t.instances, "slo_attainment": t.slo_attainment} for t in run.sizing_trials],
    }


def busiest_window_start_s(arrival_s: npt.NDArray[np.float64], window_s: float) -> float:
    """Start of a window [t, t + window_s) holding the most arrivals (the earliest such, at an arrival;
    0 for an empty trace). Sorted arrivals."""
    if len(arrival_s) == 0:
        return 0.0
    ends = np.searchsorted(arrival_s, arrival_s + window_s, side="left")
    return float(arrival_s[int(np.argmax(ends - np.arange(len(arrival_s))))])


def order_policies(policies: Sequence[str], known: Sequence[str], baseline: str) -> tuple[str, ...]:
    """The run order: the baseline, then the requested policies (all known ones when none), each once.
    InvalidArgumentError naming `--compare` for an unknown name."""
    if baseline not in known:
        raise InvalidArgumentError("baseline", baseline, tuple(known))
    for name in policies:
        if name not in known:
            raise InvalidArgumentError("--compare", name, tuple(known))
    wanted = list(policies) if policies else list(known)
    return tuple(dict.fromkeys([baseline, *wanted]))


@dataclass(frozen=True, slots=True)
class CompareRow:
    """One policy's figures, absolute and as a ratio to the baseline's (None where undefined)."""

    policy: str
    energy_kwh: float
    energy_x: float | None
    energy_x_bound: float | None
    carbon_x: float | None
    cost_x: float | None
    avg_servers: float
    servers_x: float | None
    ttft_p99_s: float | None
    ttft_p99_x: float | None
    tbt_p99_s: float | None
    tbt_p99_x: float | None
    slo_attainment: float | None
    reconfigurations: int


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def normalised_rows(
    reports: Sequence[Mapping[str, Any]], baseline: str | None = DEFAULT_BASELINE
) -> tuple[CompareRow, ...]:
    """Each report's headline figures and their ratios to the `baseline` policy's report; `baseline`
    None: absolute figures only (every ratio None). `energy_x_bound`: the report's own ratio to the
    fluid lower bound (None when it has none). InvalidArgumentError when the baseline is missing."""
    base: Mapping[str, Any] | None = None
    if baseline is not None:
        base = next((r for r in reports if r["policy"] == baseline), None)
        if base is None:
            raise InvalidArgumentError(
                "reports", [r["policy"] for r in reports], f"a list including {baseline}"
            )

    def ratio(key: str, r: Mapping[str, Any]) -> float | None:
        return None if base is None else _ratio(r[key], base[key])

    return tuple(
        CompareRow(
            policy=r["policy"],
            energy_kwh=r["energy_kwh"],
            energy_x=ratio("energy_j", r),
            energy_x_bound=r.get("energy_x_bound"),
            carbon_x=ratio("carbon_g", r),
            cost_x=ratio("cost_usd", r),
            avg_servers=r["avg_servers"],
            servers_x=ratio("avg_servers", r),
            ttft_p99_s=r["ttft_s_p99"],
            ttft_p99_x=ratio("ttft_s_p99", r),
            tbt_p99_s=r["tbt_s_p99"],
            tbt_p99_x=ratio("tbt_s_p99", r),
            slo_attainment=r["slo_attainment"],
            reconfigurations=r["reconfigurations"],
        )
        for r in reports
    )


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def is_failure(entry: Mapping[str, Any]) -> bool:
    """True for a failure entry of report.json (a policy that could not run), False for a report."""
    return entry.get("schema") == FAILURE_SCHEMA


def format_compare_table(entries: Sequence[Mapping[str, Any]], baseline: str = DEFAULT_BASELINE) -> str:
    """The comparison for a terminal, from report.json's entries in run order (reports and failure
    entries): ratios (x) are to the baseline, SLO attainment is absolute; a policy that failed is a
    FAILED row with its reason. Without a baseline report, absolute figures only, said in the first
    line. `x bound`: each policy's energy / the fluid lower bound's, which has its own row (from the
    reports' `bound`), with a warning line for any policy below it. Under the table: the pools each
    policy started with, labelled by the classes they serve, and the key of the class names."""
    reports = [e for e in entries if not is_failure(e)]
    failed = {e["policy"]: e for e in entries if is_failure(e)}
    have_base = any(r["policy"] == baseline for r in reports)
    rows = {row.policy: row for row in normalised_rows(reports, baseline if have_base else None)}
    first = reports[0] if reports else entries[0] if entries else {}
    if have_base:
        scale = f"normalised to {baseline}"
    else:
        why = "failed" if baseline in failed else "did not run"
        scale = f"absolute figures only: {baseline} (the baseline) {why}, so there is nothing to normalise to"
    head = f"trace {first.get('trace', '?')}"
    if "requests" in first:
        head += f"  requests {first['requests']}"
    head += f"  seed {first.get('seed', '?')}"
    if "model" in first:
        head += f"  model {first['model']} on {first['gpu']}"
    header = (
        f"{'policy':<12}{'energy kWh':>11}{'energy x':>9}{'carbon x':>9}{'cost x':>8}{'servers':>9}"
        f"{'servers x':>10}{'TTFT p99':>9}{'x':>7}{'TBT p99':>9}{'x':>7}{'SLO met':>9}{'reconf':>8}"
        f"{'x bound':>9}"
    )
    lines = [f"{head}  {scale}", header]
    for entry in entries:
        name = entry["policy"]
        if is_failure(entry):
            lines.append(f"{name:<12}FAILED ({entry['error_type']}): {entry['error']}")
            continue
        row = rows[name]
        slo = "-" if row.slo_attainment is None else f"{100.0 * row.slo_attainment:.2f}%"
        lines.append(
            f"{row.policy:<12}{row.energy_kwh:>11.3f}{_x(row.energy_x):>9}{_x(row.carbon_x):>9}"
            f"{_x(row.cost_x):>8}{row.avg_servers:>9.2f}{_x(row.servers_x):>10}{_s(row.ttft_p99_s):>9}"
            f"{_x(row.ttft_p99_x):>7}{_s(row.tbt_p99_s):>9}{_x(row.tbt_p99_x):>7}{slo:>9}"
            f"{row.reconfigurations:>8}{_x(row.energy_x_bound):>9}"
        )
    base = next((r for r in reports if r["policy"] == baseline), None) if have_base else None
    return "\n".join([*lines, *bound_lines(reports, base), *pool_lines(reports)])


def bound_lines(reports: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None) -> list[str]:
    """The fluid lower bound's row (its energy, its ratio to `base`'s, 1.000 in `x bound`), what it is,
    and a warning for every report below it; nothing when no report carries a bound."""
    bound = next((r["bound"] for r in reports if r.get("bound")), None)
    if bound is None:
        return []
    energy_x = _ratio(bound["energy_j"], None if base is None else base["energy_j"])
    dash = "-"
    lines = [
        f"{BOUND_NAME:<12}{bound['energy_kwh']:>11.3f}{_x(energy_x):>9}{dash:>9}{dash:>8}{dash:>9}{dash:>10}"
        f"{dash:>9}{dash:>7}{dash:>9}{dash:>7}{dash:>9}{dash:>8}{_x(1.0):>9}",
        f"{BOUND_NAME}: fluid lower bound on energy, computed from the trace, not simulated "
        "(controller/sim/bound.py): every admitted request by its true class at the least energy per "
        "request within its SLO of any (TP, clock), fractional instances, no idle GPUs, packing or "
        f"reconfiguration (on average {bound['avg_gpus']:.2f} GPUs)",
    ]
    for r in reports:
        ratio = r.get("energy_x_bound")
        if ratio is not None and ratio < 1.0:
            lines.append(
                f"WARNING: {r['policy']} used less energy than the bound ({ratio:.3f}x): the bound assumes "
                "every admitted request served within its SLO under the profile's capacities"
            )
    return lines


def pool_lines(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """Under a table: the pools each run started with, labelled by the classes they serve, then the
    one-line key of the class names."""
    lines = [
        "pools at the start of each run, with the classes each serves (a merged pool is named after its "
        "heaviest class, the one an instance serves the fewest requests/s of; a dynamic policy may regroup "
        "classes at each cluster step):"
    ]
    for r in reports:
        labels = plots.pool_labels(r)
        lines.append(f"  {r['policy']:<12}" + ("; ".join(labels.values()) or "-"))
    lines.append(plots.class_key())
    return lines


def write_outputs(
    out_dir: Path,
    entries: Sequence[Mapping[str, Any]],
    baseline: str = DEFAULT_BASELINE,
) -> tuple[Path, ...]:
    """report.json (every entry: reports and failure entries, in run order), table.txt, power.png (of
    the policies that ran, when any did) and, for each policy of MIX_POLICIES that ran, its TP-mix and
    clock-mix figures, in `out_dir` (created); the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_FILE
    write_text_atomic(report_path, json.dumps(list(entries), indent=2, allow_nan=False) + "\n")
    table_path = out_dir / TABLE_FILE
    write_text_atomic(table_path, format_compare_table(entries, baseline) + "\n")
    written = [report_path, table_path]
    reports = [e for e in entries if not is_failure(e)]
    if reports:
        written.append(plots.plot_power(reports, out_dir / plots.POWER_FILE))
    for r in reports:
        if r["policy"] in MIX_POLICIES:
            for kind in plots.MIX_KINDS:
                written.append(plots.plot_mix(r, kind, out_dir / plots.mix_file(r["policy"], kind)))
    return tuple(written)
