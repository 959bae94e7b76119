"""The router's Prometheus metrics, served at `/metrics` on its API address by `controller.router.app`.

The request path counts into them as it goes (requests, TTFT/TBT, escalations, predictions); the rolling
ratios (SLO attainment and predictor accuracy over the last minute, five minutes and hour) and the queue
depths are read at the scrape. Names follow `dynamollm_router_<quantity>_<unit>`; every metric lives in
the router's own registry. docs/metrics.md, *Router*, lists them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# The windows the rolling ratios cover, by label (wall seconds).
WINDOWS_S: Mapping[str, float] = {"1m": 60.0, "5m": 300.0, "1h": 3600.0}
ESCALATION_STEPS = ("fallback", "queued", "expired")
PREDICTION_OUTCOMES = ("correct", "under", "over")
BUCKET_S = 1.0


class RollingRatio:
    """Hits out of events per key over the last hour, kept in one-second buckets, so that a scrape costs
    at most an hour of buckets per key however many requests went through. Time is the caller's."""

    def __init__(self, horizon_s: float = max(WINDOWS_S.values())) -> None:
        self.horizon_s = horizon_s
        # per key: (bucket start, hits, events), oldest first
        self._buckets: dict[str, deque[list[float]]] = {}

    def add(self, key: str, hit: bool, now_s: float) -> None:
        buckets = self._buckets.setdefault(key, deque())
        start_s = math.floor(now_s / BUCKET_S) * BUCKET_S
        if not buckets or buckets[-1][0] != start_s:
            buckets.append([start_s, 0.0, 0.0])
        buckets[-1][1] += 1.0 if hit else 0.0
        buckets[-1][2] += 1.0
        self._prune(buckets, now_s)

    def ratios(
        self, now_s: float, windows_s: Mapping[str, float] = WINDOWS_S
    ) -> dict[tuple[str, str], float]:
        """{(key, window): hits / events} over each window ending at `now_s`; a key with no event in a
        window has no ratio for it (a ratio of nothing is not 1)."""
        out: dict[tuple[str, str], float] = {}
        for key, buckets in self._buckets.items():
            self._prune(buckets, now_s)
            for window, span_s in windows_s.items():
                inside = [b for b in buckets if b[0] > now_s - span_s]  # to within a bucket
                events = sum(b[2] for b in inside)
                if events:
                    out[(key, window)] = sum(b[1] for b in inside) / events
        return out

    def _prune(self, buckets: deque[list[float]], now_s: float) -> None:
        while buckets and buckets[0][0] <= now_s - self.horizon_s - BUCKET_S:
            buckets.popleft()


class _RatioCollector(Collector):
    """A gauge family computed from a RollingRatio at each scrape."""

    def __init__(
        self, name: str, doc: str, labels: list[str], ratio: RollingRatio, now_s: Callable[[], float]
    ) -> None:
        self._name, self._doc, self._labels = name, doc, labels
        self._ratio, self._now_s = ratio, now_s

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._doc, labels=self._labels)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labels)
        for (key, window), value in sorted(self._ratio.ratios(self._now_s()).items()):
            family.add_metric([key, window] if len(self._labels) == 2 else [window], value)
        yield family


class RouterMetrics:
    """The router's registry and the metrics the request path updates; `now_s` is the monotonic clock the
    rolling windows read (injected)."""

    def __init__(self, now_s: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.now_s = now_s
        self.requests = Counter(
            "dynamollm_router_requests_total",
            "Requests by routed class, pool and outcome (ok, failed, rejected)",
            ["cls", "pool", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "dynamollm_router_ttft_seconds",
            "Time to first token at the router by true class (engine seconds)",
            ["cls"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )
        self.tbt = Histogram(
            "dynamollm_router_tbt_seconds",
            "Mean time between tokens per request by true class (engine seconds)",
            ["cls"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 1),
        )
        self.queue_depth = Gauge(
            "dynamollm_router_queue_depth", "Requests waiting per pool", ["pool"], registry=r
        )
        self.escalations = Counter(
            "dynamollm_router_escalations_total",
            "Requests that went past their pool's free instances, by the step they reached",
            ["step"],
            registry=r,
        )
        self.predictions = Counter(
            "dynamollm_router_predictions_total",
            "Output-length bin predictions checked against the answer, by outcome",
            ["outcome"],
            registry=r,
        )
        for step in ESCALATION_STEPS:
            self.escalations.labels(step)
        for outcome in PREDICTION_OUTCOMES:
            self.predictions.labels(outcome)
        self.slo = RollingRatio()
        self.accuracy = RollingRatio()
        r.register(
            _RatioCollector(
                "dynamollm_router_slo_attainment_ratio",
                "Share of requests that met their class's TTFT and TBT targets over the window, by class",
                ["cls", "window"],
                self.slo,
                now_s,
            )
        )
        r.register(
            _RatioCollector(
                "dynamollm_router_predictor_accuracy_ratio",
                "Share of output-length bin predictions that were right over the window",
                ["window"],
                self.accuracy,
                now_s,
            )
        )

    def slo_outcome(self, cls: str, met: bool) -> None:
        self.slo.add(cls, met, self.now_s())

    def prediction(self, predicted_bin: int, true_bin: int) -> None:
        outcome = "correct" if predicted_bin == true_bin else "under" if predicted_bin < true_bin else "over"
        self.predictions.labels(outcome).inc()
        self.accuracy.add("", predicted_bin == true_bin, self.now_s())

    def exposition(self, queue_depths: Mapping[str, int]) -> bytes:
        for pool, depth in queue_depths.items():
            self.queue_depth.labels(pool).set(depth)
        return generate_latest(self.registry)
