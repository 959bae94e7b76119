"""The fluid lower bound (`controller.sim.bound`): its closed form is the LP's optimum, it is below every
feasible fractional allocation (and every pooled one) of the profile's model, below the simulated
policies on a short synthetic trace, and `dctl simulate --compare` reports it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api.errors import InvalidArgumentError
from controller.dctl.main import main
from controller.model.classes import CLASS_NAMES, ClassBins
from controller.model.profile import ConfigProfile
from controller.policy.capacity import ConfigCapacity, mix_capacity, pool_capacities
from controller.profiles import default_profile
from controller.sim.bound import (
    BOUND_SCHEMA,
    cheapest_config,
    class_optimum,
    fluid_bound,
    fluid_power_w,
    line_energy_per_request_j,
    measured_energy_per_request_j,
)
from controller.sim.carbon import ConstantCarbonIntensity, ConstantEnergyPrice
from controller.sim.cluster import SimConfig
from controller.sim.compare import format_compare_table, run_compare
from controller.sim.report import Pricing
from controller.sim.traces import Trace, load_trace

PROFILE = default_profile("llama2-70b", "h100-sxm")
PRICING = Pricing(
    carbon=ConstantCarbonIntensity(200.0),
    carbon_source="constant 200 g/kWh",
    energy_price=ConstantEnergyPrice(50.0),
    energy_price_source="constant 50 USD/MWh",
    gpu_usd_per_server_hour=88.5,
)


def _config(k: int, idle_w: float, slope_w_per_rps: float, cap_rps: float) -> ConfigCapacity:
    return ConfigCapacity(
        tp=(2, 4, 8)[k % 3],
        clock_mhz=800 + 100 * k,
        max_load_rps=cap_rps,
        power_idle_w=idle_w,
        power_slope_w_per_rps=slope_w_per_rps,
        energy_per_request_j=idle_w / cap_rps + slope_w_per_rps if cap_rps > 0 else math.inf,
    )


def _lp_power_w(loads_rps: list[float], capacities: list[list[ConfigCapacity]]) -> float:
    """The bound's LP as stated (module docstring of controller.sim.bound), all classes at once:
    fractional instances n and loads x per (class, configuration)."""
    import cvxpy as cp

    idle = np.array([[c.power_idle_w for c in cs] for cs in capacities])
    slope = np.array([[c.power_slope_w_per_rps for c in cs] for cs in capacities])
    cap = np.array([[c.max_load_rps for c in cs] for cs in capacities])
    n = cp.Variable(cap.shape, nonneg=True)
    x = cp.Variable(cap.shape, nonneg=True)
    problem = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(idle, n)) + cp.sum(cp.multiply(slope, x))),  # type: ignore[attr-defined]
        [cp.sum(x, axis=1) >= np.array(loads_rps), x <= cp.multiply(cap, n)],  # type: ignore[attr-defined]
    )
    # threads=1 as the pool MILP solves (controller.policy.pool): HiGHS sizes its global scheduler on a
    # process's first solve, and a later solve asking for another thread count then fails outright, so
    # a default-threaded solve here would break every pool MILP of the tests that run after this one.
    problem.solve(solver=cp.HIGHS, threads=1)  # type: ignore[no-untyped-call]
    assert problem.status == cp.OPTIMAL
    return float(problem.value)


def test_closed_form_equals_the_lp_on_random_inputs() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        n_classes, n_configs = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        capacities = [
            [
                _config(
                    k,
                    float(rng.uniform(0.0, 3000.0)),
                    float(rng.uniform(0.0, 800.0)),
                    float(rng.uniform(0.05, 20.0)),
                )
                for k in range(n_configs)
            ]
            for _ in range(n_classes)
        ]
        loads = [float(rng.choice([0.0, rng.uniform(0.0, 50.0)])) for _ in range(n_classes)]
        closed = sum(fluid_power_w(load, cs) for load, cs in zip(loads, capacities, strict=True))
        assert closed == pytest.approx(_lp_power_w(loads, capacities), rel=1e-6, abs=1e-6)


def test_closed_form_picks_the_least_energy_per_request() -> None:
    configs = [_config(0, 1000.0, 100.0, 10.0), _config(1, 200.0, 150.0, 2.0), _config(2, 0.0, 0.0, 0.0)]
    # 1000 / 10 + 100 = 200 J per request against 200 / 2 + 150 = 250; the third cannot serve.
    assert cheapest_config(configs) == configs[0]
    assert fluid_power_w(3.0, configs) == pytest.approx(600.0)
    assert fluid_power_w(0.0, configs[2:]) == 0.0
    assert fluid_power_w(1.0, configs[2:]) == math.inf
    with pytest.raises(InvalidArgumentError, match="load_rps"):
        fluid_power_w(-1.0, configs)
    # On the profile, the line's value is the capacity model's own energy per request at full load.
    for c in pool_capacities(PROFILE, {"MM": 1.0}):
        assert line_energy_per_request_j(c) == pytest.approx(c.energy_per_request_j, rel=1e-12)


_CONFIG = st.tuples(
    st.floats(0.0, 5000.0), st.floats(0.0, 1000.0), st.floats(0.01, 50.0), st.floats(0.0, 1.0)
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(configs=st.lists(_CONFIG, min_size=1, max_size=10), load_rps=st.floats(0.0, 200.0))
def test_no_feasible_fractional_allocation_beats_the_bound(
    configs: list[tuple[float, float, float, float]], load_rps: float
) -> None:
    """Any split of the load over the configurations, each with at least the instances its share
    needs (any surplus), draws at least the bound's power."""
    capacities = [_config(k, idle, slope, cap) for k, (idle, slope, cap, _) in enumerate(configs)]
    weights = np.array([w for *_, w in configs]) + 1e-9
    shares_rps = load_rps * weights / weights.sum()
    power_w = 0.0
    for c, x_rps, surplus in zip(capacities, shares_rps, np.linspace(0.0, 2.0, len(configs)), strict=True):
        instances = x_rps / c.max_load_rps * (1.0 + surplus)
        power_w += c.power_idle_w * instances + c.power_slope_w_per_rps * x_rps
    assert fluid_power_w(load_rps, capacities) <= power_w * (1.0 + 1e-9) + 1e-9


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    shares=st.lists(st.floats(0.0, 1.0), min_size=len(CLASS_NAMES), max_size=len(CLASS_NAMES)),
    config=st.integers(0, 20),
    load_rps=st.floats(0.01, 100.0),
    surplus=st.floats(0.0, 1.0),
)
def test_no_pooled_allocation_beats_the_bound(
    shares: list[float], config: int, load_rps: float, surplus: float
) -> None:
    """A pool serving a MIX of classes on one configuration (the profile's mix model, as DynamoLLM
    plans it) draws at least the per-class bound: pooling is a restriction of the bound's relaxation."""
    mix = {name: s for name, s in zip(CLASS_NAMES, shares, strict=True) if s > 0.0}
    if not mix:
        return
    total = sum(mix.values())
    tp, clock = PROFILE.tps[config % len(PROFILE.tps)], PROFILE.clocks_mhz[config % len(PROFILE.clocks_mhz)]
    pool = mix_capacity(PROFILE, {n: s / total for n, s in mix.items()}, tp, clock)
    if pool is None:
        return
    instances = load_rps / pool.max_load_rps * (1.0 + surplus)
    pool_power_w = pool.power_idle_w * instances + pool.power_slope_w_per_rps * load_rps
    bound_power_w = 0.0
    for name, s in mix.items():
        opt = class_optimum(PROFILE, name)
        assert opt is not None
        bound_power_w += load_rps * s / total * opt.energy_per_request_j
    assert bound_power_w <= pool_power_w * (1.0 + 1e-9)


