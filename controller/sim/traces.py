"""Request traces for the simulator: the `Trace` value, the file readers and `load_trace`.

Flow: `dctl simulate --trace SPEC` -> `load_trace` -> (file reader | `synthetic_trace`, which wraps the
requests `controller.sim.synthetic` generates) -> `Trace.window` -> `Trace.scale_rate` -> the cluster
simulator replays `arrival_s` with the token counts. Reading files is the I/O edge; `Trace` and its
transforms are pure (randomness injected as a Generator). Imports go one way: this module uses
`synthetic` (a leaf that only generates arrays); `synthetic` never imports this one.

Two file formats, told apart by their header line (docs/traces.md has examples):

* Azure LLM inference CSV (2023 and 2024 releases): `TIMESTAMP,ContextTokens,GeneratedTokens`.
  Timestamps `YYYY-MM-DD HH:MM:SS[.f{1,9}][Z|+HH:MM|-HH:MM]` (space or `T` between date and time); no
  zone means UTC. t = 0 is the earliest request, whose UTC time becomes `start_unix_s`.
* Generic CSV: optional `# start_unix_s=<UTC epoch seconds>` comment lines before the header
  `arrival_s,input_tokens,output_tokens`; `arrival_s` >= 0 seconds from t = 0.

Token counts are non-negative integers below one billion. Blank lines are skipped. Rows need not be in
time order: they are stable-sorted by arrival (equal times keep file order), because merged or
concatenated exports are common and the order carries no other meaning. Any bad row raises
`DataFileError` naming the file, the 1-based line and the column (echoed text is cut to
ECHO_CHARS). A missing file raises NotFoundError; an unreadable one, or a binary one (a NUL byte or
invalid UTF-8 in its header or in a bad row), DataFileError saying so - never a traceback.

The 2024 week files hold 17-27 million rows, so the parser works on 16 MiB blocks of bytes with numpy:
line and comma positions by `flatnonzero`, integers and timestamps from fixed-width byte columns
(timestamps by civil-date arithmetic, variable fraction widths and zone offsets included). Only when a
block fails validation does it fall back to per-line Python, and only to word the error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from agent.api.errors import DataFileError, InvalidArgumentError, OutOfRangeError
from controller.sim.synthetic import (
    DEFAULT_DURATION_S,
    SYNTHETIC_KINDS,
    SYNTHETIC_PREFIX,
    WORKLOADS,
    synthetic_requests,
)
from controller.textfiles import open_error

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GENERIC_COLUMNS = ("arrival_s", "input_tokens", "output_tokens")
TRACE_SPEC_FORMS = (
    "a trace file (Azure CSV 'TIMESTAMP,ContextTokens,GeneratedTokens' or generic CSV "
    "'arrival_s,input_tokens,output_tokens')",
    *(f"{SYNTHETIC_PREFIX}{kind}" for kind in SYNTHETIC_KINDS),
)

MAX_TOKENS = 999_999_999  # nine digits: parses without overflow and fits int32
ECHO_CHARS = 60  # longest piece of a bad row or header quoted back in an error
_TRACE_CSV = (
    "a trace CSV (Azure TIMESTAMP,ContextTokens,GeneratedTokens or generic "
    "arrival_s,input_tokens,output_tokens)"
)
_MAX_HEADER_BYTES = 1 << 16  # a header or comment line longer than this is not one

_BLOCK_BYTES = 1 << 24
_INT_WIDTH = 9
_TS_WIDTH = 19 + 16  # "YYYY-MM-DD HH:MM:SS" + ".fffffffff" + "+HH:MM"
_FLOAT_WIDTH = 32
_NS_PER_S = 1_000_000_000

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True)
class Trace:
    """A request trace: arrival times (s from t = 0, sorted) with prompt and output token counts.

    `start_unix_s` is the UTC epoch of t = 0 (None when unknown), used to align carbon intensity and
    energy prices with trace time. `end_s` is the end of the time span the trace covers (a window or a
    synthetic run may end after its last arrival); None means the last arrival. Arrays are read-only.
    """

    name: str
    arrival_s: FloatArray
    input_tokens: IntArray
    output_tokens: IntArray
    start_unix_s: float | None
    end_s: float | None = None

    def __post_init__(self) -> None:
        arrival = np.array(self.arrival_s, dtype=np.float64)
        inputs = np.array(self.input_tokens, dtype=np.int32)
        outputs = np.array(self.output_tokens, dtype=np.int32)
        if not (
            arrival.ndim == inputs.ndim == outputs.ndim == 1 and len(arrival) == len(inputs) == len(outputs)
        ):
            raise InvalidArgumentError(
                "trace", (arrival.shape, inputs.shape, outputs.shape), "three 1-D arrays of equal length"
            )
        if len(arrival) and not (
            np.isfinite(arrival).all() and arrival[0] >= 0.0 and bool(np.all(np.diff(arrival) >= 0.0))
        ):
            raise InvalidArgumentError("trace.arrival_s", self.name, "finite, sorted, first >= 0")
        if len(arrival) and (inputs.min() < 0 or outputs.min() < 0):
            raise InvalidArgumentError("trace tokens", self.name, "non-negative token counts")
        last_s = float(arrival[-1]) if len(arrival) else 0.0
        if self.end_s is not None and not (math.isfinite(self.end_s) and self.end_s >= last_s):
            raise InvalidArgumentError("trace.end_s", self.end_s, f"finite and >= the last arrival {last_s}")
        for name, array in (("arrival_s", arrival), ("input_tokens", inputs), ("output_tokens", outputs)):
            array.flags.writeable = False
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Length of the covered span from t = 0: `end_s`, else the last arrival (0 when empty)."""
        if self.end_s is not None:
            return self.end_s
        return float(self.arrival_s[-1]) if len(self.arrival_s) else 0.0

    def window(self, start_s: float, duration_s: float | None = None) -> Trace:
        """Requests arriving in [start_s, start_s + duration_s), re-based so `start_s` becomes t = 0.

        A window reaching or passing the trace's end keeps the last request and is cut at the end, so
        `window(0, trace.duration_s)` is the whole trace. `start_unix_s` moves with the window.
        """
        if not (math.isfinite(start_s) and 0.0 <= start_s < max(self.duration_s, math.ulp(0.0))):
            raise OutOfRangeError(
                "--start", start_s, f"0 <= start_s < {self.duration_s} (the trace's duration)"
            )
        if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0.0):
            raise InvalidArgumentError("--duration", duration_s, "a positive number of seconds")
        stop_s = self.duration_s if duration_s is None else min(start_s + duration_s, self.duration_s)
        lo = int(np.searchsorted(self.arrival_s, start_s, side="left"))
        if stop_s >= self.duration_s:
            hi = len(self.arrival_s)
        else:
            hi = int(np.searchsorted(self.arrival_s, stop_s, side="left"))
        return Trace(
            name=self.name,
            arrival_s=self.arrival_s[lo:hi] - start_s,
            input_tokens=self.input_tokens[lo:hi],
            output_tokens=self.output_tokens[lo:hi],
            start_unix_s=None if self.start_unix_s is None else self.start_unix_s + start_s,
            end_s=stop_s - start_s,
        )

    def scale_rate(self, factor: float, rng: np.random.Generator) -> Trace:
        """The same span and load shape at `factor` times the request rate.

        factor < 1 keeps each request with probability `factor`. factor > 1 superposes the trace itself,
        floor(factor) - 1 full copies and one copy thinned to the fractional part; every arrival of an
        extra copy moves by an independent uniform offset in +-half the mean inter-arrival time
        (reflected at 0 and at the end) so copies do not land on the same instant. Copies keep the
        token counts of their originals. Stable-sorted after merging.
        """
        if not (math.isfinite(factor) and factor > 0.0):
            raise InvalidArgumentError("--rate-scale", factor, "a positive finite number")
        if factor == 1.0 or len(self) == 0:
            return self
        if factor < 1.0:
            keep = rng.random(len(self)) < factor
            return self._with(self.arrival_s[keep], self.input_tokens[keep], self.output_tokens[keep])
        whole = math.floor(factor)
        fraction = factor - whole
        end_s = self.duration_s
        half_jitter_s = 0.5 * (end_s / len(self) if end_s > 0.0 else 0.0)
        parts_s = [self.arrival_s]
        parts_in = [self.input_tokens]
        parts_out = [self.output_tokens]
        masks = [np.ones(len(self), dtype=bool)] * (whole - 1)
        if fraction > 0.0:
            masks.append(rng.random(len(self)) < fraction)
        for mask in masks:
            shifted = self.arrival_s[mask] + rng.uniform(-half_jitter_s, half_jitter_s, int(mask.sum()))
            shifted = np.abs(shifted)  # reflect at 0
            shifted = np.where(shifted > end_s, 2.0 * end_s - shifted, shifted)  # reflect at the end
            parts_s.append(shifted)
            parts_in.append(self.input_tokens[mask])
            parts_out.append(self.output_tokens[mask])
        arrival = np.concatenate(parts_s)
        order = np.argsort(arrival, kind="stable")
        return self._with(arrival[order], np.concatenate(parts_in)[order], np.concatenate(parts_out)[order])

    def _with(self, arrival_s: FloatArray, input_tokens: IntArray, output_tokens: IntArray) -> Trace:
        return Trace(self.name, arrival_s, input_tokens, output_tokens, self.start_unix_s, self.duration_s)


