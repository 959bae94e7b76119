"""The simulated engine program's loop: the cluster simulator's `SimEngine` core run on the wall clock.

Where it sits: `python -m agent.sim.engine` (agent.sim.engine) builds one `RealTimeEngine`; its HTTP face
(agent.sim.engine_http) submits each accepted request and reads tokens from the request's queue. The
scheduling, batching, KV cache, preemption, jitter and energy are those of `agent.sim.engine_core.SimEngine`,
the same object the cluster simulator and profile generation run on a virtual clock, so a profile
measured against this program matches the simulator's. This module only maps the core's time onto the
wall clock (simulated time = seconds since the engine started), applies the GPU settings of the simulated
node, delivers tokens when the core produces them, and reports to the node directory.

Time: before every action the core is advanced to the wall clock, one iteration at a time
(`advance_to` runs every iteration that starts before the given time; the last may end in the future,
as a real GPU's kernel does). An arrival is submitted at its wall-clock time and joins at the next
iteration boundary.

Tokens: the core reports a request only when it completes (`CompletedRequest`: first-token and finish
times). To stream tokens as they are produced, the engine looks ahead: after every change (an arrival,
a clock or power-limit change, a dropped request), and whenever the previous look-ahead runs out, it
copies the core and runs the copy for `LOOKAHEAD_S` of wall time (x time_scale), recording the end time
of every iteration and, per request, its first-token time and how many tokens it has produced by then
(and when the latest came; its finish when it completes within the look-ahead). Nothing but a later
change can alter that future, and each change triggers a new look-ahead from the real core's state, so
the predicted times are the times the real core will produce. A request's tokens come at consecutive
iteration ends from its first token on (one token per iteration while decoding); after a preemption
(more iterations than tokens in that span) they are spread evenly over it. Delivery: the first and the
last token at their times (so TTFT and mean TBT are exact at the client), the ones between in bunches
every `STREAM_INTERVAL_S` of wall time (no later than that past their times). The cost is one copy plus
the iterations of one look-ahead per change: about a millisecond with a hundred requests held (running
to the end of the held work instead cost ~9 ms per arrival on a busy TP8 engine).

GPU settings: the clock is the lowest locked maximum among the engine's GPUs (a TP group runs at the pace
of its slowest GPU), applied to the iterations that start after the change is seen (looked for every
10-50 ms while busy, and at every arrival). An iteration whose power per GPU would exceed the lowest
power limit runs at the highest supported clock under it (`PowerCappedPerf`, the GPU's power capping; at
the model's lowest clock the limit may still be exceeded).

Reporting: per GPU, the cumulative energy above idle up to now (the part of a running iteration that
lies in the future is not counted yet), the power above idle averaged over the last second (what NVML
reports on Ampere and newer GPUs, and what makes the agent's counter-versus-integrated-power check
agree), busy time, the effective clock and memory held, written at most every 100 ms while busy and for a
second after, and at every busy/idle transition.

Requests a client abandons: one not started yet is taken out of the core's queue; one already running
runs to its end inside the core (the core has no way to drop a started request), its tokens discarded.

Time compression (`time_scale` X > 0, `--time-scale`): simulated time runs X times faster than the wall
clock, sim_t = X x wall seconds since the engine started. Everything the core models is in simulated
seconds and unchanged per simulated second (iteration latencies, energy, the first-token and finish
times, the latency histograms), so an iteration takes 1/X of its simulated duration in wall time and a
client measures 1/X of the simulated TTFT and TBT. What is about the wall clock stays in wall seconds:
the activity write period, the settings poll, and the power average, taken over the last wall second
(X simulated seconds) so that the agent's sampler, which reads once per wall second, sees every joule
in one reading (power stays physical: energy per simulated second). X = 1 is the plain wall clock.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import math
import os
import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.sim.engine_core import EngineConfig, SimEngine
from agent.sim.engine_metrics import EngineGauges, EngineStats
from agent.sim.gpu import POWER_AVERAGE_S, supported_clocks_mhz
from agent.sim.node import GpuActivity, NodeDir
from agent.sim.physics import PerfModel
from agent.sim.physics.specs import gpu_for

# Put in a request's token queue instead of a token index when the engine gives up on the request.
ABORTED = -1

# The node directory is written at most this often while busy (and at every busy/idle transition):
# readers see the energy counter at most this late (the agent samples once a second); one write per GPU
# each time costs a file replace, which at 50 ms was a quarter of a busy TP8 engine's CPU (at 200 ms the
# agent's 50-ms energy cross-check in tests drifted past its 5% threshold; 100 ms keeps it under).
# Wall-clock seconds, like the settings poll (simulated seconds = these x time_scale).
_ACTIVITY_WRITE_PERIOD_S = 0.1
_SETTINGS_POLL_S = 0.01  # how often a busy engine looks for a new clock lock or power limit
# Tokens between a request's first and its last are delivered in bunches at most this often (vLLM's
# stream interval does the same, counted in tokens): one wake-up and one write per bunch instead of one
# per iteration, which is what lets a time-compressed node keep up on a small machine.
STREAM_INTERVAL_S = 0.02
_MEM_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization: what a loaded engine holds on each GPU
# The look-ahead runs this far (wall seconds; simulated = x time_scale) and is run again from the real core
# when that time comes: its cost grows with the iterations it runs, and a change (an arrival) makes the
# rest of it void anyway. Running to the end of the held work cost ~9 ms per arrival on a busy TP8 engine.
LOOKAHEAD_S = 0.25
# Energy bins of the core are not used here; one per hour keeps the core's state small to copy.
_POWER_BIN_S = 3600.0


class GpuSettingsView:
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


class PowerCappedPerf:
    """The physics model as the core sees it on GPUs with a power limit (`PerfModelLike`): an iteration
    whose power per GPU would exceed `power_limit_w` runs at the highest supported clock under it.
    Remembers the last iteration it priced (effective clock, power per GPU, whether it was capped)."""

    def __init__(self, perf: PerfModel, clocks_mhz: tuple[int, ...]) -> None:
        self._perf = perf
        self._clocks = clocks_mhz
        self.power_limit_w = perf.tdp_w
        self.last_clock_mhz = perf.max_clock_mhz
        self.last_power_w = perf.idle_power_w
        self.last_capped = False

    @property
    def tp(self) -> int:
        return self._perf.tp

    @property
    def idle_power_w(self) -> float:
        return self._perf.idle_power_w

    @property
    def kv_capacity_tokens(self) -> int:
        return self._perf.kv_capacity_tokens

    @property
    def min_clock_mhz(self) -> int:
        return self._clocks[0]

    @property
    def max_clock_mhz(self) -> int:
        return self._clocks[-1]

    def iteration(
        self,
        clock_mhz: float,
        prefill_tokens: int,
        prefill_attn_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float]:
        work = (prefill_tokens, prefill_attn_tokens, decode_seqs, decode_context_tokens)
        iteration = self._perf.iteration
        latency_s, power_w = iteration(clock_mhz, *work)
        clock = int(clock_mhz)
        capped = power_w > self.power_limit_w
        if capped:
            clocks = self._clocks
            lo, hi = 0, bisect.bisect_right(clocks, clock_mhz) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if iteration(clocks[mid], *work)[1] <= self.power_limit_w:
                    lo = mid
                else:
                    hi = mid - 1
            clock = clocks[lo]
            latency_s, power_w = iteration(clock, *work)
        self.last_clock_mhz, self.last_power_w, self.last_capped = clock, power_w, capped
        return latency_s, power_w


class EngineRequest:
    """One request inside the engine; tokens go to the HTTP handler through `tokens` (None ends the
    answer, `ABORTED` cuts it). What the core says of its future (predicted by the look-ahead until it
    happens), in simulated seconds: `first_token_s`, the first `known_tokens` tokens with the latest of
    them at `last_known_s`, and `finish_s` once its completion is known; `first_index` locates its first
    token in the iteration timeline (-1: the known tokens spread evenly between the first and latest)."""

    __slots__ = (
        "aborted",
        "arrival_s",
        "emitted",
        "finish_s",
        "first_index",
        "first_token_s",
        "input_tokens",
        "known_tokens",
        "last_known_s",
        "output_tokens",
        "request_id",
        "tokens",
    )

    def __init__(self, request_id: int, input_tokens: int, output_tokens: int, arrival_s: float) -> None:
        self.request_id = request_id
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.arrival_s = arrival_s
        self.emitted = 0
        self.first_token_s = math.nan
        self.finish_s = math.nan
        self.known_tokens = 0
        self.last_known_s = math.nan
        self.first_index = -1
        self.aborted = False
        self.tokens: asyncio.Queue[int | None] = asyncio.Queue()

    def known(self, first_token_s: float, last_s: float, tokens: int) -> None:
        """The core's (predicted) times of the first `tokens` tokens; all of them means finished."""
        self.first_token_s, self.last_known_s, self.known_tokens = first_token_s, last_s, tokens
        self.finish_s = last_s if tokens == self.output_tokens else math.nan


