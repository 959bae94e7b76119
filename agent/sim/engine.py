"""The simulated inference engine as a real program: an OpenAI-compatible HTTP server timed by the physics.

    python -m agent.sim.engine --model llama2-70b --gpu h100-sxm --tp 8 --gpus 0,1,2,3,4,5,6,7 \
        --port 8000 --node-dir /run/dynamollm-agent/sim-node [--max-num-seqs 256 --max-num-batched-tokens 512]

Where it sits: the agent's engine driver (`agent.engine.driver`) starts it as a subprocess exactly like
`vllm serve`, polls `/health`, scrapes `/metrics` (vLLM's `vllm:*` names) and stops it with SIGTERM; clients
send `/v1/completions` and `/v1/chat/completions`. Unlike the virtual-clock core used by the cluster
simulator (`agent.sim.engine_core`), this engine runs in real time: a continuous-batching loop prices each
iteration with `PerfModel.iteration` at the clock currently set on its GPUs (read from the simulated node
directory, `agent.sim.node`, which `agent.gpu.simulated.SimulatedGpuBackend` writes), sleeps for the
iteration's latency and then emits one token to every decoding request. It writes its power and energy
above idle back to the node directory, so the backend's readings follow the load.

Scheduling per iteration (vLLM v0 with chunked prefill, FCFS): every decoding request produces one token;
the rest of the `max_num_batched_tokens` budget goes to prompt chunks, first of admitted requests, then of
waiting ones in arrival order. A waiting request is admitted when `max_num_seqs` allows and the KV cache
holds its prompt plus all its output tokens: reserving the whole answer up front means no preemption
(vLLM allocates lazily and preempts; the difference matters only near a full cache). The iteration that
finishes a prompt produces the first token. Answers are exactly `max_tokens` long (no EOS).

Sim-only extension: `POST /admin/drain` stops admission (new requests get 503 + Retry-After) while
accepted requests finish. SIGTERM does the same, waits up to `--shutdown-grace-s` for them, then exits 0.
Kept light to import (no numpy): the driver's start-up time is measured with it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.api.errors import DynamoError, InvalidArgumentError, NotFoundError
from agent.gpu.simulated import supported_clocks_mhz
from agent.sim.node import GpuActivity, NodeDir
from agent.sim.physics import PerfModel, load_perf_model
from agent.sim.physics.specs import GPU_NAMES, MODEL_NAMES, gpu_for

# max_position_embeddings of each model's Hugging Face config: the longest request the model accepts.
_MODEL_CONTEXT_TOKENS = {"llama2-70b": 4096, "llama3.1-8b": 131072, "llama3.1-70b": 131072}
# Chat templates wrap each message in role markers; Llama's cost about this many tokens per message.
_CHAT_TOKENS_PER_MESSAGE = 4
# The node directory is written at most this often while busy (and at every busy/idle transition):
# readers see the energy counter at most this late, at a few small writes per GPU per second.
_ACTIVITY_WRITE_PERIOD_S = 0.05
_MEM_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization: what a loaded engine holds on each GPU
# Generated text: a fixed word cycle, so answers are deterministic and every token is one word.
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away")

# vLLM's histogram buckets (vllm/engine/metrics.py).
_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


def approx_token_count(text: str) -> int:
    """Deterministic tokenizer stand-in: each whitespace-separated word costs one token per 4 characters
    (English averages about 4 characters per Llama token)."""
    return sum((len(word) + 3) // 4 for word in text.split())


def token_text(index: int) -> str:
    return " " + _WORDS[index % len(_WORDS)]


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True, slots=True)
class EngineOptions:
    model: str
    served_model_name: str
    gpu: str
    tp: int
    gpu_indices: tuple[int, ...]
    host: str
    port: int
    node_dir: str | None
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None
    default_max_tokens: int
    startup_s: float
    shutdown_grace_s: float
    retry_after_s: int


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent.sim.engine",
        description="Simulated OpenAI-compatible inference engine timed by the dynamollm physics model.",
    )
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--gpu", default="h100-sxm", help=f"GPU type, one of {', '.join(GPU_NAMES)}")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument(
        "--gpus", default=None, help="GPU indices, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES, else 0..tp-1)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged as engine_listening)")
    p.add_argument("--node-dir", default=None, help="simulated node directory (default: GPUs unlocked)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None, help="default: model context, bounded by KV")
    p.add_argument(
        "--default-max-tokens", type=int, default=16, help="answer length when max_tokens is absent"
    )
    p.add_argument(
        "--startup-s", type=float, default=0.2, help="imitated model loading; /health is 503 meanwhile"
    )
    p.add_argument(
        "--shutdown-grace-s", type=float, default=30.0, help="SIGTERM: wait this long for requests"
    )
    p.add_argument("--retry-after-s", type=int, default=1, help="Retry-After of 503 answers while draining")
    p.add_argument("--log-level", default="info")
    return p


def _parse_gpu_indices(text: str, field: str) -> tuple[int, ...]:
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgumentError(field, text, "comma-separated GPU indices, e.g. 0,1") from None
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise InvalidArgumentError(field, text, "distinct indices >= 0")
    return indices


def options_from_args(ns: argparse.Namespace, environ: dict[str, str]) -> EngineOptions:
    """Validated options; InvalidArgumentError names the flag."""
    if ns.gpus is not None:
        gpu_indices = _parse_gpu_indices(ns.gpus, "--gpus")
    elif environ.get("CUDA_VISIBLE_DEVICES"):
        gpu_indices = _parse_gpu_indices(environ["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES")
    else:
        gpu_indices = tuple(range(ns.tp))
    if len(gpu_indices) != ns.tp:
        raise InvalidArgumentError(
            "--gpus", ",".join(map(str, gpu_indices)), f"exactly --tp ({ns.tp}) indices"
        )
    checks: tuple[tuple[str, float, float, float], ...] = (
        ("--port", ns.port, 0, 65535),
        ("--max-num-seqs", ns.max_num_seqs, 1, 1 << 20),
        ("--max-num-batched-tokens", ns.max_num_batched_tokens, max(1, ns.max_num_seqs), 1 << 24),
        ("--default-max-tokens", ns.default_max_tokens, 1, 1 << 24),
        ("--startup-s", ns.startup_s, 0.0, 3600.0),
        ("--shutdown-grace-s", ns.shutdown_grace_s, 0.0, 3600.0),
        ("--retry-after-s", ns.retry_after_s, 0, 3600),
    )
    for flag, value, lo, hi in checks:
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InvalidArgumentError(flag, value, f"{lo:g}..{hi:g}")
    if ns.max_model_len is not None and ns.max_model_len < 2:
        raise InvalidArgumentError("--max-model-len", ns.max_model_len, ">= 2")
    if ns.model not in MODEL_NAMES:
        raise InvalidArgumentError("--model", ns.model, MODEL_NAMES)
    if ns.gpu not in GPU_NAMES:
        raise InvalidArgumentError("--gpu", ns.gpu, GPU_NAMES)
    try:
        load_perf_model(ns.model, ns.gpu, ns.tp)  # the TP degrees the model is fitted for and fits on
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"--{err.field}", err.value, err.allowed) from None
    return EngineOptions(
        model=ns.model,
        served_model_name=ns.served_model_name or ns.model,
        gpu=ns.gpu,
        tp=ns.tp,
        gpu_indices=gpu_indices,
        host=ns.host,
        port=ns.port,
        node_dir=ns.node_dir,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len,
        default_max_tokens=ns.default_max_tokens,
        startup_s=ns.startup_s,
        shutdown_grace_s=ns.shutdown_grace_s,
        retry_after_s=ns.retry_after_s,
    )


# ------------------------------------------------------------------------------------------ metrics
class Histogram:
    """A Prometheus histogram: cumulative buckets rendered from per-bucket counts."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))


