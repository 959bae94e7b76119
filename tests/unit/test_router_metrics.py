"""The router's rolling ratios and their exposition, on an injected clock: windows forget what is older
than they are, a class with nothing in a window has no ratio for it, predictions are sorted into
correct / under / over."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controller.router.metrics import RollingRatio, RouterMetrics


def _samples(metrics: RouterMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.exposition({"p0": 2}).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_each_window_counts_only_its_own_span() -> None:
    ratio = RollingRatio()
    for t in range(100):  # one a second for 100 s: misses in the first 40 s, hits after
        ratio.add("SS", hit=t >= 40, now_s=float(t))
    got = ratio.ratios(now_s=99.0)
    assert got[("SS", "1m")] == 1.0  # the last minute: all hits
    assert abs(got[("SS", "5m")] - 0.6) < 1e-9
    assert got[("SS", "1h")] == got[("SS", "5m")]
    assert ratio.ratios(now_s=99.0 + 3600.0 + 2.0) == {}  # all of it older than the hour


def test_a_key_without_events_in_a_window_has_no_ratio() -> None:
    ratio = RollingRatio()
    ratio.add("LL", hit=False, now_s=0.0)
    got = ratio.ratios(now_s=200.0)
    assert ("LL", "1m") not in got and got[("LL", "5m")] == 0.0


def test_memory_is_bounded_by_buckets_not_requests() -> None:
    ratio = RollingRatio()
    for i in range(100_000):
        ratio.add("SS", hit=True, now_s=i / 10_000)  # 100k requests in 10 s
    assert len(ratio._buckets["SS"]) <= 11


def test_exposition_has_attainment_accuracy_escalations_and_queue_depth() -> None:
    now = [1000.0]
    metrics = RouterMetrics(lambda: now[0])
    metrics.slo_outcome("SS", True)
    metrics.slo_outcome("SS", False)
    metrics.prediction(0, 0)
    metrics.prediction(0, 2)
    metrics.prediction(2, 1)
    metrics.escalations.labels("queued").inc()
    slo = _samples(metrics, "dynamollm_router_slo_attainment_ratio")
    assert slo[(("cls", "SS"), ("window", "1m"))] == 0.5
    assert {labels for labels in slo} == {(("cls", "SS"), ("window", w)) for w in ("1m", "5m", "1h")}
    accuracy = _samples(metrics, "dynamollm_router_predictor_accuracy_ratio")
    assert abs(accuracy[(("window", "5m"),)] - 1 / 3) < 1e-9
    predictions = _samples(metrics, "dynamollm_router_predictions_total")
    assert {k[0][1]: v for k, v in predictions.items()} == {"correct": 1, "under": 1, "over": 1}
    escalations = _samples(metrics, "dynamollm_router_escalations_total")
    assert {k[0][1]: v for k, v in escalations.items()} == {"fallback": 0, "queued": 1, "expired": 0}
    assert _samples(metrics, "dynamollm_router_queue_depth") == {(("pool", "p0"),): 2}
    now[0] += 120.0
    assert (("cls", "SS"), ("window", "1m")) not in _samples(metrics, "dynamollm_router_slo_attainment_ratio")