def load_trace(
    spec: str | os.PathLike[str],
    *,
    rate_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
) -> Trace:
    """The trace named by `spec` (a file path or `synthetic:KIND`), cut to the window [start_s, start_s +
    duration_s) and then rate-scaled by `rate_scale`.

    Synthetic traces are generated for exactly the window (default: the kind's, one hour but two days
    for `conversation-2day`). `seed` drives the
    synthetic generator and, through an independent stream, the rate scaling.
    """
    if not (math.isfinite(rate_scale) and rate_scale > 0.0):
        raise InvalidArgumentError("--rate-scale", rate_scale, "a positive finite number")
    if not (math.isfinite(start_s) and start_s >= 0.0):
        raise InvalidArgumentError("--start", start_s, "a non-negative number of seconds")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0.0):
        raise InvalidArgumentError("--duration", duration_s, "a positive number of seconds")
    text = os.fspath(spec)
    if text.startswith(SYNTHETIC_PREFIX):
        kind = text.removeprefix(SYNTHETIC_PREFIX)
        if kind not in SYNTHETIC_KINDS:
            raise InvalidArgumentError("--trace", text, TRACE_SPEC_FORMS)
        span_s = WORKLOADS[kind].default_duration_s if duration_s is None else duration_s
        trace = synthetic_trace(kind, start_s + span_s, seed).window(start_s, span_s)
    else:
        trace = read_trace_file(text)
        if start_s != 0.0 or duration_s is not None:
            trace = trace.window(start_s, duration_s)
    scale_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    return trace.scale_rate(rate_scale, scale_rng)


