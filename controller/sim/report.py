"""From a finished simulation to the `dynamollm.simreport/v1` report: metrics, carbon, cost, table.

Flow: `controller.sim.cluster.simulate` returns a `SimResult` (raw per-request outcomes, energy per
1-s bin, engine TBT histograms); `build_report` turns it into the JSON-ready report, pricing energy with
a carbon-intensity source and an energy-price source; `format_table` renders it for a terminal and
`controller.textfiles.write_text_atomic` stores it. Pure.

Definitions (also in docs/simulator.md):
- A request meets its SLO when it completed, its TTFT <= its class's TTFT target, and its mean
  inter-token time <= its class's TBT target (single-token answers have no inter-token gap and pass
  TBT). `slo_attainment` = requests meeting SLO / ADMITTED requests: incomplete and rejected ones count
  as misses. Requests refused at admission (input + output beyond the model's context) are never
  served and are reported beside it (`refused`, by reason), the same for every policy.
- Cluster `tbt_s_p50/p99` are token-weighted over every decode iteration of every engine (each
  iteration's duration counted once per token it produced), from a histogram with bins of 0.1%
  relative width (`TbtHistogram`: within 0.05% of the exact percentile). Per-class TBT percentiles
  are over the class's completed requests' mean inter-token times, weighted by their inter-token gap
  counts.
- Power percentiles are over 1-s bins of total cluster power (all allocated GPUs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.classes import REQUEST_CLASSES, ClassSlo
from controller.model.cluster import ClusterPlan, InstanceSpec
from controller.model.decisions import ClockDecision, Decision, StepRecord
from controller.model.state import Periods
from controller.sim.carbon import (
    J_PER_KWH,
    CarbonSource,
    ConstantCarbonIntensity,
    ConstantEnergyPrice,
    PriceSource,
)

SCHEMA = "dynamollm.simreport/v1"
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Pricing:
    """How energy and servers turn into carbon and money, with human-readable provenance."""

    carbon: CarbonSource
    carbon_source: str
    energy_price: PriceSource
    energy_price_source: str
    gpu_usd_per_server_hour: float


@dataclass(frozen=True, slots=True)
class PoolMixSeries:
    """Instances of one pool by (TP, clock) over time: `counts[spec][i]` instances of `spec` (starting or
    active) at `t_s[i]` (sampled at the start of each series bin; a step series)."""

    pool: str
    t_s: tuple[float, ...]
    counts: Mapping[InstanceSpec, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class RunSeries:
    """Per-bin series of a run for plots: mean GPUs held by instances and mean allocated servers per bin
    of `bin_s` from t = 0, and each pool's instance mix (the power series comes from the energy bins)."""

    bin_s: float
    gpus: tuple[float, ...]
    servers: tuple[float, ...]
    pools: tuple[PoolMixSeries, ...]


@dataclass(frozen=True, slots=True)
class ForecastScore:
    """Per-class error of the forecasts the policy planned with, over a run's steps of `horizon_s`.
    None where a class had no step with a realised rate."""

    horizon_s: float
    epochs: int
    mape_by_class: Mapping[str, float | None]
    bias_by_class: Mapping[str, float | None]
    kind: str = "peak"  # what was forecast: "rate" (mean over the horizon) or "peak" (peak bin rate)


@dataclass(frozen=True, slots=True)
class PredictorScore:
    """Output-bin predictions made by the router against the truth. `accuracy_knob`: the injected
    accuracy (None: the online learned predictor)."""

    accuracy_knob: float | None
    accuracy: float
    under_share: float  # predicted a smaller bin than the truth
    over_share: float


