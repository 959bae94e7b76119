"""The controller's energy attribution and the metrics built on it: a pool's interval energy is shared
over its classes by output tokens, idle energy and a pool without tokens stay unattributed, the counters
add up across intervals while the per-token gauges keep the last interval with traffic; the guard's
gauges follow the plan's pools."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import ControllerMetrics, attribute_energy
from controller.model.state import GuardState


def _values(metrics: ControllerMetrics, name: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels[k] for k in ("pool", "cls") if k in s.labels): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
        if s.name == name
    }


def test_pool_energy_is_shared_by_output_tokens_else_requests() -> None:
    got = attribute_energy(
        {"A": 900.0, "B": 50.0, "C": 70.0, "": 400.0},
        {("A", "SS"): 1, ("A", "SM"): 1, ("B", "LL"): 1, ("B", "LM"): 4, ("", "SS"): 5},
        {("A", "SS"): 100, ("A", "SM"): 200, ("B", "LL"): 0, ("", "SS"): 5},
    )
    # B finished requests but no token: shared by requests; C finished nothing and idle is nobody's
    assert got == {("A", "SS"): 300.0, ("A", "SM"): 600.0, ("B", "LL"): 10.0, ("B", "LM"): 40.0}


def test_counters_accumulate_and_gauges_keep_the_last_interval_with_traffic() -> None:
    m = ControllerMetrics()
    m.ledger_interval({"A": 600.0}, {("A", "SS"): 3, ("A", "SM"): 1}, {("A", "SS"): 100, ("A", "SM"): 200})
    assert _values(m, "dynamollm_class_energy_per_output_token_joules") == {
        ("A", "SS"): 2.0,
        ("A", "SM"): 2.0,
    }
    assert _values(m, "dynamollm_class_energy_per_request_joules") == {
        ("A", "SS"): 200.0 / 3,
        ("A", "SM"): 400.0,
    }
    m.ledger_interval({"A": 100.0}, {("A", "SS"): 1}, {("A", "SS"): 10})
    assert _values(m, "dynamollm_class_energy_joules_total") == {("A", "SS"): 300.0, ("A", "SM"): 400.0}
    assert _values(m, "dynamollm_class_requests_total") == {("A", "SS"): 4.0, ("A", "SM"): 1.0}
    assert _values(m, "dynamollm_class_output_tokens_total") == {("A", "SS"): 110.0, ("A", "SM"): 200.0}
    per_token = _values(m, "dynamollm_class_energy_per_output_token_joules")
    assert per_token == {("A", "SS"): 10.0, ("A", "SM"): 2.0}  # SM had no traffic: its last figure stays
    m.ledger_interval({"": 50.0}, {}, {})  # an idle interval changes nothing
    assert _values(m, "dynamollm_class_energy_joules_total")[("A", "SS")] == 300.0


def test_guard_gauges_follow_the_plans_pools() -> None:
    m = ControllerMetrics()
    state = {
        "A": GuardState(factor=1.3, attainment=0.97, samples=150),
        "B": GuardState(clock_floor_mhz=1400, attainment=0.99, samples=20),
        "old": GuardState(factor=2.0),
    }
    m.set_guard(state, ["A", "B", "C"])
    assert _values(m, "dynamollm_guard_factor") == {("A",): 1.3, ("B",): 1.0, ("C",): 1.0}
    assert _values(m, "dynamollm_guard_active") == {("A",): 1.0, ("B",): 1.0, ("C",): 0.0}
    attainment = _values(m, "dynamollm_guard_attainment_ratio")
    assert math.isclose(attainment[("A",)], 0.97) and ("C",) not in attainment
    m.set_guard(state, ["A"])
    assert set(_values(m, "dynamollm_guard_factor")) == {("A",)}
