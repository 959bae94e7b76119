"""Week-long Azure workloads rebuilt from hourly request counts: `--trace azure-week:conv|code`.

Flow: `dctl simulate --trace azure-week:conv --trace-dir DIR` -> `load_trace` -> `load_week_spec` ->
`azure_week_trace` -> the cluster simulator, like any other `Trace`. The full-resolution 2024 week files
(27 M and 17 M rows) are published by Azure but not shipped in ../shared/data; what is shipped is their
hourly request count per service (`azure2024_week_hourly/azure2024_week_hourly_per_service_utc.csv`,
derived) and the 2023 one-hour traces of the same services. This module joins the two:

* Arrivals: a non-homogeneous Poisson process whose rate is piecewise linear between hour centres
  (each hour's count / 3600 s placed at the hour's middle; constant before the first and after the last
  centre). Piecewise linear rather than a step per hour, so the rate has no jumps at hour boundaries
  that the real service does not have. Each hour's expected count is then (c[h-1] + 6 c[h] + c[h+1]) / 8
  of the published counts c: the week's total is kept exactly (in expectation), single hours move by a
  median 1% (at most 4% conversation, 12% coding, where the count jumps; docs/prediction-forecast.md).
  Within-hour burstiness of the real service is not reproduced (the hourly data does not carry it).
* Lengths: each request's (prompt, output) token pair is drawn uniformly, with replacement, from the 2023
  trace of the same service (`AzureLLMInferenceTrace_{conv,code}.csv`), keeping their correlation. The
  2024 services' lengths differ somewhat (the 2024 notebook figures show longer conversation prompts);
  with only hourly data this is the best public stand-in.
* Randomness: every piece between two consecutive hour centres draws from its own generator seeded by
  (seed, piece index), so a window of the week holds exactly the requests the whole week holds in it.
  `rate_scale` multiplies the rate (exact for a Poisson process; no thinning or copies).

Reading the two CSV files is the I/O edge; the arrival and length sampling is pure given the generator.
A missing file raises NotFoundError naming it; an unreadable or binary one DataFileError.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.api.errors import DataFileError, InvalidArgumentError, OutOfRangeError
from controller.sim.traces import Trace, quoted, read_trace_file
from controller.textfiles import open_error

WEEK_SPEC_PREFIX = "azure-week:"
WEEK_SERVICES = ("conv", "code")
WEEK_SPEC_FORMS = tuple(WEEK_SPEC_PREFIX + s for s in WEEK_SERVICES)
HOURLY_FILE = Path("azure2024_week_hourly") / "azure2024_week_hourly_per_service_utc.csv"
HOURLY_COLUMNS = ("utc_hour_start", "service", "requests")
HOUR_S = 3600.0


def length_source_file(service: str) -> Path:
    """The 2023 trace file whose token lengths a week trace of `service` resamples."""
    return Path(f"AzureLLMInferenceTrace_{service}.csv")


@dataclass(frozen=True, slots=True)
class HourlyCounts:
    """Requests per consecutive UTC hour of one service, from `start_unix_s` on."""

    service: str
    start_unix_s: float
    requests: tuple[int, ...]

    @property
    def duration_s(self) -> float:
        return HOUR_S * len(self.requests)

    def rate_at_centres_rps(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.requests, dtype=np.float64) / HOUR_S


def read_hourly_counts(path: str | os.PathLike[str], service: str) -> HourlyCounts:
    """The consecutive hourly counts of `service` in an `utc_hour_start,service,requests` CSV.

    Hours must be whole UTC hours (`YYYY-MM-DDTHH:00:00Z`), strictly consecutive per service; a bad row
    raises DataFileError naming the file, line and column.
    """
    if service not in WEEK_SERVICES:
        raise InvalidArgumentError("service", service, WEEK_SERVICES)
    file = Path(path)
    expected = f"the hourly request counts CSV ({','.join(HOURLY_COLUMNS)})"
    try:
        return _read_hourly_counts(file, service)
    except UnicodeDecodeError as err:
        reason = f"not UTF-8 text (byte 0x{err.object[err.start]:02x}), binary?; expected {expected}"
        raise DataFileError(str(file), None, None, reason) from None
    except OSError as err:
        raise open_error(file, err, expected) from None


def _read_hourly_counts(file: Path, service: str) -> HourlyCounts:
    hours: list[tuple[float, int]] = []
    with file.open("r", encoding="utf-8") as f:
        header = [c.strip() for c in f.readline().removeprefix("\ufeff").split(",")]
        if tuple(header) != HOURLY_COLUMNS:
            reason = f"header must be {','.join(HOURLY_COLUMNS)}, got {quoted(','.join(header))}"
            raise DataFileError(str(file), 1, None, reason)
        for line_no, raw in enumerate(f, start=2):
            text = raw.strip()
            if not text:
                continue
            fields = [c.strip() for c in text.split(",")]
            if len(fields) != len(HOURLY_COLUMNS):
                raise DataFileError(str(file), line_no, None, f"expected 3 fields, got {len(fields)}")
            stamp, row_service, count = fields
            if row_service != service:
                continue
            try:
                when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            except ValueError:
                when = None
            if when is None or when.minute or when.second:
                raise DataFileError(
                    str(file), line_no, "utc_hour_start", f"not a whole UTC hour: {quoted(stamp)}"
                )
            if not (count.isascii() and count.isdigit()):
                raise DataFileError(
                    str(file), line_no, "requests", f"not a non-negative integer: {quoted(count)}"
                )
            unix_s = when.timestamp()
            if hours and unix_s != hours[-1][0] + HOUR_S:
                raise DataFileError(
                    str(file), line_no, "utc_hour_start", f"{stamp} does not follow the previous hour"
                )
            hours.append((unix_s, int(count)))
    if not hours:
        raise DataFileError(str(file), None, "service", f"no rows for service {service!r}")
    return HourlyCounts(service, hours[0][0], tuple(c for _, c in hours))


def _piece_arrivals_s(
    t0_s: float, t1_s: float, rate0_rps: float, rate1_rps: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Poisson arrivals on [t0, t1) with the rate linear from rate0 to rate1 (sorted)."""
    length_s = t1_s - t0_s
    mass = 0.5 * (rate0_rps + rate1_rps) * length_s
    n = int(rng.poisson(mass)) if mass > 0.0 else 0
    u = np.sort(rng.random(n)) * mass
    slope = (rate1_rps - rate0_rps) / length_s
    if abs(slope) * length_s <= 1e-12 * max(rate0_rps, rate1_rps):
        return t0_s + u / rate0_rps
    # Invert the cumulative rate rate0 x + slope x^2 / 2 = u (the root in [0, length]).
    x = (np.sqrt(np.maximum(rate0_rps**2 + 2.0 * slope * u, 0.0)) - rate0_rps) / slope
    return t0_s + np.clip(x, 0.0, np.nextafter(length_s, 0.0))