def test_class_optimum_is_the_lower_of_line_and_measurements() -> None:
    for name in CLASS_NAMES:
        opt = class_optimum(PROFILE, name)
        assert opt is not None
        caps = pool_capacities(PROFILE, {name: 1.0})
        line = min(line_energy_per_request_j(c) for c in caps)
        assert opt.line_energy_per_request_j == pytest.approx(line)
        measured = min(measured_energy_per_request_j(PROFILE, name, c.tp, c.clock_mhz)[0] for c in caps)
        assert opt.energy_per_request_j == pytest.approx(min(line, measured))
        assert 0.0 < opt.load_rps <= opt.max_load_rps * (1 + 1e-12)
        assert opt.max_load_rps == pytest.approx(PROFILE.max_load_rps(name, opt.tp, opt.clock_mhz))


def _trace(rows: list[tuple[float, int, int]], end_s: float | None = None) -> Trace:
    return Trace(
        name="t",
        arrival_s=np.array([r[0] for r in rows]),
        input_tokens=np.array([r[1] for r in rows]),
        output_tokens=np.array([r[2] for r in rows]),
        start_unix_s=None,
        end_s=end_s,
    )


def test_bound_counts_admitted_requests_by_true_class_per_period() -> None:
    # SS at 0 s and 400 s, LL at 350 s, and a request beyond the 4,096-token context (refused).
    trace = _trace([(0.0, 100, 50), (350.0, 2000, 500), (360.0, 5000, 100), (400.0, 100, 50)], end_s=700.0)
    bound = fluid_bound(trace, PROFILE, period_s=300.0)
    ss, ll = class_optimum(PROFILE, "SS"), class_optimum(PROFILE, "LL")
    assert ss is not None and ll is not None
    assert bound.requests == 4 and bound.refused_context == 1 and bound.admitted == 3
    assert bound.requests_by_class == (2, 0, 0, 0, 0, 0, 0, 0, 1)
    assert bound.energy_by_period_j == pytest.approx(
        (ss.energy_per_request_j, ss.energy_per_request_j + ll.energy_per_request_j, 0.0)
    )
    assert bound.avg_gpus == pytest.approx((2 * ss.tp / ss.load_rps + ll.tp / ll.load_rps) / 700.0)
    # Linear in the load: the total does not depend on the period, only the series does.
    for period_s in (1.0, 60.0, 3600.0):
        other = fluid_bound(trace, PROFILE, period_s=period_s)
        assert other.energy_j == pytest.approx(bound.energy_j)
        assert len(other.energy_by_period_j) == math.ceil(700.0 / period_s)
    # The bins of the simulation decide the class: with an output edge at 40 tokens SS becomes SM.
    moved = fluid_bound(trace, PROFILE, bins=ClassBins(output_edges_tokens=(40, 350)))
    assert moved.requests_by_class[:2] == (0, 2)
    doc = json.loads(json.dumps(bound.to_json(seed=1, wall_s=0.0), allow_nan=False))
    assert doc["schema"] == BOUND_SCHEMA and doc["kind"] == "bound" and doc["policy"] == "bound"
    assert doc["refused"] == {"context_length": 1} and doc["admitted"] == 3
    assert doc["per_class"]["LL"]["energy_j"] == pytest.approx(ll.energy_per_request_j)
    assert doc["energy_kwh"] == pytest.approx(bound.energy_j / 3.6e6)
    assert doc["energy_line_model_j"] >= doc["energy_j"]
    with pytest.raises(InvalidArgumentError, match="period_s"):
        fluid_bound(trace, PROFILE, period_s=0.0)