def synthetic_trace(
    kind: str, duration_s: float = DEFAULT_DURATION_S, seed: int = 0, rate_rps: float | None = None
) -> Trace:
    """A synthetic trace of `kind` ("conversation" | "coding") over [0, duration_s); deterministic per seed
    (`controller.sim.synthetic` has the model). `rate_rps` replaces the fitted mean rate."""
    r = synthetic_requests(kind, duration_s, seed, rate_rps)
    return Trace(r.name, r.arrival_s, r.input_tokens, r.output_tokens, r.start_unix_s, r.duration_s)


def binary_reason(raw: bytes, expected: str) -> str | None:
    """Why `raw` (a line or the start of a file) is not text - a NUL byte or invalid UTF-8 - or None."""
    nul = raw.find(b"\0")
    if nul >= 0:
        return f"binary data (NUL byte at offset {nul} of the line), not text; expected {expected}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # a multi-byte character cut by the end of a partial read is not an error
        if err.reason == "unexpected end of data" and err.end == len(raw):
            return None
        return (
            f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start} of the line), binary?; "
            f"expected {expected}"
        )
    return None


def quoted(text: str) -> str:
    """`text` for quoting in an error: repr, cut to ECHO_CHARS characters."""
    return repr(text) if len(text) <= ECHO_CHARS else repr(text[:ECHO_CHARS]) + f"... ({len(text)} chars)"


