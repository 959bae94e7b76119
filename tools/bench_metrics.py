#!/usr/bin/env python3
"""What the metrics cost the daemons that keep them, in-process (no network, no scrape client).

    PYTHONPATH=. .venv/bin/python tools/bench_metrics.py [--requests 200000] [--scrapes 20]

1. Router, per request: the SLO outcome and the prediction check it records when a request ends
   (`RouterMetrics.slo_outcome` + `prediction`: two rolling-window updates and a counter), in
   microseconds. Target: under 10 us, next to a request path of milliseconds.
2. Router, one scrape at the worst case: every one of the nine classes with a full hour of one-second
   buckets behind it (the rolling windows' largest state), in milliseconds; and the buckets it holds
   (bounded by the hour, whatever the request rate). Target: under 50 ms, far inside a 15-s scrape.
3. Controller, one energy-ledger interval for 9 pools x 9 classes (attribution and 5 series each) and one
   scrape of the result, in milliseconds. Target: under 10 ms per interval (it runs once a minute).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.metrics import ControllerMetrics
from controller.model.classes import CLASS_NAMES
from controller.router.metrics import BUCKET_S, WINDOWS_S, RouterMetrics


def per_request_us(requests: int) -> float:
    metrics = RouterMetrics(time.monotonic)
    started = time.perf_counter()
    for i in range(requests):
        metrics.slo_outcome(CLASS_NAMES[i % 9], i % 50 != 0)
        metrics.prediction(i % 3, (i // 3) % 3)
    return (time.perf_counter() - started) / requests * 1e6


def worst_scrape_ms(scrapes: int) -> tuple[float, int]:
    now_s = time.monotonic()
    metrics = RouterMetrics(lambda: now_s)
    horizon_s = max(WINDOWS_S.values())
    for cls in CLASS_NAMES:
        metrics.slo._buckets[cls] = deque(
            [now_s - horizon_s + k * BUCKET_S, 9.0, 10.0] for k in range(1, int(horizon_s / BUCKET_S) + 1)
        )
    started = time.perf_counter()
    for _ in range(scrapes):
        metrics.exposition({"p": 3})
    buckets = sum(len(b) for b in metrics.slo._buckets.values())
    return (time.perf_counter() - started) / scrapes * 1e3, buckets


def ledger_interval_ms(intervals: int) -> float:
    metrics = ControllerMetrics()
    pools = [f"pool{i}" for i in range(9)]
    energy_j = {p: 1e6 for p in pools}
    requests = {(p, c): 100 for p in pools for c in CLASS_NAMES}
    tokens = {(p, c): 20000 for p in pools for c in CLASS_NAMES}
    started = time.perf_counter()
    for _ in range(intervals):
        metrics.ledger_interval(energy_j, requests, tokens)
        metrics.exposition()
    return (time.perf_counter() - started) / intervals * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--scrapes", type=int, default=20)
    args = p.parse_args()
    request_us = per_request_us(args.requests)
    scrape_ms, buckets = worst_scrape_ms(args.scrapes)
    ledger_ms = ledger_interval_ms(args.scrapes)
    print(f"router, per request (SLO outcome + prediction):  {request_us:8.2f} us   target < 10 us")
    print(f"router, one scrape, 9 classes x 1 h of buckets:  {scrape_ms:8.2f} ms   target < 50 ms")
    print(f"  ({buckets} buckets: the hour's bound, whatever the request rate)")
    print(f"controller, ledger interval 9x9 + one scrape:    {ledger_ms:8.2f} ms   target < 10 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
