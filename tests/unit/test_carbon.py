"""Hourly carbon intensity and energy prices: lookup, energy conversion, range and file errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import DataFileError, InvalidArgumentError, NotFoundError, OutOfRangeError
from controller.sim.carbon import CarbonIntensity, ConstantCarbonIntensity, ConstantEnergyPrice, EnergyPrice

HEADER = (
    "Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
    "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,Data Source,"
    "Data Estimated,Data Estimation Method"
)
T0 = datetime(2023, 11, 16, tzinfo=UTC).timestamp()


def carbon_file(tmp_path: Path, rows: list[tuple[str, str, str]]) -> Path:
    body = "\n".join(f"{t},USA,CAISO,US-CAL-CISO,{d},{lca},50,40,caiso.com,false," for t, d, lca in rows)
    path = tmp_path / "ci.csv"
    path.write_text(f"{HEADER}\n{body}\n", encoding="utf-8")
    return path


def test_hourly_lookup_direct_and_lca(tmp_path: Path) -> None:
    path = carbon_file(
        tmp_path, [("2023-11-16 00:00:00", "200", "300"), ("2023-11-16 01:00:00", "100", "150")]
    )
    direct = CarbonIntensity.from_csv(path)
    assert direct.g_per_kwh_at(T0) == 200.0
    assert direct.g_per_kwh_at(T0 + 3599.9) == 200.0
    assert direct.g_per_kwh_at(T0 + 3600.0) == 100.0
    assert CarbonIntensity.from_csv(path, "lca").g_per_kwh_at(T0 + 4000.0) == 150.0
    # 1 kWh in the first hour, 2 kWh in the second.
    grams = direct.grams_for(np.array([3.6e6, 7.2e6]), np.array([T0 + 10.0, T0 + 3610.0]))
    assert grams == pytest.approx(200.0 + 200.0)


@pytest.mark.parametrize("when", [T0 - 1.0, T0 + 2 * 3600.0, T0 + 4 * 3600.0 + 5.0])
def test_times_outside_covered_hours_are_out_of_range(tmp_path: Path, when: float) -> None:
    # Hour 02:00 is missing from the file: not covered either.
    path = carbon_file(
        tmp_path,
        [
            ("2023-11-16 00:00:00", "1", "1"),
            ("2023-11-16 01:00:00", "2", "2"),
            ("2023-11-16 03:00:00", "3", "3"),
        ],
    )
    source = CarbonIntensity.from_csv(path)
    with pytest.raises(OutOfRangeError) as err:
        source.grams_for(np.array([1.0, 1.0]), np.array([T0, when]))
    message = str(err.value)
    assert str(path) in message and "2023-11-16T00:00:00Z .. 2023-11-16T04:00:00Z" in message
    assert datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") in message


@pytest.mark.parametrize(
    ("rows", "line", "field"),
    [
        ([("2023-11-16 00:30:00", "1", "1")], 2, "Datetime (UTC)"),
        ([("tomorrow", "1", "1")], 2, "Datetime (UTC)"),
        ([("2023-11-16 00:00:00", "1", "1"), ("2023-11-16 00:00:00", "1", "1")], 3, "Datetime (UTC)"),
        ([("2023-11-16 00:00:00", "-3", "1")], 2, "Carbon Intensity gCO₂eq/kWh (direct)"),
        ([("2023-11-16 00:00:00", "", "1")], 2, "Carbon Intensity gCO₂eq/kWh (direct)"),
    ],
)
def test_bad_carbon_rows(tmp_path: Path, rows: list[tuple[str, str, str]], line: int, field: str) -> None:
    path = carbon_file(tmp_path, rows)
    with pytest.raises(DataFileError) as err:
        CarbonIntensity.from_csv(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)


def test_missing_column_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("Datetime (UTC),Price\n2024-01-01 00:00:00+00:00,3\n")
    with pytest.raises(DataFileError) as err:
        EnergyPrice.from_csv(path)
    assert (err.value.line, err.value.field) == (1, "Price (USD/MWh)")
    path.write_text("")
    with pytest.raises(DataFileError, match="empty file"):
        CarbonIntensity.from_csv(path)
    with pytest.raises(InvalidArgumentError, match="carbon basis"):
        CarbonIntensity.from_csv(path, "scope3")  # type: ignore[arg-type]


def test_price_lookup_allows_negative(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        "Datetime (UTC),Datetime (Local),Price (USD/MWh)\n"
        "2024-01-01 00:00:00+00:00,2023-12-31 16:00:00-08:00,40\n"
        "2024-01-01 01:00:00+00:00,2023-12-31 17:00:00-08:00,-10"
    )
    price = EnergyPrice.from_csv(path)
    t = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    assert price.usd_per_mwh_at(t + 4000.0) == -10.0
    assert price.usd_for(np.array([3.6e9, 3.6e9]), np.array([t, t + 3600.0])) == pytest.approx(30.0)


def test_constants() -> None:
    assert ConstantCarbonIntensity(250.0).grams_for(np.array([3.6e6, 3.6e6]), np.array([0.0, 1.0])) == 500.0
    assert ConstantEnergyPrice(-5.0).usd_for(np.array([3.6e9]), np.array([0.0])) == -5.0
    with pytest.raises(InvalidArgumentError, match="--carbon-g-per-kwh"):
        ConstantCarbonIntensity(-1.0)


def test_real_caiso_files(shared_data: Path) -> None:
    carbon = shared_data / "carbon"
    c2023 = CarbonIntensity.from_csv(carbon / "US-CAL-CISO_2023_hourly.csv")
    assert len(c2023.series.values) == 8760
    assert c2023.g_per_kwh_at(datetime(2023, 1, 1, tzinfo=UTC).timestamp()) == 238.69
    assert (
        CarbonIntensity.from_csv(carbon / "US-CAL-CISO_2023_hourly.csv", "lca").g_per_kwh_at(
            datetime(2023, 1, 1, 0, 30, tzinfo=UTC).timestamp()
        )
        == 309.75
    )
    with pytest.raises(OutOfRangeError):
        c2023.g_per_kwh_at(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    c2024 = CarbonIntensity.from_csv(carbon / "US-CAL-CISO_2024_hourly.csv")
    assert len(c2024.series.values) == 8784 and float(np.mean(c2024.series.values)) == pytest.approx(
        168.46, abs=0.01
    )
    price = EnergyPrice.from_csv(carbon / "US-CAL-CISO_electricity_prices_2024.csv")
    assert price.usd_per_mwh_at(datetime(2024, 1, 1, 3, tzinfo=UTC).timestamp()) == pytest.approx(43.04537)
    assert float(np.mean(price.series.values)) == pytest.approx(40.67, abs=0.01)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), r"binary data \(NUL byte"),
        (
            "Datetime (UTC),Price (USD/MWh)\n2024-01-01 00:00:00,3\u20ac\n".encode("latin-1", "replace")
            + b"\xe9\n",
            "not UTF-8 text",
        ),
    ],
)
def test_binary_or_non_utf8_files_are_data_file_errors(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    for read in (CarbonIntensity.from_csv, EnergyPrice.from_csv):
        with pytest.raises(DataFileError, match=reason) as err:
            read(path)
        assert err.value.path == str(path) and len(str(err.value)) < 300


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        CarbonIntensity.from_csv(tmp_path / "gone.csv")
    with pytest.raises(DataFileError, match="a folder, not a file"):
        EnergyPrice.from_csv(tmp_path)
    if Path("/proc/self/mem").exists():  # fails with EIO at offset 0, also for root
        with pytest.raises(DataFileError, match="cannot read: "):
            CarbonIntensity.from_csv("/proc/self/mem")
