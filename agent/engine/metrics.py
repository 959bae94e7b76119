"""Prometheus text exposition -> typed engine metrics (pure; no I/O).

Flow: the engine driver (`agent.engine.driver`) GETs an engine's `/metrics`, hands the text to
`parse_prometheus_text`, then `extract_engine_metrics` picks vLLM's `vllm:*` series out of the parsed
families into a frozen `EngineMetrics`, deriving token rates from the previous scrape of the same engine
process. The telemetry sampler copies `EngineMetrics` into the wire message `EngineMetrics` (common.proto).

The parser implements the text format 0.0.4 (and the OpenMetrics subset vLLM's prometheus_client emits):
`# HELP` / `# TYPE` lines, other comments, label values with `\\\\`, `\\"` and `\\n` escapes, NaN/±Inf,
optional timestamps, histograms (`_bucket{le=..}`, `_sum`, `_count`) and counters exposed as `X_total`
under `# TYPE X counter`. Malformed text raises `DataFileError(source, line, field, reason)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from agent.api.errors import DataFileError

METRIC_TYPES = ("counter", "gauge", "histogram", "summary", "untyped", "info", "stateset", "gaugehistogram")

# Sample-name suffixes that belong to a family declared without them (prometheus_client / OpenMetrics).
_FAMILY_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
}

# vLLM renamed the KV-cache gauge in its V1 engine; older servers expose the GPU-specific name.
KV_CACHE_METRIC_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass(frozen=True, slots=True)
class Sample:
    """One exposed line: `name{labels} value [timestamp_ms]`."""

    name: str
    labels: tuple[tuple[str, str], ...]  # in exposition order
    value: float
    timestamp_ms: int | None = None

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """Samples sharing one `# TYPE` declaration (type "untyped" when none was given)."""

    name: str
    type: str
    help: str
    samples: tuple[Sample, ...]


@dataclass(frozen=True, slots=True)
class Histogram:
    """A Prometheus histogram summed over label sets: cumulative bucket counts by upper bound."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), ascending le, last le = +Inf
    sum: float
    count: float

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding rank q*count, as PromQL's histogram_quantile."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.count <= 0 or not self.buckets:
            return math.nan
        rank = q * self.count
        lower_le, lower_count = 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank:
                if math.isinf(le):
                    return lower_le  # PromQL returns the highest finite bound here
                if cum == lower_count:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_count) / (cum - lower_count)
            lower_le, lower_count = le, cum
        return lower_le


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """One scrape of an engine's serving state, with rates since the previous scrape of the same process."""

    scraped_s: float  # monotonic time of the scrape (driver's clock)
    running_requests_count: int  # vllm:num_requests_running
    waiting_requests_count: int  # vllm:num_requests_waiting
    kv_cache_usage_ratio: float  # vllm:kv_cache_usage_perc (0..1 despite the name)
    prompt_tokens: int  # vllm:prompt_tokens_total
    generation_tokens: int  # vllm:generation_tokens_total
    finished_requests_count: int  # vllm:request_success_total, all finished_reason labels
    preemptions_count: int  # vllm:num_preemptions_total
    prompt_tokens_per_s: float  # 0 on the first scrape of a process
    generation_tokens_per_s: float

    @property
    def outstanding_requests_count(self) -> int:
        return self.running_requests_count + self.waiting_requests_count


class _Cursor:
    """Character scanner over one sample line; errors carry the line number."""

    def __init__(self, text: str, source: str, line_no: int) -> None:
        self.text = text
        self.pos = 0
        self.source = source
        self.line_no = line_no

    def fail(self, field: str | None, reason: str) -> DataFileError:
        return DataFileError(self.source, self.line_no, field, f"{reason} at column {self.pos + 1}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_blanks(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def name(self, field: str, *, first_chars: str, chars: str) -> str:
        start = self.pos
        if self.peek() == "" or self.peek() not in first_chars:
            raise self.fail(field, "expected a name")
        self.pos += 1
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self, field: str) -> str:
        if self.peek() != '"':
            raise self.fail(field, "expected '\"'")
        self.pos += 1
        out: list[str] = []
        while True:
            if self.at_end():
                raise self.fail(field, "unterminated label value")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\":
                if self.at_end():
                    raise self.fail(field, "dangling escape")
                esc = self.text[self.pos]
                self.pos += 1
                if esc not in _LABEL_ESCAPES:
                    raise self.fail(field, f"unknown escape \\{esc}")
                out.append(_LABEL_ESCAPES[esc])
            else:
                out.append(ch)

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in " \t":
            self.pos += 1
        return self.text[start : self.pos]


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_NAME_FIRST = _LOWER + _LOWER.upper() + "_:"
_NAME_CHARS = _NAME_FIRST + "0123456789"
_LABEL_FIRST = _LOWER + _LOWER.upper() + "_"
_LABEL_CHARS = _LABEL_FIRST + "0123456789"
_LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


