"""Several policies on one trace, side by side: `dctl simulate --compare [POLICY ...] --out DIR`.

Flow: the caller loads the trace once (`resolve_trace`: a file, `synthetic:KIND` or `azure-week:SERVICE`)
and builds the pricing; `run_compare` runs every policy on that same trace with the same `SimConfig`
(same seed, so the same engine jitter streams), turns each run into a `dynamollm.simreport/v1` report
(`build_report`), and, when given an output folder, writes `DIR/report.json` (the list of reports, in
run order), `DIR/table.txt` (the table normalised to the baseline) and the PNG plots of
`controller.sim.plots`, drawn from the reports' `timeseries`. `format_compare_table` is the table;
`normalised_rows` its numbers (pure).

Static policies that can be sized (`SizablePolicy`, e.g. `singlepool`) are sized by simulation to the
smallest instance count meeting `slo_target` (`controller.sim.cluster.size_by_simulation`), exactly as
`dctl simulate --policy` does, so the baseline is the cheapest static cluster that serves the trace.
The baseline (default `singlepool`) is always run, first, even when not listed: every ratio needs it.
Dynamic policies that tune a fleet of a given size (`scalefreq`, `scaleshard`: `SizablePolicy` and
`DynamicPolicy`) start from the instance count the baseline was sized to (DESIGN §8: "singlepool's
instances").

The only wall clock is `clock` (injected, default `time.perf_counter`), used for each report's `wall_s`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.profile import Profile
from controller.policy.base import DynamicPolicy, SimPolicy, SizablePolicy
from controller.sim.cluster import PolicyRun, ProgressCallback, SimConfig, run_policy
from controller.sim.report import Pricing, build_report
from controller.sim.traces import Trace, load_trace
from controller.sim.week import WEEK_SPEC_PREFIX, load_week_spec

DEFAULT_BASELINE = "singlepool"
# Policies whose per-pool TP and clock mix over time is drawn (the static ones never change).
MIX_POLICIES = ("dynamollm",)
REPORT_FILE = "report.json"
TABLE_FILE = "table.txt"
DEFAULT_SLO_TARGET = 0.99

PolicyFactory = Callable[[], SimPolicy]


def policy_registry() -> Mapping[str, PolicyFactory]:
    """`--policy` / `--compare` name -> factory of the policy object."""
    from controller.policy.policies import POLICIES

    return POLICIES


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


@dataclass(frozen=True, slots=True)
class CompareOutcome:
    """The reports in run order (baseline first) and the files written (none without an output folder)."""

    baseline: str
    reports: tuple[dict[str, Any], ...]
    files: tuple[Path, ...]


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
    on_progress: Callable[[str], ProgressCallback | None] | None = None,
    sizing_window_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> CompareOutcome:
    """Run `policies` (empty: every registered one) and `baseline` on `trace`; write DIR's files.

    `workload` (trace spec, rate scale, ...) is copied into every report's `workload`. `on_progress(name)`
    may return a progress callback for that policy's run. Every name is checked before anything runs.

    `sizing_window_s` (for week-long traces): a static policy is sized by simulating only the trace's
    busiest window of that length (most arrivals), then run once over the whole trace at that size; the
    report's attainment is the whole trace's. None: sized on the whole trace (each trial a full run).
    """
    if sizing_window_s is not None and not (math.isfinite(sizing_window_s) and sizing_window_s > 0):
        raise InvalidArgumentError("--sizing-window", sizing_window_s, "a positive number of seconds")
    known = policy_registry() if registry is None else registry
    names = order_policies(policies, tuple(known), baseline)
    reports: list[dict[str, Any]] = []
    baseline_instances = 0
    for name in names:
        started_s = clock()
        policy = known[name]()
        # A dynamic policy with a size (scalefreq, scaleshard) tunes the baseline's fleet: it starts from
        # the instance count the baseline was sized to; only static ones are sized themselves.
        sizable = isinstance(policy, SizablePolicy) and not isinstance(policy, DynamicPolicy)
        progress = None if on_progress is None else on_progress(name)
        sizing: dict[str, Any] | None = None
        if isinstance(policy, SizablePolicy) and isinstance(policy, DynamicPolicy) and baseline_instances:
            run = run_policy(
                trace, policy, profile, config=config, on_progress=progress, instances=baseline_instances
            )
            sizing = sizing_json(f"the {baseline} baseline's instance count", run)
        elif sizable and sizing_window_s is not None and trace.duration_s > sizing_window_s:
            window_start_s = busiest_window_start_s(trace.arrival_s, sizing_window_s)
            sized = run_policy(
                trace.window(window_start_s, sizing_window_s),
                policy,
                profile,
                config=config,
                on_progress=progress,
                slo_target=slo_target,
            )
            run = run_policy(
                trace,
                policy,
                profile,
                config=config,
                on_progress=progress,
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
                on_progress=progress,
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
        reports.append(report)
        if name == baseline:
            baseline_instances = run.result.plan.instances
    files: tuple[Path, ...] = ()
    if out_dir is not None:
        files = write_outputs(out_dir, reports, baseline)
    return CompareOutcome(baseline=baseline, reports=tuple(reports), files=files)


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
    reports: Sequence[Mapping[str, Any]], baseline: str = DEFAULT_BASELINE
) -> tuple[CompareRow, ...]:
    """Each report's headline figures and their ratios to the `baseline` policy's report."""
    base = next((r for r in reports if r["policy"] == baseline), None)
    if base is None:
        raise InvalidArgumentError("reports", [r["policy"] for r in reports], f"a list including {baseline}")
    rows = []
    for r in reports:
        rows.append(
            CompareRow(
                policy=r["policy"],
                energy_kwh=r["energy_kwh"],
                energy_x=_ratio(r["energy_j"], base["energy_j"]),
                carbon_x=_ratio(r["carbon_g"], base["carbon_g"]),
                cost_x=_ratio(r["cost_usd"], base["cost_usd"]),
                avg_servers=r["avg_servers"],
                servers_x=_ratio(r["avg_servers"], base["avg_servers"]),
                ttft_p99_s=r["ttft_s_p99"],
                ttft_p99_x=_ratio(r["ttft_s_p99"], base["ttft_s_p99"]),
                tbt_p99_s=r["tbt_s_p99"],
                tbt_p99_x=_ratio(r["tbt_s_p99"], base["tbt_s_p99"]),
                slo_attainment=r["slo_attainment"],
                reconfigurations=r["reconfigurations"],
            )
        )
    return tuple(rows)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_compare_table(reports: Sequence[Mapping[str, Any]], baseline: str = DEFAULT_BASELINE) -> str:
    """The comparison for a terminal: ratios (x) are to the baseline, SLO attainment is absolute."""
    rows = normalised_rows(reports, baseline)
    first = reports[0]
    header = (
        f"{'policy':<12}{'energy kWh':>11}{'energy x':>9}{'carbon x':>9}{'cost x':>8}{'servers':>9}"
        f"{'servers x':>10}{'TTFT p99':>9}{'x':>7}{'TBT p99':>9}{'x':>7}{'SLO met':>9}{'reconf':>8}"
    )
    lines = [
        f"trace {first['trace']}  requests {first['requests']}  seed {first['seed']}  "
        f"model {first['model']} on {first['gpu']}  normalised to {baseline}",
        header,
    ]
    for row in rows:
        slo = "-" if row.slo_attainment is None else f"{100.0 * row.slo_attainment:.2f}%"
        lines.append(
            f"{row.policy:<12}{row.energy_kwh:>11.3f}{_x(row.energy_x):>9}{_x(row.carbon_x):>9}"
            f"{_x(row.cost_x):>8}{row.avg_servers:>9.2f}{_x(row.servers_x):>10}{_s(row.ttft_p99_s):>9}"
            f"{_x(row.ttft_p99_x):>7}{_s(row.tbt_p99_s):>9}{_x(row.tbt_p99_x):>7}{slo:>9}"
            f"{row.reconfigurations:>8}"
        )
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    """Temporary file in the same folder, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(
    out_dir: Path,
    reports: Sequence[Mapping[str, Any]],
    baseline: str = DEFAULT_BASELINE,
) -> tuple[Path, ...]:
    """report.json, table.txt, power.png and, for each policy of MIX_POLICIES that ran, its TP-mix and
    clock-mix figures, in `out_dir` (created); the paths written."""
    from controller.sim import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / REPORT_FILE
    _write_atomic(report_path, json.dumps(list(reports), indent=2, allow_nan=False) + "\n")
    table_path = out_dir / TABLE_FILE
    _write_atomic(table_path, format_compare_table(reports, baseline) + "\n")
    written = [report_path, table_path]
    written.append(plots.plot_power(reports, out_dir / plots.POWER_FILE))
    for r in reports:
        if r["policy"] in MIX_POLICIES:
            for kind in plots.MIX_KINDS:
                written.append(plots.plot_mix(r, kind, out_dir / plots.mix_file(r["policy"], kind)))
    return tuple(written)