def read_trace_file(path: str | os.PathLike[str], *, block_bytes: int = _BLOCK_BYTES) -> Trace:
    """Read an Azure or generic trace CSV (format chosen by its header line), `block_bytes` at a time."""
    file = Path(path)
    try:
        return _read_trace_file(file, block_bytes)
    except OSError as err:  # unreadable, a folder, gone: one error naming the file
        raise open_error(file, err, _TRACE_CSV) from None


def _read_trace_file(file: Path, block_bytes: int) -> Trace:
    with file.open("rb") as f:
        header, line_no, start_unix_s = _read_header(f, str(file))
        azure = _header_format(header, str(file), line_no)
        times: list[npt.NDArray[np.int64] | FloatArray] = []
        inputs: list[npt.NDArray[np.int64]] = []
        outputs: list[npt.NDArray[np.int64]] = []
        for block, first_line in _blocks(f, line_no + 1, block_bytes):
            t, i, o = _parse_block(block, first_line, azure, str(file))
            times.append(t)
            inputs.append(i)
            outputs.append(o)
    if not times or sum(len(t) for t in times) == 0:
        raise DataFileError(str(file), None, None, "no requests after the header line")
    input_tokens = np.concatenate(inputs).astype(np.int32)
    output_tokens = np.concatenate(outputs).astype(np.int32)
    if azure:
        epoch_ns = np.concatenate(times).astype(np.int64)
        order = _stable_order(epoch_ns)
        epoch_ns = epoch_ns[order]
        zero_ns = int(epoch_ns[0])
        arrival_s = (epoch_ns - zero_ns).astype(np.float64) / _NS_PER_S
        start_unix_s = zero_ns / _NS_PER_S
    else:
        arrival_s = np.concatenate(times).astype(np.float64)
        order = _stable_order(arrival_s)
        arrival_s = arrival_s[order]
    return Trace(file.stem, arrival_s, input_tokens[order], output_tokens[order], start_unix_s)


def _stable_order(values: npt.NDArray[np.int64] | FloatArray) -> npt.NDArray[np.intp]:
    if bool(np.all(values[1:] >= values[:-1])):
        return np.arange(len(values))
    return np.argsort(values, kind="stable")


def _read_header(f: BinaryIO, path: str) -> tuple[list[str], int, float | None]:
    """Skip leading `#` comments (reading `start_unix_s=`); return the header fields and its line number."""
    start_unix_s: float | None = None
    line_no = 0
    while True:
        raw = f.readline(_MAX_HEADER_BYTES)
        line_no += 1
        if not raw:
            raise DataFileError(path, None, None, "empty file: no header line")
        binary = binary_reason(raw, _TRACE_CSV)
        if binary is not None:
            raise DataFileError(path, line_no, None, binary)
        if len(raw) == _MAX_HEADER_BYTES and not raw.endswith(b"\n"):
            reason = f"line longer than {_MAX_HEADER_BYTES} bytes where a header was expected; {_TRACE_CSV}"
            raise DataFileError(path, line_no, None, reason)
        text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff").strip()
        if not text:
            continue
        if not text.startswith("#"):
            return [c.strip() for c in text.split(",")], line_no, start_unix_s
        key, sep, value = text.lstrip("#").strip().partition("=")
        if sep and key.strip() == "start_unix_s":
            try:
                start_unix_s = float(value)
            except ValueError:
                start_unix_s = math.nan
            if not math.isfinite(start_unix_s):
                raise DataFileError(
                    path, line_no, "start_unix_s", f"not a number of seconds: {quoted(value.strip())}"
                )


