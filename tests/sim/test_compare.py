"""`run_compare` on a short synthetic trace: every policy on the same trace, report.json as a list of
simreports, the table normalised to singlepool, PNG plots; names checked before anything runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES, ClassBins
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.profile import Profile
from controller.policy.base import ArrivalStats, SimPolicy
from controller.policy.singlepool import SinglePool
from controller.profiles import default_profile
from controller.sim.carbon import ConstantCarbonIntensity, ConstantEnergyPrice
from controller.sim.cluster import SimConfig
from controller.sim.compare import (
    REPORT_FILE,
    TABLE_FILE,
    PolicyFactory,
    busiest_window_start_s,
    format_compare_table,
    normalised_rows,
    order_policies,
    resolve_trace,
    run_compare,
)
from controller.sim.plots import (
    POWER_FILE,
    class_key,
    mix_counts,
    mix_file,
    plot_mix,
    pool_label,
    pool_labels,
)
from controller.sim.report import Pricing
from controller.sim.traces import Trace, load_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True)
class FixedPlan:
    """A static test policy: `count` TP8 instances at `clock_mhz` serving every class."""

    label: str
    count: int
    clock_mhz: int

    @property
    def name(self) -> str:
        return self.label

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        spec = InstanceSpec(tp=8, clock_mhz=self.clock_mhz)
        return ClusterPlan(
            pools=(PoolPlan(name="all", class_names=CLASS_NAMES, instances=(spec,) * self.count),)
        )


def _registry() -> dict[str, PolicyFactory]:
    def slow() -> SimPolicy:
        return FixedPlan("slow", 3, 1200)

    def big() -> SimPolicy:
        return FixedPlan("big", 4, 1980)

    return {"singlepool": SinglePool, "slow": slow, "big": big}


PRICING = Pricing(
    carbon=ConstantCarbonIntensity(200.0),
    carbon_source="constant 200 g/kWh",
    energy_price=ConstantEnergyPrice(50.0),
    energy_price_source="constant 50 USD/MWh",
    gpu_usd_per_server_hour=88.5,
)


@pytest.fixture(scope="module")
def trace() -> Trace:
    return load_trace("synthetic:conversation", duration_s=90.0, seed=3)


@pytest.fixture(scope="module")
def compared(
    trace: Trace, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, tuple[dict[str, Any], ...]]:
    out = tmp_path_factory.mktemp("cmp") / "out"
    outcome = run_compare(
        trace,
        ["big", "slow"],
        default_profile("llama2-70b", "h100-sxm"),
        config=SimConfig(seed=5, max_drain_s=120.0),
        pricing=PRICING,
        out_dir=out,
        registry=_registry(),
        workload={"trace_spec": "synthetic:conversation"},
    )
    assert {p.name for p in outcome.files} == {REPORT_FILE, TABLE_FILE, POWER_FILE}
    return out, outcome.reports


def test_report_json_is_the_list_of_simreports_baseline_first(
    compared: tuple[Path, tuple[dict[str, Any], ...]], trace: Trace
) -> None:
    out, reports = compared
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert [r["policy"] for r in on_disk] == ["singlepool", "big", "slow"]
    assert all(r["schema"] == "dynamollm.simreport/v1" for r in on_disk)
    assert all(r["requests"] == len(trace) and r["seed"] == 5 for r in on_disk)
    assert all(r["workload"]["trace_spec"] == "synthetic:conversation" for r in on_disk)
    assert on_disk == json.loads(json.dumps(list(reports)))
    # The fixed plans run as given; singlepool is sized by simulation.
    assert on_disk[1]["plan"]["gpus"] == 32 and on_disk[2]["plan"]["gpus"] == 24
    assert on_disk[0]["workload"]["sizing"]["trials"]
    assert "sizing" not in on_disk[1]["workload"]


def test_table_is_normalised_to_singlepool(compared: tuple[Path, tuple[dict[str, Any], ...]]) -> None:
    out, reports = compared
    rows = {row.policy: row for row in normalised_rows(reports)}
    base, big = reports[0], reports[1]
    assert rows["singlepool"].energy_x == rows["singlepool"].cost_x == rows["singlepool"].servers_x == 1.0
    assert rows["big"].energy_x == pytest.approx(big["energy_j"] / base["energy_j"])
    assert rows["big"].carbon_x == pytest.approx(big["carbon_g"] / base["carbon_g"])
    assert rows["big"].servers_x == pytest.approx(4.0 / base["avg_servers"])
    # Four servers at maximum clock draw more than the sized baseline (at most as many servers).
    assert base["avg_servers"] <= 4.0 and rows["big"].energy_x is not None and rows["big"].energy_x > 1.0
    table = (out / TABLE_FILE).read_text()
    assert table.strip() == format_compare_table(reports)
    assert "normalised to singlepool" in table
    singlepool_line = next(line for line in table.splitlines() if line.startswith("singlepool"))
    assert singlepool_line.split()[2] == "1.000"


def test_power_plot_is_a_png(compared: tuple[Path, tuple[dict[str, Any], ...]]) -> None:
    out, reports = compared
    data = (out / POWER_FILE).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    # The series it is drawn from: per-minute power whose integral is the run's energy.
    series = reports[1]["timeseries"]
    bins = np.full(len(series["power_w"]), series["bin_s"])
    bins[-1] = reports[1]["duration_s"] - series["bin_s"] * (len(bins) - 1)
    assert float(np.dot(series["power_w"], bins)) == pytest.approx(reports[1]["energy_j"], rel=1e-3)


def test_mix_counts_sum_over_the_other_knob() -> None:
    pool = {
        "t_s": [0.0, 60.0],
        "instances": [
            {"tp": 4, "clock_mhz": 1980, "counts": [1, 0]},
            {"tp": 8, "clock_mhz": 1200, "counts": [2, 1]},
            {"tp": 4, "clock_mhz": 1200, "counts": [0, 3]},
        ],
    }
    assert mix_counts(pool, "tp") == {"TP4": [1, 3], "TP8": [2, 1]}
    assert mix_counts(pool, "clock") == {"1200 MHz": [2, 4], "1980 MHz": [1, 0]}
    with pytest.raises(InvalidArgumentError, match="kind"):
        mix_counts(pool, "pool")  # type: ignore[arg-type]


def test_mix_plot_of_a_report_is_a_png(
    compared: tuple[Path, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, reports = compared
    path = plot_mix(reports[2], "clock", tmp_path / "mix.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_baseline_added_and_names_checked() -> None:
    known = ("singlepool", "big", "slow")
    assert order_policies([], known, "singlepool") == known
    assert order_policies(["slow", "slow"], known, "singlepool") == ("singlepool", "slow")
    with pytest.raises(InvalidArgumentError, match="--compare"):
        order_policies(["slow", "nope"], known, "singlepool")


def test_unknown_policy_fails_before_anything_is_written(trace: Trace, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="nope"):
        run_compare(
            trace,
            ["nope"],
            default_profile("llama2-70b", "h100-sxm"),
            config=SimConfig(),
            pricing=PRICING,
            out_dir=tmp_path / "x",
            registry=_registry(),
        )
    assert not (tmp_path / "x").exists()


def test_rows_need_the_baseline(compared: tuple[Path, tuple[dict[str, Any], ...]]) -> None:
    _, reports = compared
    with pytest.raises(InvalidArgumentError, match="singlepool"):
        normalised_rows(reports[1:])


def test_busiest_window_start() -> None:
    arrival_s = np.array([0.0, 1.0, 10.0, 10.5, 11.0, 11.2, 30.0])
    assert busiest_window_start_s(arrival_s, 2.0) == 10.0
    assert busiest_window_start_s(arrival_s, 100.0) == 0.0
    assert busiest_window_start_s(np.zeros(0), 5.0) == 0.0


def test_sizing_on_the_busiest_window_then_one_full_run(trace: Trace) -> None:
    outcome = run_compare(
        trace,
        [],
        default_profile("llama2-70b", "h100-sxm"),
        config=SimConfig(seed=5, max_drain_s=120.0),
        pricing=PRICING,
        registry={"singlepool": SinglePool},
        sizing_window_s=30.0,
    )
    (report,) = outcome.reports
    assert outcome.files == ()
    sizing = report["workload"]["sizing"]
    assert "busiest 30 s" in sizing["rule"]
    chosen = report["plan"]["pools"][0]["instances"][0]["count"]
    assert any(t["instances"] == chosen and t["slo_attainment"] >= 0.99 for t in sizing["trials"])
    assert report["requests"] == len(trace)  # the whole trace, not the window


def test_registered_dynamic_policies_with_mix_plots(trace: Trace, tmp_path: Path) -> None:
    outcome = run_compare(
        trace,
        ["scalefreq", "dynamollm"],
        default_profile("llama2-70b", "h100-sxm"),
        config=SimConfig(seed=5, max_drain_s=120.0),
        pricing=PRICING,
        out_dir=tmp_path,
    )
    base, scalefreq, dynamo = outcome.reports
    assert [r["policy"] for r in outcome.reports] == ["singlepool", "scalefreq", "dynamollm"]
    # scalefreq tunes the clocks of singlepool's fleet: it starts from the baseline's instance count.
    assert (
        scalefreq["workload"]["sizing"]["peak_rule_instances"]
        == base["plan"]["pools"][0]["instances"][0]["count"]
    )
    assert dynamo["timeseries"]["pools"]
    for name in (mix_file("dynamollm", "tp"), mix_file("dynamollm", "clock")):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / mix_file("scalefreq", "tp")).exists()


def test_resolve_trace_builds_the_week_from_the_trace_dir(shared_data: Path) -> None:
    week = resolve_trace("azure-week:code", trace_dir=shared_data / "traces", duration_s=600.0, seed=1)
    assert week.duration_s == 600.0 and len(week) > 0 and week.start_unix_s is not None
    synthetic = resolve_trace("synthetic:coding", trace_dir=shared_data / "traces", duration_s=60.0)
    assert synthetic.name == "synthetic:coding"
    with pytest.raises(InvalidArgumentError, match="--trace"):
        resolve_trace("azure-week:chat", trace_dir=shared_data / "traces")


def _broken() -> SimPolicy:
    raise InvalidArgumentError("--slo-target", 0.99, "an attainment this test policy can never reach")


def test_a_failing_policy_is_recorded_and_the_others_still_run(trace: Trace, tmp_path: Path) -> None:
    heard: list[tuple[int, int, str, str | None]] = []

    class Progress:
        def policy_started(self, index: int, total: int, name: str) -> None:
            heard.append((index, total, name, "started"))

        def policy_finished(
            self, index: int, total: int, name: str, error: str | None, wall_s: float
        ) -> None:
            heard.append((index, total, name, error))

    outcome = run_compare(
        trace,
        ["broken", "big"],
        default_profile("llama2-70b", "h100-sxm"),
        config=SimConfig(seed=5, max_drain_s=120.0),
        pricing=PRICING,
        out_dir=tmp_path,
        registry={**_registry(), "broken": _broken},
        progress=Progress(),
    )
    assert [r["policy"] for r in outcome.reports] == ["singlepool", "big"]
    (failure,) = outcome.failures
    assert failure.policy == "broken" and failure.error_type == "InvalidArgumentError"
    assert [e["policy"] for e in outcome.entries] == ["singlepool", "broken", "big"]
    assert json.loads((tmp_path / REPORT_FILE).read_text()) == json.loads(json.dumps(list(outcome.entries)))
    table = (tmp_path / TABLE_FILE).read_text()
    assert "normalised to singlepool" in table  # the baseline ran: ratios as usual
    assert any(
        line.startswith("broken      FAILED (InvalidArgumentError): --slo-target")
        for line in table.split("\n")
    )
    assert [h[:3] for h in heard if h[3] == "started"] == [
        (1, 3, "singlepool"),
        (2, 3, "broken"),
        (3, 3, "big"),
    ]
    assert (2, 3, "broken", failure.error) in heard and (3, 3, "big", None) in heard


def test_without_the_baseline_the_table_is_absolute(trace: Trace, tmp_path: Path) -> None:
    outcome = run_compare(
        trace,
        ["big"],
        default_profile("llama2-70b", "h100-sxm"),
        config=SimConfig(seed=5, max_drain_s=120.0),
        pricing=PRICING,
        out_dir=tmp_path,
        registry={**_registry(), "singlepool": _broken},
    )
    assert [f.policy for f in outcome.failures] == ["singlepool"]
    table = format_compare_table(outcome.entries)
    first, _, base_row, big_row = table.split("\n")[:4]
    assert "absolute figures only: singlepool (the baseline) failed" in first
    assert base_row.startswith("singlepool  FAILED")
    big = outcome.reports[0]
    assert big_row.split()[1] == f"{big['energy_kwh']:.3f}" and set(big_row.split()[2:5]) == {"-"}
    assert (tmp_path / POWER_FILE).is_file()


def test_pool_labels_and_class_key() -> None:
    assert pool_label("SS", ["SS"]) == "SS"
    assert pool_label("ML", ["SS", "SM", "MS", "MM", "SL", "ML"]) == "ML (serves SS SM MS MM SL ML)"
    assert pool_label("all", list(CLASS_NAMES)) == "all (serves all nine classes)"
    assert pool_label("LS", ["LM", "LS"], at_start=True) == "LS (at start serves LM LS)"
    report = {"plan": {"pools": [{"name": "LL", "class_names": ["LS", "LM", "LL"]}]}}
    assert pool_labels(report) == {"LL": "LL (serves LS LM LL)"}
    key = class_key()
    assert key.startswith("Request classes XY: X = input bin, Y = output bin")
    assert "input S <256, M <1024, L >=1024 tokens" in key and "output S <100, M <350, L >=350" in key
    assert "input S <100" in class_key(ClassBins(input_edges_tokens=(100, 2000)))


# ------------------------------------------------------------------ --jobs


def _without_wall_times(value: Any) -> Any:
    """The entries with every `wall_s` removed: the one thing a run in another process may change."""
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items() if k != "wall_s"}
    if isinstance(value, list | tuple):
        return [_without_wall_times(v) for v in value]
    return value


class _Heard:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[tuple[str, str | None]] = []

    def policy_started(self, index: int, total: int, name: str) -> None:
        self.started.append(name)

    def policy_finished(self, index: int, total: int, name: str, error: str | None, wall_s: float) -> None:
        self.finished.append((name, error))


def test_jobs_run_the_policies_in_processes_with_the_reports_of_one(trace: Trace, tmp_path: Path) -> None:
    # scalefreq starts from the baseline's size: it must wait for singlepool in the parallel run too
    policies = ["dynamollm", "scalefreq", "multipool"]
    profile = default_profile("llama2-70b", "h100-sxm")
    runs = {}
    for jobs in (1, 2):
        heard = _Heard()
        runs[jobs] = run_compare(
            trace, policies, profile, config=SimConfig(seed=5, max_drain_s=120.0), pricing=PRICING,
            out_dir=tmp_path / f"jobs{jobs}", progress=heard, jobs=jobs,
        )  # fmt: skip
        assert sorted(heard.started) == sorted(["singlepool", *policies])
        assert sorted(heard.finished) == sorted((n, None) for n in ["singlepool", *policies])
    one, two = runs[1], runs[2]
    assert [r["policy"] for r in two.entries] == ["singlepool", *policies]  # run order, not finish order
    assert _without_wall_times(two.entries) == _without_wall_times(one.entries)
    assert (tmp_path / "jobs2" / TABLE_FILE).read_text() == (tmp_path / "jobs1" / TABLE_FILE).read_text()
    scalefreq = next(r for r in two.reports if r["policy"] == "scalefreq")
    assert "baseline's instance count" in scalefreq["workload"]["sizing"]["rule"]


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5])
def test_jobs_must_be_a_whole_number_of_processes(trace: Trace, jobs: Any) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        run_compare(trace, [], default_profile("llama2-70b", "h100-sxm"), config=SimConfig(), pricing=PRICING,
                    jobs=jobs)  # fmt: skip
    assert refused.value.field == "--jobs"
