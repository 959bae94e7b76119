"""Prometheus text parser and vLLM metric extraction (agent.engine.metrics) on vLLM-style expositions."""

from __future__ import annotations

import math

import pytest

from agent.api.errors import DataFileError
from agent.engine.metrics import (
    EngineMetrics,
    extract_engine_metrics,
    histogram,
    parse_prometheus_text,
    total,
)

# Shaped like vLLM V1's /metrics (prometheus_client 0.2x): counters declared without `_total`, `_created`
# samples, a histogram, per-engine-rank labels, and a model path needing escapes.
VLLM_TEXT = r"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-2-70b-hf"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 4.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-2-70b-hf"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-2-70b-hf"} 0.25
# HELP vllm:num_preemptions Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 7.0
vllm:num_preemptions_created{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 1.7e+09
# HELP vllm:prompt_tokens Number of prefill tokens processed.
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 10000.0
vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-2-70b-hf"} 2000.0
# HELP vllm:generation_tokens Number of generation tokens processed.
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 5000.0
# HELP vllm:request_success Count of successfully processed requests.
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 40.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 0.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="m"} 30.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 40.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 42.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 42.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 12.5
vllm:time_to_first_token_seconds_created{engine="0",model_name="m"} 1.7e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",path="C:\\models\\llama",quote="say \"hi\"",multi="a\nb",} 1.0
"""


def test_parse_families_types_and_help() -> None:
    families = parse_prometheus_text(VLLM_TEXT)
    assert families["vllm:num_requests_running"].type == "gauge"
    assert families["vllm:prompt_tokens"].type == "counter"
    # `_total` and `_created` samples belong to the family declared without the suffix
    names = {s.name for s in families["vllm:num_preemptions"].samples}
    assert names == {"vllm:num_preemptions_total", "vllm:num_preemptions_created"}
    hist = families["vllm:time_to_first_token_seconds"]
    assert hist.type == "histogram"
    assert len(hist.samples) == 7
    assert families["vllm:kv_cache_usage_perc"].help == "KV-cache usage. 1 means 100 percent usage."
    # a family named with `_total` in its TYPE line keeps its own name
    assert families["python_gc_objects_collected_total"].samples[0].value == 1234.0


def test_label_escapes_and_trailing_comma() -> None:
    families = parse_prometheus_text(VLLM_TEXT)
    (sample,) = families["vllm:cache_config_info"].samples
    assert sample.label("path") == "C:\\models\\llama"
    assert sample.label("quote") == 'say "hi"'
    assert sample.label("multi") == "a\nb"
    assert sample.label("block_size") == "16"
    assert sample.label("absent") is None


def test_special_values_timestamps_blanks_and_comments() -> None:
    text = (
        "# a free comment\n\n"
        "# HELP esc A help with a \\\\ backslash and a \\n newline\n"
        "esc 1\n"
        "a_nan NaN\n"
        "a_pos +Inf 1700000000000\n"
        "a_neg -Inf\n"
        "a_sci 1.5e3\n"
        '  spaced { x = "1" , y="2" }   2.5  \t\n'
        "# EOF\n"
    )
    families = parse_prometheus_text(text)
    assert families["esc"].help == "A help with a \\ backslash and a \n newline"
    assert math.isnan(families["a_nan"].samples[0].value)
    assert families["a_pos"].samples[0].value == math.inf
    assert families["a_pos"].samples[0].timestamp_ms == 1_700_000_000_000
    assert families["a_neg"].samples[0].value == -math.inf
    assert families["a_sci"].samples[0].value == 1500.0
    spaced = families["spaced"].samples[0]
    assert spaced.labels == (("x", "1"), ("y", "2"))
    assert spaced.value == 2.5
    assert families["esc"].type == "untyped"


def test_openmetrics_exemplar_is_ignored() -> None:
    text = 'h_bucket{le="0.5"} 3 # {trace_id="abc"} 0.4 1700000000.1\n'
    (sample,) = parse_prometheus_text(text)["h_bucket"].samples
    assert sample.value == 3.0
    assert sample.timestamp_ms is None


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("ok 1\nbad{a=1} 2\n", 2, "expected '\"'"),
        ('ok 1\n\nbad{a="1} 2\n', 3, "unterminated label value"),
        ('bad{a="\\t"} 1\n', 1, "unknown escape"),
        ('bad{a="1",a="2"} 1\n', 1, "duplicate label"),
        ('bad{a="1" b="2"} 1\n', 1, "expected ',' or '}'"),
        ("bad\n", 1, "missing sample value"),
        ("bad one\n", 1, "bad sample value"),
        ("bad 1 soon\n", 1, "bad timestamp"),
        ("bad 1 2 3\n", 1, "unexpected text after timestamp"),
        ("9bad 1\n", 1, "expected a name"),
        ("# TYPE x widget\nx 1\n", 1, "unknown metric type"),
        ("x 1\n# TYPE x gauge\n", 2, "# TYPE after the family's samples"),
    ],
)
def test_malformed_lines_name_source_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(DataFileError) as info:
        parse_prometheus_text(text, source="http://127.0.0.1:8000/metrics")
    assert info.value.line == line
    assert info.value.path == "http://127.0.0.1:8000/metrics"
    assert fragment in str(info.value)


def test_histogram_sums_label_sets_and_estimates_quantiles() -> None:
    families = parse_prometheus_text(VLLM_TEXT)
    hist = histogram(families, "vllm:time_to_first_token_seconds")
    assert hist is not None
    assert hist.count == 42.0
    assert hist.sum == 12.5
    assert [le for le, _ in hist.buckets] == [0.1, 0.5, 1.0, math.inf]
    # rank 21 lies in (0.1, 0.5] holding cumulative 10..30: 0.1 + 0.4 * 11/20
    assert hist.quantile(0.5) == pytest.approx(0.1 + 0.4 * 11 / 20)
    assert hist.quantile(0.0) == 0.0
    # the top rank lies in the +Inf bucket: the highest finite bound, as PromQL
    assert hist.quantile(1.0) == 1.0
    assert histogram(families, "vllm:no_such_histogram") is None
    with pytest.raises(ValueError):
        hist.quantile(1.5)

    two = parse_prometheus_text(
        'h_bucket{e="0",le="1"} 1\nh_bucket{e="1",le="1"} 2\nh_bucket{e="0",le="+Inf"} 2\n'
        'h_bucket{e="1",le="+Inf"} 4\nh_count{e="0"} 2\nh_count{e="1"} 4\n'
    )
    merged = histogram(two, "h")
    assert merged is not None
    assert merged.buckets == ((1.0, 3.0), (math.inf, 6.0))
    assert merged.count == 6.0


def test_total_sums_label_sets() -> None:
    families = parse_prometheus_text(VLLM_TEXT)
    assert total(families, "vllm:prompt_tokens_total") == 12000.0
    assert total(families, "vllm:absent_total") is None


def test_extract_engine_metrics_and_rates() -> None:
    families = parse_prometheus_text(VLLM_TEXT)
    first = extract_engine_metrics(families, scraped_s=100.0)
    assert first == EngineMetrics(
        scraped_s=100.0,
        running_requests_count=5,
        waiting_requests_count=4,
        kv_cache_usage_ratio=0.375,
        prompt_tokens=12000,
        generation_tokens=5000,
        finished_requests_count=42,
        preemptions_count=7,
        prompt_tokens_per_s=0.0,
        generation_tokens_per_s=0.0,
    )
    assert first.outstanding_requests_count == 9
    later_text = VLLM_TEXT.replace(
        'vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 5000.0',
        'vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-2-70b-hf"} 5600.0',
    ).replace(
        'vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-2-70b-hf"} 2000.0',
        'vllm:prompt_tokens_total{engine="1",model_name="meta-llama/Llama-2-70b-hf"} 3000.0',
    )
    second = extract_engine_metrics(parse_prometheus_text(later_text), scraped_s=102.0, previous=first)
    assert second.generation_tokens_per_s == pytest.approx(300.0)
    assert second.prompt_tokens_per_s == pytest.approx(500.0)


def test_counter_reset_counts_from_zero() -> None:
    gauges = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
    before = extract_engine_metrics(
        parse_prometheus_text(gauges + "vllm:generation_tokens_total 1000\n"), scraped_s=0.0
    )
    after = extract_engine_metrics(
        parse_prometheus_text(gauges + "vllm:generation_tokens_total 40\n"), scraped_s=2.0, previous=before
    )
    assert after.generation_tokens_per_s == pytest.approx(20.0)


def test_old_vllm_kv_cache_name_and_missing_counters() -> None:
    text = (
        'vllm:num_requests_running{model_name="m"} 1\n'
        'vllm:num_requests_waiting{model_name="m"} 0\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.8\n'
    )
    metrics = extract_engine_metrics(parse_prometheus_text(text), scraped_s=0.0)
    assert metrics.kv_cache_usage_ratio == pytest.approx(0.8)
    assert metrics.prompt_tokens == 0
    assert metrics.preemptions_count == 0


def test_missing_request_gauge_is_an_error_naming_it() -> None:
    with pytest.raises(DataFileError) as info:
        extract_engine_metrics(
            parse_prometheus_text("vllm:num_requests_running 1\n"), scraped_s=0.0, source="engine-a"
        )
    assert info.value.field == "vllm:num_requests_waiting"
    assert info.value.path == "engine-a"
