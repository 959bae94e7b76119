"""The simulated engine core: a vLLM-like continuous-batching engine on a virtual clock.

Where it sits: the physics model (`agent.sim.physics`) prices one engine iteration (latency, power);
this module decides what each iteration contains (scheduling, KV cache, preemption) and turns the
priced iterations into per-request latencies and per-instance energy. The cluster simulator
(`controller.sim`) drives one `SimEngine` per simulated instance, and profile generation
(`controller.sim.profiling`) measures profiles by running it. Pure and deterministic: no wall clock,
randomness only from the injected generator.

Scheduling, per iteration (vLLM v0 with chunked prefill, FCFS):
  1. If the KV cache cannot hold one more token for every decoding request, preempt the most recently
     admitted running request back to the head of the waiting queue (recompute: its KV is dropped and its
     prompt plus the tokens it already generated are prefilled again later).
  2. Every decoding request produces one token (running decodes come first in the token budget).
  3. The remaining budget (`max_num_batched_tokens` minus the decodes) goes to prefill chunks: first the
     admitted requests whose prefill is unfinished, then waiting requests in arrival order; a waiting
     request is admitted only if `max_num_seqs` allows and its whole prompt fits in the free KV cache above
     a small watermark (no skipping: head-of-line blocking as in vLLM's FCFS policy).
The iteration that completes a request's prefill also produces its first token.

Cluster-control extensions (used by the dynamic cluster simulator; a caller that uses none of them gets the
plain FCFS engine above): a request may carry a TTFT deadline, and the waiting queue then stays in
earliest-deadline-first order (requests re-queued by a preemption stay at its head, as in vLLM); the
not-yet-started requests can be taken out (`take_waiting`, to move them to another instance) or dropped
once past their deadline (`reject_past_deadline`); a clock change may stall the engine (`set_clock(...,
stall_s)`: no iteration starts during the stall, GPUs at idle power); `drain` runs the held work to its
end and says when the engine went idle, so a draining instance's GPUs are released at that moment.

Cost: O(1) amortised per iteration in the number of running requests (the cluster simulator runs ~1e6
iterations per trace hour). Decode completions come from a min-heap keyed by the iteration of the last
token, the decode context is a running sum, and a request's largest inter-token gap is taken from a log of
iteration durations only when it completes. Where the next iterations can only decode (nothing to admit,
no preemption due, no completion before the last of them) and the model can price such a run in one call
(`decode_iterations`), they run in one tight loop with the same arithmetic as one by one; `stepwise=True`
is the reference engine without it. The module compiles with mypyc (agent/sim/native.py).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from agent.api.errors import InternalError, InvalidArgumentError

# Jitter multipliers are drawn in blocks: one generator call per block instead of per iteration. The
# sequence consumed per iteration does not depend on how the caller slices time with advance_to.
_JITTER_BLOCK = 4096
# Iteration-duration log: trimmed to the oldest decoding request once it holds this many entries.
_LOG_TRIM_MIN = 1 << 16
# A gap range shorter than this is reduced in Python; longer ones through a numpy view of the log.
_NUMPY_MAX_MIN_LEN = 64

_WAITING = 0
_PREFILL = 1
_DECODE = 2
_DONE = 3


class PerfModelLike(Protocol):
    """What the engine needs from a performance/power model (`agent.sim.physics.PerfModel` fits)."""

    @property
    def tp(self) -> int: ...

    @property
    def idle_power_w(self) -> float: ...

    @property
    def kv_capacity_tokens(self) -> int: ...

    @property
    def min_clock_mhz(self) -> int: ...

    @property
    def max_clock_mhz(self) -> int: ...

    def iteration(
        self,
        clock_mhz: float,
        prefill_tokens: int,
        prefill_attn_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float]: ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Scheduler settings of one engine instance (vLLM's names where vLLM has the knob)."""

    # Token budget per iteration. 512 is vLLM v0's chunked-prefill default and, as Sarathi-Serve argues,
    # the budget has to be sized for the TBT target: at 2048 an iteration carrying a full prefill chunk
    # (~170-200 ms at TP8 for Llama-2-70B) exceeds the default TBT SLO of 5x the unloaded ~30 ms, so no
    # long-prompt class could hold its p99 TBT at any load. At 512 such an iteration stays well inside it.
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 256
    # Coefficient of variation of the per-iteration latency multiplier (lognormal, mean 1): run-to-run
    # noise of a real engine, so that profiles have to be measured rather than read off the model.
    jitter_cv: float = 0.03
    # Share of the KV cache kept free when admitting a new prompt (vLLM's 1% watermark), so that running
    # decodes do not have to be preempted as soon as a prompt is admitted.
    kv_watermark_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidArgumentError("max_num_seqs", self.max_num_seqs, ">= 1")
        # Every decoding request must fit in each iteration's token budget: a decode is never deferred.
        if self.max_num_batched_tokens < self.max_num_seqs:
            allowed = f">= max_num_seqs ({self.max_num_seqs})"
            raise InvalidArgumentError("max_num_batched_tokens", self.max_num_batched_tokens, allowed)
        if not (0.0 <= self.jitter_cv <= 1.0):
            raise InvalidArgumentError("jitter_cv", self.jitter_cv, "0..1")
        if not (0.0 <= self.kv_watermark_fraction < 0.5):
            raise InvalidArgumentError("kv_watermark_fraction", self.kv_watermark_fraction, "0 <= x < 0.5")

    def max_request_tokens(self, kv_capacity_tokens: int) -> int:
        """Largest input + output a request may have on an engine with this KV cache: alone on the engine
        it must fit below the admission watermark."""
        return kv_capacity_tokens - math.ceil(self.kv_watermark_fraction * kv_capacity_tokens)


