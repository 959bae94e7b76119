"""What the simulated engine program counts, and its `/metrics` page in vLLM's Prometheus names.

Where it sits: the real-time engine loop (`agent.sim.realtime`) updates an `EngineStats` as it delivers
tokens and finishes requests; the HTTP face (`agent.sim.engine_http`) renders it with the engine's gauges
(`render_metrics`); the agent's engine driver scrapes the page (`agent.engine.metrics` parses it) exactly
as it scrapes a real vLLM.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

# vLLM's histogram buckets (vllm/engine/metrics.py).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class Histogram:
    """A Prometheus histogram: cumulative buckets rendered from per-bucket counts."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times


@dataclass
class EngineStats:
    """Counters and latency histograms of one engine process since it started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS_S))


@dataclass(frozen=True, slots=True)
class EngineGauges:
    """The engine's state at the moment of a scrape."""

    running: int
    waiting: int
    kv_usage_ratio: float
    preemptions: int
    clock_mhz: float
    power_w: float  # all the engine's GPUs, averaged over the last second
    extra_energy_j: float  # all the engine's GPUs, above idle, since the engine started


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


def render_metrics(model_name: str, stats: EngineStats, g: EngineGauges) -> str:
    """The Prometheus text exposition of one engine (label `model_name`)."""
    lab = f'model_name="{_escape_label(model_name)}"'
    out: list[str] = []

    def scalar(name: str, kind: str, help_text: str, value: float, labels: str = lab) -> None:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name}{{{labels}}} {_num(value)}\n")

    def histogram(name: str, help_text: str, h: Histogram) -> None:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
        cumulative = 0
        for bound, n in zip((*h.bounds, math.inf), h.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{{lab},le="{_num(bound)}"}} {_num(cumulative)}\n')
        out.append(f"{name}_sum{{{lab}}} {_num(h.sum)}\n{name}_count{{{lab}}} {_num(h.count)}\n")

    scalar("vllm:num_requests_running", "gauge", "Number of requests currently running on GPU.", g.running)
    scalar("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", g.waiting)
    scalar(
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage.",
        g.kv_usage_ratio,
    )
    scalar(
        "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", g.kv_usage_ratio
    )
    scalar(
        "vllm:num_preemptions_total",
        "counter",
        "Cumulative number of preemption from the engine.",
        g.preemptions,
    )
    scalar("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", stats.prompt_tokens)
    scalar(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        stats.generation_tokens,
    )
    scalar(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        stats.requests_finished,
        f'{lab},finished_reason="length"',
    )
    histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft)
    histogram(
        "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", stats.tpot
    )
    histogram(
        "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", stats.e2e
    )
    # Simulation-only: what the physics model says the engine's GPUs are doing (docs/architecture.md names).
    scalar("dynamollm_sim_engine_sm_clock_hertz", "gauge", "SM clock the engine runs at.", g.clock_mhz * 1e6)
    scalar(
        "dynamollm_sim_engine_power_watts",
        "gauge",
        "Power of all the engine's GPUs, averaged over the last second.",
        g.power_w,
    )
    scalar(
        "dynamollm_sim_engine_energy_joules_total",
        "counter",
        "Energy of the engine's GPUs above idle since the engine started.",
        g.extra_energy_j,
    )
    return "".join(out)
