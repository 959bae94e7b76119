"""The simreport: schema fields and their consistency, the SLO-attainment definition, token-weighted
percentiles, carbon and cost arithmetic (constant and hourly sources), atomic writing, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError, OutOfRangeError
from controller.model.classes import CLASS_NAMES, ClassSlo
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import ClockDecision, MixChoice, PlanStep, PoolDecision, StepRecord
from controller.sim.carbon import CarbonIntensity, ConstantCarbonIntensity, ConstantEnergyPrice, EnergyPrice
from controller.sim.report import (
    SCHEMA,
    Pricing,
    SimResult,
    TbtHistogram,
    build_report,
    check_pricing_covers,
    format_table,
    meets_slo,
    slo_attainment,
    weighted_percentile,
)

SLOS = {name: ClassSlo(ttft_s=1.0, tbt_s=0.1) for name in CLASS_NAMES}
PLAN = ClusterPlan((PoolPlan("all", CLASS_NAMES, (InstanceSpec(8, 1980), InstanceSpec(4, 1980))),))
HOUR_2023_11_16_18 = 1700157600  # 2023-11-16T18:00:00Z


def _pricing(g_per_kwh: float = 200.0, usd_per_kwh: float = 0.05, server_usd: float = 88.5) -> Pricing:
    return Pricing(
        carbon=ConstantCarbonIntensity(g_per_kwh),
        carbon_source="constant",
        energy_price=ConstantEnergyPrice(usd_per_kwh * 1000.0),
        energy_price_source="constant",
        gpu_usd_per_server_hour=server_usd,
    )


def _result(**changes: Any) -> SimResult:
    # Five requests: 0 and 1 meet their SLO; 2 is too slow to start; 3 never finished; 4 is a one-token
    # answer (no inter-token gap). Classes SS, SS, LL, LL, SM.
    base: dict[str, Any] = dict(
        trace_name="t",
        trace_duration_s=9.5,
        duration_s=10.0,
        start_unix_s=None,
        plan=PLAN,
        class_index=np.array([0, 0, 8, 8, 1], dtype=np.int8),
        instance_index=np.array([0, 1, 0, 1, 0], dtype=np.int32),
        output_tokens=np.array([10, 20, 30, 40, 1], dtype=np.int32),
        completed=np.array([True, True, True, False, True]),
        ttft_s=np.array([0.2, 0.4, 2.0, np.nan, 0.3]),
        tbt_mean_s=np.array([0.05, 0.08, 0.05, np.nan, 0.0]),
        tbt_gap_s=np.array([0.05, 0.08, 0.2]),
        tbt_tokens=np.array([100, 10, 1], dtype=np.int64),
        energy_by_bin_j=np.full(10, 3600.0),
        power_bin_s=1.0,
        energy_instances_j=30_000.0,
        energy_unused_gpus_j=6_000.0,
        gpu_s=120.0,
        server_s=20.0,
        rejected=0,
        reconfigurations=0,
        engine_iterations=0,
    )
    base.update(changes)
    return SimResult(**base)


def _report(result: SimResult | None = None, pricing: Pricing | None = None) -> dict[str, Any]:
    return build_report(
        result or _result(),
        policy="singlepool",
        seed=0,
        model="llama2-70b",
        gpu="h100-sxm",
        slos=SLOS,
        pricing=pricing or _pricing(),
        wall_s=1.5,
        workload={"rate_scale": 1.0},
    )


REQUIRED = (
    "schema",
    "trace",
    "policy",
    "seed",
    "model",
    "gpu",
    "duration_s",
    "requests",
    "admitted",
    "refused",
    "completed",
    "energy_j",
    "energy_kwh",
    "avg_gpus",
    "avg_servers",
    "power_w_p50",
    "power_w_p99",
    "ttft_s_p50",
    "ttft_s_p99",
    "tbt_s_p50",
    "tbt_s_p99",
    "slo_attainment",
    "per_class",
    "reconfigurations",
    "carbon_g",
    "carbon_source",
    "cost_usd",
    "wall_s",
    "plan",
    "decisions",
    "clock_decisions",
)


def test_report_has_every_field_and_they_are_consistent() -> None:
    r = _report()
    assert set(REQUIRED) <= set(r)
    assert r["schema"] == SCHEMA == "dynamollm.simreport/v1"
    assert r["requests"] == r["admitted"] == 5 and r["completed"] == 4 <= r["requests"]
    assert r["refused"] == {} and r["decisions"] == [] and r["clock_decisions"] == {}
    assert r["energy_j"] == 36_000.0
    assert r["energy_kwh"] == r["energy_j"] / 3.6e6
    assert r["avg_gpus"] == 12.0 and r["avg_servers"] == 2.0
    assert r["power_w_p50"] == r["power_w_p99"] == 3600.0
    for metric in ("ttft_s", "tbt_s"):
        assert r[f"{metric}_p50"] <= r[f"{metric}_p99"]
    assert r["plan"] == {
        "gpus": 12,
        "servers": 2,
        "pools": [
            {
                "name": "all",
                "class_names": list(CLASS_NAMES),
                "instances": [
                    {"tp": 4, "clock_mhz": 1980, "count": 1},
                    {"tp": 8, "clock_mhz": 1980, "count": 1},
                ],
            }
        ],
    }
    assert set(r["per_class"]) == set(CLASS_NAMES)
    assert r["per_class"]["SS"]["slo"] == {"ttft_s": 1.0, "tbt_s": 0.1}
    assert r["workload"] == {"rate_scale": 1.0}
    json.dumps(r, allow_nan=False)  # strict JSON: missing values are null, never NaN


def test_slo_attainment_counts_incomplete_requests_as_misses() -> None:
    ok = meets_slo(_result(), SLOS)
    assert ok.tolist() == [True, True, False, False, True]
    r = _report()
    assert r["slo_attainment"] == 3 / 5
    assert r["per_class"]["SS"]["slo_attainment"] == 1.0
    assert r["per_class"]["LL"]["slo_attainment"] == 0.0
    assert r["per_class"]["LL"]["completed"] == 1
    assert r["per_class"]["SM"]["slo_attainment"] == 1.0  # one token: no gap to miss
    assert r["per_class"]["MM"]["requests"] == 0
    assert r["per_class"]["MM"]["slo_attainment"] is None and r["per_class"]["MM"]["ttft_s_p50"] is None


def test_refused_requests_are_reported_beside_the_attainment_not_in_it() -> None:
    # Request 3 (LL, never finished) was refused at admission (beyond the model's context).
    admitted = np.array([True, True, True, False, True])
    result = _result(admitted=admitted, refused={"context_length": 1})
    assert meets_slo(result, SLOS).tolist() == [True, True, False, False, True]
    assert slo_attainment(result, SLOS) == 3 / 4
    assert slo_attainment(_result(), SLOS) == 3 / 5
    r = _report(result)
    assert (r["requests"], r["admitted"], r["refused"]) == (5, 4, {"context_length": 1})
    assert r["slo_attainment"] == 3 / 4
    assert r["per_class"]["LL"]["requests"] == 1 and r["per_class"]["LL"]["slo_attainment"] == 0.0
    # Nothing admitted: no attainment to report.
    none = _result(admitted=np.zeros(5, dtype=bool), refused={"context_length": 5})
    assert slo_attainment(none, SLOS) == 1.0 and _report(none)["slo_attainment"] is None


def test_decisions_are_reported_as_records() -> None:
    spec = InstanceSpec(8, 1980)
    decision = PoolDecision(
        pool="all",
        class_names=CLASS_NAMES,
        gpu_budget=16,
        forecast_rps=2.5,
        solver_status="optimal",
        shortfall_rps=0.0,
        chosen=MixChoice(((spec, 1),), 1234.56789),
        runner_up=None,
    )
    step = PlanStep(PLAN, (decision,), (0.5,) * len(CLASS_NAMES), "rate")
    records = (StepRecord(300.0, "pool", 300.0, step, 2), ClockDecision(305.0, 1, 1980, 800, "load"))
    r = _report(_result(decisions=records))
    assert r["decisions"] == [
        {
            "t_s": 300.0,
            "level": "pool",
            "horizon_s": 300.0,
            "generation": 2,
            "forecast_kind": "rate",
            "class_forecast_rps": [0.5] * len(CLASS_NAMES),
            "pools": [
                {
                    "pool": "all",
                    "classes": list(CLASS_NAMES),
                    "gpu_budget": 16,
                    "forecast_rps": 2.5,
                    "solver_status": "optimal",
                    "shortfall_rps": 0.0,
                    "chosen": {"instances": [{"tp": 8, "clock_mhz": 1980, "count": 1}], "power_w": 1234.568},
                    "runner_up": None,
                    "guard_factor": 1.0,
                    "clock_floor_mhz": 0,
                }
            ],
        },
    ]
    assert r["clock_decisions"] == {"load": 1}  # counted, not listed (a week holds ~10^6)
    json.dumps(r, allow_nan=False)


def test_tbt_percentiles_are_token_weighted() -> None:
    r = _report()
    # 100 of 111 tokens came from 50-ms iterations: p50 is 50 ms; the 99th-percentile token is at 80 ms
    assert r["tbt_s_p50"] == 0.05
    assert r["tbt_s_p99"] == 0.08
    assert weighted_percentile(np.array([3.0, 1.0, 2.0]), np.array([1, 1, 1]), 50) == 2.0
    assert weighted_percentile(np.array([1.0, 9.0]), np.array([99, 1]), 99) == 1.0
    assert weighted_percentile(np.array([1.0, 9.0]), np.array([99, 2]), 99) == 9.0
    assert weighted_percentile(np.array([]), np.array([]), 50) is None


def test_carbon_and_cost_with_constants() -> None:
    r = _report(pricing=_pricing(g_per_kwh=250.0, usd_per_kwh=0.1, server_usd=80.0))
    kwh = 36_000.0 / 3.6e6
    assert r["carbon_g"] == pytest.approx(kwh * 250.0)
    assert r["cost"]["server_hours"] == pytest.approx(20.0 / 3600.0)
    assert r["cost"]["gpu_rental_usd"] == pytest.approx(20.0 / 3600.0 * 80.0)
    assert r["cost"]["energy_usd"] == pytest.approx(kwh * 0.1)
    assert r["cost_usd"] == pytest.approx(r["cost"]["gpu_rental_usd"] + r["cost"]["energy_usd"])


def _hourly_csv(tmp_path: Path, header: str, rows: list[tuple[str, float]]) -> Path:
    path = tmp_path / "hourly.csv"
    path.write_text(header + "\n" + "".join(f"{t},{v}\n" for t, v in rows))
    return path


def test_hourly_carbon_and_price_follow_trace_time(tmp_path: Path) -> None:
    carbon = CarbonIntensity.from_csv(
        _hourly_csv(
            tmp_path,
            "Datetime (UTC),Carbon Intensity gCO₂eq/kWh (direct)",
            [("2023-11-16 18:00:00", 100.0), ("2023-11-16 19:00:00", 300.0)],
        )
    )
    price_path = tmp_path / "price.csv"
    price_path.write_text(
        "Datetime (UTC),Price (USD/MWh)\n2023-11-16 18:00:00+00:00,40\n2023-11-16 19:00:00+00:00,-10\n"
    )
    prices = EnergyPrice.from_csv(price_path)
    pricing = Pricing(carbon, "file", prices, "file", 88.5)
    # ten 1-s bins of 3600 J (1 Wh) each; the hour changes after the 4th bin
    result = _result(start_unix_s=HOUR_2023_11_16_18 + 3600 - 4)
    r = _report(result, pricing)
    assert r["carbon_g"] == pytest.approx(4 * 0.001 * 100.0 + 6 * 0.001 * 300.0)
    assert r["cost"]["energy_usd"] == pytest.approx(4 * 1e-6 * 40.0 + 6 * 1e-6 * -10.0)
    check_pricing_covers(pricing, HOUR_2023_11_16_18, 7200.0, 1.0)
    with pytest.raises(OutOfRangeError):
        check_pricing_covers(pricing, HOUR_2023_11_16_18, 7201.0, 1.0)
    with pytest.raises(InvalidArgumentError, match="--carbon"):
        check_pricing_covers(pricing, None, 10.0, 1.0)
    with pytest.raises(InvalidArgumentError, match="--prices"):
        check_pricing_covers(Pricing(ConstantCarbonIntensity(1.0), "c", prices, "f", 1.0), None, 10.0, 1.0)
    check_pricing_covers(_pricing(), None, 1e6, 1.0)


def test_power_percentiles_divide_the_partial_last_bin_by_its_length() -> None:
    bins = np.array([1000.0, 1000.0, 250.0])  # the last bin covers 0.25 s at 1000 W
    r = _report(_result(energy_by_bin_j=bins, duration_s=2.25))
    assert r["power_w_p50"] == r["power_w_p99"] == pytest.approx(1000.0)


def test_table_shows_the_headline_figures_and_every_class() -> None:
    text = format_table(_report())
    assert "singlepool" in text and "SLO attainment 60.00%" in text
    assert "energy 0.010 kWh" in text
    for name in CLASS_NAMES:
        assert f"\n{name} " in text


def test_tbt_histogram_percentiles_within_half_a_bin_and_folding_order_does_not_matter() -> None:
    rng = np.random.default_rng(3)
    gap_s = rng.lognormal(math.log(0.04), 0.5, 20_000)
    tokens = rng.integers(1, 200, 20_000)
    whole = TbtHistogram()
    whole.fold((gap_s, tokens))
    pieces = TbtHistogram()
    for part in np.array_split(np.arange(len(gap_s)), 7)[::-1]:
        pieces.fold((gap_s[part], tokens[part]))
    pieces.fold((np.zeros(0), np.zeros(0, dtype=np.int64)))
    values, counts = whole.arrays()
    assert np.array_equal(values, pieces.arrays()[0]) and np.array_equal(counts, pieces.arrays()[1])
    assert int(counts.sum()) == int(tokens.sum())
    for q in (1, 50, 99, 99.9):
        exact = weighted_percentile(gap_s, tokens, q)
        binned = weighted_percentile(values, counts, q)
        assert exact is not None and binned is not None
        assert binned == pytest.approx(exact, rel=5.1e-4)
    # a gap far beyond the others only grows the histogram; an empty one reports nothing
    whole.fold((np.array([500.0]), np.array([1])))
    assert whole.arrays()[0][-1] == pytest.approx(500.0, rel=5.1e-4)
    assert weighted_percentile(*TbtHistogram().arrays(), 50) is None
