"""Trace readers (Azure 2023/2024 and generic CSV), bad-row errors, window and rate scale."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import DataFileError, InvalidArgumentError, NotFoundError, OutOfRangeError
from controller.sim.traces import Trace, load_trace, read_trace_file

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def unix(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_azure_2023_form_without_trailing_newline(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"{AZURE_HEADER}\n2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:51.2224670,879,55",
    )
    trace = read_trace_file(path)
    assert trace.name == "t"
    assert len(trace) == 3
    assert trace.start_unix_s == pytest.approx(unix("2023-11-16 18:15:46.680590"), abs=1e-6)
    np.testing.assert_allclose(trace.arrival_s, [0.0, 4.314579, 4.541877], atol=1e-9)
    assert trace.input_tokens.tolist() == [374, 396, 879]
    assert trace.output_tokens.tolist() == [44, 109, 55]
    assert trace.input_tokens.dtype == np.int32 and trace.arrival_s.dtype == np.float64
    assert trace.duration_s == pytest.approx(4.541877)


def test_azure_2024_mixed_fractions_and_offsets(tmp_path: Path) -> None:
    stamps = [
        "2024-05-10 00:00:00+00:00",
        "2024-05-10 00:00:00.009930+00:00",
        "2024-05-10 00:00:00.5+00:00",
        "2024-05-10 00:00:01.123456789+00:00",
        "2024-05-10T00:00:02Z",
        "2024-05-10 02:00:03.25+02:00",  # 00:00:03.25 UTC
        "2024-05-09 23:00:04-01:00",  # 00:00:04 UTC
        "2024-05-10 00:00:05.1",
    ]
    rows = "\r\n".join(f"{s},{10 + i},{i}" for i, s in enumerate(stamps))
    trace = read_trace_file(write(tmp_path, f"{AZURE_HEADER}\r\n{rows}\r\n"))
    assert trace.start_unix_s == unix("2024-05-10 00:00:00")
    np.testing.assert_allclose(trace.arrival_s, [0, 0.00993, 0.5, 1.123456789, 2, 3.25, 4, 5.1], atol=1e-9)
    assert trace.output_tokens.tolist() == list(range(8))


def test_leap_day_and_year_boundary(tmp_path: Path) -> None:
    text = f"{AZURE_HEADER}\n2023-12-31 23:59:59.5,1,1\n2024-02-29 12:00:00,2,2\n"
    trace = read_trace_file(write(tmp_path, text))
    assert trace.arrival_s[1] == pytest.approx(unix("2024-02-29 12:00:00") - unix("2023-12-31 23:59:59.5"))


def test_unsorted_rows_are_stable_sorted(tmp_path: Path) -> None:
    text = f"{AZURE_HEADER}\n2023-11-16 18:00:02,1,1\n2023-11-16 18:00:01,2,2\n2023-11-16 18:00:02,3,3\n"
    trace = read_trace_file(write(tmp_path, text))
    assert trace.arrival_s.tolist() == [0.0, 1.0, 1.0]
    assert trace.input_tokens.tolist() == [2, 1, 3]  # equal times keep file order


def test_generic_format_with_start_comment(tmp_path: Path) -> None:
    text = (
        "# exported by hand\n# start_unix_s=1700000000.5\n"
        "arrival_s,input_tokens,output_tokens\n\n0.5,100,10\n2,200,0\n"
    )
    trace = read_trace_file(write(tmp_path, text))
    assert trace.start_unix_s == 1700000000.5
    assert trace.arrival_s.tolist() == [0.5, 2.0]
    assert trace.output_tokens.tolist() == [10, 0]
    no_start = read_trace_file(write(tmp_path, "arrival_s,input_tokens,output_tokens\n1e1,5,6", "g.csv"))
    assert no_start.start_unix_s is None and no_start.arrival_s.tolist() == [10.0]


def test_blocks_split_lines_correctly(tmp_path: Path) -> None:
    rows = "\n".join(f"2023-11-16 18:00:{i:02d}.{i:07d},{i},{i + 1}" for i in range(40))
    # Blocks smaller than a line force partial lines to carry across reads.
    trace = read_trace_file(write(tmp_path, f"{AZURE_HEADER}\n{rows}"), block_bytes=37)
    assert trace.input_tokens.tolist() == list(range(40))
    np.testing.assert_allclose(trace.arrival_s, np.arange(40) + np.arange(40) * 1e-7, atol=1e-9)
    bad = rows.replace("18:00:39", "18:00:3x")
    with pytest.raises(DataFileError) as err:
        read_trace_file(write(tmp_path, f"{AZURE_HEADER}\n{bad}", "bad.csv"), block_bytes=100)
    assert err.value.line == 41 and err.value.field == "TIMESTAMP"


GOOD = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize(
    ("text", "line", "field", "reason"),
    [
        (f"{AZURE_HEADER}\n{GOOD}2023-13-16 18:15:46,1,1\n", 3, "TIMESTAMP", "bad timestamp"),
        (f"{AZURE_HEADER}\n{GOOD}2023-02-30 18:15:46,1,1\n", 3, "TIMESTAMP", "bad timestamp"),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 25:15:46,1,1\n", 3, "TIMESTAMP", "bad timestamp"),
        (f"{AZURE_HEADER}\n{GOOD}yesterday,1,1\n", 3, "TIMESTAMP", "bad timestamp"),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:46.,1,1\n", 3, "TIMESTAMP", "bad timestamp"),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:46+0000,1,1\n", 3, "TIMESTAMP", "bad timestamp"),
        (f"{AZURE_HEADER}\n{GOOD}{GOOD}2023-11-16 18:15:47,-5,1\n", 4, "ContextTokens", "negative"),
        (
            f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47,12.5,1\n",
            3,
            "ContextTokens",
            "not a non-negative integer",
        ),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47,1,\n", 3, "GeneratedTokens", "empty"),
        (
            f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47,1,1234567890\n",
            3,
            "GeneratedTokens",
            "above the maximum",
        ),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47,1\n", 3, "GeneratedTokens", "missing column"),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47\n", 3, "ContextTokens", "missing column"),
        (f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47,1,2,3\n", 3, None, "expected 3 fields, got 4"),
        (
            f"{AZURE_HEADER}\n{GOOD}2023-11-16 18:15:47,1,x2",
            3,
            "GeneratedTokens",
            "not a non-negative integer",
        ),
        ("arrival_s,input_tokens,output_tokens\n1,2,3\n-1,2,3\n", 3, "arrival_s", ">= 0"),
        ("arrival_s,input_tokens,output_tokens\nnan,2,3\n", 2, "arrival_s", ">= 0"),
        ("arrival_s,input_tokens,output_tokens\nsoon,2,3\n", 2, "arrival_s", "not a number"),
        (
            "# start_unix_s=later\narrival_s,input_tokens,output_tokens\n1,2,3\n",
            1,
            "start_unix_s",
            "not a number",
        ),
        ("TIMESTAMP,ContextTokens\n", 1, "GeneratedTokens", "missing column"),
        ("arrival_s,output_tokens,input_tokens\n", 1, None, "must be exactly"),
        ("time,in,out\n1,2,3\n", 1, None, "unknown header"),
        ("", None, None, "empty file"),
        (f"{AZURE_HEADER}\n", None, None, "no requests"),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tmp_path: Path, text: str, line: int | None, field: str | None, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataFileError) as err:
        read_trace_file(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)
    message = str(err.value)
    assert reason in message and str(path) in message
    if line is not None:
        assert f"{path}:{line}" in message
    if field is not None:
        assert repr(field) in message


def make_trace(n: int = 2000, duration_s: float = 1000.0) -> Trace:
    rng = np.random.default_rng(7)
    arrival = np.sort(rng.uniform(0.0, duration_s, n))
    return Trace(
        "t",
        arrival,
        rng.integers(1, 5000, n, dtype=np.int32),
        rng.integers(1, 900, n, dtype=np.int32),
        1.7e9,
        duration_s,
    )


def test_window_rebases_and_moves_start() -> None:
    trace = make_trace()
    part = trace.window(100.0, 200.0)
    inside = (trace.arrival_s >= 100.0) & (trace.arrival_s < 300.0)
    assert len(part) == int(inside.sum())
    np.testing.assert_allclose(part.arrival_s, trace.arrival_s[inside] - 100.0)
    assert part.input_tokens.tolist() == trace.input_tokens[inside].tolist()
    assert part.duration_s == 200.0 and part.start_unix_s == 1.7e9 + 100.0
    whole = make_trace().window(0.0, 5000.0)  # past the end: cut at the end, last request kept
    assert len(whole) == 2000 and whole.duration_s == 1000.0
    file_like = Trace("f", np.array([0.0, 1.0, 2.0]), np.ones(3, np.int32), np.ones(3, np.int32), None)
    assert len(file_like.window(0.0, file_like.duration_s)) == 3
    with pytest.raises(OutOfRangeError, match="--start"):
        trace.window(1000.0, 10.0)
    with pytest.raises(InvalidArgumentError, match="--duration"):
        trace.window(0.0, 0.0)


@pytest.mark.parametrize("factor", [0.3, 1.0, 2.0, 3.7])
def test_scale_rate_keeps_span_and_shape(factor: float) -> None:
    trace = make_trace(n=4000)
    # Load shape: the first half of the span twice as busy as the second.
    arrival = np.sort(np.concatenate((trace.arrival_s[:2667] * 0.5, 500.0 + trace.arrival_s[2667:] * 0.5)))
    shaped = Trace("s", arrival, trace.input_tokens, trace.output_tokens, 1.7e9, 1000.0)
    scaled = shaped.scale_rate(factor, np.random.default_rng(1))
    assert len(scaled) == pytest.approx(factor * 4000, rel=0.05)
    assert scaled.duration_s == 1000.0 and scaled.start_unix_s == 1.7e9
    assert bool(np.all(np.diff(scaled.arrival_s) >= 0)) and scaled.arrival_s[0] >= 0.0
    assert scaled.arrival_s[-1] <= 1000.0
    first_half = float(np.mean(scaled.arrival_s < 500.0))
    assert first_half == pytest.approx(float(np.mean(arrival < 500.0)), abs=0.03)
    again = shaped.scale_rate(factor, np.random.default_rng(1))
    assert np.array_equal(again.arrival_s, scaled.arrival_s)
    assert np.array_equal(again.input_tokens, scaled.input_tokens)


def test_scale_rate_rejects_non_positive() -> None:
    with pytest.raises(InvalidArgumentError, match="--rate-scale"):
        make_trace().scale_rate(0.0, np.random.default_rng(0))


def test_trace_rejects_unsorted_arrays() -> None:
    with pytest.raises(InvalidArgumentError, match="sorted"):
        Trace("x", np.array([1.0, 0.5]), np.ones(2, np.int32), np.ones(2, np.int32), None)


def test_load_trace_window_then_scale_and_seed(tmp_path: Path) -> None:
    rows = "\n".join(f"{i * 0.5},{100 + i},{10 + i}" for i in range(2000))
    path = write(tmp_path, f"arrival_s,input_tokens,output_tokens\n{rows}\n")
    trace = load_trace(path, rate_scale=2.5, start_s=100.0, duration_s=300.0, seed=3)
    assert len(trace) == pytest.approx(2.5 * 600, rel=0.06)
    assert trace.duration_s == 300.0 and trace.arrival_s[-1] <= 300.0
    assert np.array_equal(
        trace.arrival_s, load_trace(path, rate_scale=2.5, start_s=100.0, duration_s=300.0, seed=3).arrival_s
    )
    other = load_trace(path, rate_scale=2.5, start_s=100.0, duration_s=300.0, seed=4)
    assert not np.array_equal(trace.arrival_s[: len(other)], other.arrival_s[: len(trace)])


@pytest.mark.parametrize("spec", ["synthetic:chat", "synthetic:"])
def test_load_trace_rejects_bad_spec(spec: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        load_trace(spec)
    assert err.value.field == "--trace" and "synthetic:conversation" in str(err.value)


def test_a_missing_trace_file_is_not_found_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.csv"
    with pytest.raises(NotFoundError) as err:
        load_trace(missing)
    assert str(missing) in str(err.value) and "not found" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate_scale": -1.0}, "--rate-scale"),
        ({"start_s": -1.0}, "--start"),
        ({"duration_s": 0.0}, "--duration"),
    ],
)
def test_load_trace_validates_numbers(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        load_trace("synthetic:conversation", **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_real_azure_2023_traces(shared_data: Path) -> None:
    conv = read_trace_file(shared_data / "traces" / "AzureLLMInferenceTrace_conv.csv")
    code = read_trace_file(shared_data / "traces" / "AzureLLMInferenceTrace_code.csv")
    assert (len(conv), len(code)) == (19_366, 8_819)
    assert conv.start_unix_s == pytest.approx(unix("2023-11-16 18:15:46.680590"), abs=1e-6)
    assert conv.duration_s == pytest.approx(
        unix("2023-11-16 19:14:08.402527") - unix("2023-11-16 18:15:46.680590")
    )
    assert (conv.input_tokens[0], conv.output_tokens[0], conv.input_tokens[-1], conv.output_tokens[-1]) == (
        374,
        44,
        197,
        183,
    )
    assert code.start_unix_s == pytest.approx(unix("2023-11-16 18:17:03.979960"), abs=1e-6)
    assert (code.input_tokens[0], code.output_tokens[0]) == (4808, 10)
    assert (code.input_tokens[-1], code.output_tokens[-1]) == (549, 173)
    assert code.duration_s == pytest.approx(
        unix("2023-11-16 19:14:19.928016") - unix("2023-11-16 18:17:03.979960")
    )
    assert np.percentile(conv.input_tokens, 50) == 1020 and np.percentile(conv.output_tokens, 99) == 601
    assert np.percentile(code.input_tokens, 50) == 1469 and np.percentile(code.output_tokens, 50) == 13


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" + bytes(range(256)) * 64


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (BINARY, 1),  # a binary file: its first "line" is not a header
        (b"\xff\xfe" + "arrival_s,input_tokens,output_tokens\n".encode("utf-16-le"), 1),  # UTF-16
        (b"arrival_s,input_tokens,output_tokens\n0.0,10,20\n" + BINARY, 3),  # binary after good rows
    ],
)
def test_binary_data_is_named_not_echoed(tmp_path: Path, data: bytes, line: int) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(data)
    with pytest.raises(DataFileError) as err:
        read_trace_file(path)
    assert (err.value.path, err.value.line) == (str(path), line)
    message = str(err.value)
    assert "binary" in err.value.reason and len(message) < 400 and "\n" not in message


def test_a_long_bad_header_is_cut_when_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, "x" * 5000 + "\n1,2,3\n")
    with pytest.raises(DataFileError, match="unknown header") as err:
        read_trace_file(path)
    assert "(5000 chars)" in str(err.value) and len(str(err.value)) < 400


def test_unreadable_or_missing_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="a folder, not a file") as err:
        read_trace_file(tmp_path)
    assert err.value.path == str(tmp_path)
    with pytest.raises(NotFoundError, match="not found"):
        read_trace_file(tmp_path / "gone.csv")
    if Path("/proc/self/mem").exists():  # readable by name, fails with EIO: unreadable even for root
        with pytest.raises(DataFileError, match="cannot read: "):
            read_trace_file("/proc/self/mem")