def _header_format(header: list[str], path: str, line_no: int) -> bool:
    """True for the Azure format, False for the generic one; DataFileError naming what is wrong."""
    for columns in (AZURE_COLUMNS, GENERIC_COLUMNS):
        if tuple(header) == columns:
            return columns is AZURE_COLUMNS
        if columns[0] in header:
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataFileError(
                    path, line_no, missing[0], f"missing column; expected header {','.join(columns)}"
                )
            raise DataFileError(path, line_no, None, f"columns {header} must be exactly {','.join(columns)}")
    raise DataFileError(
        path,
        line_no,
        None,
        f"unknown header {quoted(','.join(header))}; expected {','.join(AZURE_COLUMNS)} (Azure) "
        f"or {','.join(GENERIC_COLUMNS)} (generic)",
    )


def _blocks(f: BinaryIO, first_line: int, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines (each ending in a newline) and the file line number of each block's first."""
    carry = b""
    line = first_line
    while True:
        data = f.read(block_bytes)
        if not data:
            if carry:
                yield carry + b"\n", line  # last line without its newline
            return
        data = carry + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        block, carry = data[:cut], data[cut:]
        yield block, line
        line += block.count(b"\n")


def _parse_block(
    block: bytes, first_line: int, azure: bool, path: str
) -> tuple[npt.NDArray[np.int64] | FloatArray, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Times (epoch ns for Azure, seconds for generic), input and output tokens of one block of lines."""
    buf = np.frombuffer(block, dtype=np.uint8)
    newline = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], newline[:-1] + 1))
    ends = newline - ((newline > starts) & (buf[np.maximum(newline - 1, 0)] == 13))
    line_numbers = first_line + np.arange(len(starts))
    keep = ends > starts  # blank lines carry no request
    starts, ends, line_numbers = starts[keep], ends[keep], line_numbers[keep]
    columns = AZURE_COLUMNS if azure else GENERIC_COLUMNS
    commas = np.flatnonzero(buf == 44)
    first_comma = np.searchsorted(commas, starts)
    n_commas = np.searchsorted(commas, ends) - first_comma
    if np.any(n_commas != 2):
        bad = int(np.flatnonzero(n_commas != 2)[0])
        binary = binary_reason(block[int(starts[bad]) : int(ends[bad])], _TRACE_CSV)
        if binary is not None:
            raise DataFileError(path, int(line_numbers[bad]), None, binary)
        n_fields = int(n_commas[bad]) + 1
        if n_fields < 3:
            reason = f"missing column: expected 3 fields, got {n_fields}"
            raise DataFileError(path, int(line_numbers[bad]), columns[n_fields], reason)
        raise DataFileError(path, int(line_numbers[bad]), None, f"expected 3 fields, got {n_fields}")
    comma1 = commas[first_comma]
    comma2 = commas[first_comma + 1]
    times: npt.NDArray[np.int64] | FloatArray
    if azure:
        times, time_ok = _parse_timestamps_ns(buf, starts, comma1)
    else:
        times, time_ok = _parse_floats(buf, starts, comma1)
    inputs, input_ok = _parse_uints(buf, comma1 + 1, comma2)
    outputs, output_ok = _parse_uints(buf, comma2 + 1, ends)
    oks = (time_ok, input_ok, output_ok)
    bad_rows = ~(time_ok & input_ok & output_ok)
    if np.any(bad_rows):
        row = int(np.flatnonzero(bad_rows)[0])
        binary = binary_reason(block[int(starts[row]) : int(ends[row])], _TRACE_CSV)
        if binary is not None:
            raise DataFileError(path, int(line_numbers[row]), None, binary)
        col = next(c for c in range(3) if not oks[c][row])
        bounds = ((starts, comma1), (comma1 + 1, comma2), (comma2 + 1, ends))[col]
        text = block[int(bounds[0][row]) : int(bounds[1][row])].decode("utf-8", errors="replace")
        reason = (
            (_explain_timestamp if azure else _explain_arrival)(text) if col == 0 else _explain_tokens(text)
        )
        raise DataFileError(path, int(line_numbers[row]), columns[col], reason)
    return times, inputs, outputs


def _gather(buf: npt.NDArray[np.uint8], start: npt.NDArray[np.intp], width: int) -> npt.NDArray[np.uint8]:
    """n x width bytes from each start (positions past the buffer read as NUL)."""
    padded = np.concatenate((buf, np.zeros(width, dtype=np.uint8)))
    return np.lib.stride_tricks.sliding_window_view(padded, width)[start]


def _parse_uints(
    buf: npt.NDArray[np.uint8], start: npt.NDArray[np.intp], end: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Decimal integers in buf[start:end], right-aligned into _INT_WIDTH columns; (values, ok)."""
    length = end - start
    ok = (length >= 1) & (length <= _INT_WIDTH)
    # Right-aligned: the window ends at the field's end; bytes before its start are masked out.
    padded = np.concatenate((np.zeros(_INT_WIDTH, dtype=np.uint8), buf))
    window = np.lib.stride_tricks.sliding_window_view(padded, _INT_WIDTH)[end]
    in_field = np.arange(_INT_WIDTH)[None, :] >= (_INT_WIDTH - length)[:, None]
    digits = window.astype(np.int16) - 48
    ok &= np.all(~in_field | ((digits >= 0) & (digits <= 9)), axis=1)
    place = 10 ** np.arange(_INT_WIDTH - 1, -1, -1, dtype=np.int64)
    return np.where(in_field, digits, 0).astype(np.int64) @ place, ok


def _parse_floats(
    buf: npt.NDArray[np.uint8], start: npt.NDArray[np.intp], end: npt.NDArray[np.intp]
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Non-negative finite decimal numbers in buf[start:end]; (values, ok)."""
    length = end - start
    raw = _gather(buf, start, _FLOAT_WIDTH)
    raw[np.arange(_FLOAT_WIDTH)[None, :] >= length[:, None]] = 0
    ok = (length >= 1) & (length <= _FLOAT_WIDTH)
    texts = np.ascontiguousarray(raw).view(f"S{_FLOAT_WIDTH}").ravel()
    try:
        values = texts.astype(np.float64)
    except ValueError:
        values = np.array([_float_or_nan(t) for t in texts])
    ok &= np.isfinite(values) & (values >= 0.0)
    return values, ok


def _float_or_nan(text: bytes) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _parse_timestamps_ns(
    buf: npt.NDArray[np.uint8], start: npt.NDArray[np.intp], end: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """UTC epoch nanoseconds of `YYYY-MM-DD HH:MM:SS[.f{1,9}][Z|+HH:MM|-HH:MM]` in buf[start:end]."""
    n = len(start)
    length = end - start
    raw = _gather(buf, start, _TS_WIDTH)
    raw[np.arange(_TS_WIDTH)[None, :] >= length[:, None]] = 0
    d = raw.astype(np.int16) - 48
    is_digit = (d >= 0) & (d <= 9)
    ok = (length >= 19) & (length <= _TS_WIDTH)
    ok &= is_digit[:, [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]].all(axis=1)
    ok &= (
        (raw[:, 4] == ord("-"))
        & (raw[:, 7] == ord("-"))
        & (raw[:, 13] == ord(":"))
        & (raw[:, 16] == ord(":"))
    )
    ok &= (raw[:, 10] == ord(" ")) | (raw[:, 10] == ord("T"))
    c = d[:, :19].astype(np.int64)
    year = c[:, 0] * 1000 + c[:, 1] * 100 + c[:, 2] * 10 + c[:, 3]
    month = c[:, 5] * 10 + c[:, 6]
    day = c[:, 8] * 10 + c[:, 9]
    hour = c[:, 11] * 10 + c[:, 12]
    minute = c[:, 14] * 10 + c[:, 15]
    second = c[:, 17] * 10 + c[:, 18]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[np.clip(month - 1, 0, 11)]
    month_days = month_days + ((month == 2) & leap)
    ok &= (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59)

    # Suffix after the seconds: optional fraction of 1-9 digits, then optional zone.
    suffix = raw[:, 19:]
    suffix_digit = is_digit[:, 19:]
    suffix_len = length - 19
    has_dot = suffix[:, 0] == ord(".")
    # Count of digits after the dot = index of the first non-digit (a False sentinel closes the row).
    first_non_digit = np.argmin(
        np.concatenate((suffix_digit[:, 1:11], np.zeros((n, 1), bool)), axis=1), axis=1
    )
    n_frac = np.where(has_dot, first_non_digit, 0)
    ok &= ~has_dot | ((n_frac >= 1) & (n_frac <= 9))
    frac_cols = np.arange(1, 10)
    frac_place = 10 ** (9 - frac_cols)
    frac_ns = (
        np.where(frac_cols[None, :] <= n_frac[:, None], d[:, 19 + frac_cols], 0).astype(np.int64) @ frac_place
    )
    zone_at = np.where(has_dot, 1 + n_frac, 0)
    zone_len = suffix_len - zone_at
    zone = suffix[np.arange(n)[:, None], np.minimum(zone_at[:, None] + np.arange(6), suffix.shape[1] - 1)]
    zd = zone.astype(np.int64) - 48
    zone_digits = ((zd[:, [1, 2, 4, 5]] >= 0) & (zd[:, [1, 2, 4, 5]] <= 9)).all(axis=1)
    sign = np.where(zone[:, 0] == ord("-"), -1, 1)
    offset_h = zd[:, 1] * 10 + zd[:, 2]
    offset_min = zd[:, 4] * 10 + zd[:, 5]
    numeric_zone = (
        (zone_len == 6)
        & ((zone[:, 0] == ord("+")) | (zone[:, 0] == ord("-")))
        & (zone[:, 3] == ord(":"))
        & zone_digits
        & (offset_h <= 23)
        & (offset_min <= 59)
    )
    ok &= (zone_len == 0) | ((zone_len == 1) & (zone[:, 0] == ord("Z"))) | numeric_zone
    offset_s = np.where(numeric_zone, sign * (offset_h * 3600 + offset_min * 60), 0)

    # Days since 1970-01-01 from the civil date (H. Hinnant's days_from_civil), vectorised.
    y = year - (month <= 2)
    era = y // 400
    year_of_era = y - era * 400
    day_of_year = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    seconds = days * 86400 + hour * 3600 + minute * 60 + second - offset_s
    return seconds * _NS_PER_S + frac_ns, ok


def _explain_tokens(text: str) -> str:
    if not text:
        return "empty token count"
    if text.startswith("-") and text[1:].isdigit():
        return f"negative token count {text}"
    if not (text.isascii() and text.isdigit()):
        return f"not a non-negative integer: {quoted(text)}"
    return f"token count {text} above the maximum {MAX_TOKENS}"


def _explain_arrival(text: str) -> str:
    if len(text) > _FLOAT_WIDTH:
        return f"longer than {_FLOAT_WIDTH} characters: {quoted(text)}"
    try:
        float(text)
    except ValueError:
        return f"not a number of seconds: {quoted(text)}"
    return f"arrival time must be finite and >= 0, got {quoted(text)}"


def _explain_timestamp(text: str) -> str:
    expected = "YYYY-MM-DD HH:MM:SS[.fraction of 1-9 digits][Z|+HH:MM|-HH:MM]"
    return f"bad timestamp {quoted(text)}; expected {expected}"