@dataclass(frozen=True, slots=True)
class SimResult:
    """Raw outcome of one simulation; arrays are indexed by request (trace order) unless noted."""

    trace_name: str
    trace_duration_s: float
    duration_s: float  # simulated span: the trace plus the drain of the last requests
    start_unix_s: float | None
    plan: ClusterPlan
    class_index: npt.NDArray[np.int8]
    output_tokens: npt.NDArray[np.int32]
    instance_index: npt.NDArray[np.int32]  # plan order (pools, then instances); -1 when rejected
    completed: npt.NDArray[np.bool_]
    ttft_s: npt.NDArray[np.float64]  # NaN where not completed
    tbt_mean_s: npt.NDArray[np.float64]  # NaN where not completed
    tbt_gap_s: npt.NDArray[np.float64]  # every decode iteration of every engine ...
    tbt_tokens: npt.NDArray[np.int64]  # ... and the tokens it produced
    energy_by_bin_j: npt.NDArray[np.float64]  # all allocated GPUs, per bin of power_bin_s from t=0
    power_bin_s: float
    energy_instances_j: float  # engines, busy and idle
    energy_unused_gpus_j: float  # GPUs of allocated servers that host no instance
    gpu_s: float  # GPU-seconds of instances
    server_s: float  # server-seconds allocated
    rejected: int  # admitted but not served: no instance could hold it, or past its deadline
    reconfigurations: int
    engine_iterations: int
    # Dynamic runs only (static runs keep the empty defaults, except the series).
    reconfigurations_by_kind: Mapping[str, int] = field(default_factory=dict)
    escalations: Mapping[str, int] = field(default_factory=dict)
    predictor: PredictorScore | None = None
    forecast: tuple[ForecastScore, ...] = ()
    periods: Periods | None = None
    objective: str | None = None  # what the policy's pool MILP minimised (DynamoLLM family), else None
    series: RunSeries | None = None
    # Requests refused at admission, by reason; `admitted` per request (None: all admitted).
    refused: Mapping[str, int] = field(default_factory=dict)
    admitted: npt.NDArray[np.bool_] | None = None
    # What the control cycle decided, in order (controller.model.decisions).
    decisions: tuple[Decision, ...] = ()

    @property
    def admitted_mask(self) -> npt.NDArray[np.bool_]:
        if self.admitted is None:
            return np.ones(len(self.class_index), dtype=bool)
        return self.admitted

    @property
    def energy_j(self) -> float:
        return self.energy_instances_j + self.energy_unused_gpus_j


def weighted_percentile(
    values: npt.NDArray[np.float64], weights: npt.NDArray[np.integer] | npt.NDArray[np.floating], q: float
) -> float | None:
    """Smallest value v with (weight of values <= v) >= q% of the total weight; None when empty."""
    total = float(np.sum(weights))
    if len(values) == 0 or total <= 0:
        return None
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    idx = int(np.searchsorted(cum, q / 100.0 * total, side="left"))
    return float(values[order][min(idx, len(values) - 1)])


# Cluster TBT gaps are kept as token counts in log-spaced bins of this relative width: a reported
# percentile is the bin's geometric centre, within 0.05% of the exact value, and memory no longer grows
# with the engine iterations of a run (~350 M in a simulated week).
TBT_BIN_REL = 1e-3
_TBT_FLOOR_S = 1e-6


