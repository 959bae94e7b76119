"""Load forecasting per request class: the peak arrival rate of the coming cluster epoch.

Flow: at every cluster epoch the simulator (or the live controller) hands the cluster manager each
class's observed arrival rate in fixed bins (`ClusterObs.class_rate_history_rps`, 60 s bins, oldest
first); the cluster manager calls `forecast_next_peak_rps` per class and sizes the pools for the result.
The simulator scores the forecasts against the realised peaks with `forecast_error`.

The forecast (all rates in requests/s; "peak" = the largest bin rate within the horizon):

    peak = level * trend + expected_max_sigmas(horizon_s / bin_s) * noise * sqrt(trend)

* level: exponentially weighted mean of recent bins (time constant DEFAULT_EWMA_TAU_S, or the per-bin
  weight `alpha`), the current load with the noise of single bins averaged out.
* trend: from a weekly template, the hour-of-week mean-rate profile (`WeeklyTemplate`): the template's
  largest rate over [now, now + horizon] divided by its rate at the level's effective time (the EWMA
  lags by its mean weight age), clipped to [1/MAX_TREND, MAX_TREND]. The template is given by the
  caller or learned from the history itself once the history spans a whole week; with at least a day
  but less than a week, an hour-of-day template stands in (the daily cycle dominates LLM services);
  with less, or no wall time (`now_unix_s` None), trend = 1. The template supplies the shape, recent
  history the level, so a template from another week or a scaled service still applies.
* headroom (peak over mean): noise = the standard deviation of the one-bin-ahead EWMA errors over the
  last `headroom_window_s`, learned from recent bins; the horizon's peak is then the mean plus the
  expected largest of horizon/bin standard normal draws (~2.0 for 30 bins) times the noise, scaled by
  sqrt(trend) as Poisson noise grows with the rate. It carries the bin-to-bin burstiness (Poisson
  noise at low rates, bursts of the coding service) that the mean forecast does not, and needs only a
  few bins of history.

With an empty history the forecast is the template's peak over the horizon (0 without a template).
Pure: sequences in, floats and frozen values out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError

DAY_S = 86400.0
WEEK_S = 7 * DAY_S
SLOT_S = 3600.0  # template resolution: one value per hour of the week (or day)
# Unix time 0 was a Thursday; shifting by 3 days puts slot 0 of a weekly template at Monday 00:00 UTC.
_WEEK_PHASE_SHIFT_S = 3 * DAY_S
DEFAULT_EWMA_TAU_S = 300.0
DEFAULT_HEADROOM_WINDOW_S = 7200.0
MAX_TREND = 4.0
# Template evaluation points per horizon (its maximum over the horizon is taken on this grid).
_TREND_SAMPLES = 16

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class WeeklyTemplate:
    """Mean arrival rate per slot of a repeating period (an hour-of-week profile by default).

    `rate_rps[k]` is the mean rate of slot k, slot 0 starting at Monday 00:00 UTC (weekly) or at
    00:00 UTC (daily). Between slot centres the rate is interpolated linearly (wrapping around).
    """

    rate_rps: tuple[float, ...]
    period_s: float = WEEK_S
    slot_s: float = SLOT_S

    def __post_init__(self) -> None:
        if self.period_s not in (WEEK_S, DAY_S):
            raise InvalidArgumentError("template.period_s", self.period_s, (WEEK_S, DAY_S))
        if not (self.slot_s > 0 and math.isclose(self.period_s / self.slot_s, len(self.rate_rps))):
            raise InvalidArgumentError(
                "template.rate_rps", len(self.rate_rps), f"period_s / slot_s = {self.period_s / self.slot_s}"
            )
        if not all(math.isfinite(r) and r >= 0.0 for r in self.rate_rps):
            raise InvalidArgumentError("template.rate_rps", "negative or not finite", "rates >= 0")

    def rate_at(self, unix_s: float | FloatArray) -> FloatArray:
        """Template rate (rps) at UTC time(s) `unix_s`."""
        rates = np.asarray(self.rate_rps, dtype=np.float64)
        position = _phase_s(np.asarray(unix_s, dtype=np.float64), self.period_s) / self.slot_s - 0.5
        lo = np.floor(position)
        frac = position - lo
        n = len(rates)
        i = lo.astype(np.int64) % n
        return np.asarray(rates[i] * (1.0 - frac) + rates[(i + 1) % n] * frac, dtype=np.float64)


def _phase_s(unix_s: FloatArray, period_s: float) -> FloatArray:
    shift = _WEEK_PHASE_SHIFT_S if period_s == WEEK_S else 0.0
    return np.asarray(np.mod(unix_s + shift, period_s), dtype=np.float64)


def learn_template(
    history_rps: Sequence[float] | FloatArray,
    bin_s: float,
    end_unix_s: float,
    *,
    period_s: float = WEEK_S,
    slot_s: float = SLOT_S,
) -> WeeklyTemplate | None:
    """The mean rate per slot of `period_s` over the history (bins ending at `end_unix_s`), or None
    when the history does not cover a whole period (some slot would be unseen)."""
    rates = validated_history(history_rps, bin_s)
    if len(rates) * bin_s < period_s:
        return None
    starts = end_unix_s - bin_s * np.arange(len(rates), 0, -1, dtype=np.float64)
    n_slots = round(period_s / slot_s)
    slot = (_phase_s(starts + 0.5 * bin_s, period_s) // slot_s).astype(np.int64) % n_slots
    sums = np.bincount(slot, weights=rates, minlength=n_slots)
    counts = np.bincount(slot, minlength=n_slots)
    if np.any(counts == 0):
        return None
    return WeeklyTemplate(tuple((sums / counts).tolist()), period_s, slot_s)


def forecast_next_peak_rps(
    history_rps: Sequence[float] | FloatArray,
    bin_s: float,
    horizon_s: float,
    *,
    now_unix_s: float | None = None,
    template: WeeklyTemplate | None = None,
    alpha: float | None = None,
    headroom_window_s: float = DEFAULT_HEADROOM_WINDOW_S,
) -> float:
    """Forecast of the largest bin rate (rps) of one class over [now, now + horizon_s).

    `history_rps`: the class's rate per bin of `bin_s` seconds, oldest first, ending now.
    `now_unix_s`: UTC time of now (aligns the template; None = no template trend). `template`: a
    weekly (or daily) template; None = learned from the history when it spans a day or more.
    `alpha`: EWMA weight of the newest bin (None = 1 - exp(-bin_s / DEFAULT_EWMA_TAU_S)).
    """
    rates, alpha, template, horizon_points = _prepared(
        history_rps, bin_s, horizon_s, now_unix_s, template, alpha, headroom_window_s
    )
    if len(rates) == 0:
        if template is None or horizon_points is None:
            return 0.0
        return float(template.rate_at(horizon_points).max())

    level, trend = _level_and_trend(rates, bin_s, alpha, template, horizon_points, now_unix_s)
    per_horizon = max(1, round(horizon_s / bin_s))
    # Bin noise grows like a Poisson count's: with the square root of the mean rate.
    noise_rps = _noise_rps(rates, alpha, headroom_window_s, bin_s) * math.sqrt(trend)
    return level * trend + expected_max_sigmas(per_horizon) * noise_rps


def forecast_next_rate_rps(
    history_rps: Sequence[float] | FloatArray,
    bin_s: float,
    horizon_s: float,
    *,
    now_unix_s: float | None = None,
    template: WeeklyTemplate | None = None,
    alpha: float | None = None,
    headroom_window_s: float = DEFAULT_HEADROOM_WINDOW_S,
) -> float:
    """Forecast of the arrival RATE (rps) to provision for over [now, now + horizon_s): the largest
    Poisson intensity the horizon is expected to bring, not the largest noisy bin count.

    A capacity measured under Poisson arrivals at rate r (the profile's `max_load_rps`) already absorbs
    the Poisson noise of a stream at r, so sizing for `forecast_next_peak_rps` (whose headroom is
    mostly that very noise at low rates) counts it twice. Here the headroom is only what is NOT
    Poisson noise: the one-bin-ahead errors' variance minus the Poisson variance of one bin at the
    level (level / bin_s), the rest being genuine rate changes; plus the Poisson noise left in the
    EWMA level itself (variance alpha / (2 - alpha) * level / bin_s), which is a forecast error:

        rate = level * trend + expected_max_sigmas(horizon / bin) * sqrt(excess^2 + level noise^2)

    Arguments as `forecast_next_peak_rps`; never above it (for the same inputs).
    """
    rates, alpha, template, horizon_points = _prepared(
        history_rps, bin_s, horizon_s, now_unix_s, template, alpha, headroom_window_s
    )
    if len(rates) == 0:
        return forecast_next_peak_rps(rates, bin_s, horizon_s, now_unix_s=now_unix_s, template=template)
    level, trend = _level_and_trend(rates, bin_s, alpha, template, horizon_points, now_unix_s)
    noise_var = _noise_rps(rates, alpha, headroom_window_s, bin_s) ** 2
    poisson_var = level / bin_s
    level_var = alpha / (2.0 - alpha) * poisson_var
    # The observed errors bound the forecast error (a flat history has neither noise nor error).
    excess_var = min(noise_var, max(0.0, noise_var - poisson_var) + level_var)
    per_horizon = max(1, round(horizon_s / bin_s))
    margin_rps = expected_max_sigmas(per_horizon) * math.sqrt(excess_var * trend)
    return level * trend + margin_rps


def _prepared(
    history_rps: Sequence[float] | FloatArray,
    bin_s: float,
    horizon_s: float,
    now_unix_s: float | None,
    template: WeeklyTemplate | None,
    alpha: float | None,
    headroom_window_s: float,
) -> tuple[FloatArray, float, WeeklyTemplate | None, FloatArray | None]:
    """The forecasters' checked inputs: the history, the EWMA weight (default from the time constant),
    the template (learned from the history when not given: weekly, else daily) and the horizon's
    sample times for the template's trend (None without a template or a time)."""
    rates = validated_history(history_rps, bin_s)
    if not (math.isfinite(horizon_s) and horizon_s > 0):
        raise InvalidArgumentError("horizon_s", horizon_s, "a positive number of seconds")
    if alpha is None:
        alpha = 1.0 - math.exp(-bin_s / DEFAULT_EWMA_TAU_S)
    if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
        raise InvalidArgumentError("alpha", alpha, "a number in (0, 1]")
    if not (math.isfinite(headroom_window_s) and headroom_window_s > 0):
        raise InvalidArgumentError("headroom_window_s", headroom_window_s, "a positive number of seconds")
    if template is None and now_unix_s is not None:
        template = learn_template(rates, bin_s, now_unix_s) or learn_template(
            rates, bin_s, now_unix_s, period_s=DAY_S
        )
    horizon_points = None
    if template is not None and now_unix_s is not None:
        horizon_points = now_unix_s + np.linspace(0.0, horizon_s, _TREND_SAMPLES)
    return rates, alpha, template, horizon_points


def _level_and_trend(
    rates: FloatArray,
    bin_s: float,
    alpha: float,
    template: WeeklyTemplate | None,
    horizon_points: FloatArray | None,
    now_unix_s: float | None,
) -> tuple[float, float]:
    """The EWMA level of a non-empty history and the template's trend over the horizon (1 without)."""
    level = _ewma(rates, alpha)
    trend = 1.0
    if template is not None and horizon_points is not None and now_unix_s is not None:
        # The EWMA describes the load at its mean weight age before now, not now itself.
        lag_s = bin_s * ((1.0 - alpha) / alpha + 0.5)
        reference = float(template.rate_at(now_unix_s - lag_s))
        if reference > 0.0:
            ratio = float(template.rate_at(horizon_points).max()) / reference
            trend = min(max(ratio, 1.0 / MAX_TREND), MAX_TREND)
    return level, trend


def validated_history(history_rps: Sequence[float] | FloatArray, bin_s: float) -> FloatArray:
    if not (math.isfinite(bin_s) and bin_s > 0):
        raise InvalidArgumentError("bin_s", bin_s, "a positive number of seconds")
    rates = np.asarray(history_rps, dtype=np.float64)
    if rates.ndim != 1 or (len(rates) and not (np.isfinite(rates).all() and rates.min() >= 0.0)):
        raise InvalidArgumentError("history_rps", "not a sequence of rates", "finite rates >= 0, one per bin")
    return rates


def _ewma(rates: FloatArray, alpha: float) -> float:
    """Normalised EWMA of the series, newest weighted `alpha` (weights below 1e-6 of it dropped)."""
    if alpha >= 1.0:
        return float(rates[-1])
    keep = min(len(rates), 1 + int(math.log(1e-6) / math.log(1.0 - alpha)))
    weights = (1.0 - alpha) ** np.arange(keep - 1, -1, -1, dtype=np.float64)
    return float(np.dot(rates[-keep:], weights) / weights.sum())


def _noise_rps(rates: FloatArray, alpha: float, window_s: float, bin_s: float) -> float:
    """Standard deviation of the one-bin-ahead EWMA errors over the last `window_s` (0 if < 2 errors)."""
    n = min(len(rates), max(2, round(window_s / bin_s)) + 1)
    recent = rates[len(rates) - n :]
    if n < 3:
        return 0.0
    # Running EWMA before each bin, started at the window's first bin.
    smoothed = np.empty(n - 1, dtype=np.float64)
    level = float(recent[0])
    for i in range(1, n):
        smoothed[i - 1] = level
        level += alpha * (float(recent[i]) - level)
    return float(np.std(recent[1:] - smoothed))


def expected_max_sigmas(bins: int) -> float:
    """Expected largest of `bins` independent standard normal draws (Blom's approximation)."""
    if bins <= 1:
        return 0.0
    return NormalDist().inv_cdf((bins - 0.375) / (bins + 0.25))
