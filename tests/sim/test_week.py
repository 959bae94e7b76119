"""Week traces from hourly counts + 2023 lengths: the reader, the arrival process, windows, the spec."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import DataFileError, InvalidArgumentError, NotFoundError, OutOfRangeError
from controller.sim.traces import read_trace_file
from controller.sim.week import (
    HOURLY_FILE,
    azure_week_trace,
    length_source_file,
    load_week_spec,
    read_hourly_counts,
)

HEADER = "utc_hour_start,service,requests\n"
LENGTHS = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
    f"2023-11-16 18:00:{i:02d}.0000000,{100 * (i + 1)},{i + 1}\n" for i in range(5)
)


def source_dir(tmp_path: Path, rows: list[tuple[str, str, int]]) -> Path:
    (tmp_path / HOURLY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / HOURLY_FILE).write_text(HEADER + "".join(f"{t},{s},{n}\n" for t, s, n in rows))
    for service in ("conv", "code"):
        (tmp_path / length_source_file(service)).write_text(LENGTHS)
    return tmp_path


def hours(service: str, counts: list[int], day: int = 12) -> list[tuple[str, str, int]]:
    return [(f"2024-05-{day}T{h:02d}:00:00Z", service, n) for h, n in enumerate(counts)]


def test_reader_keeps_one_service_in_order(tmp_path: Path) -> None:
    folder = source_dir(tmp_path, hours("code", [5, 6], day=10) + hours("conv", [7, 8, 9]))
    counts = read_hourly_counts(folder / HOURLY_FILE, "conv")
    assert counts.requests == (7, 8, 9)
    assert counts.start_unix_s == datetime(2024, 5, 12, tzinfo=UTC).timestamp()
    assert counts.duration_s == 3 * 3600.0


@pytest.mark.parametrize(
    ("rows", "field"),
    [
        ([("2024-05-12T00:00:00Z", "conv", 1), ("2024-05-12T02:00:00Z", "conv", 1)], "utc_hour_start"),
        ([("2024-05-12T00:30:00Z", "conv", 1)], "utc_hour_start"),
        ([("2024-05-12 00:00:00", "conv", 1)], "utc_hour_start"),
        ([("2024-05-12T00:00:00Z", "conv", -3)], "requests"),
        ([("2024-05-12T00:00:00Z", "code", 1)], "service"),
    ],
)
def test_reader_names_the_bad_field(tmp_path: Path, rows: list[tuple[str, str, int]], field: str) -> None:
    folder = source_dir(tmp_path, rows)
    with pytest.raises(DataFileError) as err:
        read_hourly_counts(folder / HOURLY_FILE, "conv")
    assert err.value.field == field


def test_reader_rejects_a_wrong_header(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("hour,service,count\n")
    with pytest.raises(DataFileError, match="header"):
        read_hourly_counts(path, "conv")


def test_counts_follow_the_hours_and_lengths_come_from_the_source(tmp_path: Path) -> None:
    folder = source_dir(tmp_path, hours("conv", [3600, 3600, 7200, 7200]))
    trace = azure_week_trace("conv", folder, seed=1)
    assert trace.name == "azure-week-conv"
    assert trace.duration_s == 4 * 3600.0
    per_hour = np.bincount((trace.arrival_s // 3600).astype(int), minlength=4)
    # Rate 1 rps up to the 01:30 centre, linear to 2 rps at 02:30, then 2 rps.
    expected = [3600, 3600 * (0.5 + 0.5 * 1.25), 3600 * (0.5 * 1.75 + 0.5 * 2), 7200]
    np.testing.assert_allclose(per_hour, expected, rtol=0.05)
    pairs = set(zip(trace.input_tokens.tolist(), trace.output_tokens.tolist(), strict=True))
    assert pairs == {(100 * (i + 1), i + 1) for i in range(5)}
    assert np.all(np.diff(trace.arrival_s) >= 0)


def test_rate_ramps_linearly_between_hour_centres(tmp_path: Path) -> None:
    folder = source_dir(tmp_path, hours("code", [0, 36_000], day=10))
    trace = azure_week_trace("code", folder, seed=0)
    # Zero up to 00:30, then linear from 0 to 10 rps at 01:30, then 10 rps.
    assert trace.arrival_s.min() >= 1800.0
    ramp = trace.arrival_s[trace.arrival_s < 5400.0]
    first_half = np.sum(ramp < 3600.0)
    assert len(ramp) == pytest.approx(18_000, rel=0.03)
    assert first_half / len(ramp) == pytest.approx(0.25, abs=0.02)


def test_same_seed_same_trace_and_windows_are_sub_traces(tmp_path: Path) -> None:
    folder = source_dir(tmp_path, hours("conv", [500, 900, 300, 1200]))
    whole = azure_week_trace("conv", folder, seed=7)
    again = azure_week_trace("conv", folder, seed=7)
    assert np.array_equal(whole.arrival_s, again.arrival_s)
    assert not np.array_equal(whole.arrival_s[:50], azure_week_trace("conv", folder, seed=8).arrival_s[:50])
    window = azure_week_trace("conv", folder, seed=7, start_s=2000.0, duration_s=5000.0)
    inside = (whole.arrival_s >= 2000.0) & (whole.arrival_s < 7000.0)
    np.testing.assert_allclose(window.arrival_s + 2000.0, whole.arrival_s[inside], rtol=0, atol=1e-9)
    assert np.array_equal(window.output_tokens, whole.output_tokens[inside])
    assert window.start_unix_s == pytest.approx(whole.start_unix_s + 2000.0)  # type: ignore[operator]
    assert window.duration_s == 5000.0
    tail = azure_week_trace("conv", folder, seed=7, start_s=10_000.0, duration_s=1e6)
    assert tail.duration_s == 4 * 3600.0 - 10_000.0


def test_rate_scale_multiplies_the_rate(tmp_path: Path) -> None:
    folder = source_dir(tmp_path, hours("conv", [4000] * 3))
    assert len(azure_week_trace("conv", folder, seed=0, rate_scale=0.25)) == pytest.approx(3000, rel=0.06)
    assert len(azure_week_trace("conv", folder, seed=0, rate_scale=3.0)) == pytest.approx(36_000, rel=0.02)


def test_bad_arguments(tmp_path: Path) -> None:
    folder = source_dir(tmp_path, hours("conv", [10, 10]))
    with pytest.raises(InvalidArgumentError, match="--trace"):
        load_week_spec("azure-week:chat", folder)
    with pytest.raises(InvalidArgumentError, match="--trace"):
        load_week_spec("conv", folder)
    with pytest.raises(OutOfRangeError, match="--start"):
        azure_week_trace("conv", folder, seed=0, start_s=7200.0)
    with pytest.raises(InvalidArgumentError, match="--rate-scale"):
        azure_week_trace("conv", folder, seed=0, rate_scale=0.0)
    with pytest.raises(InvalidArgumentError, match="--duration"):
        azure_week_trace("conv", folder, seed=0, duration_s=-1.0)
    # A missing file is named (the reader's errors are the CLI's, not a bare OSError).
    with pytest.raises(NotFoundError, match=r"missing.*hourly request counts"):
        azure_week_trace("conv", tmp_path / "missing", seed=0)
    binary = tmp_path / "binary"
    (binary / HOURLY_FILE).parent.mkdir(parents=True)
    (binary / HOURLY_FILE).write_bytes(HEADER.encode() + b"\xff\xfe\x00\n")
    with pytest.raises(DataFileError, match="UTF-8"):
        read_hourly_counts(binary / HOURLY_FILE, "conv")
    with pytest.raises(DataFileError, match="a folder"):
        read_hourly_counts(tmp_path, "conv")


def test_real_week_window(shared_data: Path) -> None:
    folder = shared_data / "traces"
    trace = load_week_spec("azure-week:code", folder, seed=0, start_s=36 * 3600.0, duration_s=1800.0)
    counts = read_hourly_counts(folder / HOURLY_FILE, "code")
    assert trace.start_unix_s == datetime(2024, 5, 11, 12, tzinfo=UTC).timestamp()
    # 12:00 -> 12:30: the rate goes from halfway between the 11:30 and 12:30 centres to the 12:30 one.
    expected = (counts.requests[35] + 3 * counts.requests[36]) / 8.0
    assert len(trace) == pytest.approx(expected, rel=0.05)
    source = read_trace_file(folder / "AzureLLMInferenceTrace_code.csv")
    assert np.median(trace.output_tokens) == pytest.approx(np.median(source.output_tokens), abs=3)
