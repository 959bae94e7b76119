"""Evaluation of the policy core's predictions, for the simulator's report and the accuracy study: injected
predictor errors, predictor accuracy against the truth, forecast errors and forecast backtests. These
need the truth (a trace's future), so they live with the simulator, not in the pure core the live
controller runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.policy.forecast import (
    DEFAULT_HEADROOM_WINDOW_S,
    FloatArray,
    WeeklyTemplate,
    forecast_next_peak_rps,
    validated_history,
)
from controller.policy.predict import N_OUTPUT_BINS, Counts, OutputPredictor, predict_output_bin, update


def inject_accuracy(
    true_bins: npt.NDArray[np.integer], accuracy: float, rng: np.random.Generator
) -> npt.NDArray[np.int8]:
    """Predictions with a given accuracy: each true bin is kept with probability `accuracy`, else
    replaced by one of the other two bins chosen uniformly (accuracy 1.0 = oracle, 0.0 = always wrong).
    """
    if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        raise InvalidArgumentError("predictor_accuracy", accuracy, "a number in [0, 1]")
    truth = np.asarray(true_bins)
    if truth.size and (truth.min() < 0 or truth.max() >= N_OUTPUT_BINS):
        raise InvalidArgumentError("true_bins", "out of range", f"output bins 0..{N_OUTPUT_BINS - 1}")
    wrong = rng.random(truth.shape) >= accuracy
    shift = rng.integers(1, N_OUTPUT_BINS, size=truth.shape)
    return np.where(wrong, (truth + shift) % N_OUTPUT_BINS, truth).astype(np.int8)


@dataclass(frozen=True, slots=True)
class PredictorAccuracy:
    """How a predictor did on a replayed trace. `confusion[t][p]` = requests of true bin t predicted p."""

    requests: int
    accuracy: float
    under_share: float  # predicted a smaller bin than the truth (the request lands in a tighter pool)
    over_share: float
    confusion: tuple[Counts, ...]


def accuracy_of(
    true_bins: npt.NDArray[np.integer], predicted_bins: npt.NDArray[np.integer]
) -> PredictorAccuracy:
    """Accuracy, under/over-prediction shares and the confusion matrix of predicted vs true bins."""
    truth = np.asarray(true_bins, np.int64)
    pred = np.asarray(predicted_bins, np.int64)
    if truth.shape != pred.shape:
        raise InvalidArgumentError("predicted_bins", pred.shape, f"the shape of true_bins {truth.shape}")
    n = int(truth.size)
    matrix = np.bincount(truth * N_OUTPUT_BINS + pred, minlength=N_OUTPUT_BINS**2).reshape(3, 3)
    confusion = tuple((int(r[0]), int(r[1]), int(r[2])) for r in matrix)
    return PredictorAccuracy(
        requests=n,
        accuracy=float(np.trace(matrix)) / n if n else 1.0,
        under_share=float(np.tril(matrix, -1).sum()) / n if n else 0.0,
        over_share=float(np.triu(matrix, 1).sum()) / n if n else 0.0,
        confusion=confusion,
    )


def replay_predictions(
    input_tokens: npt.NDArray[np.integer],
    output_tokens: npt.NDArray[np.integer],
    state: OutputPredictor | None = None,
    *,
    learn_after: int = 0,
) -> npt.NDArray[np.int8]:
    """Online predictions for requests in arrival order, each made before the request is learned.

    Request i is predicted from the completions of requests 0 .. i - 1 - `learn_after` (with
    `learn_after` = 0 every earlier request counts as completed; a positive value models completions
    arriving later than the requests that follow them). No hints (the Azure traces carry none).
    """
    if learn_after < 0:
        raise InvalidArgumentError("learn_after", learn_after, "a non-negative number of requests")
    current = OutputPredictor() if state is None else state
    inputs = np.asarray(input_tokens)
    outputs = np.asarray(output_tokens)
    predicted = np.empty(len(inputs), np.int8)
    for i in range(len(inputs)):
        predicted[i] = predict_output_bin(current, int(inputs[i]), None)
        j = i - learn_after
        if j >= 0:
            current = update(current, int(inputs[j]), int(outputs[j]))
    return predicted


@dataclass(frozen=True, slots=True)
class ForecastError:
    """Forecast versus realised peaks over a run's epochs.

    `mape` is the mean of |forecast - realised| / realised over epochs with a realised peak > 0
    (`scored` of them); `bias` the mean signed relative error (> 0: over-forecast, costs energy);
    `under_share` the share of scored epochs forecast below the realised peak (risks the SLO).
    """

    epochs: int
    scored: int
    mape: float
    bias: float
    under_share: float


def forecast_error(
    forecast_peak_rps: Sequence[float] | FloatArray, realised_peak_rps: Sequence[float] | FloatArray
) -> ForecastError:
    """Score per-epoch peak forecasts against the realised peaks (same order, same length)."""
    forecast = np.asarray(forecast_peak_rps, dtype=np.float64)
    realised = np.asarray(realised_peak_rps, dtype=np.float64)
    if forecast.shape != realised.shape or forecast.ndim != 1:
        raise InvalidArgumentError(
            "forecast_peak_rps", forecast.shape, f"one forecast per realised peak {realised.shape}"
        )
    scored = realised > 0.0
    n = int(scored.sum())
    if n == 0:
        return ForecastError(len(forecast), 0, 0.0, 0.0, 0.0)
    relative = (forecast[scored] - realised[scored]) / realised[scored]
    return ForecastError(
        epochs=len(forecast),
        scored=n,
        mape=float(np.abs(relative).mean()),
        bias=float(relative.mean()),
        under_share=float((relative < 0.0).mean()),
    )


def backtest_peak_forecast(
    rates_rps: Sequence[float] | FloatArray,
    bin_s: float,
    horizon_s: float,
    *,
    start_unix_s: float | None = None,
    template: WeeklyTemplate | None = None,
    warmup_s: float | None = None,
    step_s: float | None = None,
    alpha: float | None = None,
    headroom_window_s: float = DEFAULT_HEADROOM_WINDOW_S,
) -> tuple[FloatArray, FloatArray]:
    """(forecast, realised) peak per epoch of a whole rate series, each forecast made from the bins
    before its epoch only. Epochs of `horizon_s` start after `warmup_s` (default one horizon), every
    `step_s` (default one horizon: back to back; shorter steps give overlapping epochs, for short
    series), while a whole epoch remains. `start_unix_s` is the UTC time of the first bin's start.
    """
    rates = validated_history(rates_rps, bin_s)
    per_epoch = max(1, round(horizon_s / bin_s))
    first = per_epoch if warmup_s is None else max(1, math.ceil(warmup_s / bin_s))
    step = per_epoch if step_s is None else max(1, round(step_s / bin_s))
    boundaries = range(first, len(rates) - per_epoch + 1, step)
    forecast = np.array(
        [
            forecast_next_peak_rps(
                rates[:b],
                bin_s,
                horizon_s,
                now_unix_s=None if start_unix_s is None else start_unix_s + b * bin_s,
                template=template,
                alpha=alpha,
                headroom_window_s=headroom_window_s,
            )
            for b in boundaries
        ],
        dtype=np.float64,
    )
    realised = np.array([rates[b : b + per_epoch].max() for b in boundaries], dtype=np.float64)
    return forecast, realised