_DEFAULT_CONFIG = EngineConfig()


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    """A request taken out of an engine before it started (no prefill computed): it can be submitted to
    another engine unchanged, keeping its arrival time and deadline."""

    request_id: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    deadline_s: float


@dataclass(frozen=True, slots=True)
class CompletedRequest:
    """Latencies of one finished request, as a client of the engine would measure them.

    `tbt_mean_s` = (finish_s - first_token_s) / (output_tokens - 1); `tbt_max_s` is the largest gap
    between consecutive tokens (a preemption makes one long gap). Both are 0 for a one-token answer.
    """

    request_id: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    input_tokens: int
    output_tokens: int
    tbt_mean_s: float
    tbt_max_s: float

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


class _Request:
    """Mutable scheduling state of one request inside the engine."""

    __slots__ = (
        "admit_seq",
        "arrival_s",
        "ctx_base",
        "deadline_s",
        "first_token_s",
        "generated",
        "input_tokens",
        "last_token_s",
        "output_tokens",
        "prefilled",
        "request_id",
        "start_iter",
        "state",
        "target",
        "tbt_max_s",
    )

    def __init__(
        self, request_id: int, arrival_s: float, input_tokens: int, output_tokens: int, deadline_s: float
    ) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.deadline_s = deadline_s  # latest first-token time wanted (inf: none; FCFS)
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.state = _WAITING
        # tokens produced so far (the first comes from the prefill iteration)
        self.generated = 0
        # tokens to prefill: the prompt, plus the generated tokens after a recompute preemption
        self.target = input_tokens
        self.prefilled = 0
        self.admit_seq = -1
        # first iteration of the current decode run; the context of iteration j is ctx_base + j
        self.start_iter = 0
        self.ctx_base = 0
        self.first_token_s = math.nan
        self.last_token_s = math.nan
        self.tbt_max_s = 0.0