class Metrics:
    """Counters and histograms of one engine, exposed in Prometheus text format with vLLM's names."""

    def __init__(self, model_name: str) -> None:
        self.label = f'model_name="{_escape_label(model_name)}"'
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished = 0
        self.ttft = Histogram(_TTFT_BUCKETS_S)
        self.tpot = Histogram(_TPOT_BUCKETS_S)
        self.e2e = Histogram(_E2E_BUCKETS_S)

    def render(self, running: int, waiting: int, kv_usage_ratio: float, engine: RealTimeEngine) -> str:
        lab = self.label
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

        scalar("vllm:num_requests_running", "gauge", "Number of requests currently running on GPU.", running)
        scalar("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting)
        scalar(
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "GPU KV-cache usage. 1 means 100 percent usage.",
            kv_usage_ratio,
        )
        scalar(
            "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv_usage_ratio
        )
        scalar(
            "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", self.prompt_tokens
        )
        scalar(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            self.generation_tokens,
        )
        scalar(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            self.requests_finished,
            f'{lab},finished_reason="length"',
        )
        histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft
        )
        histogram(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", self.tpot
        )
        histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            self.e2e,
        )
        # Simulation-only: what the physics model says the engine's GPUs are doing (DESIGN §10 names).
        scalar(
            "dynamollm_sim_engine_sm_clock_hertz",
            "gauge",
            "SM clock the engine runs at.",
            engine.clock_mhz * 1e6,
        )
        scalar("dynamollm_sim_engine_power_watts", "gauge", "Power of all the engine's GPUs.", engine.power_w)
        scalar(
            "dynamollm_sim_engine_energy_joules_total",
            "counter",
            "Energy of the engine's GPUs above idle since the engine started.",
            engine.extra_energy_j,
        )
        return "".join(out)