_SPECIAL_VALUES = {"nan": math.nan, "+inf": math.inf, "inf": math.inf, "-inf": -math.inf}


def _parse_value(text: str, cur: _Cursor, field: str) -> float:
    lowered = text.lower()
    if lowered in _SPECIAL_VALUES:
        return _SPECIAL_VALUES[lowered]
    try:
        return float(text)
    except ValueError:
        raise cur.fail(field, f"bad sample value {text!r}") from None


def _parse_sample(line: str, source: str, line_no: int) -> Sample:
    cur = _Cursor(line, source, line_no)
    name = cur.name("metric name", first_chars=_NAME_FIRST, chars=_NAME_CHARS)
    labels: list[tuple[str, str]] = []
    cur.skip_blanks()
    if cur.peek() == "{":
        cur.pos += 1
        seen: set[str] = set()
        while True:
            cur.skip_blanks()
            if cur.peek() == "}":
                cur.pos += 1
                break
            key = cur.name(name, first_chars=_LABEL_FIRST, chars=_LABEL_CHARS)
            if key in seen:
                raise cur.fail(name, f"duplicate label {key!r}")
            seen.add(key)
            cur.skip_blanks()
            if cur.peek() != "=":
                raise cur.fail(name, "expected '=' after label name")
            cur.pos += 1
            cur.skip_blanks()
            labels.append((key, cur.quoted(name)))
            cur.skip_blanks()
            if cur.peek() == ",":
                cur.pos += 1
            elif cur.peek() != "}":
                raise cur.fail(name, "expected ',' or '}' after label value")
    cur.skip_blanks()
    value_text = cur.token()
    if not value_text:
        raise cur.fail(name, "missing sample value")
    value = _parse_value(value_text, cur, name)
    cur.skip_blanks()
    timestamp_ms: int | None = None
    if not cur.at_end() and cur.peek() != "#":  # '#' starts an OpenMetrics exemplar, which we ignore
        ts_text = cur.token()
        try:
            timestamp_ms = int(ts_text)
        except ValueError:
            try:  # OpenMetrics gives seconds with a fraction
                timestamp_ms = round(float(ts_text) * 1000.0)
            except ValueError:
                raise cur.fail(name, f"bad timestamp {ts_text!r}") from None
        cur.skip_blanks()
        if not cur.at_end() and cur.peek() != "#":
            raise cur.fail(name, "unexpected text after timestamp")
    return Sample(name=name, labels=tuple(labels), value=value, timestamp_ms=timestamp_ms)


def _unescape_help(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in ("\\", "n"):
            out.append("\\" if text[i + 1] == "\\" else "\n")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _FamilyBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.type = "untyped"
        self.help = ""
        self.samples: list[Sample] = []


def _family_of(sample_name: str, declared: Mapping[str, _FamilyBuilder]) -> str:
    if sample_name in declared:
        return sample_name
    for family in declared.values():
        for suffix in _FAMILY_SUFFIXES.get(family.type, ()):
            if sample_name == family.name + suffix:
                return family.name
    return sample_name


def parse_prometheus_text(text: str, *, source: str = "metrics") -> dict[str, MetricFamily]:
    """Parse a text exposition into families keyed by family name (`source` names it in errors)."""
    families: dict[str, _FamilyBuilder] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].lstrip().split(None, 2)
            if len(parts) >= 2 and parts[0] in ("HELP", "TYPE"):
                fam = families.setdefault(parts[1], _FamilyBuilder(parts[1]))
                rest = parts[2] if len(parts) == 3 else ""
                if parts[0] == "HELP":
                    fam.help = _unescape_help(rest)
                else:
                    kind = rest.strip().lower()
                    if kind not in METRIC_TYPES:
                        raise DataFileError(source, line_no, parts[1], f"unknown metric type {rest!r}")
                    if fam.samples and fam.type != kind:
                        raise DataFileError(source, line_no, parts[1], "# TYPE after the family's samples")
                    fam.type = kind
            continue  # plain comments and OpenMetrics' "# EOF"
        sample = _parse_sample(line, source, line_no)
        key = _family_of(sample.name, families)
        families.setdefault(key, _FamilyBuilder(key)).samples.append(sample)
    return {
        name: MetricFamily(name=f.name, type=f.type, help=f.help, samples=tuple(f.samples))
        for name, f in families.items()
    }