class SimEngine:
    """One simulated engine instance (tp GPUs) driven by a performance model on a virtual clock.

    Use: `advance_to(arrival_s)`, then `submit(...)`; `pop_completed()` for finished requests;
    `close(end_s)` at the end. `now_s` is the end of the last iteration run (or the idle time reached).
    """

    def __init__(
        self,
        perf: PerfModelLike,
        clock_mhz: float,
        rng: np.random.Generator,
        config: EngineConfig = _DEFAULT_CONFIG,
        start_s: float = 0.0,
        power_bin_s: float = 1.0,
        *,
        stepwise: bool = False,
    ) -> None:
        if not math.isfinite(start_s):
            raise InvalidArgumentError("start_s", start_s, "a finite time in seconds")
        if not (power_bin_s > 0 and math.isfinite(power_bin_s)):
            raise InvalidArgumentError("power_bin_s", power_bin_s, "positive seconds")
        self._iteration = perf.iteration
        # Runs of decode-only iterations are priced in one call where the model can (an optional
        # `decode_iterations(clock_mhz, decode_seqs, first_context_tokens, count)` equal to `iteration`
        # on each, as `agent.sim.physics.PerfModel` has), unless `stepwise` asks for the reference engine
        # that takes every iteration on its own. The results are the same, bit for bit.
        self._decode_run: Callable[[float, int, int, int], tuple[list[float], list[float]]] | None = (
            None if stepwise else getattr(perf, "decode_iterations", None)
        )
        self._config = config
        self._rng = rng
        self._min_clock_mhz = perf.min_clock_mhz
        self._max_clock_mhz = perf.max_clock_mhz
        self._clock_mhz = 0.0
        self._stall_until_s = start_s
        self.set_clock(clock_mhz)
        self._tp = perf.tp
        self._idle_total_w = perf.tp * perf.idle_power_w
        self._kv_capacity_tokens = perf.kv_capacity_tokens
        self._max_request_tokens = config.max_request_tokens(perf.kv_capacity_tokens)
        self._max_batched = config.max_num_batched_tokens
        self._max_seqs = config.max_num_seqs
        sigma2 = math.log1p(config.jitter_cv**2)
        self._jitter_sigma = math.sqrt(sigma2)
        self._jitter_mu = -sigma2 / 2.0  # mean of the multiplier is exactly 1
        self._jitter: list[float] = []
        self._jitter_pos = 0

        self._start_s = start_s
        self._now_s = start_s
        self._closed = False
        self._iter = 0  # global index of the next iteration
        self._last_start_s = start_s
        self._last_end_s = start_s
        self._last_total_w = 0.0

        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()  # admitted, prefill unfinished, admission order
        self._running: dict[int, _Request] = {}  # admit_seq -> request; insertion order = admission order
        self._admit_seq = 0
        self._finish_heap: list[tuple[int, int, _Request]] = []  # (iteration of last token, admit_seq, req)
        self._num_decoding = 0
        self._ctx_sum = 0  # decode context tokens of the next iteration, over decoding requests
        self._prefill_alloc = 0  # KV tokens reserved by admitted requests still in prefill
        self._outstanding = 0
        self._num_preemptions = 0
        self._completed: list[CompletedRequest] = []

        self._dur_log = array("d")  # duration of iteration (log_base + k)
        self._log_base = 0
        self._log_trim_at = _LOG_TRIM_MIN
        self._hist_gap_s = array("d")
        self._hist_tokens = array("q")

        self._energy_j = 0.0
        self._busy_s = 0.0
        self._bin_s = power_bin_s
        self._bins: list[float] = [0.0]
        self._bin_end_s = start_s + power_bin_s

    # ------------------------------------------------------------------ state
    @property
    def now_s(self) -> float:
        return self._now_s

    @property
    def start_s(self) -> float:
        """When the engine was created: its energy bins start here."""
        return self._start_s

    @property
    def clock_mhz(self) -> float:
        return self._clock_mhz

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def tp(self) -> int:
        return self._tp

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def outstanding_tokens(self) -> int:
        """Prefill tokens still to compute plus output tokens still to produce, over all requests held."""
        return self._outstanding

    @property
    def earliest_deadline_s(self) -> float:
        """Earliest TTFT deadline among the waiting requests not started yet (inf when none has one)."""
        for req in self._waiting:
            if req.generated == 0:
                return req.deadline_s  # the fresh requests are in deadline order
        return math.inf

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    def progress(self) -> dict[int, tuple[int, float, float]]:
        """Request id -> (tokens produced, first-token time, time of the latest token) of every held
        request that has produced a token (the real-time engine's bounded look-ahead reads it). A
        decoding request's count is kept lazily (one token per iteration since its decode run began),
        and its latest token came with the latest iteration."""
        out: dict[int, tuple[int, float, float]] = {}
        for r in (*self._running.values(), *self._waiting):
            if r.state == _DECODE:
                out[r.request_id] = (r.generated + self._iter - r.start_iter, r.first_token_s, self._now_s)
            elif r.generated:
                out[r.request_id] = (r.generated, r.first_token_s, r.last_token_s)
        return out

    @property
    def iterations(self) -> int:
        """Engine iterations run so far."""
        return self._iter

    @property
    def max_request_tokens(self) -> int:
        """Largest input + output a request may have: alone on the engine it must fit in the KV cache."""
        return self._max_request_tokens

    @property
    def energy_j(self) -> float:
        """Energy of all tp GPUs, busy and idle, from start_s up to now_s."""
        return self._energy_j

    @property
    def busy_s(self) -> float:
        return self._busy_s

    @property
    def tbt_histogram(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """(gap_s, tokens): each decode iteration's duration with the tokens it produced, plus one entry per
        token resumed after a preemption (its gap since the request's previous token). Weight percentiles by
        tokens to get the token-weighted TBT distribution."""
        return (
            np.array(self._hist_gap_s, dtype=np.float64),
            np.array(self._hist_tokens, dtype=np.int64),
        )

    @property
    def tbt_log_len(self) -> int:
        """Entries in the TBT log (see `tbt_histogram`)."""
        return len(self._hist_tokens)

    def take_tbt_log(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """The TBT log so far (as `tbt_histogram`), which then starts empty: a caller that folds it into
        its own histogram keeps the engine's memory bounded on long runs (16 bytes per decode iteration
        otherwise, ~6 GB for a simulated week of a cluster)."""
        log = self.tbt_histogram
        self._hist_gap_s = array("d")
        self._hist_tokens = array("q")
        return log

    @property
    def energy_by_bin_j(self) -> npt.NDArray[np.float64]:
        """Energy (J, all tp GPUs) per bin of power_bin_s from start_s; the last bin may be partial."""
        return np.array(self._bins, dtype=np.float64)

    # ---------------------------------------------------------------- control
    def set_clock(self, clock_mhz: float, stall_s: float = 0.0) -> None:
        """Clock (MHz) of the iterations that start from now on. `stall_s`: the time the change itself
        takes (50-80 ms through nvidia-smi, docs/control.md), during which no iteration starts and the
        GPUs draw idle power; it begins when the current iteration ends (now_s)."""
        if not (self._min_clock_mhz <= clock_mhz <= self._max_clock_mhz):
            raise InvalidArgumentError(
                "clock_mhz", clock_mhz, f"{self._min_clock_mhz}..{self._max_clock_mhz} MHz"
            )
        if not (0.0 <= stall_s < math.inf):
            raise InvalidArgumentError("stall_s", stall_s, "seconds >= 0")
        self._clock_mhz = float(clock_mhz)
        if stall_s > 0.0:
            self._stall_until_s = max(self._stall_until_s, self._now_s) + stall_s

    def submit(
        self,
        request_id: int,
        arrival_s: float,
        input_tokens: int,
        output_tokens: int,
        deadline_s: float = math.inf,
    ) -> None:
        """Queue a request; it joins at the next iteration boundary.

        The caller advances the engine to arrival_s first; an arrival later than now_s advances the engine
        to it here, so no iteration starting before the arrival can include the request. `deadline_s`
        (its TTFT deadline) places it in earliest-deadline-first order among the waiting requests not
        started yet; without one it queues last (FCFS). A request moved from another engine
        (`take_waiting`) keeps its original arrival time, which may lie before now_s.
        """
        self._check_open()
        if not math.isfinite(arrival_s):
            raise InvalidArgumentError("arrival_s", arrival_s, "a finite time in seconds")
        if input_tokens < 1:
            raise InvalidArgumentError("input_tokens", input_tokens, ">= 1")
        if output_tokens < 1:
            raise InvalidArgumentError("output_tokens", output_tokens, ">= 1")
        if input_tokens + output_tokens > self.max_request_tokens:
            raise InvalidArgumentError(
                "input_tokens+output_tokens",
                input_tokens + output_tokens,
                f"<= {self.max_request_tokens} (KV cache of this instance)",
            )
        if math.isnan(deadline_s):
            raise InvalidArgumentError("deadline_s", deadline_s, "a time in seconds or inf")
        if arrival_s > self._now_s:
            self.advance_to(arrival_s)
        req = _Request(request_id, arrival_s, input_tokens, output_tokens, deadline_s)
        waiting = self._waiting
        if not waiting or waiting[-1].deadline_s <= deadline_s:
            waiting.append(req)  # the common case: FCFS, or deadlines arriving in order
        else:
            # Deadlines differ by class, so a later arrival can be more urgent: walk back past the later
            # deadlines (never past a preempted request, which keeps its place at the head).
            k = len(waiting)
            while k > 0 and waiting[k - 1].deadline_s > deadline_s and waiting[k - 1].generated == 0:
                k -= 1
            waiting.insert(k, req)
        self._outstanding += input_tokens + output_tokens

    def take_waiting(self, max_deadline_s: float = math.inf) -> list[WaitingRequest]:
        """Remove and return the waiting requests not started yet whose deadline is <= max_deadline_s
        (all of them by default), in queue order, so they can be submitted elsewhere. Requests re-queued
        by a preemption stay: their prompt and generated tokens would have to be recomputed anyway."""
        self._check_open()
        return [self._as_waiting(r) for r in self._remove_waiting(lambda r: r.deadline_s <= max_deadline_s)]

    def reject_past_deadline(self, now_s: float) -> list[int]:
        """Drop the waiting requests not started yet whose TTFT deadline is before now_s; their ids.
        They never complete (the caller reports them as rejected)."""
        self._check_open()
        return [r.request_id for r in self._remove_waiting(lambda r: r.deadline_s < now_s)]

    def drain(self, limit_s: float) -> float | None:
        """Run the held work (the caller routes nothing new here) through iterations starting before
        limit_s. The time the engine went idle (the end of its last iteration), or None if still busy."""
        self.advance_to(limit_s)
        if self._running or self._waiting:
            return None
        return max(self._last_end_s, self._start_s)

    def advance_to(self, t_s: float) -> None:
        """Run every iteration that starts before t_s (the last may end after it); idle until t_s if
        there is no work."""
        self._check_open()
        if math.isnan(t_s) or math.isinf(t_s):
            raise InvalidArgumentError("t_s", t_s, "a finite time in seconds")
        while self._now_s < t_s:
            if self._now_s < self._stall_until_s:
                stall_end_s = min(self._stall_until_s, t_s)
                self._add_energy(self._now_s, stall_end_s, self._idle_total_w)
                self._energy_j += self._idle_total_w * (stall_end_s - self._now_s)
                self._now_s = stall_end_s
                continue
            if not self._running and not self._waiting:
                self._add_energy(self._now_s, t_s, self._idle_total_w)
                self._energy_j += self._idle_total_w * (t_s - self._now_s)
                self._now_s = t_s
                return
            if self._decode_run is None or not self._run_decodes(t_s):
                self._run_iteration()

    def close(self, end_s: float) -> None:
        """Advance to end_s and account energy up to exactly end_s: the part of the last iteration after
        end_s is not charged. now_s becomes end_s; the engine accepts no further calls."""
        self._check_open()
        if end_s < self._last_start_s:
            raise InvalidArgumentError(
                "end_s", end_s, f">= {self._last_start_s} (start of the last iteration already run)"
            )
        self.advance_to(end_s)
        # What ran after end_s: possibly an idle stretch (latest) after the tail of the last iteration.
        idle_from_s = max(end_s, self._last_end_s)
        if self._now_s > idle_from_s:
            self._energy_j -= self._idle_total_w * (self._now_s - idle_from_s)
            self._remove_energy_after(idle_from_s, self._idle_total_w)
            self._now_s = idle_from_s
        if self._now_s > end_s:
            busy_overrun_s = self._now_s - end_s
            self._energy_j -= self._last_total_w * busy_overrun_s
            self._busy_s -= busy_overrun_s
            self._remove_energy_after(end_s, self._last_total_w)
            self._now_s = end_s
        self._closed = True

    def pop_completed(self) -> list[CompletedRequest]:
        """Requests finished since the last call, in completion order."""
        done = self._completed
        self._completed = []
        return done

    # --------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise InternalError("SimEngine used after close()")

    def _remove_waiting(self, take: Callable[[_Request], bool]) -> list[_Request]:
        """Remove the fresh (never started) waiting requests selected by `take`; the rest keep their order."""
        if not self._waiting:
            return []
        taken: list[_Request] = []
        kept: deque[_Request] = deque()
        for req in self._waiting:
            if req.generated == 0 and take(req):
                taken.append(req)
                self._outstanding -= req.input_tokens + req.output_tokens
            else:
                kept.append(req)
        self._waiting = kept
        return taken

    @staticmethod
    def _as_waiting(req: _Request) -> WaitingRequest:
        return WaitingRequest(
            req.request_id, req.arrival_s, req.input_tokens, req.output_tokens, req.deadline_s
        )

    def _next_jitter(self) -> float:
        if self._jitter_pos >= len(self._jitter):
            self._draw_jitter()
        m = self._jitter[self._jitter_pos]
        self._jitter_pos += 1
        return m

    def _draw_jitter(self) -> None:
        z = self._rng.standard_normal(_JITTER_BLOCK)
        self._jitter = np.exp(self._jitter_mu + self._jitter_sigma * z).tolist()
        self._jitter_pos = 0

    def _gap_max(self, first_iter: int, last_iter: int) -> float:
        """Largest iteration duration over iterations first_iter..last_iter (inclusive, non-empty)."""
        a = first_iter - self._log_base
        b = last_iter - self._log_base + 1
        if b - a < _NUMPY_MAX_MIN_LEN:
            return max(self._dur_log[a:b])
        # a temporary view: released before the log is appended to again
        return float(np.frombuffer(self._dur_log, dtype=np.float64, count=b - a, offset=8 * a).max())

    def _preempt_last(self) -> None:
        """Move the most recently admitted running request back to the head of the waiting queue."""
        _, req = self._running.popitem()
        if req.state == _PREFILL:
            # the newest running request is the newest prefill too
            self._prefilling.pop()
            self._prefill_alloc -= req.target
            self._outstanding += req.prefilled
        else:
            it = self._iter
            steps = it - req.start_iter
            if steps > 0:
                req.tbt_max_s = max(req.tbt_max_s, self._gap_max(req.start_iter, it - 1))
            req.generated += steps
            req.last_token_s = self._now_s
            self._ctx_sum -= req.ctx_base + it
            self._num_decoding -= 1
            # recompute: the prompt and the tokens generated so far are prefilled again
            self._outstanding += req.input_tokens + req.generated
            req.target = req.input_tokens + req.generated
        req.state = _WAITING
        req.prefilled = 0
        self._waiting.appendleft(req)
        self._num_preemptions += 1

    def _complete(self, req: _Request, finish_s: float) -> None:
        del self._running[req.admit_seq]
        req.state = _DONE
        n_gaps = req.output_tokens - 1
        tbt_mean_s = (finish_s - req.first_token_s) / n_gaps if n_gaps > 0 else 0.0
        self._completed.append(
            CompletedRequest(
                request_id=req.request_id,
                arrival_s=req.arrival_s,
                first_token_s=req.first_token_s,
                finish_s=finish_s,
                input_tokens=req.input_tokens,
                output_tokens=req.output_tokens,
                tbt_mean_s=tbt_mean_s,
                tbt_max_s=req.tbt_max_s,
            )
        )

    def _run_iteration(self) -> None:
        it = self._iter
        cap = self._kv_capacity_tokens
        while self._prefill_alloc + self._ctx_sum > cap:
            self._preempt_last()
        decode_seqs = self._num_decoding
        budget = self._max_batched - decode_seqs
        prefill_tokens = 0
        attn_tokens = 0
        finished_prefill: list[_Request] = []

        prefilling = self._prefilling
        while prefilling and budget > 0:
            req = prefilling[0]
            chunk = min(req.target - req.prefilled, budget)
            req.prefilled += chunk
            budget -= chunk
            prefill_tokens += chunk
            attn_tokens += chunk * req.prefilled
            if req.prefilled < req.target:
                break
            prefilling.popleft()
            finished_prefill.append(req)

        waiting = self._waiting
        if budget > 0 and waiting:
            running = self._running
            # the KV cache above the admission watermark
            kv_free = self._max_request_tokens - self._prefill_alloc - self._ctx_sum
            while budget > 0 and waiting and len(running) < self._max_seqs:
                req = waiting[0]
                if req.target > kv_free:
                    break
                waiting.popleft()
                kv_free -= req.target
                self._prefill_alloc += req.target
                req.state = _PREFILL
                req.admit_seq = self._admit_seq
                self._admit_seq += 1
                running[req.admit_seq] = req
                chunk = min(req.target, budget)
                req.prefilled = chunk
                budget -= chunk
                prefill_tokens += chunk
                attn_tokens += chunk * chunk
                if chunk < req.target:
                    prefilling.append(req)
                    break
                finished_prefill.append(req)

        if prefill_tokens == 0 and decode_seqs == 0:
            raise InternalError("engine iteration with no work although requests are held")

        latency_s, power_w = self._iteration(
            self._clock_mhz, prefill_tokens, attn_tokens, decode_seqs, self._ctx_sum
        )
        if self._jitter_sigma > 0.0:
            latency_s *= self._next_jitter()
        start_s = self._now_s
        end_s = start_s + latency_s
        total_w = self._tp * power_w
        energy_j = total_w * latency_s
        self._energy_j += energy_j
        if end_s <= self._bin_end_s:
            self._bins[-1] += energy_j
        else:
            self._add_energy(start_s, end_s, total_w)
        self._busy_s += latency_s
        self._last_start_s = start_s
        self._last_end_s = end_s
        self._last_total_w = total_w
        self._dur_log.append(latency_s)
        if decode_seqs:
            self._hist_gap_s.append(latency_s)
            self._hist_tokens.append(decode_seqs)

        # every decoding request wrote one more token into its context
        self._ctx_sum += decode_seqs
        heap = self._finish_heap
        while heap and heap[0][0] <= it:
            _, seq, req = heapq.heappop(heap)
            if req.state != _DECODE or req.admit_seq != seq:
                continue  # stale entry of a request preempted during its decode
            self._ctx_sum -= req.ctx_base + it + 1
            self._num_decoding -= 1
            req.tbt_max_s = max(req.tbt_max_s, self._gap_max(req.start_iter, it))
            self._complete(req, end_s)

        for req in finished_prefill:
            self._prefill_alloc -= req.target
            if req.generated == 0:
                req.first_token_s = end_s
            else:
                gap_s = end_s - req.last_token_s
                req.tbt_max_s = max(req.tbt_max_s, gap_s)
                self._hist_gap_s.append(gap_s)
                self._hist_tokens.append(1)
            req.generated += 1
            if req.generated >= req.output_tokens:
                self._complete(req, end_s)
                continue
            req.state = _DECODE
            req.start_iter = it + 1
            req.ctx_base = req.target - it
            self._ctx_sum += req.target + 1
            self._num_decoding += 1
            heapq.heappush(heap, (it + req.output_tokens - req.generated, req.admit_seq, req))

        self._outstanding -= prefill_tokens + decode_seqs + len(finished_prefill)
        self._iter = it + 1
        self._now_s = end_s
        if not self._running:
            self._dur_log = array("d")
            self._log_base = it + 1
        elif len(self._dur_log) >= self._log_trim_at:
            self._trim_log()

    def _decode_run_length(self, t_s: float) -> int:
        """How many of the next iterations are sure to only decode, the same batch each time: no request
        can be admitted, none is preempted, none completes (the iteration that completes one is left to
        `_run_iteration`). Capped by a guess of how many start before t_s. 0 when the next one differs."""
        n = self._num_decoding
        if n == 0 or self._prefilling:
            return 0
        heap = self._finish_heap
        while heap[0][2].state != _DECODE or heap[0][2].admit_seq != heap[0][1]:
            heapq.heappop(heap)  # stale: preempted during its decode (popped later anyway, to no effect)
        kv_room = self._kv_capacity_tokens - self._prefill_alloc - self._ctx_sum
        waiting = self._waiting
        if kv_room < 0 or (
            waiting
            and self._max_batched > n
            and len(self._running) < self._max_seqs
            and waiting[0].target <= self._max_request_tokens - self._prefill_alloc - self._ctx_sum
        ):
            return 0  # a preemption or an admission is due; a blocked admission stays blocked in the run
        count = min(heap[0][0] - self._iter, kv_room // n + 1)
        last_s = self._last_end_s - self._last_start_s
        if last_s > 0.0:
            # the context only grows in the run, so iterations take at least about as long as the last
            count = min(count, int((t_s - self._now_s) / last_s) + 2)
        return count

    def _run_decodes(self, t_s: float) -> bool:
        """Run the iterations of a decode-only run that start before t_s, priced in one call; False (and
        nothing run) when the next iteration is not part of one. The same arithmetic, in the same order,
        as `_run_iteration` on each of them."""
        count = self._decode_run_length(t_s)
        if count < 2:
            return False
        assert self._decode_run is not None
        n = self._num_decoding
        latencies_s, powers_w = self._decode_run(self._clock_mhz, n, self._ctx_sum, count)
        jitter = self._jitter_sigma > 0.0
        tp, bins = self._tp, self._bins
        now_s, bin_end_s = self._now_s, self._bin_end_s
        energy_j, busy_s = self._energy_j, self._busy_s
        run: list[float] = []
        start_s = total_w = 0.0
        for latency_s, power_w in zip(latencies_s, powers_w, strict=True):
            if now_s >= t_s:
                break
            if jitter:
                if self._jitter_pos >= len(self._jitter):
                    self._draw_jitter()
                latency_s *= self._jitter[self._jitter_pos]
                self._jitter_pos += 1
            start_s = now_s
            now_s = start_s + latency_s
            total_w = tp * power_w
            e_j = total_w * latency_s
            energy_j += e_j
            if now_s <= bin_end_s:
                bins[-1] += e_j
            else:
                self._add_energy(start_s, now_s, total_w)
                bin_end_s = self._bin_end_s
            busy_s += latency_s
            run.append(latency_s)
        done = len(run)
        self._now_s, self._energy_j, self._busy_s = now_s, energy_j, busy_s
        self._last_start_s, self._last_end_s, self._last_total_w = start_s, now_s, total_w
        self._dur_log.extend(run)
        self._hist_gap_s.extend(run)
        self._hist_tokens.extend([n] * done)
        self._ctx_sum += n * done
        self._outstanding -= n * done
        self._iter += done
        if len(self._dur_log) >= self._log_trim_at:
            self._trim_log()
        return True

    def _trim_log(self) -> None:
        """Drop log entries older than the first decode iteration of every decoding request."""
        oldest = self._iter
        for req in self._running.values():
            if req.state == _DECODE and req.start_iter < oldest:
                oldest = req.start_iter
        del self._dur_log[: oldest - self._log_base]
        self._log_base = oldest
        self._log_trim_at = max(_LOG_TRIM_MIN, 2 * len(self._dur_log))

    def _add_energy(self, t0_s: float, t1_s: float, total_w: float) -> None:
        """Spread total_w over [t0_s, t1_s) into the power bins (energy_j is charged by the caller)."""
        bins = self._bins
        while t1_s > self._bin_end_s:
            bins[-1] += total_w * (self._bin_end_s - t0_s)
            t0_s = self._bin_end_s
            bins.append(0.0)
            self._bin_end_s = self._start_s + len(bins) * self._bin_s
        bins[-1] += total_w * (t1_s - t0_s)

    def _remove_energy_after(self, end_s: float, total_w: float) -> None:
        """Take back from the bins the energy at total_w between end_s and now_s."""
        bins = self._bins
        while len(bins) > 1 and self._start_s + (len(bins) - 1) * self._bin_s >= end_s:
            bins.pop()  # a bin starting at or after end_s holds only the overrun
            self._bin_end_s = self._start_s + len(bins) * self._bin_s
        bins[-1] -= total_w * (min(self._now_s, self._bin_end_s) - end_s)