class _Timeline:
    """End times of the core's iterations in order (past ones and predicted ones): the instants at which
    tokens are produced. Indices are global: `ends[0]` has index `base`."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.base = 0

    def cut_after(self, t_s: float) -> None:
        del self.ends[bisect.bisect_right(self.ends, t_s) :]

    def append(self, t_s: float) -> None:
        if not self.ends or t_s > self.ends[-1]:
            self.ends.append(t_s)

    def index_of(self, t_s: float) -> int:
        """Global index of the iteration ending exactly at t_s, or -1."""
        i = bisect.bisect_left(self.ends, t_s)
        return self.base + i if i < len(self.ends) and self.ends[i] == t_s else -1

    def at(self, index: int) -> float | None:
        i = index - self.base
        return self.ends[i] if 0 <= i < len(self.ends) else None

    def drop_before(self, t_s: float) -> None:
        k = bisect.bisect_left(self.ends, t_s)
        if k:
            del self.ends[:k]
            self.base += k


class _CorePickler(pickle.Pickler):
    """Copies a core without its physics model, which is shared (read-only apart from a clock cache)."""

    def __init__(self, file: io.BytesIO, shared: object) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._shared = shared

    def persistent_id(self, obj: Any) -> str | None:
        return "perf" if obj is self._shared else None


class _CoreUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: object) -> None:
        super().__init__(file)
        self._shared = shared

    def persistent_load(self, pid: Any) -> object:
        return self._shared


class RealTimeEngine:
    """`SimEngine` on the wall clock (see the module docstring)."""

    def __init__(
        self,
        perf: PerfModel,
        gpu: str,
        gpu_indices: tuple[int, ...],
        node: NodeDir | None,
        config: EngineConfig,
        *,
        seed: int | None = None,
        monotonic_s: Callable[[], float] = time.monotonic,
        time_scale: float = 1.0,
    ) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0.0):
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
        spec = gpu_for(gpu)
        self._perf = perf
        self._tp = perf.tp
        self._idle_w = perf.idle_power_w
        self._indices = gpu_indices
        self._node = node
        self._monotonic_s = monotonic_s
        self.time_scale = time_scale
        # wall-clock periods in simulated seconds
        self._write_period_s = _ACTIVITY_WRITE_PERIOD_S * time_scale
        self._settings_poll_s = _SETTINGS_POLL_S * time_scale
        self._stream_interval_s = STREAM_INTERVAL_S * time_scale
        self._lookahead_s = LOOKAHEAD_S * time_scale
        self._power_window_s = POWER_AVERAGE_S * time_scale  # the last wall second
        # a lock below the lowest clock the model is stated for runs at that clock (never happens with the
        # simulated backend, whose supported clocks start there)
        self._clocks_mhz = tuple(c for c in supported_clocks_mhz(spec) if c >= perf.min_clock_mhz)
        self._capped = PowerCappedPerf(perf, self._clocks_mhz)
        self._settings = GpuSettingsView(node, gpu_indices, perf.max_clock_mhz, spec.tdp_w)
        locked_mhz, self._capped.power_limit_w = self._settings.current()
        self._clock_mhz = self._clamp(locked_mhz)
        self._origin_s = monotonic_s()
        self._core = SimEngine(
            self._capped,
            self._clock_mhz,
            np.random.default_rng(seed),
            config,
            start_s=0.0,
            power_bin_s=_POWER_BIN_S,
        )
        self.max_request_tokens = self._core.max_request_tokens
        self._kv_capacity = perf.kv_capacity_tokens
        self._mem_used_bytes = int(_MEM_UTILIZATION * spec.memory_bytes)
        self.stats = EngineStats()
        self._live: dict[int, EngineRequest] = {}
        self._next_id = 0
        self._timeline = _Timeline()
        self._dirty = False  # the look-ahead is out of date
        self._lookahead_until_s = math.inf  # where the last look-ahead stopped with work still held
        self._last_settings_s = -math.inf
        self._wake = asyncio.Event()
        # (time, energy above idle of all GPUs) for the power average over the last wall second; E(0) = 0
        self._hist_t: list[float] = [0.0]
        self._hist_e: list[float] = [0.0]
        self._avg_extra_w = 0.0
        # counters continue those of the previous engine on each GPU: the energy counter never goes back
        self._base: dict[int, GpuActivity] = {}
        if node is not None:
            self._base = {i: node.read_activity(i) for i in gpu_indices}
        self._last_write_s = -math.inf
        self._last_busy = False
        self._last_quiet = True
        self.loaded = False  # the GPUs are claimed (memory, power) once the model is "loaded"

    # ---------------------------------------------------------------- state
    def now_s(self) -> float:
        """Simulated time: seconds since the engine started, times `time_scale`."""
        return self.time_scale * (self._monotonic_s() - self._origin_s)

    def wall_s(self, sim_s: float) -> float:
        """Wall-clock seconds that `sim_s` simulated seconds take."""
        return sim_s / self.time_scale

    @property
    def num_running(self) -> int:
        return self._core.num_running

    @property
    def num_waiting(self) -> int:
        return self._core.num_waiting

    def gauges(self) -> EngineGauges:
        """The engine's state now, for /metrics."""
        now = self.now_s()
        self.step(now)
        kv_tokens = sum(r.input_tokens + r.emitted for r in self._live.values() if r.emitted)
        return EngineGauges(
            running=self._core.num_running,
            waiting=self._core.num_waiting,
            kv_usage_ratio=min(1.0, kv_tokens / self._kv_capacity),
            preemptions=self._core.num_preemptions,
            clock_mhz=self._effective_clock_mhz(now),
            power_w=self._tp * self._idle_w + self._avg_extra_w,
            extra_energy_j=self._extra_energy_j(now),
        )

    # ------------------------------------------------------------- requests
    def submit(self, input_tokens: int, output_tokens: int) -> EngineRequest:
        """Queue a request arriving now; InvalidArgumentError when it can never fit the KV cache."""
        now = self.now_s()
        self._advance(now)
        self._apply_settings(now, force=True)
        req = EngineRequest(self._next_id, input_tokens, output_tokens, now)
        self._core.submit(req.request_id, now, input_tokens, output_tokens)
        self._next_id += 1
        self._live[req.request_id] = req
        self._dirty = True
        self._wake.set()
        return req

    def abort(self, req: EngineRequest) -> None:
        """Forget a request whose client went away (see the module docstring)."""
        if req.aborted or self._live.pop(req.request_id, None) is None:
            return
        req.aborted = True
        if req.emitted:
            return
        self._advance(self.now_s())
        for w in self._core.take_waiting():
            if w.request_id != req.request_id:  # the others go back in their order
                self._core.submit(w.request_id, w.arrival_s, w.input_tokens, w.output_tokens, w.deadline_s)
        self._dirty = True
        self._wake.set()

    def abort_all(self) -> None:
        """End every request now (shutdown grace expired): handlers get `ABORTED` instead of a token."""
        for req in self._live.values():
            req.aborted = True
            req.tokens.put_nowait(ABORTED)
        self._live.clear()

    # ----------------------------------------------------------------- loop
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.now_s()
            self.step(now)
            wake_s = self.next_wake_s(now)
            self._wake.clear()
            delay_s = self.wall_s(wake_s - self.now_s())  # from the clock now: the step itself took time
            timer = None if wake_s == math.inf else loop.call_later(max(0.0, delay_s), self._wake.set)
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def step(self, now: float) -> None:
        """Bring everything to simulated time `now`: core, settings, look-ahead, tokens, node directory."""
        self._advance(now)
        self._apply_settings(now, force=False)
        if self._dirty or now >= self._lookahead_until_s:
            self._look_ahead()
        for req in list(self._live.values()):
            self._deliver(req, now)
        self._publish(now, force=False)

    def _advance(self, now: float) -> None:
        """Run the real core up to `now` one iteration at a time, recording iteration ends and results."""
        core, timeline = self._core, self._timeline
        if self._dirty:
            timeline.cut_after(core.now_s)  # the predicted future no longer holds
        while core.now_s < now:
            if not (core.num_running or core.num_waiting):
                core.advance_to(now)  # idle until now
                break
            core.advance_to(math.nextafter(core.now_s, math.inf))  # exactly one iteration
            timeline.append(core.now_s)
        for rec in core.pop_completed():
            req = self._live.get(rec.request_id)
            if req is not None and (req.first_token_s, req.finish_s) != (rec.first_token_s, rec.finish_s):
                req.known(rec.first_token_s, rec.finish_s, req.output_tokens)
                self._map_tokens(req)
        gaps_s, tokens = core.take_tbt_log()
        for gap_s, n in zip(gaps_s.tolist(), tokens.tolist(), strict=True):
            self.stats.tpot.observe(gap_s, n)
        extra_j = max(self._extra_energy_j(now), self._hist_e[-1])
        if now > self._hist_t[-1]:
            self._hist_t.append(now)
            self._hist_e.append(extra_j)
            window_s = self._power_window_s
            keep = bisect.bisect_right(self._hist_t, now - window_s) - 1
            if keep > 0:
                del self._hist_t[:keep]
                del self._hist_e[:keep]
            average_w = (extra_j - self._energy_at(now - window_s)) / window_s
            self._avg_extra_w = average_w if average_w > 1e-6 else 0.0

    def _apply_settings(self, now: float, *, force: bool) -> None:
        """Pick up a new clock lock or power limit from the node directory (polled while busy)."""
        if not force and now - self._last_settings_s < self._settings_poll_s:
            return
        self._last_settings_s = now
        locked_mhz, limit_w = self._settings.current()
        clock_mhz = self._clamp(locked_mhz)
        if clock_mhz != self._clock_mhz or limit_w != self._capped.power_limit_w:
            self._clock_mhz = clock_mhz
            self._capped.power_limit_w = limit_w
            self._core.set_clock(clock_mhz)  # from the end of the running iteration
            self._dirty = True

    def _look_ahead(self) -> None:
        """Run a copy of the core for `LOOKAHEAD_S`: iteration ends, and for each live request its
        first-token time and the times of the tokens it produces by then (all of them, with the finish,
        when it completes within the look-ahead); see the module docstring."""
        copy = self._copy_core()
        horizon_s = copy.now_s + self._lookahead_s
        ends: list[float] = []
        done: dict[int, tuple[float, float]] = {}
        while (copy.num_running or copy.num_waiting) and copy.now_s < horizon_s:
            copy.advance_to(math.nextafter(copy.now_s, math.inf))
            ends.append(copy.now_s)
            for rec in copy.pop_completed():
                done[rec.request_id] = (rec.first_token_s, rec.finish_s)
        held = copy.num_running or copy.num_waiting
        self._lookahead_until_s = copy.now_s if held else math.inf
        partial = copy.progress() if held else {}
        timeline = self._timeline
        timeline.cut_after(self._core.now_s)
        for end_s in ends:
            timeline.append(end_s)
        for req in self._live.values():
            if req.request_id in done:
                first_s, finish_s = done[req.request_id]
                req.known(first_s, finish_s, req.output_tokens)
            elif req.request_id in partial:
                produced, first_s, last_s = partial[req.request_id]
                req.known(first_s, last_s, produced)
            self._map_tokens(req)
        started = [r.first_token_s for r in self._live.values() if not math.isnan(r.first_token_s)]
        timeline.drop_before(min(started, default=self._core.now_s))
        self._dirty = False

    def _copy_core(self) -> SimEngine:
        buffer = io.BytesIO()
        _CorePickler(buffer, self._perf).dump(self._core)
        buffer.seek(0)
        copy: SimEngine = _CoreUnpickler(buffer, self._perf).load()
        return copy

    def _map_tokens(self, req: EngineRequest) -> None:
        """Locate the request's known tokens in the timeline: consecutive iteration ends from its first
        token to the latest known one when there are exactly as many ends as tokens in that span."""
        first = self._timeline.index_of(req.first_token_s)
        last = self._timeline.index_of(req.last_known_s)
        exact = first >= 0 and last - first + 1 == req.known_tokens
        req.first_index = first if exact else -1

    def _token_s(self, req: EngineRequest, k: int) -> float | None:
        """When token k of the request is produced (simulated seconds), None while unknown."""
        n = req.known_tokens
        if k >= n:
            return None
        if req.first_index >= 0:
            return self._timeline.at(req.first_index + k)
        if k == 0 or n == 1:
            return req.first_token_s
        return req.first_token_s + k * (req.last_known_s - req.first_token_s) / (n - 1)

    def _deliver(self, req: EngineRequest, now: float) -> None:
        stats = self.stats
        while req.emitted < req.output_tokens:
            t = self._token_s(req, req.emitted)
            if t is None or t > now:
                return
            if req.emitted == 0:
                stats.prompt_tokens += req.input_tokens
                stats.ttft.observe(req.first_token_s - req.arrival_s)
            req.tokens.put_nowait(req.emitted)
            req.emitted += 1
            stats.generation_tokens += 1
        req.tokens.put_nowait(None)
        stats.requests_finished += 1
        stats.e2e.observe(req.finish_s - req.arrival_s)
        del self._live[req.request_id]

    def next_wake_s(self, now: float) -> float:
        """When `step` has something to do next: a token due, the look-ahead's end, or (while busy and a
        second after) the next activity write; inf when idle."""
        wake_s = self._lookahead_until_s
        bunch_s = now + self._stream_interval_s
        for req in self._live.values():
            t = self._token_s(req, req.emitted)
            if t is None:
                continue
            if 0 < req.emitted < req.output_tokens - 1:
                # a middle token waits for the bunch, never past the last one (module docstring, Tokens)
                last_s = self._token_s(req, req.output_tokens - 1)
                t = max(t, bunch_s) if last_s is None else min(max(t, bunch_s), last_s)
            wake_s = min(wake_s, t)
        if self._busy(now) or self._avg_extra_w > 0.0 or not self._last_quiet:
            wake_s = min(wake_s, now + self._write_period_s)
        return wake_s

    # ------------------------------------------------------------ physics
    def _clamp(self, clock_mhz: int) -> int:
        clocks = self._clocks_mhz
        return max(clocks[0], min(clock_mhz, clocks[-1]))

    def _busy(self, now: float) -> bool:
        core = self._core
        return bool(core.num_running or core.num_waiting or core.now_s > now)

    def _effective_clock_mhz(self, now: float) -> int:
        return self._capped.last_clock_mhz if self._busy(now) else self._clock_mhz

    def _extra_energy_j(self, now: float) -> float:
        """Energy above idle of all the engine's GPUs up to `now` (the core has charged a running
        iteration to its end; the part after `now` is taken back)."""
        core = self._core
        idle_total_w = self._tp * self._idle_w
        extra_j = core.energy_j - idle_total_w * (core.now_s - core.start_s)
        if core.now_s > now:
            extra_j -= (core.now_s - now) * self._tp * (self._capped.last_power_w - self._idle_w)
        return max(0.0, extra_j)

    def _busy_s(self, now: float) -> float:
        return self._core.busy_s - max(0.0, self._core.now_s - now)

    def _energy_at(self, t_s: float) -> float:
        """Energy above idle at t_s, interpolated between the recorded points (0 before the start)."""
        ts, es = self._hist_t, self._hist_e
        i = bisect.bisect_right(ts, t_s) - 1
        if i < 0:
            return 0.0 if t_s <= 0.0 else es[0]
        if i == len(ts) - 1:
            return es[-1]
        t0, t1 = ts[i], ts[i + 1]
        return es[i] + (es[i + 1] - es[i]) * (t_s - t0) / (t1 - t0)

    # ---------------------------------------------------------- reporting
    def _publish(self, now: float, *, force: bool) -> None:
        """Write this engine's activity to the node directory (rate-limited while busy)."""
        if self._node is None or not self.loaded:
            return
        busy = self._busy(now)
        quiet = not busy and self._avg_extra_w == 0.0
        changed = busy != self._last_busy or quiet != self._last_quiet
        if not force and not changed and (quiet or now - self._last_write_s < self._write_period_s):
            return
        self._last_write_s, self._last_busy, self._last_quiet = now, busy, quiet
        per_gpu_extra_j = self._extra_energy_j(now) / self._tp
        busy_s = self._busy_s(now)
        for i in self._indices:
            base = self._base[i]
            self._node.write_activity(
                i,
                GpuActivity(
                    pid=os.getpid(),
                    extra_energy_j=base.extra_energy_j + per_gpu_extra_j,
                    extra_power_w=self._avg_extra_w / self._tp,
                    busy_s=base.busy_s + busy_s,
                    clock_mhz=self._effective_clock_mhz(now),
                    power_capped=self._capped.last_capped and busy,
                    mem_used_bytes=self._mem_used_bytes,
                ),
            )

    def mark_loaded(self) -> None:
        """The model is "loaded": from now on the engine holds its GPUs' memory and reports its power."""
        self.loaded = True
        self._publish(self.now_s(), force=True)

    def release_gpus(self) -> None:
        """Leave the GPUs: counters kept for the next engine, no power, no memory, no process."""
        if self._node is None:
            return
        now = self.now_s()
        self._advance(now)
        per_gpu_extra_j = self._extra_energy_j(now) / self._tp
        busy_s = self._busy_s(now)
        for i in self._indices:
            base = self._base[i]
            self._node.write_activity(
                i,
                GpuActivity(
                    pid=0,
                    extra_energy_j=base.extra_energy_j + per_gpu_extra_j,
                    extra_power_w=0.0,
                    busy_s=base.busy_s + busy_s,
                    clock_mhz=0,
                    power_capped=False,
                    mem_used_bytes=0,
                ),
            )
