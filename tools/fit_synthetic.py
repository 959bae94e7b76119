#!/usr/bin/env python3
"""Fit the synthetic workload generator (controller/sim/synthetic.py) to the Azure 2023 traces and print
its constants, so that every number in synthetic.py can be reproduced.

    PYTHONPATH=. .venv/bin/python tools/fit_synthetic.py [--data ../shared/data]

Per service (conversation, coding) it prints: the trace's start (UTC epoch), mean rate, the ON/OFF
structure (gaps longer than GAP_THRESHOLD_S are OFF periods; ON periods are what lies between), the
coefficient of variation of the per-minute ON rate with the Poisson part removed, the token-length
quantile tables, the Spearman rank correlation of input and output lengths and the Gaussian-copula
correlation that reproduces it, and the statistics the tests compare against (percentiles,
inter-arrival CV).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from controller.sim.synthetic import GAP_THRESHOLD_S, MODULATION_BIN_S, QUANTILE_LEVELS
from controller.sim.traces import Trace, read_trace_file

SERVICES = {"conversation": "AzureLLMInferenceTrace_conv.csv", "coding": "AzureLLMInferenceTrace_code.csv"}


def spearman(x: npt.NDArray[np.int32], y: npt.NDArray[np.int32]) -> float:
    """Spearman rank correlation with average ranks for ties."""

    def ranks(v: npt.NDArray[np.int32]) -> npt.NDArray[np.float64]:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        upper = np.cumsum(counts)
        mean_rank = upper - (counts - 1) / 2.0
        return mean_rank[inverse]

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def on_off(trace: Trace) -> tuple[float, float, int, float]:
    """(mean ON period s, mean OFF period s, number of OFF periods, ON rate req/s)."""
    gaps = np.diff(trace.arrival_s)
    off = gaps[gaps > GAP_THRESHOLD_S]
    on_time_s = trace.duration_s - float(off.sum())
    on_mean_s = on_time_s / (len(off) + 1)
    off_mean_s = float(off.mean()) if len(off) else 0.0
    return on_mean_s, off_mean_s, len(off), len(trace) / on_time_s


def modulation_cv(trace: Trace) -> float:
    """CV of the per-bin ON rate, Poisson noise removed (var(rate) - E[count] / on_time^2)."""
    gaps = np.diff(trace.arrival_s)
    n_bins = math.ceil(trace.duration_s / MODULATION_BIN_S)
    edges = np.arange(n_bins + 1) * MODULATION_BIN_S
    on_s = np.full(n_bins, float(MODULATION_BIN_S))
    on_s[-1] = trace.duration_s - edges[-2]
    for i in np.flatnonzero(gaps > GAP_THRESHOLD_S):
        a, b = trace.arrival_s[i], trace.arrival_s[i + 1]
        on_s -= np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None)
    counts = np.bincount((trace.arrival_s // MODULATION_BIN_S).astype(int), minlength=n_bins)[:n_bins]
    full = on_s >= MODULATION_BIN_S / 2  # bins mostly ON give a usable rate estimate
    rate = counts[full] / on_s[full]
    noise = float(np.mean(counts[full] / on_s[full] ** 2))
    return math.sqrt(max(float(rate.var()) - noise, 0.0)) / float(rate.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    levels = np.asarray(QUANTILE_LEVELS)
    for kind, file in SERVICES.items():
        trace = read_trace_file(args.data / "traces" / file)
        on_mean_s, off_mean_s, n_off, on_rate = on_off(trace)
        rho_s = spearman(trace.input_tokens, trace.output_tokens)
        gaps = np.diff(trace.arrival_s)
        print(f"== {kind} ({file}): {len(trace)} requests over {trace.duration_s:.3f} s")
        print(f"  start_unix_s          = {trace.start_unix_s!r}")
        print(f"  rate_rps              = {len(trace) / trace.duration_s:.4f}")
        print(f"  on_mean_s             = {on_mean_s:.2f}   ({n_off} OFF gaps > {GAP_THRESHOLD_S} s)")
        print(f"  off_mean_s            = {off_mean_s:.2f}")
        print(f"  on_rate_rps           = {on_rate:.4f}")
        print(f"  modulation_cv         = {modulation_cv(trace):.4f}   (per {MODULATION_BIN_S} s bin)")
        print(f"  spearman(in, out)     = {rho_s:.4f}")
        print(f"  copula_rho            = {2.0 * math.sin(math.pi * rho_s / 6.0):.4f}")
        print(f"  inter-arrival CV      = {gaps.std() / gaps.mean():.4f}")
        for name, tokens in (("input", trace.input_tokens), ("output", trace.output_tokens)):
            q = np.quantile(tokens, levels, method="linear")
            print(f"  {name}_quantiles_tokens = ({', '.join(f'{v:g}' for v in q)})")
            p50, p99 = np.percentile(tokens, [50, 99])
            print(f"    p50 {p50:g}  p99 {p99:g}  mean {tokens.mean():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