def test_a_class_no_configuration_serves_adds_nothing_and_is_listed() -> None:
    ll = PROFILE.classes["LL"]
    empty = {key: ConfigProfile(c.tp, c.clock_mhz, 0.0, (), ()) for key, c in ll.configs.items()}
    profile = replace(PROFILE, classes={**PROFILE.classes, "LL": replace(ll, configs=empty)})
    trace = _trace([(0.0, 100, 50), (1.0, 2000, 500)], end_s=10.0)
    bound = fluid_bound(trace, profile)
    ss = class_optimum(PROFILE, "SS")
    assert ss is not None
    assert bound.unservable_classes == ("LL",) and bound.energy_j == pytest.approx(ss.energy_per_request_j)
    assert bound.to_json(seed=0, wall_s=0.0)["per_class"]["LL"] == {"requests": 1, "servable": False}


def test_bound_is_below_every_simulated_policy_on_a_synthetic_trace() -> None:
    trace = load_trace("synthetic:conversation").window(0.0, 900.0)
    outcome = run_compare(
        trace, ["dynamollm", "oracle", "bound"], PROFILE, config=SimConfig(seed=0), pricing=PRICING
    )
    assert [r["policy"] for r in outcome.reports] == ["singlepool", "dynamollm", "oracle"]
    bound = outcome.bound
    assert bound is not None and bound.energy_j > 0.0 and not bound.unservable_classes
    for r in outcome.reports:
        assert r["energy_j"] > bound.energy_j, r["policy"]
        assert r["energy_x_bound"] == pytest.approx(r["energy_j"] / bound.energy_j)
        assert r["bound"]["energy_j"] == bound.energy_j
        # The same admission as every policy: refused requests are out of the bound's load too.
        assert r["admitted"] == bound.admitted and r["refused"]["context_length"] == bound.refused_context
        assert r["bound"]["period_s"] == 300.0  # the pool period of the dynamic policies
    table = format_compare_table(outcome.entries)
    header, *rows = table.split("\n")[1:]
    assert header.split()[-2:] == ["x", "bound"]
    bound_row = next(line for line in rows if line.startswith("bound "))
    assert bound_row.split()[1] == f"{bound.energy_j / 3.6e6:.3f}" and bound_row.split()[-1] == "1.000"
    assert "WARNING" not in table


def test_dctl_simulate_compare_writes_the_bound_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["simulate", "--compare", "dynamollm", "--trace", "synthetic:conversation", "--duration", "600"]
    code = main([*argv, "--out", str(out_dir), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    reports = json.loads((out_dir / "report.json").read_text())
    assert [r["policy"] for r in reports] == ["singlepool", "dynamollm"]
    for r in reports:
        assert r["bound"]["schema"] == BOUND_SCHEMA
        assert r["energy_x_bound"] == pytest.approx(r["energy_j"] / r["bound"]["energy_j"])
        assert r["energy_x_bound"] > 1.0
    table = (out_dir / "table.txt").read_text()
    assert out.strip() == table.strip()
    dynamo_row = next(line for line in table.splitlines() if line.startswith("dynamollm"))
    assert dynamo_row.split()[-1] == f"{reports[1]['energy_x_bound']:.3f}"
    assert any(line.startswith("bound ") for line in table.splitlines())


def test_bound_is_not_a_simulated_policy(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--trace", "synthetic:conversation", "--duration", "30", "--policy", "bound"]
    assert main([*argv, "--no-progress"]) == 2
    assert "--policy: got 'bound'" in capsys.readouterr().err