# ------------------------------------------------------------------------------------------- engine
# Put in a request's token queue instead of a token index when the engine gives up on the request.
ABORTED = -1

_WAITING = 0
_PREFILL = 1
_DECODE = 2
_DONE = 3


class _Request:
    """One request inside the engine; tokens go to the handler through `tokens` (None ends the answer)."""

    __slots__ = (
        "aborted",
        "arrival_s",
        "generated",
        "input_tokens",
        "last_token_s",
        "output_tokens",
        "prefilled",
        "state",
        "tokens",
    )

    def __init__(self, input_tokens: int, output_tokens: int, arrival_s: float) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.arrival_s = arrival_s
        self.state = _WAITING
        self.prefilled = 0
        self.generated = 0
        self.last_token_s = arrival_s
        self.aborted = False
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()


class _GpuSettingsView:
    """The clock and power limit currently set on the engine's GPUs, re-read only when a file changed."""

    def __init__(self, node: NodeDir | None, gpu_indices: tuple[int, ...], max_clock_mhz: int, tdp_w: float):
        self._node = node
        self._indices = gpu_indices
        self._max_clock_mhz = max_clock_mhz
        self._tdp_w = tdp_w
        self._stamps: dict[int, tuple[int, int] | None] = {}
        self._values: dict[int, tuple[int, float]] = {i: (max_clock_mhz, tdp_w) for i in gpu_indices}

    def current(self) -> tuple[int, float]:
        """(clock_mhz, power_limit_w): the slowest GPU sets a TP group's pace, the lowest limit caps it."""
        if self._node is None:
            return self._max_clock_mhz, self._tdp_w
        for i in self._indices:
            path = self._node.control_path(i)
            try:
                st = os.stat(path)
                stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                stamp = None
            if i in self._stamps and self._stamps[i] == stamp:
                continue
            self._stamps[i] = stamp
            control = self._node.read_control(i) if stamp is not None else None
            if control is None:
                self._values[i] = (self._max_clock_mhz, self._tdp_w)
            else:
                clock = control.locked_max_clock_mhz
                self._values[i] = (self._max_clock_mhz if clock is None else clock, control.power_limit_w)
        return min(v[0] for v in self._values.values()), min(v[1] for v in self._values.values())


