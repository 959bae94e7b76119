"""Grid carbon intensity and energy prices over time, to turn the simulator's energy per time bin into
grams of CO2eq and dollars (docs/traces.md, docs/evaluation.md). Read once at the edge (`from_csv`);
lookups are pure.

Flow: `dctl simulate --carbon FILE [--prices FILE]` (or constants `--carbon-g-per-kwh X`) ->
these sources -> the report multiplies each power bin's energy by the value of the hour it starts in,
at the bin's UTC time `Trace.start_unix_s + t`.

Files: Electricity Maps hourly CSVs (`Datetime (UTC)`, ..., `Carbon Intensity gCO₂eq/kWh (direct)`,
`Carbon Intensity gCO₂eq/kWh (LCA)`, ...; e.g. US-CAL-CISO_2024_hourly.csv) and the sustain-cluster
price CSVs (`Datetime (UTC)`, `Datetime (Local)`, `Price (USD/MWh)`). Each row covers the hour starting
at its timestamp; a time in no covered hour (before the first, after the last, or in a missing hour)
raises OutOfRangeError naming the time and the file's range. Timestamps are UTC, with or without an
explicit offset; rows must be in increasing time order. A missing file raises NotFoundError; an
unreadable, binary (NUL bytes) or non-UTF-8 one DataFileError naming the file, never a traceback.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt

from agent.api.errors import DataFileError, InvalidArgumentError, OutOfRangeError
from controller.sim.traces import quoted
from controller.textfiles import read_text

if TYPE_CHECKING:
    from _csv import Reader as CsvReader

HOUR_S = 3600
J_PER_KWH = 3.6e6
J_PER_MWH = 3.6e9
TIME_COLUMN = "Datetime (UTC)"
CARBON_COLUMNS = {
    "direct": "Carbon Intensity gCO₂eq/kWh (direct)",
    "lca": "Carbon Intensity gCO₂eq/kWh (LCA)",
}
PRICE_COLUMN = "Price (USD/MWh)"

FloatArray = npt.NDArray[np.float64]


class CarbonSource(Protocol):
    """Carbon intensity over UTC time: hourly from a file or a constant."""

    def g_per_kwh_at(self, unix_s: float) -> float: ...

    def grams_for(self, energy_j: FloatArray, bin_start_unix_s: FloatArray) -> float: ...


class PriceSource(Protocol):
    """Energy price over UTC time: hourly from a file or a constant."""

    def usd_per_mwh_at(self, unix_s: float) -> float: ...

    def usd_for(self, energy_j: FloatArray, bin_start_unix_s: FloatArray) -> float: ...


@dataclass(frozen=True, slots=True)
class HourlySeries:
    """Values per UTC hour from a file: `hour_start_unix_s[i]` starts the hour holding `values[i]`."""

    path: str
    hour_start_unix_s: npt.NDArray[np.int64]
    values: FloatArray

    def at(self, unix_s: FloatArray) -> FloatArray:
        """Values of the hours holding each time; OutOfRangeError for the first time not covered."""
        times = np.asarray(unix_s, dtype=np.float64)
        index = np.searchsorted(self.hour_start_unix_s, times, side="right") - 1
        safe = np.maximum(index, 0)
        covered = (index >= 0) & (times < self.hour_start_unix_s[safe] + HOUR_S)
        if not bool(np.all(covered)):
            bad = float(times[np.flatnonzero(~covered)[0]])
            first = int(self.hour_start_unix_s[0])
            end = int(self.hour_start_unix_s[-1]) + HOUR_S
            raise OutOfRangeError(
                f"time in {self.path}",
                f"{_iso(bad)} (unix {bad:.0f})",
                f"{_iso(first)} .. {_iso(end)} (unix {first} .. {end}), "
                f"{len(self.values)} hourly rows; missing hours are not covered",
            )
        return self.values[safe]


@dataclass(frozen=True, slots=True)
class CarbonIntensity:
    """Hourly grid carbon intensity (gCO2eq/kWh) from an Electricity Maps CSV."""

    series: HourlySeries
    basis: Literal["direct", "lca"]

    @classmethod
    def from_csv(
        cls, path: str | os.PathLike[str], basis: Literal["direct", "lca"] = "direct"
    ) -> CarbonIntensity:
        """Read the direct (operational, default) or life-cycle (LCA) intensity column."""
        if basis not in CARBON_COLUMNS:
            raise InvalidArgumentError("carbon basis", basis, tuple(CARBON_COLUMNS))
        return cls(_read_hourly(Path(path), CARBON_COLUMNS[basis], allow_negative=False), basis)

    def g_per_kwh_at(self, unix_s: float) -> float:
        return float(self.series.at(np.array([unix_s]))[0])

    def grams_for(self, energy_j: FloatArray, bin_start_unix_s: FloatArray) -> float:
        """gCO2eq of energy spent in bins, each at the intensity of the hour its bin starts in."""
        return float(np.sum(np.asarray(energy_j) / J_PER_KWH * self.series.at(bin_start_unix_s)))


@dataclass(frozen=True, slots=True)
class ConstantCarbonIntensity:
    """One intensity for all time (`--carbon-g-per-kwh X`), when no hourly file is given."""

    g_per_kwh: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.g_per_kwh) and self.g_per_kwh >= 0.0):
            raise InvalidArgumentError("--carbon-g-per-kwh", self.g_per_kwh, "a finite number >= 0")

    def g_per_kwh_at(self, unix_s: float) -> float:
        return self.g_per_kwh

    def grams_for(self, energy_j: FloatArray, bin_start_unix_s: FloatArray) -> float:
        return float(np.sum(energy_j)) / J_PER_KWH * self.g_per_kwh


@dataclass(frozen=True, slots=True)
class EnergyPrice:
    """Hourly wholesale energy price (USD/MWh, may be negative) from a sustain-cluster price CSV."""

    series: HourlySeries

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> EnergyPrice:
        return cls(_read_hourly(Path(path), PRICE_COLUMN, allow_negative=True))

    def usd_per_mwh_at(self, unix_s: float) -> float:
        return float(self.series.at(np.array([unix_s]))[0])

    def usd_for(self, energy_j: FloatArray, bin_start_unix_s: FloatArray) -> float:
        """USD for energy spent in bins, each at the price of the hour its bin starts in."""
        return float(np.sum(np.asarray(energy_j) / J_PER_MWH * self.series.at(bin_start_unix_s)))


@dataclass(frozen=True, slots=True)
class ConstantEnergyPrice:
    """One price for all time (`--energy-usd-per-kwh X`, stored per MWh), when no hourly file is given."""

    usd_per_mwh: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.usd_per_mwh):
            raise InvalidArgumentError("energy_price_usd_per_mwh", self.usd_per_mwh, "a finite number")

    def usd_per_mwh_at(self, unix_s: float) -> float:
        return self.usd_per_mwh

    def usd_for(self, energy_j: FloatArray, bin_start_unix_s: FloatArray) -> float:
        return float(np.sum(energy_j)) / J_PER_MWH * self.usd_per_mwh


def _read_hourly(path: Path, column: str, *, allow_negative: bool) -> HourlySeries:
    expected = f"an hourly CSV with columns {TIME_COLUMN!r} and {column!r}"
    reader = csv.reader(io.StringIO(read_text(path, expected), newline=""))
    try:
        return _parse_hourly(reader, str(path), column, allow_negative=allow_negative)
    except csv.Error as err:  # e.g. a field above csv's size limit: not the CSV it should be
        reason = f"not a valid CSV: {err}; expected an hourly CSV with columns {TIME_COLUMN!r} and {column!r}"
        raise DataFileError(str(path), reader.line_num or None, None, reason) from None


def _parse_hourly(reader: CsvReader, path: str, column: str, *, allow_negative: bool) -> HourlySeries:
    header = next(reader, None)
    if header is None:
        raise DataFileError(path, None, None, "empty file: no header line")
    for needed in (TIME_COLUMN, column):
        if needed not in header:
            raise DataFileError(path, 1, needed, f"missing column; header is {quoted(','.join(header))}")
    time_at, value_at = header.index(TIME_COLUMN), header.index(column)
    starts: list[int] = []
    values: list[float] = []
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) <= max(time_at, value_at):
            missing = TIME_COLUMN if len(row) <= time_at else column
            raise DataFileError(path, line, missing, f"missing column: row has {len(row)} fields")
        unix_s = _parse_utc(row[time_at])
        if unix_s is None:
            reason = (
                f"bad timestamp {quoted(row[time_at])}; expected YYYY-MM-DD HH:MM:SS[+00:00] at a whole hour"
            )
            raise DataFileError(path, line, TIME_COLUMN, reason)
        if starts and unix_s <= starts[-1]:
            raise DataFileError(path, line, TIME_COLUMN, f"{row[time_at]} is not after the previous row")
        try:
            value = float(row[value_at])
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (value < 0.0 and not allow_negative):
            allowed = "a finite number" if allow_negative else "a finite number >= 0"
            raise DataFileError(path, line, column, f"got {quoted(row[value_at])}; expected {allowed}")
        starts.append(unix_s)
        values.append(value)
    if not starts:
        raise DataFileError(path, None, None, "no rows after the header line")
    return HourlySeries(path, np.array(starts, dtype=np.int64), np.array(values, dtype=np.float64))


def _parse_utc(text: str) -> int | None:
    """Epoch seconds of a whole-hour timestamp; naive times are UTC. None when malformed."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment.minute or moment.second or moment.microsecond:
        return None
    return int(moment.timestamp())


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
