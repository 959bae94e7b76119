"""Per-class peak forecaster: level, template trend, noise headroom, error scoring, backtests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import InvalidArgumentError
from controller.model.classes import ClassBins
from controller.policy.forecast import (
    DAY_S,
    WEEK_S,
    WeeklyTemplate,
    expected_max_sigmas,
    forecast_next_peak_rps,
    learn_template,
)
from controller.sim.evaluation import backtest_peak_forecast, forecast_error
from controller.sim.traces import read_trace_file

MONDAY_UNIX_S = datetime(2024, 5, 13, tzinfo=UTC).timestamp()


def test_constant_history_forecasts_the_constant() -> None:
    assert forecast_next_peak_rps([4.0] * 50, 60.0, 1800.0) == pytest.approx(4.0)
    assert forecast_next_peak_rps([4.0], 60.0, 1800.0) == pytest.approx(4.0)


def test_empty_history_uses_the_template_or_nothing() -> None:
    assert forecast_next_peak_rps([], 60.0, 1800.0) == 0.0
    template = WeeklyTemplate(tuple(float(h) for h in range(24)), period_s=DAY_S)
    # 10:00 -> 10:30 UTC: centres at 09:30 (9 rps) and 10:30 (10 rps).
    now = MONDAY_UNIX_S + 10 * 3600.0
    assert forecast_next_peak_rps([], 60.0, 1800.0, now_unix_s=now, template=template) == pytest.approx(10.0)


def test_poisson_noise_gives_an_unbiased_peak_forecast() -> None:
    rng = np.random.default_rng(3)
    rates = rng.poisson(2.0 * 60.0, 60 * 24) / 60.0  # 2 rps in 60 s bins for a day
    forecast, realised = backtest_peak_forecast(rates, 60.0, 1800.0)
    error = forecast_error(forecast, realised)
    assert error.epochs == 47
    assert error.mape < 0.08
    assert abs(error.bias) < 0.04
    # Without the headroom the mean rate would be ~13% below the peak every time.
    assert np.all(forecast > 2.05)


def test_template_trend_scales_the_recent_level() -> None:
    rising = WeeklyTemplate(tuple(1.0 + (h >= 12) * 1.0 for h in range(24)), period_s=DAY_S)
    history = [3.0] * 30
    at_11 = MONDAY_UNIX_S + 11 * 3600.0
    # Now 11:30, horizon to 12:00: the template rises from 1 (11:30 centre) to 1.5 (halfway to 12:30).
    plain = forecast_next_peak_rps(history, 60.0, 1800.0)
    up = forecast_next_peak_rps(history, 60.0, 1800.0, now_unix_s=at_11 + 1800.0, template=rising)
    assert plain == pytest.approx(3.0)
    assert up == pytest.approx(3.0 * 1.5, rel=0.02)
    at_night = MONDAY_UNIX_S + 2 * 3600.0
    assert forecast_next_peak_rps(
        history, 60.0, 1800.0, now_unix_s=at_night, template=rising
    ) == pytest.approx(3.0)


def test_trend_is_clipped() -> None:
    spike = WeeklyTemplate(tuple(0.01 if h < 12 else 100.0 for h in range(24)), period_s=DAY_S)
    now = MONDAY_UNIX_S + 11.5 * 3600.0  # 0.01 rps now, 50 rps by the horizon's end
    forecast = forecast_next_peak_rps([1.0] * 30, 60.0, 1800.0, now_unix_s=now, template=spike)
    assert forecast == pytest.approx(4.0)


def test_learn_template_needs_a_whole_period_and_aligns_to_utc() -> None:
    hourly = np.repeat(np.arange(24, dtype=float), 60)  # rate = hour of day, in 60 s bins
    end = MONDAY_UNIX_S + DAY_S
    assert learn_template(hourly[:-1], 60.0, end, period_s=DAY_S) is None
    daily = learn_template(hourly, 60.0, end, period_s=DAY_S)
    assert daily is not None and daily.rate_rps == tuple(float(h) for h in range(24))
    assert learn_template(hourly, 60.0, end) is None  # a day is not a week
    weekly = learn_template(np.tile(hourly, 7), 60.0, MONDAY_UNIX_S + WEEK_S)
    assert weekly is not None and len(weekly.rate_rps) == 168
    assert weekly.rate_rps[:3] == (0.0, 1.0, 2.0)  # slot 0 = Monday 00:00 UTC
    assert float(weekly.rate_at(MONDAY_UNIX_S + 3600.0)) == pytest.approx(0.5)  # between centres


def test_forecast_learns_a_daily_template_from_a_long_history() -> None:
    hourly = np.repeat(np.array([1.0] * 12 + [2.0] * 12), 60)
    now = MONDAY_UNIX_S + DAY_S + 11.5 * 3600.0  # the next day, half an hour before the step
    history = np.concatenate((hourly, hourly[: 11 * 60 + 30]))
    with_clock = forecast_next_peak_rps(history, 60.0, 1800.0, now_unix_s=now)
    without = forecast_next_peak_rps(history, 60.0, 1800.0)
    assert without == pytest.approx(1.0)
    assert with_clock > 1.4


def test_forecast_error_scores_only_epochs_with_load() -> None:
    error = forecast_error([1.0, 3.0, 5.0], [2.0, 2.0, 0.0])
    assert (error.epochs, error.scored) == (3, 2)
    assert error.mape == pytest.approx(0.5)
    assert error.bias == pytest.approx(0.0)
    assert error.under_share == pytest.approx(0.5)
    assert forecast_error([], []).scored == 0


def test_backtest_uses_only_bins_before_each_epoch() -> None:
    rng = np.random.default_rng(0)
    rates = rng.poisson(60.0, 300) / 60.0
    forecast, realised = backtest_peak_forecast(rates, 60.0, 600.0, warmup_s=1200.0)
    changed = rates.copy()
    changed[20:] *= 10.0  # everything from the first epoch's start on
    forecast2, _ = backtest_peak_forecast(changed, 60.0, 600.0, warmup_s=1200.0)
    assert forecast2[0] == forecast[0]
    assert forecast2[1] != forecast[1]
    assert realised[0] == rates[20:30].max()
    assert len(backtest_peak_forecast(rates, 60.0, 600.0, warmup_s=600.0, step_s=60.0)[0]) == 281


def test_expected_max_sigmas() -> None:
    assert expected_max_sigmas(1) == 0.0
    assert expected_max_sigmas(30) == pytest.approx(2.04, abs=0.01)


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (([1.0], 0.0, 60.0), {}, "bin_s"),
        (([1.0, -1.0], 60.0, 60.0), {}, "history_rps"),
        (([1.0, float("nan")], 60.0, 60.0), {}, "history_rps"),
        (([1.0], 60.0, 0.0), {}, "horizon_s"),
        (([1.0], 60.0, 60.0), {"alpha": 0.0}, "alpha"),
        (([1.0], 60.0, 60.0), {"headroom_window_s": -1.0}, "headroom_window_s"),
    ],
)
def test_bad_arguments_name_the_field(args: tuple[object, ...], kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        forecast_next_peak_rps(*args, **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_template_shape_is_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="rate_rps"):
        WeeklyTemplate((1.0,) * 24)  # weekly needs 168 slots
    with pytest.raises(InvalidArgumentError, match="period_s"):
        WeeklyTemplate((1.0,) * 12, period_s=43200.0)
    with pytest.raises(InvalidArgumentError):
        forecast_error([1.0], [1.0, 2.0])


def test_error_on_the_azure_2023_hours(shared_data: Path) -> None:
    """Honest bound on real data: 60 s bins per class, 30 min ahead, rolling each minute from minute 10."""
    for service, ceiling in (("conv", 0.6), ("code", 0.45)):
        trace = read_trace_file(shared_data / "traces" / f"AzureLLMInferenceTrace_{service}.csv")
        classes = ClassBins().class_indices(trace.input_tokens, trace.output_tokens).astype(np.int64)
        n_bins = int(trace.duration_s // 60)
        bins = (trace.arrival_s // 60).astype(np.int64)
        keep = bins < n_bins
        rates = (
            np.bincount(classes[keep] * n_bins + bins[keep], minlength=9 * n_bins).reshape(9, n_bins) / 60.0
        )
        pairs = [backtest_peak_forecast(r, 60.0, 1800.0, warmup_s=600.0, step_s=60.0) for r in rates]
        error = forecast_error(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
        assert 0.0 < error.mape < ceiling
