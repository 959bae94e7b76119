"""Output-length predictor: online per-bucket statistics, hints, drift, the accuracy knob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api.errors import InvalidArgumentError
from controller.model.classes import ClassBins
from controller.policy.predict import (
    OutputPredictor,
    default_bucket_edges_tokens,
    predict_output_bin,
    predict_output_bins,
    update,
    update_many,
)
from controller.sim.evaluation import accuracy_of, inject_accuracy, replay_predictions
from controller.sim.traces import read_trace_file

S, M, L = 0, 1, 2


def learned(pairs: list[tuple[int, int]], state: OutputPredictor | None = None) -> OutputPredictor:
    current = OutputPredictor() if state is None else state
    for input_tokens, output_tokens in pairs:
        current = update(current, input_tokens, output_tokens)
    return current


def test_cold_start_predicts_the_largest_bin_the_hint_allows() -> None:
    empty = OutputPredictor()
    assert empty.completions == 0
    assert predict_output_bin(empty, 500, None) == L
    assert predict_output_bin(empty, 500, 200) == M
    assert predict_output_bin(empty, 500, 50) == S


def test_mode_of_the_prompt_bucket_wins_and_ties_go_to_the_larger_bin() -> None:
    state = learned([(300, 50)] * 3 + [(300, 500)] * 2)
    assert predict_output_bin(state, 300, None) == S
    state = learned([(300, 500)], state)
    assert predict_output_bin(state, 300, None) == L  # 3 S vs 3 L: tie goes up


def test_buckets_are_finer_than_input_bins() -> None:
    # 300 and 900 tokens share the M input bin but not a bucket.
    state = learned([(300, 20)] * 5 + [(900, 600)] * 5)
    assert state.bucket(300) != state.bucket(900)
    assert predict_output_bin(state, 300, None) == S
    assert predict_output_bin(state, 900, None) == L


def test_empty_bucket_backs_off_to_its_input_bin_only() -> None:
    state = learned([(300, 200)] * 4 + [(5000, 20)] * 9)
    # 600 tokens: empty bucket in the M input bin (256..1023), which holds only M outputs.
    assert state.counts[state.bucket(600)] == (0, 0, 0)
    assert predict_output_bin(state, 600, None) == M
    # 100 tokens: S input bin has no data at all -> conservative.
    assert predict_output_bin(state, 100, None) == L


def test_hint_excludes_bins_above_it() -> None:
    state = learned([(2000, 800)] * 5 + [(2000, 150)] * 2 + [(2000, 10)])
    assert predict_output_bin(state, 2000, None) == L
    assert predict_output_bin(state, 2000, 349) == M
    assert predict_output_bin(state, 2000, 99) == S
    assert predict_output_bin(state, 2000, 350) == L


def test_counts_halve_at_the_cap_so_drift_is_followed() -> None:
    state = learned([(3000, 600)] * 7, OutputPredictor(max_count_per_bucket=8))
    assert state.counts[state.bucket(3000)] == (0, 0, 7)
    state = update(state, 3000, 600)
    assert state.counts[state.bucket(3000)] == (0, 0, 4)
    state = learned([(3000, 30)] * 5, state)
    assert predict_output_bin(state, 3000, None) == S


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 2000)), max_size=60),
    st.integers(2, 12),
)
def test_update_many_equals_folded_update(pairs: list[tuple[int, int]], cap: int) -> None:
    start = OutputPredictor(max_count_per_bucket=cap)
    inputs = np.array([p[0] for p in pairs], dtype=np.int64)
    outputs = np.array([p[1] for p in pairs], dtype=np.int64)
    assert update_many(start, inputs, outputs) == learned(pairs, start)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 2000)), max_size=40),
    st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 1000)), min_size=1, max_size=20),
)
def test_vectorised_prediction_equals_scalar(
    pairs: list[tuple[int, int]], queries: list[tuple[int, int]]
) -> None:
    state = learned(pairs)
    tokens = np.array([q[0] for q in queries])
    hints = np.array([q[1] for q in queries])
    expected = [predict_output_bin(state, int(t), int(h) if h > 0 else None) for t, h in queries]
    assert predict_output_bins(state, tokens, hints).tolist() == expected
    assert predict_output_bins(state, tokens).tolist() == [
        predict_output_bin(state, int(t), None) for t in tokens
    ]


def test_bucket_edges_include_the_class_edges() -> None:
    bins = ClassBins(input_edges_tokens=(300, 1500))
    edges = default_bucket_edges_tokens(bins, 2)
    assert {300, 1500} <= set(edges)
    assert list(edges) == sorted(set(edges))
    OutputPredictor(bins=bins, bucket_edges_tokens=edges)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bucket_edges_tokens": (100, 1024)}, "bucket_edges_tokens"),  # 256 missing
        ({"bucket_edges_tokens": (256, 256, 1024)}, "bucket_edges_tokens"),
        ({"max_count_per_bucket": 1}, "max_count_per_bucket"),
        ({"counts": ((0, 0, 0),)}, "counts"),
    ],
)
def test_bad_state_is_rejected(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        OutputPredictor(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_bad_request_values_are_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="max_tokens_hint"):
        predict_output_bin(OutputPredictor(), 10, 0)
    with pytest.raises(InvalidArgumentError, match="input_tokens"):
        predict_output_bin(OutputPredictor(), -1, None)
    with pytest.raises(InvalidArgumentError, match="tokens"):
        update(OutputPredictor(), 10, -5)


def test_inject_accuracy_extremes_and_rate() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 60_000)
    assert np.array_equal(inject_accuracy(truth, 1.0, rng), truth)
    never = inject_accuracy(truth, 0.0, rng)
    assert not np.any(never == truth)
    noisy = inject_accuracy(truth, 0.6, np.random.default_rng(1))
    assert np.mean(noisy == truth) == pytest.approx(0.6, abs=0.01)
    # Wrong bins are uniform over the two others.
    wrong_for_s = noisy[(truth == S) & (noisy != truth)]
    assert np.mean(wrong_for_s == M) == pytest.approx(0.5, abs=0.02)
    again = inject_accuracy(truth, 0.6, np.random.default_rng(1))
    assert np.array_equal(noisy, again)


@pytest.mark.parametrize("accuracy", [-0.1, 1.5, float("nan")])
def test_inject_accuracy_rejects_bad_accuracy(accuracy: float) -> None:
    with pytest.raises(InvalidArgumentError, match="predictor_accuracy"):
        inject_accuracy(np.zeros(3, np.int64), accuracy, np.random.default_rng(0))


def test_accuracy_of_counts_under_and_over() -> None:
    result = accuracy_of(np.array([0, 1, 2, 2]), np.array([0, 2, 1, 2]))
    assert result.accuracy == 0.5
    assert result.under_share == 0.25 and result.over_share == 0.25
    assert result.confusion == ((1, 0, 0), (0, 0, 1), (0, 1, 1))


def test_replay_predicts_before_learning() -> None:
    inputs = np.array([500, 500, 500])
    outputs = np.array([20, 20, 20])
    assert replay_predictions(inputs, outputs).tolist() == [L, S, S]
    assert replay_predictions(inputs, outputs, learn_after=1).tolist() == [L, L, S]


@pytest.mark.parametrize(("service", "floor"), [("conv", 0.74), ("code", 0.93)])
def test_online_accuracy_on_the_azure_2023_traces(shared_data: Path, service: str, floor: float) -> None:
    trace = read_trace_file(shared_data / "traces" / f"AzureLLMInferenceTrace_{service}.csv")
    truth = ClassBins().class_indices(trace.input_tokens, trace.output_tokens) % 3
    predicted = replay_predictions(trace.input_tokens, trace.output_tokens)
    assert accuracy_of(truth, predicted).accuracy >= floor


def test_smallest_cap_keeps_learning() -> None:
    start = OutputPredictor(max_count_per_bucket=2)
    inputs = np.full(9, 3000)
    outputs = np.array([20, 600] * 4 + [20])
    state = update_many(start, inputs, outputs)
    assert state == learned([(3000, int(o)) for o in outputs], start)
    assert sum(state.counts[state.bucket(3000)]) < 2
