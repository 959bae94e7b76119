"""Synthetic workloads: fitted statistics, determinism, and agreement with the real Azure traces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError
from controller.sim.synthetic import DEFAULT_DURATION_S, WORKLOADS
from controller.sim.traces import load_trace, read_trace_file, synthetic_trace

# Published token statistics (shared/data/README.md): (input p50, input p99, output p50, output p99).
PUBLISHED = {"conversation": (1020, 4142, 129, 601), "coding": (1469, 7436, 13, 252)}


@pytest.mark.parametrize("kind", ["conversation", "coding"])
def test_token_percentiles_match_published(kind: str) -> None:
    trace = synthetic_trace(kind, 4 * 3600.0, seed=1)
    in_p50, in_p99, out_p50, out_p99 = PUBLISHED[kind]
    assert np.percentile(trace.input_tokens, 50) == pytest.approx(in_p50, rel=0.05)
    assert np.percentile(trace.input_tokens, 99) == pytest.approx(in_p99, rel=0.05)
    assert np.percentile(trace.output_tokens, 50) == pytest.approx(out_p50, rel=0.08)
    assert np.percentile(trace.output_tokens, 99) == pytest.approx(out_p99, rel=0.08)
    assert trace.input_tokens.min() >= 1 and trace.output_tokens.min() >= 1


@pytest.mark.parametrize(("kind", "cv_lo", "cv_hi"), [("conversation", 0.95, 1.3), ("coding", 6.0, 30.0)])
def test_rate_and_burstiness(kind: str, cv_lo: float, cv_hi: float) -> None:
    trace = synthetic_trace(kind, 12 * 3600.0, seed=2)
    assert len(trace) / trace.duration_s == pytest.approx(WORKLOADS[kind].rate_rps, rel=0.1)
    gaps = np.diff(trace.arrival_s)
    assert cv_lo < gaps.std() / gaps.mean() < cv_hi


def test_rate_override_and_span() -> None:
    trace = synthetic_trace("conversation", 1800.0, seed=3, rate_rps=20.0)
    assert len(trace) / 1800.0 == pytest.approx(20.0, rel=0.1)
    assert trace.duration_s == 1800.0 and trace.arrival_s[-1] < 1800.0 and trace.arrival_s[0] >= 0.0
    assert trace.start_unix_s == WORKLOADS["conversation"].start_unix_s


def test_deterministic_per_seed() -> None:
    a, b, c = (synthetic_trace("coding", 600.0, seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.arrival_s[: len(c)], c.arrival_s[: len(a)])


def test_load_trace_synthetic_defaults_to_one_hour() -> None:
    trace = load_trace("synthetic:conversation", seed=0)
    assert trace.duration_s == DEFAULT_DURATION_S == 3600.0
    assert trace.name == "synthetic:conversation"
    later = load_trace("synthetic:conversation", start_s=600.0, duration_s=60.0, seed=0)
    assert later.duration_s == 60.0
    assert later.start_unix_s == pytest.approx(WORKLOADS["conversation"].start_unix_s + 600.0)


def test_the_evaluation_workloads_have_their_stated_shapes() -> None:
    """Workloads of other shapes than the fitted hours, for evaluating on what nothing was tuned on."""
    days = load_trace("synthetic:conversation-2day", seed=0)
    assert days.duration_s == 2 * 86400.0
    hourly = np.bincount((days.arrival_s // 3600).astype(np.int64), minlength=48)
    assert 3.0 < hourly.max() / hourly.min() < 5.0  # 4x from trough to peak, with Poisson noise
    assert len(days) / days.duration_s == pytest.approx(WORKLOADS["conversation"].rate_rps, rel=0.05)
    peak_hour_utc = (days.start_unix_s / 3600 + np.argmax(hourly[:24])) % 24
    assert abs(peak_hour_utc - 20.0) <= 2.0
    long = load_trace("synthetic:long-context", seed=0)
    assert np.percentile(long.input_tokens, 50) == pytest.approx(2900, rel=0.05)
    beyond = np.mean(long.input_tokens + long.output_tokens > 4096)
    assert 0.05 < beyond < 0.12  # close to the context: some prompts with their answers exceed it


def test_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="synthetic:conversation"):
        synthetic_trace("chat", 60.0, 0)
    with pytest.raises(InvalidArgumentError, match="--duration"):
        synthetic_trace("coding", -1.0, 0)
    with pytest.raises(InvalidArgumentError, match="rate_rps"):
        synthetic_trace("coding", 60.0, 0, rate_rps=0.0)


@pytest.mark.parametrize(("kind", "file"), [("conversation", "conv"), ("coding", "code")])
def test_fitted_constants_match_real_trace(shared_data: Path, kind: str, file: str) -> None:
    real = read_trace_file(shared_data / "traces" / f"AzureLLMInferenceTrace_{file}.csv")
    params = WORKLOADS[kind]
    assert params.start_unix_s == pytest.approx(real.start_unix_s, abs=1e-3)
    assert params.rate_rps == pytest.approx(len(real) / real.duration_s, rel=1e-3)
    assert params.input_quantiles_tokens[8] == np.percentile(real.input_tokens, 50)
    assert params.output_quantiles_tokens[15] == pytest.approx(np.percentile(real.output_tokens, 99))
    synthetic = synthetic_trace(kind, 4 * 3600.0, seed=4)
    for real_tokens, synthetic_tokens in (
        (real.input_tokens, synthetic.input_tokens),
        (real.output_tokens, synthetic.output_tokens),
    ):
        assert np.mean(synthetic_tokens) == pytest.approx(np.mean(real_tokens), rel=0.1)


def test_no_import_cycle_between_traces_and_synthetic() -> None:
    """`synthetic` is a leaf that generates arrays; `traces` wraps them in a Trace, never the other way."""
    root = Path(__file__).resolve().parents[2]
    code = "import sys, controller.sim.synthetic; print('controller.sim.traces' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