def _samples_named(families: Mapping[str, MetricFamily], sample_name: str) -> list[Sample]:
    return [s for fam in families.values() for s in fam.samples if s.name == sample_name]


def total(families: Mapping[str, MetricFamily], sample_name: str) -> float | None:
    """Sum of a sample over all its label sets (e.g. per model or per vLLM engine rank); None if absent."""
    found = _samples_named(families, sample_name)
    if not found:
        return None
    return math.fsum(s.value for s in found)


def histogram(families: Mapping[str, MetricFamily], name: str) -> Histogram | None:
    """The histogram family `name` summed over its label sets (other than `le`); None if absent."""
    buckets: dict[float, float] = {}
    for s in _samples_named(families, name + "_bucket"):
        le_text = s.label("le")
        if le_text is None:
            raise DataFileError("metrics", None, name, "histogram bucket without an 'le' label")
        le = math.inf if le_text.lower() in ("+inf", "inf") else float(le_text)
        buckets[le] = buckets.get(le, 0.0) + s.value
    sum_value = total(families, name + "_sum")
    count_value = total(families, name + "_count")
    if not buckets and sum_value is None and count_value is None:
        return None
    return Histogram(
        buckets=tuple(sorted(buckets.items())),
        sum=sum_value if sum_value is not None else 0.0,
        count=count_value if count_value is not None else 0.0,
    )


def _rate_per_s(current: int, previous: int, elapsed_s: float) -> float:
    if elapsed_s <= 0.0:
        return 0.0
    # A counter that went down was reset (process restarted): everything counted since is new.
    delta = current - previous if current >= previous else current
    return delta / elapsed_s


def extract_engine_metrics(
    families: Mapping[str, MetricFamily],
    *,
    scraped_s: float,
    previous: EngineMetrics | None = None,
    source: str = "metrics",
) -> EngineMetrics:
    """vLLM's serving metrics from parsed families; rates against `previous` (a scrape of the same process).

    The request gauges are required (the driver's drain relies on them): their absence raises
    `DataFileError`. Counters an engine does not expose count as 0.
    """
    required: dict[str, float] = {}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        value = total(families, name)
        if value is None:
            raise DataFileError(source, None, name, "metric missing from the exposition")
        required[name] = value
    kv_ratio = 0.0
    for name in KV_CACHE_METRIC_NAMES:
        found = _samples_named(families, name)
        if found:  # one gauge per engine rank: the mean is the node-level use
            kv_ratio = math.fsum(s.value for s in found) / len(found)
            break

    def counter(name: str) -> int:
        value = total(families, name)
        return 0 if value is None or math.isnan(value) else round(value)

    prompt = counter("vllm:prompt_tokens_total")
    generation = counter("vllm:generation_tokens_total")
    prompt_rate = generation_rate = 0.0
    if previous is not None:
        elapsed_s = scraped_s - previous.scraped_s
        prompt_rate = _rate_per_s(prompt, previous.prompt_tokens, elapsed_s)
        generation_rate = _rate_per_s(generation, previous.generation_tokens, elapsed_s)
    return EngineMetrics(
        scraped_s=scraped_s,
        running_requests_count=round(required["vllm:num_requests_running"]),
        waiting_requests_count=round(required["vllm:num_requests_waiting"]),
        kv_cache_usage_ratio=kv_ratio,
        prompt_tokens=prompt,
        generation_tokens=generation,
        finished_requests_count=counter("vllm:request_success_total"),
        preemptions_count=counter("vllm:num_preemptions_total"),
        prompt_tokens_per_s=prompt_rate,
        generation_tokens_per_s=generation_rate,
    )