class RealTimeEngine:
    """Continuous batching in real time on the event loop; see the module docstring for the policy."""

    def __init__(self, opts: EngineOptions, perf: PerfModel, node: NodeDir | None) -> None:
        self._opts = opts
        self._perf = perf
        spec = gpu_for(opts.gpu)
        self._idle_w = perf.idle_power_w
        # a lock below the lowest clock the model is stated for runs at that clock (never happens with the
        # simulated backend, whose supported clocks start there)
        self._clocks_mhz = tuple(c for c in supported_clocks_mhz(spec) if c >= perf.min_clock_mhz)
        self._settings = _GpuSettingsView(node, opts.gpu_indices, perf.max_clock_mhz, spec.tdp_w)
        self._node = node
        self._mem_used_bytes = int(_MEM_UTILIZATION * spec.memory_bytes)
        self._kv_capacity = perf.kv_capacity_tokens
        self._kv_used = 0
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._decoding: list[_Request] = []
        self._wake = asyncio.Event()
        self.metrics = Metrics(opts.served_model_name)
        self.clock_mhz = perf.max_clock_mhz
        self.power_w = perf.tp * self._idle_w
        self.power_capped = False
        self.extra_energy_j = 0.0
        self._busy_s = 0.0
        # counters continue those of the previous engine on each GPU: the energy counter never goes back
        self._base: dict[int, GpuActivity] = {}
        if node is not None:
            self._base = {i: node.read_activity(i) for i in opts.gpu_indices}
        self._last_write_s = -math.inf
        self._last_busy = False
        self._aborted = 0
        self.loaded = False  # the GPUs are claimed (memory, power) once the model is "loaded"

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage_ratio(self) -> float:
        return self._kv_used / self._kv_capacity

    @property
    def max_request_tokens(self) -> int:
        return self._kv_capacity

    def submit(self, input_tokens: int, output_tokens: int) -> _Request:
        req = _Request(input_tokens, output_tokens, time.monotonic())
        self._waiting.append(req)
        self._wake.set()
        return req

    def abort(self, req: _Request) -> None:
        """Forget a request whose client went away; it leaves the batch at the next iteration boundary."""
        if not req.aborted and req.state != _DONE:
            req.aborted = True
            self._aborted += 1
            self._wake.set()

    def abort_all(self) -> None:
        """End every request now (shutdown grace expired): handlers get `ABORTED` instead of a token."""
        for req in (*self._waiting, *self._prefilling, *self._decoding):
            self.abort(req)
            req.tokens.put_nowait(ABORTED)

    # ---------------------------------------------------------------- loop
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline_s = loop.time()
        while True:
            self._drop_aborted()
            if not (self._waiting or self._prefilling or self._decoding):
                self.power_w = self._perf.tp * self._idle_w
                self._publish(loop.time(), busy=False, force=True)
                self._wake.clear()
                await self._wake.wait()
                deadline_s = loop.time()
                continue
            chunks, attn_tokens = self._plan()
            decode_seqs = len(self._decoding)
            decode_ctx = sum(r.input_tokens + r.generated for r in self._decoding)
            prefill_tokens = sum(n for _, n in chunks)
            latency_s, power_w = self._price(prefill_tokens, attn_tokens, decode_seqs, decode_ctx)
            self.power_w = self._perf.tp * power_w
            start_s = loop.time()
            self._publish(start_s, busy=True, force=False)
            # Absolute deadlines: a late wake-up is made up by the next iteration, so the token rate over
            # a busy period is the model's, not the model's minus the event loop's overshoot.
            deadline_s = max(deadline_s, start_s - latency_s) + latency_s
            await asyncio.sleep(max(0.0, deadline_s - loop.time()))
            self.extra_energy_j += self._perf.tp * (power_w - self._idle_w) * latency_s
            self._busy_s += latency_s
            self._apply(chunks, time.monotonic())

    def _price(
        self, prefill_tokens: int, attn_tokens: int, decode_seqs: int, decode_ctx: int
    ) -> tuple[float, float]:
        locked_mhz, limit_w = self._settings.current()
        clocks = self._clocks_mhz
        clock = max(clocks[0], min(locked_mhz, clocks[-1]))
        iteration = self._perf.iteration
        latency_s, power_w = iteration(clock, prefill_tokens, attn_tokens, decode_seqs, decode_ctx)
        capped = False
        if power_w > limit_w:
            # The power limit pulls the clock down to the highest supported clock that stays under it.
            capped = True
            hi = bisect.bisect_right(clocks, clock) - 1
            lo = 0
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if iteration(clocks[mid], prefill_tokens, attn_tokens, decode_seqs, decode_ctx)[1] <= limit_w:
                    lo = mid
                else:
                    hi = mid - 1
            clock = clocks[lo]
            latency_s, power_w = iteration(clock, prefill_tokens, attn_tokens, decode_seqs, decode_ctx)
        self.clock_mhz = clock
        self.power_capped = capped
        return latency_s, power_w

    def _drop_aborted(self) -> None:
        if not self._aborted:
            return
        self._aborted = 0
        for queue in (self._waiting, self._prefilling):
            kept = [r for r in queue if not r.aborted]
            queue.clear()
            queue.extend(kept)
        self._decoding = [r for r in self._decoding if not r.aborted]
        self._kv_used = sum(r.input_tokens + r.output_tokens for r in (*self._prefilling, *self._decoding))

    def _plan(self) -> tuple[list[tuple[_Request, int]], int]:
        """Prompt chunks of this iteration (decodes are implicit: all of `_decoding`) and their attention
        work (chunk length x context after the chunk, summed)."""
        budget = self._opts.max_num_batched_tokens - len(self._decoding)
        chunks: list[tuple[_Request, int]] = []
        attn_tokens = 0
        for req in self._prefilling:
            if budget <= 0:
                break
            n = min(req.input_tokens - req.prefilled, budget)
            chunks.append((req, n))
            attn_tokens += n * (req.prefilled + n)
            budget -= n
        while budget > 0 and self._waiting and self.num_running < self._opts.max_num_seqs:
            req = self._waiting[0]
            need = req.input_tokens + req.output_tokens
            if self._kv_used + need > self._kv_capacity:
                break  # FCFS: no skipping past a request that does not fit
            self._waiting.popleft()
            self._kv_used += need
            req.state = _PREFILL
            self._prefilling.append(req)
            n = min(req.input_tokens, budget)
            chunks.append((req, n))
            attn_tokens += n * n
            budget -= n
        return chunks, attn_tokens

    def _apply(self, chunks: list[tuple[_Request, int]], now_s: float) -> None:
        """Account the iteration that just ended at `now_s`: one token per decoding request, prompt chunks
        advanced, first tokens for finished prompts."""
        m = self.metrics
        still: list[_Request] = []
        for req in self._decoding:
            m.tpot.observe(now_s - req.last_token_s)
            self._emit(req, now_s)
            if req.state != _DONE:
                still.append(req)
        self._decoding = still
        for req, n in chunks:
            req.prefilled += n
            m.prompt_tokens += n
            if req.prefilled < req.input_tokens:
                continue
            self._prefilling.remove(req)
            m.ttft.observe(now_s - req.arrival_s)
            self._emit(req, now_s)
            if req.state != _DONE:
                req.state = _DECODE
                self._decoding.append(req)

    def _emit(self, req: _Request, now_s: float) -> None:
        req.tokens.put_nowait(req.generated)
        req.generated += 1
        req.last_token_s = now_s
        self.metrics.generation_tokens += 1
        if req.generated >= req.output_tokens:
            req.state = _DONE
            req.tokens.put_nowait(None)
            self._kv_used -= req.input_tokens + req.output_tokens
            self.metrics.requests_finished += 1
            self.metrics.e2e.observe(now_s - req.arrival_s)

    def _publish(self, now_s: float, *, busy: bool, force: bool) -> None:
        """Write this engine's activity to the node directory (rate-limited while busy)."""
        if self._node is None or not self.loaded:
            return
        if not force and busy == self._last_busy and now_s - self._last_write_s < _ACTIVITY_WRITE_PERIOD_S:
            return
        self._last_write_s = now_s
        self._last_busy = busy
        per_gpu_extra_j = self.extra_energy_j / self._perf.tp
        per_gpu_busy_s = self._busy_s
        extra_w = self.power_w / self._perf.tp - self._idle_w if busy else 0.0
        for i in self._opts.gpu_indices:
            base = self._base[i]
            self._node.write_activity(
                i,
                GpuActivity(
                    pid=os.getpid(),
                    extra_energy_j=base.extra_energy_j + per_gpu_extra_j,
                    extra_power_w=extra_w,
                    busy_s=base.busy_s + per_gpu_busy_s,
                    clock_mhz=self.clock_mhz,
                    power_capped=self.power_capped and busy,
                    mem_used_bytes=self._mem_used_bytes,
                ),
            )

    def mark_loaded(self) -> None:
        """The model is "loaded": from now on the engine holds its GPUs' memory and reports its power."""
        self.loaded = True
        self._publish(time.monotonic(), busy=False, force=True)

    def release_gpus(self) -> None:
        """Leave the GPUs: counters kept for the next engine, no power, no memory, no process."""
        if self._node is None:
            return
        for i in self._opts.gpu_indices:
            base = self._base[i]
            self._node.write_activity(
                i,
                GpuActivity(
                    pid=0,
                    extra_energy_j=base.extra_energy_j + self.extra_energy_j / self._perf.tp,
                    extra_power_w=0.0,
                    busy_s=base.busy_s + self._busy_s,
                    clock_mhz=0,
                    power_capped=False,
                    mem_used_bytes=0,
                ),
            )