def week_arrivals(
    counts: HourlyCounts,
    n_lengths: int,
    *,
    seed: int,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    end_s: float | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Arrival times (s from the first hour's start) in [start_s, end_s), and for each the index
    (0 .. n_lengths - 1) of the length sample it takes. Each piece between hour centres draws both from
    its own generator seeded by (seed, piece index), before the window is cut."""
    stop_s = counts.duration_s if end_s is None else end_s
    centres_s = HOUR_S * (np.arange(len(counts.requests)) + 0.5)
    rates = counts.rate_at_centres_rps() * rate_scale
    # Piece k spans [knots[k], knots[k + 1]): the edges of the span and every hour centre.
    knots = np.concatenate(([0.0], centres_s, [counts.duration_s]))
    knot_rates = np.concatenate(([rates[0]], rates, [rates[-1]]))
    times: list[npt.NDArray[np.float64]] = []
    picks: list[npt.NDArray[np.int64]] = []
    for k in range(len(knots) - 1):
        t0, t1 = float(knots[k]), float(knots[k + 1])
        if t1 <= start_s or t0 >= stop_s or t1 <= t0:
            continue
        rng = np.random.default_rng([seed, k])
        t = _piece_arrivals_s(t0, t1, float(knot_rates[k]), float(knot_rates[k + 1]), rng)
        pick = rng.integers(0, n_lengths, len(t))
        inside = (t >= start_s) & (t < stop_s)
        times.append(t[inside])
        picks.append(pick[inside])
    if not times:
        return np.empty(0, np.float64), np.empty(0, np.int64)
    return np.concatenate(times), np.concatenate(picks)


def azure_week_trace(
    service: str,
    source_dir: str | os.PathLike[str],
    *,
    seed: int,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> Trace:
    """The week of `service` ("conv" or "code") rebuilt from the hourly counts and 2023 lengths in
    `source_dir` (the traces folder of ../shared/data), cut to [start_s, start_s + duration_s) and
    re-based so start_s is t = 0 (`start_unix_s` follows)."""
    if service not in WEEK_SERVICES:
        raise InvalidArgumentError("--trace", WEEK_SPEC_PREFIX + service, WEEK_SPEC_FORMS)
    if not (math.isfinite(rate_scale) and rate_scale > 0.0):
        raise InvalidArgumentError("--rate-scale", rate_scale, "a positive finite number")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0.0):
        raise InvalidArgumentError("--duration", duration_s, "a positive number of seconds")
    folder = Path(source_dir)
    counts = read_hourly_counts(folder / HOURLY_FILE, service)
    if not (math.isfinite(start_s) and 0.0 <= start_s < counts.duration_s):
        raise OutOfRangeError("--start", start_s, f"0 <= start_s < {counts.duration_s} (the week's span)")
    lengths = read_trace_file(folder / length_source_file(service))
    stop_s = counts.duration_s if duration_s is None else min(start_s + duration_s, counts.duration_s)
    arrival_s, pick = week_arrivals(
        counts, len(lengths), seed=seed, rate_scale=rate_scale, start_s=start_s, end_s=stop_s
    )
    return Trace(
        name=f"azure-week-{service}",
        arrival_s=arrival_s - start_s,
        input_tokens=lengths.input_tokens[pick],
        output_tokens=lengths.output_tokens[pick],
        start_unix_s=counts.start_unix_s + start_s,
        end_s=stop_s - start_s,
    )


def load_week_spec(
    spec: str,
    trace_dir: str | os.PathLike[str],
    *,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
) -> Trace:
    """The trace of an `azure-week:conv` / `azure-week:code` spec (for `load_trace`)."""
    if not spec.startswith(WEEK_SPEC_PREFIX):
        raise InvalidArgumentError("--trace", spec, WEEK_SPEC_FORMS)
    return azure_week_trace(
        spec.removeprefix(WEEK_SPEC_PREFIX),
        trace_dir,
        seed=seed,
        rate_scale=rate_scale,
        start_s=start_s,
        duration_s=duration_s,
    )
