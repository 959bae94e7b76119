#!/usr/bin/env python3
"""The issue's evaluation set (docs/evaluation.md): DynamoLLM and the paper's baselines on the Azure traces.

    PYTHONPATH=. .venv/bin/python tools/eval_paper.py [--data-dir ../shared/data] [--out out/eval]
        [--sets hour,sweep,accuracy,week] [--policies P ...] [--seed 0]
        [--sweep-scales 0.5,1,2] [--accuracies 1,0.9,0.8,0.7,0.6]
        [--week-rate-scale 1] [--week-duration S]

Sets (each a `controller.sim.compare.run_compare` on one trace, same seed for every policy; its
report.json, table.txt and plots go to OUT/<set>/<name>/):
- hour: the one-hour Azure 2023 conversation and coding traces, every policy (or --policies);
- sweep: the conversation hour at low / medium / high load (--sweep-scales rate scales), dynamollm and
  oracle against singlepool;
- accuracy: the conversation hour, dynamollm with the output-length predictor's accuracy forced to each
  of --accuracies (`SimConfig.predictor_accuracy`), against accuracy 1.0;
- week: `azure-week:conv` and `azure-week:code` (the 2024 week's hourly counts with 2023 lengths),
  singlepool, dynamollm and oracle, with hourly CAISO 2024 carbon and prices; the wall time of each run
  is printed (target: the week under 10 minutes). --week-duration runs only the first S seconds;
  static policies are sized on the busiest --week-sizing-window seconds (default 2 h), then run once.

Every compare also has the fluid lower bound on energy (`controller.sim.bound`, computed from the
trace, not simulated): the tables' `energy x bound` column (each policy's energy / the bound's) and
a `bound` row; `--policies` accepts the name `bound` (it adds nothing: the bound is always there).

Carbon: CAISO hourly direct intensity of the trace's year (2023 for the hour traces, 2024 for the week);
energy price: the CAISO 2024 hourly price for the week, its 2024 mean (0.0407 USD/kWh) for the 2023
hours (no 2023 price file). Prints Markdown tables (docs/evaluation.md holds a measured copy). A
benchmark, not a test: it prints figures and exits 0 (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.dctl.cmd_simulate import (  # noqa: E402  (after the sys.path insert)
    DEFAULT_ENERGY_USD_PER_KWH,
    DEFAULT_GPU_USD_PER_SERVER_HOUR,
)
from controller.profiles import default_profile  # noqa: E402
from controller.sim.bound import BOUND_NAME  # noqa: E402
from controller.sim.carbon import CarbonIntensity, ConstantEnergyPrice, EnergyPrice  # noqa: E402
from controller.sim.cluster import SimConfig  # noqa: E402
from controller.sim.compare import normalised_rows, policy_registry, resolve_trace, run_compare  # noqa: E402
from controller.sim.report import Pricing  # noqa: E402

SETS = ("hour", "sweep", "accuracy", "week")
HOUR_TRACES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
CARBON_2023 = Path("carbon") / "US-CAL-CISO_2023_hourly.csv"
CARBON_2024 = Path("carbon") / "US-CAL-CISO_2024_hourly.csv"
PRICES_2024 = Path("carbon") / "US-CAL-CISO_electricity_prices_2024.csv"
SWEEP_POLICIES = ("dynamollm", "oracle")
WEEK_POLICIES = ("dynamollm", "oracle")
LOAD_NAMES = ("low", "medium", "high")
# Sizing a static cluster by repeated full-week simulations would take most of the week's wall time;
# the busiest two hours hold the peak it is sized for (the full-week attainment is still reported).
WEEK_SIZING_WINDOW_S = 7200.0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _pricing(data_dir: Path, *, week: bool) -> Pricing:
    carbon_path = data_dir / (CARBON_2024 if week else CARBON_2023)
    if week:
        price_path = data_dir / PRICES_2024
        price: Any = EnergyPrice.from_csv(price_path)
        price_source = f"hourly {price_path}"
    else:
        price = ConstantEnergyPrice(DEFAULT_ENERGY_USD_PER_KWH * 1000.0)
        price_source = f"constant {DEFAULT_ENERGY_USD_PER_KWH:g} USD/kWh (CAISO 2024 mean)"
    return Pricing(
        carbon=CarbonIntensity.from_csv(carbon_path),
        carbon_source=f"hourly {carbon_path} (direct)",
        energy_price=price,
        energy_price_source=price_source,
        gpu_usd_per_server_hour=DEFAULT_GPU_USD_PER_SERVER_HOUR,
    )


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100.0 * share:.2f}%"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _refused(report: Mapping[str, Any]) -> str:
    """The requests refused at admission (beyond the model's context): outside every SLO figure."""
    refused = sum(report["refused"].values())
    return f"{refused:,} refused at admission (SLO met is over the {report['admitted']:,} admitted)"


def markdown_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """The compare table as Markdown: ratios to singlepool and to the fluid lower bound (its own last
    row, from the reports' `bound`), absolute latencies and attainment."""
    lines = [
        "| policy | energy kWh | energy x | energy x bound | carbon x | cost x | avg servers | TTFT p99 s "
        "| TBT p99 s | SLO met | reconfigurations | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in zip(normalised_rows(reports), reports, strict=True):
        lines.append(
            f"| {row.policy} | {row.energy_kwh:.2f} | {_x(row.energy_x)} | {_x(row.energy_x_bound)} | "
            f"{_x(row.carbon_x)} | {_x(row.cost_x)} | {row.avg_servers:.2f} | {_s(row.ttft_p99_s)} | "
            f"{_s(row.tbt_p99_s)} | {_pct(row.slo_attainment)} | {row.reconfigurations} | {r['wall_s']:.1f} |"
        )
    bound = next((r["bound"] for r in reports if r.get("bound")), None)
    base = next((r for r in reports if r["policy"] == "singlepool"), None)
    if bound is not None:
        energy_x = bound["energy_j"] / base["energy_j"] if base and base["energy_j"] > 0 else None
        lines.append(
            f"| {BOUND_NAME} (fluid, {bound['avg_gpus']:.1f} GPUs on average) | {bound['energy_kwh']:.2f} | "
            f"{_x(energy_x)} | 1.000 | - | - | - | - | - | - | - | {bound['wall_s']:.3f} |"
        )
    return "\n".join(lines)


class Evaluation:
    """Shared inputs of every set: data, output folder, seed, profile."""

    def __init__(self, data_dir: Path, out_dir: Path, seed: int) -> None:
        self.data_dir = data_dir
        self.out_dir = out_dir
        self.seed = seed
        self.profile = default_profile("llama2-70b", "h100-sxm")
        self.trace_dir = data_dir / "traces"

    def compare(
        self,
        where: str,
        spec: str,
        policies: Sequence[str],
        *,
        rate_scale: float = 1.0,
        duration_s: float | None = None,
        week: bool = False,
        config: SimConfig | None = None,
        sizing_window_s: float | None = None,
    ) -> tuple[list[dict[str, Any]], float]:
        """One run_compare; the reports and its whole wall time (trace building included)."""
        started_s = time.perf_counter()
        trace = resolve_trace(
            spec, trace_dir=self.trace_dir, rate_scale=rate_scale, duration_s=duration_s, seed=self.seed
        )
        outcome = run_compare(
            trace,
            policies,
            self.profile,
            config=config or SimConfig(seed=self.seed),
            pricing=_pricing(self.data_dir, week=week),
            out_dir=self.out_dir / where,
            workload={"trace_spec": spec, "rate_scale": rate_scale, "start_s": 0.0},
            sizing_window_s=sizing_window_s,
        )
        return list(outcome.reports), time.perf_counter() - started_s

    def hour(self, policies: Sequence[str]) -> None:
        for name, file in HOUR_TRACES.items():
            reports, wall_s = self.compare(f"hour/{name}", str(self.trace_dir / file), policies)
            print(
                f"\n### {name}: {file}, {reports[0]['requests']} requests, {_refused(reports[0])} "
                f"({wall_s:.0f} s wall)\n"
            )
            print(markdown_table(reports))

    def sweep(self, scales: Sequence[float]) -> None:
        rows = []
        for label, scale in zip(LOAD_NAMES, scales, strict=True):
            spec = str(self.trace_dir / HOUR_TRACES["conv"])
            reports, _ = self.compare(f"sweep/{label}", spec, SWEEP_POLICIES, rate_scale=scale)
            by = {row.policy: row for row in normalised_rows(reports)}
            base = by["singlepool"]
            rows.append(
                f"| {label} | {scale:g} | {reports[0]['requests']} | {base.avg_servers:.2f} | "
                + " | ".join(f"{_x(by[p].energy_x)} ({_pct(by[p].slo_attainment)})" for p in SWEEP_POLICIES)
                + " |"
            )
        print("\n### load sweep: conversation hour\n")
        print(
            "| load | rate scale | requests | singlepool servers | "
            + " | ".join(f"{p} energy x (SLO met)" for p in SWEEP_POLICIES)
            + " |"
        )
        print("|---|---|---|---|" + "---|" * len(SWEEP_POLICIES))
        print("\n".join(rows))

    def accuracy(self, accuracies: Sequence[float]) -> None:
        spec = str(self.trace_dir / HOUR_TRACES["conv"])
        rows: list[tuple[float, Mapping[str, Any]]] = []
        for accuracy in accuracies:
            config = dataclasses.replace(SimConfig(seed=self.seed), predictor_accuracy=accuracy)
            reports, _ = self.compare(f"accuracy/{accuracy:g}", spec, ("dynamollm",), config=config)
            rows.append((accuracy, next(r for r in reports if r["policy"] == "dynamollm")))
        first = rows[0][1]
        print("\n### predictor accuracy: dynamollm, conversation hour\n")
        print("| accuracy | energy kWh | energy vs first | TTFT p99 s | TTFT p99 vs first | SLO met |")
        print("|---|---|---|---|---|---|")
        for accuracy, r in rows:
            print(
                f"| {accuracy:g} | {r['energy_kwh']:.2f} | {r['energy_j'] / first['energy_j']:.3f} | "
                f"{_s(r['ttft_s_p99'])} | {_x(r['ttft_s_p99'] / first['ttft_s_p99'])} | "
                f"{_pct(r['slo_attainment'])} |"
            )

    def week(self, rate_scale: float, duration_s: float | None, sizing_window_s: float) -> None:
        for service in ("conv", "code"):
            spec = f"azure-week:{service}"
            reports, wall_s = self.compare(
                f"week/{service}",
                spec,
                WEEK_POLICIES,
                rate_scale=rate_scale,
                duration_s=duration_s,
                week=True,
                sizing_window_s=sizing_window_s,
            )
            span_h = reports[0]["trace_duration_s"] / 3600.0
            print(
                f"\n### {spec} (rate scale {rate_scale:g}, {span_h:.1f} h, "
                f"{reports[0]['requests']:,} requests, {_refused(reports[0])}; "
                f"{wall_s:.0f} s wall for all policies)\n"
            )
            print(markdown_table(reports))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "eval")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    parser.add_argument("--policies", nargs="*", default=[], help="for the hour set (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-scales", type=_floats, default=(0.5, 1.0, 2.0))
    parser.add_argument("--accuracies", type=_floats, default=(1.0, 0.9, 0.8, 0.7, 0.6))
    parser.add_argument("--week-rate-scale", type=float, default=1.0)
    parser.add_argument("--week-duration", type=float, default=None, metavar="S")
    parser.add_argument(
        "--week-sizing-window",
        type=float,
        default=WEEK_SIZING_WINDOW_S,
        metavar="S",
        help="static policies are sized on the busiest window of this length, then run on the whole week",
    )
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        parser.error(f"--sets: unknown {unknown}; allowed: {SETS}")
    if len(args.sweep_scales) != len(LOAD_NAMES):
        parser.error(f"--sweep-scales: give {len(LOAD_NAMES)} rate scales (low, medium, high)")
    if not (args.data_dir / "traces" / HOUR_TRACES["conv"]).is_file():
        parser.error(f"--data-dir: {args.data_dir / 'traces' / HOUR_TRACES['conv']} not found")
    allowed = (*policy_registry(), BOUND_NAME)
    unknown = [p for p in args.policies if p not in allowed]
    if unknown:
        parser.error(f"--policies: unknown {unknown}; allowed: {allowed}")

    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}")
    print(f"seed {args.seed}; outputs under {args.out}")
    ev = Evaluation(args.data_dir, args.out, args.seed)
    for name in sets:
        started_s = time.perf_counter()
        if name == "hour":
            ev.hour(args.policies)
        elif name == "sweep":
            ev.sweep(args.sweep_scales)
        elif name == "accuracy":
            ev.accuracy(args.accuracies)
        else:
            ev.week(args.week_rate_scale, args.week_duration, args.week_sizing_window)
        print(f"\n({name}: {time.perf_counter() - started_s:.0f} s wall)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