# --------------------------------------------------------------------------------------- HTTP layer
def _error_response(
    message: str, status: int, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(status, "Error")
    body = {"object": "error", "message": message, "type": kind, "param": param, "code": status}
    return web.json_response(body, status=status, headers=headers)


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(name, value, "an integer >= 1")
    return value


def _prompt_tokens(body: dict[str, Any]) -> int:
    ids = body.get("prompt_token_ids")
    prompt = body.get("prompt") if ids is None else ids
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return max(1, approx_token_count(prompt))
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return len(prompt)
    raise InvalidArgumentError("prompt", prompt, "a string, a list of token ids, or a batch of one of either")


def _chat_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages", messages, "a non-empty list of {role, content}")
    total = 0
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) else None for p in content]
            texts = [t for t in parts if isinstance(t, str)]
            if len(texts) != len(content):
                raise InvalidArgumentError(
                    f"messages[{i}].content", content, "a string or a list of text parts"
                )
            content = " ".join(texts)
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}]", msg, "{role: str, content: str}")
        total += approx_token_count(content) + _CHAT_TOKENS_PER_MESSAGE
    return total


class EngineServer:
    """The HTTP face of a `RealTimeEngine`: OpenAI-compatible endpoints, health, metrics, drain."""

    def __init__(self, opts: EngineOptions, engine: RealTimeEngine, max_model_len: int) -> None:
        self.opts = opts
        self.engine = engine
        self.max_model_len = max_model_len
        self.ready = False
        self.accepting = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._counter = 0
        self.created_s = int(time.time())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/admin/drain", self.drain)
        return app

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.Response(status=503, text="loading")
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        e = self.engine
        text = e.metrics.render(e.num_running, e.num_waiting, e.kv_usage_ratio, e)
        return web.Response(
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def models(self, request: web.Request) -> web.Response:
        name = self.opts.served_model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created_s,
            "owned_by": "dynamollm-sim",
            "root": self.opts.model,
            "max_model_len": self.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def drain(self, request: web.Request) -> web.Response:
        self.accepting = False
        e = self.engine
        return web.json_response({"draining": True, "running": e.num_running, "waiting": e.num_waiting})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    def _parse(self, body: Any, chat: bool) -> tuple[int, int, bool, bool]:
        """(prompt tokens, output tokens, stream, include_usage) of a request body; InvalidArgumentError
        (HTTP 400) naming the field, NotFoundError (404) for another model."""
        if not isinstance(body, dict):
            raise InvalidArgumentError("body", type(body).__name__, "a JSON object")
        model = body.get("model")
        if model is not None and model != self.opts.served_model_name:
            raise NotFoundError(f"The model `{model}` does not exist.")
        n = body.get("n", 1)
        if n != 1:
            raise InvalidArgumentError("n", n, [1])
        prompt = _chat_tokens(body) if chat else _prompt_tokens(body)
        key = (
            "max_completion_tokens"
            if chat and body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        output = _int_field(body, key, self.opts.default_max_tokens)
        assert output is not None
        if prompt + output > self.max_model_len:
            raise InvalidArgumentError(
                key,
                output,
                f"at most {self.max_model_len - prompt}: the model's maximum context length is "
                f"{self.max_model_len} tokens and the prompt has {prompt}",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidArgumentError("stream", stream, "true, false")
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage", False)) if isinstance(options, dict) else False
        return prompt, output, stream, include_usage

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if not self.ready or not self.accepting:
            why = "loading" if not self.ready else "draining"
            return _error_response(
                f"engine is {why}; retry later", 503, headers={"Retry-After": str(self.opts.retry_after_s)}
            )
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error_response("the body is not valid JSON", 400)
        try:
            prompt_tokens, output_tokens, stream, include_usage = self._parse(body, chat)
        except InvalidArgumentError as err:
            # the top-level field, as OpenAI's `param` names it
            return _error_response(str(err), 400, err.field.split("[")[0].split(".")[0])
        except NotFoundError as err:
            return _error_response(str(err), 404, "model")
        self._counter += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{os.getpid()}-{self._counter}"
        self.in_flight += 1
        self._idle.clear()
        req = self.engine.submit(prompt_tokens, output_tokens)
        try:
            if stream:
                return await self._stream(request, req, rid, chat, prompt_tokens, include_usage)
            return await self._whole(request, req, rid, chat, prompt_tokens)
        except (ConnectionResetError, asyncio.CancelledError):
            self.engine.abort(req)
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _whole(
        self, request: web.Request, req: _Request, rid: str, chat: bool, prompt_tokens: int
    ) -> web.StreamResponse:
        pieces: list[str] = []
        while (index := await req.tokens.get()) is not None:
            if index == ABORTED:
                return _error_response("engine shut down before the request finished", 503)
            pieces.append(token_text(index))
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.opts.served_model_name,
            "choices": [choice],
            "usage": self._usage(prompt_tokens, len(pieces)),
        }
        # written here rather than by aiohttp after return, so `in_flight` covers the delivery
        resp = web.json_response(body)
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    async def _stream(
        self,
        request: web.Request,
        req: _Request,
        rid: str,
        chat: bool,
        prompt_tokens: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self.opts.served_model_name

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            doc: dict[str, Any] = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage is not None:
                doc["usage"] = usage
            return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

        if chat:
            await resp.write(
                chunk(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        produced = 0
        index = await req.tokens.get()
        while index is not None:
            if index == ABORTED:
                await resp.write_eof()  # no [DONE]: the client sees a truncated stream
                return resp
            produced += 1
            following = await req.tokens.get()
            if following == ABORTED:
                await resp.write_eof()
                return resp
            finish = "length" if following is None else None
            text = token_text(index)
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            await resp.write(chunk([choice]))
            index = following
        if include_usage:
            await resp.write(chunk([], self._usage(prompt_tokens, produced)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# ------------------------------------------------------------------------------------------- main
async def serve(opts: EngineOptions) -> int:
    """Run until SIGTERM/SIGINT; 0 after a graceful stop."""
    import structlog

    log = structlog.get_logger("agent.sim.engine")
    perf = load_perf_model(opts.model, opts.gpu, opts.tp)
    node: NodeDir | None = None
    if opts.node_dir is not None:
        node = NodeDir(opts.node_dir)
        spec = node.read_spec()
        if spec is not None:
            if spec.gpu != opts.gpu:
                raise InvalidArgumentError("--gpu", opts.gpu, [spec.gpu])
            bad = [i for i in opts.gpu_indices if i >= spec.gpus]
            if bad:
                raise InvalidArgumentError("--gpus", bad, f"indices 0..{spec.gpus - 1} of the node")
        else:
            node.path.mkdir(parents=True, exist_ok=True)
    context = _MODEL_CONTEXT_TOKENS[opts.model]
    max_model_len = opts.max_model_len or min(context, perf.kv_capacity_tokens)
    if max_model_len > perf.kv_capacity_tokens:
        raise InvalidArgumentError(
            "--max-model-len", max_model_len, f"<= {perf.kv_capacity_tokens} (KV cache)"
        )

    engine = RealTimeEngine(opts, perf, node)
    server = EngineServer(opts, engine, max_model_len)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    port = runner.addresses[0][1]
    log.info(
        "engine_listening",
        host=opts.host,
        port=port,
        model=opts.model,
        tp=opts.tp,
        gpus=list(opts.gpu_indices),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop_task = asyncio.create_task(engine.run())
    try:
        try:
            await asyncio.wait_for(stop.wait(), opts.startup_s)
        except TimeoutError:
            server.ready = True
            engine.mark_loaded()
            log.info("engine_ready", port=port, startup_s=opts.startup_s)
            await stop.wait()
        server.accepting = False
        log.info("engine_stopping", in_flight=server.in_flight, grace_s=opts.shutdown_grace_s)
        finished = await server.wait_idle(opts.shutdown_grace_s)
        if not finished:
            log.warning("engine_grace_expired", in_flight=server.in_flight)
            engine.abort_all()
            await server.wait_idle(1.0)
    finally:
        loop_task.cancel()
        await runner.cleanup()
        engine.release_gpus()
    log.info("engine_stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    from agent.api.log import configure_logging

    configure_logging(ns.log_level)
    try:
        opts = options_from_args(ns, dict(os.environ))
        return asyncio.run(serve(opts))
    except DynamoError as err:
        print(f"agent.sim.engine: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"agent.sim.engine: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