class TbtHistogram:
    """Token-weighted inter-token gaps of many engines, folded in as they are produced."""

    def __init__(self) -> None:
        self._tokens = np.zeros(0, dtype=np.int64)

    def fold(self, log: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]) -> None:
        """Add an engine's (gap_s, tokens) log (`SimEngine.take_tbt_log`)."""
        gap_s, tokens = log
        if len(gap_s) == 0:
            return
        ratio = np.maximum(gap_s, _TBT_FLOOR_S) / _TBT_FLOOR_S
        bins = np.floor(np.log(ratio) / math.log1p(TBT_BIN_REL)).astype(np.int64)
        added = np.bincount(bins, weights=tokens).astype(np.int64)
        if len(added) > len(self._tokens):
            self._tokens = np.concatenate((self._tokens, np.zeros(len(added) - len(self._tokens), np.int64)))
        self._tokens[: len(added)] += added

    def arrays(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """(gap_s, tokens) of the occupied bins, gap_s at each bin's geometric centre."""
        occupied = np.flatnonzero(self._tokens)
        gap_s = _TBT_FLOOR_S * np.power(1.0 + TBT_BIN_REL, occupied + 0.5)
        return gap_s, self._tokens[occupied]


def _percentile(values: npt.NDArray[np.float64], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def meets_slo(result: SimResult, slos: Mapping[str, ClassSlo]) -> npt.NDArray[np.bool_]:
    """Per request: completed, TTFT within target, mean inter-token time within target (a refused
    request never completes: False)."""
    ttft_target = np.array([slos[c.name].ttft_s for c in REQUEST_CLASSES])[result.class_index]
    tbt_target = np.array([slos[c.name].tbt_s for c in REQUEST_CLASSES])[result.class_index]
    ok: npt.NDArray[np.bool_] = result.completed & within_targets(
        result.ttft_s, result.tbt_mean_s, result.output_tokens, ttft_target, tbt_target
    )
    return ok


def within_targets(
    ttft_s: npt.NDArray[np.float64],
    tbt_mean_s: npt.NDArray[np.float64],
    output_tokens: npt.NDArray[np.integer],
    ttft_target_s: npt.NDArray[np.float64],
    tbt_target_s: npt.NDArray[np.float64],
) -> npt.NDArray[np.bool_]:
    """Per request: TTFT and mean inter-token time within their targets (single-token answers have no
    inter-token gap and pass TBT; NaN, a request that never completed, fails)."""
    with np.errstate(invalid="ignore"):  # NaN of incomplete requests compares False, as intended
        ok: npt.NDArray[np.bool_] = (ttft_s <= ttft_target_s) & (
            (output_tokens <= 1) | (tbt_mean_s <= tbt_target_s)
        )
    return ok


def slo_attainment(result: SimResult, slos: Mapping[str, ClassSlo]) -> float:
    """Share of the admitted requests meeting their SLO (1.0 when none was admitted)."""
    admitted = result.admitted_mask
    n = int(admitted.sum())
    return float(meets_slo(result, slos)[admitted].sum()) / n if n else 1.0


def _latency_metrics(
    ttft_s: npt.NDArray[np.float64], tbt_p50_s: float | None, tbt_p99_s: float | None
) -> dict[str, float | None]:
    return {
        "ttft_s_p50": _percentile(ttft_s, 50),
        "ttft_s_p99": _percentile(ttft_s, 99),
        "tbt_s_p50": tbt_p50_s,
        "tbt_s_p99": tbt_p99_s,
    }


def _per_class(result: SimResult, slos: Mapping[str, ClassSlo], ok: npt.NDArray[np.bool_]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    admitted = result.admitted_mask
    for c in REQUEST_CLASSES:
        mine = (result.class_index == c.index) & admitted
        done = mine & result.completed
        gaps = np.maximum(result.output_tokens[done].astype(np.int64) - 1, 0)
        tbt = result.tbt_mean_s[done]
        n = int(mine.sum())
        out[c.name] = {
            "requests": n,
            "completed": int(done.sum()),
            **_latency_metrics(
                result.ttft_s[done], weighted_percentile(tbt, gaps, 50), weighted_percentile(tbt, gaps, 99)
            ),
            "slo_attainment": float(ok[mine].sum()) / n if n else None,
            "slo": {"ttft_s": slos[c.name].ttft_s, "tbt_s": slos[c.name].tbt_s},
        }
    return out


def _bin_starts_unix(
    n_bins: int, bin_s: float, start_unix_s: float | None, source: object, flag: str
) -> npt.NDArray[np.float64]:
    """UTC start of each energy bin; a constant source needs no absolute time."""
    offsets = np.arange(n_bins, dtype=np.float64) * bin_s
    if start_unix_s is not None:
        return offsets + start_unix_s
    if isinstance(source, ConstantCarbonIntensity | ConstantEnergyPrice):
        return offsets
    raise InvalidArgumentError(
        flag, "an hourly file", "a constant, because the trace has no absolute timestamps to align it with"
    )


def _bin_start_unix(result: SimResult, source: object, flag: str) -> npt.NDArray[np.float64]:
    return _bin_starts_unix(
        len(result.energy_by_bin_j), result.power_bin_s, result.start_unix_s, source, flag
    )


def check_pricing_covers(pricing: Pricing, start_unix_s: float | None, span_s: float, bin_s: float) -> None:
    """Fail before simulating when carbon or price data cannot price [0, span_s) of this trace.

    Raises InvalidArgumentError naming `--carbon` / `--prices` (hourly file without absolute trace time)
    or the sources' OutOfRangeError (an hour of the span missing from the file).
    """
    n_bins = max(1, math.ceil(span_s / bin_s))
    zeros = np.zeros(n_bins)
    pricing.carbon.grams_for(zeros, _bin_starts_unix(n_bins, bin_s, start_unix_s, pricing.carbon, "--carbon"))
    pricing.energy_price.usd_for(
        zeros, _bin_starts_unix(n_bins, bin_s, start_unix_s, pricing.energy_price, "--prices")
    )


def carbon_g(result: SimResult, source: CarbonSource) -> float:
    """Energy of each bin times the grid intensity of the hour the bin starts in."""
    return source.grams_for(result.energy_by_bin_j, _bin_start_unix(result, source, "--carbon"))


def energy_usd(result: SimResult, source: PriceSource) -> float:
    """Energy of each bin times the energy price of the hour the bin starts in."""
    return source.usd_for(result.energy_by_bin_j, _bin_start_unix(result, source, "--prices"))


def _spec_order(item: tuple[InstanceSpec, int]) -> tuple[int, int]:
    return (item[0].tp, item[0].clock_mhz)


def plan_json(plan: ClusterPlan) -> dict[str, Any]:
    return {
        "gpus": plan.gpus,
        "servers": plan.servers,
        "pools": [
            {
                "name": p.name,
                "class_names": list(p.class_names),
                "instances": [
                    {"tp": spec.tp, "clock_mhz": spec.clock_mhz, "count": n}
                    for spec, n in sorted(
                        p.instance_counts().items(), key=lambda kv: (kv[0].tp, kv[0].clock_mhz)
                    )
                ],
            }
            for p in plan.pools
        ],
    }


def power_series_w(result: SimResult, bin_s: float) -> list[float]:
    """Mean cluster power per bin of `bin_s` (a whole multiple of the run's energy bins; the last bin
    may be partial and is divided by its own length)."""
    k = max(1, round(bin_s / result.power_bin_s))
    energy = result.energy_by_bin_j
    n_out = max(1, math.ceil(len(energy) / k))
    padded = np.zeros(n_out * k)
    padded[: len(energy)] = energy
    length_s = np.full(n_out, k * result.power_bin_s)
    length_s[-1] = max(result.duration_s - k * result.power_bin_s * (n_out - 1), 1e-12)
    return [round(float(x), 1) for x in padded.reshape(n_out, k).sum(axis=1) / length_s]


def _series_json(result: SimResult) -> dict[str, Any] | None:
    s = result.series
    if s is None:
        return None
    pools: dict[str, Any] = {}
    for p in s.pools:
        pools[p.pool] = {
            "t_s": list(p.t_s),
            "instances": [
                {"tp": spec.tp, "clock_mhz": spec.clock_mhz, "counts": list(counts)}
                for spec, counts in sorted(p.counts.items(), key=lambda kv: (kv[0].tp, kv[0].clock_mhz))
            ],
        }
    return {
        "bin_s": s.bin_s,
        "power_w": power_series_w(result, s.bin_s),
        "gpus": [round(x, 3) for x in s.gpus],
        "servers": [round(x, 3) for x in s.servers],
        "pools": pools,
    }


def _dynamic_json(result: SimResult) -> dict[str, Any]:
    """The report fields of the dynamic control levels (null / empty for a static run)."""
    pred = result.predictor
    periods = result.periods
    return {
        "reconfigurations_by_kind": dict(result.reconfigurations_by_kind),
        "escalations": dict(result.escalations),
        "periods": None
        if periods is None
        else {"cluster_s": periods.cluster_s, "pool_s": periods.pool_s, "instance_s": periods.instance_s},
        "objective": result.objective,
        "predictor": None
        if pred is None
        else {
            "accuracy_knob": pred.accuracy_knob,
            "accuracy": pred.accuracy,
            "under_share": pred.under_share,
            "over_share": pred.over_share,
        },
        "forecast_error": [
            {
                "horizon_s": f.horizon_s,
                "kind": f.kind,
                "epochs": f.epochs,
                "mape_by_class": dict(f.mape_by_class),
                "bias_by_class": dict(f.bias_by_class),
            }
            for f in result.forecast
        ],
    }


def build_report(
    result: SimResult,
    *,
    policy: str,
    seed: int,
    model: str,
    gpu: str,
    slos: Mapping[str, ClassSlo],
    pricing: Pricing,
    wall_s: float,
    workload: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `dynamollm.simreport/v1` object (JSON-ready: no NaN, missing percentiles are null)."""
    ok = meets_slo(result, slos)
    n = len(result.class_index)
    admitted = int(result.admitted_mask.sum())
    done = result.completed
    bins = result.energy_by_bin_j
    # The last bin may be partial: divide by its own length so power stays a rate.
    bin_len_s = np.full(len(bins), result.power_bin_s)
    if len(bins):
        bin_len_s[-1] = result.duration_s - result.power_bin_s * (len(bins) - 1)
    power_w = bins / np.maximum(bin_len_s, 1e-12)
    server_hours = result.server_s / SECONDS_PER_HOUR
    rental_usd = server_hours * pricing.gpu_usd_per_server_hour
    energy_cost_usd = energy_usd(result, pricing.energy_price)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "trace": result.trace_name,
        "policy": policy,
        "seed": seed,
        "model": model,
        "gpu": gpu,
        "duration_s": result.duration_s,
        "trace_duration_s": result.trace_duration_s,
        "requests": n,
        "admitted": admitted,
        "refused": dict(result.refused),
        "completed": int(done.sum()),
        "rejected": result.rejected,
        "energy_j": result.energy_j,
        "energy_kwh": result.energy_j / J_PER_KWH,
        "energy_instances_j": result.energy_instances_j,
        "energy_unused_gpus_j": result.energy_unused_gpus_j,
        "avg_gpus": result.gpu_s / result.duration_s if result.duration_s > 0 else 0.0,
        "avg_servers": result.server_s / result.duration_s if result.duration_s > 0 else 0.0,
        "power_w_p50": _percentile(power_w, 50),
        "power_w_p99": _percentile(power_w, 99),
        **_latency_metrics(
            result.ttft_s[done],
            weighted_percentile(result.tbt_gap_s, result.tbt_tokens, 50),
            weighted_percentile(result.tbt_gap_s, result.tbt_tokens, 99),
        ),
        "slo_attainment": float(ok[result.admitted_mask].sum()) / admitted if admitted else None,
        "per_class": _per_class(result, slos, ok),
        "reconfigurations": result.reconfigurations,
        **_dynamic_json(result),
        "engine_iterations": result.engine_iterations,
        "carbon_g": carbon_g(result, pricing.carbon),
        "carbon_source": pricing.carbon_source,
        "cost_usd": rental_usd + energy_cost_usd,
        "cost": {
            "gpu_rental_usd": rental_usd,
            "energy_usd": energy_cost_usd,
            "server_hours": server_hours,
            "gpu_usd_per_server_hour": pricing.gpu_usd_per_server_hour,
            "energy_price_source": pricing.energy_price_source,
        },
        "wall_s": wall_s,
        "plan": plan_json(result.plan),
        "timeseries": _series_json(result),
        # Every cluster and pool step with its reasons; the instance level's clock changes (up to
        # ~10^6 in a week) are counted by reason, not listed: SimResult.decisions holds each one.
        "decisions": [d.to_json() for d in result.decisions if isinstance(d, StepRecord)],
        "clock_decisions": dict(
            Counter(d.reason for d in result.decisions if isinstance(d, ClockDecision)).most_common()
        ),
    }
    if workload is not None:
        report["workload"] = dict(workload)
    return report


def _fmt(value: float | None, unit: str = "") -> str:
    """Three significant digits for small values, whole numbers with separators from 100 up."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}{unit}" if abs(value) >= 100 else f"{value:.3g}{unit}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100.0 * share:.2f}%"


def _sizing_lines(sizing: Mapping[str, Any] | None) -> list[str]:
    if not sizing or not sizing["trials"]:
        return []
    tried = ", ".join(f"{t['instances']}: {_pct(t['slo_attainment'])}" for t in sizing["trials"])
    return [f"sizing: {sizing['rule']}; peak rule gave {sizing['peak_rule_instances']}; tried {tried}"]


def _kinds(by_kind: Mapping[str, int] | None) -> str:
    if not by_kind:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in by_kind.items()) + ")"


def _dynamic_lines(r: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    pred = r.get("predictor")
    if pred is not None:
        knob = "online" if pred["accuracy_knob"] is None else f"injected {pred['accuracy_knob']:g}"
        lines.append(
            f"output-bin predictor ({knob}): accuracy {_pct(pred['accuracy'])}"
            f"  under {_pct(pred['under_share'])}  over {_pct(pred['over_share'])}"
        )
    esc = r.get("escalations")
    if esc:
        lines.append("escalations: " + ", ".join(f"{k} {v}" for k, v in esc.items()))
    for f in r.get("forecast_error") or []:
        if not f["epochs"]:
            continue  # the run was shorter than one epoch of this horizon
        mapes = [v for v in f["mape_by_class"].values() if v is not None]
        worst = max(mapes) if mapes else None
        lines.append(
            f"forecast error ({_fmt(f['horizon_s'], ' s')} {f.get('kind', 'peak')} forecasts,"
            f" {f['epochs']} epochs): MAPE per class "
            + " ".join(f"{c} {_pct(v)}" for c, v in f["mape_by_class"].items() if v is not None)
            + ("" if worst is None else f"  worst {_pct(worst)}")
        )
    return lines


def format_table(report: Mapping[str, Any]) -> str:
    """Summary block and per-class table of a report, for stdout."""
    r = report
    lines = [
        f"trace {r['trace']}  policy {r['policy']}  model {r['model']} on {r['gpu']}  seed {r['seed']}",
        f"simulated {_fmt(r['duration_s'], ' s')}  requests {r['requests']}"
        f"  refused {sum(r['refused'].values())}{_kinds(r['refused'])}  completed {r['completed']}"
        f"  rejected {r['rejected']}"
        f"  SLO attainment {_pct(r['slo_attainment'])}  reconfigurations {r['reconfigurations']}"
        + _kinds(r.get("reconfigurations_by_kind")),
        *_dynamic_lines(r),
        f"energy {r['energy_kwh']:.3f} kWh  power p50 {_fmt(r['power_w_p50'], ' W')}"
        f"  p99 {_fmt(r['power_w_p99'], ' W')}  avg GPUs {r['avg_gpus']:.1f}"
        f"  avg servers {r['avg_servers']:.2f}",
        f"TTFT p50 {_fmt(r['ttft_s_p50'], ' s')}  p99 {_fmt(r['ttft_s_p99'], ' s')}"
        f"  TBT p50 {_fmt(r['tbt_s_p50'], ' s')}  p99 {_fmt(r['tbt_s_p99'], ' s')}",
        f"carbon {r['carbon_g']:,.1f} g; intensity: {r['carbon_source']}",
        f"cost {r['cost_usd']:,.2f} USD = GPU rental {r['cost']['gpu_rental_usd']:,.2f}"
        f" + energy {r['cost']['energy_usd']:,.2f}; energy price: {r['cost']['energy_price_source']}",
        *_sizing_lines(r.get("workload", {}).get("sizing")),
        f"wall {r['wall_s']:.1f} s",
        "",
        f"{'class':<6}{'requests':>9}{'done':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'SLO TTFT':>10}"
        f"{'TBT p50':>10}{'TBT p99':>10}{'SLO TBT':>10}{'SLO met':>9}",
    ]
    for name, c in r["per_class"].items():
        lines.append(
            f"{name:<6}{c['requests']:>9}{c['completed']:>9}{_fmt(c['ttft_s_p50']):>10}{_fmt(c['ttft_s_p99']):>10}"
            f"{_fmt(c['slo']['ttft_s']):>10}{_fmt(c['tbt_s_p50']):>10}{_fmt(c['tbt_s_p99']):>10}"
            f"{_fmt(c['slo']['tbt_s']):>10}{_pct(c['slo_attainment']):>9}"
        )
    return "\n".join(lines)
