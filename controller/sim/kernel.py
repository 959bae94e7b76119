"""The simulator's event kernel: a trace replayed on a virtual clock through the control cycle and a
`SimFleet`. The same `ControlCycle` decides for every policy, static or dynamic; the kernel only orders
time and plays the router's part (admission, classification, routing through the fleet).

Flow (`run`): the initial plan starts ACTIVE at t = 0 (a warm cluster). Then, merged in time order,
control before arrivals at the same time: starts finishing loading (`SimFleet.ready_until` -> cycle
events), staggered actions falling due (`ControlCycle.due`), ticks every instance period (engines run
to the tick, drained instances reported, the predictor learns from completions, the arrivals since the
last tick go to the cycle with the fleet view), and arrivals. An arrival is refused at admission when
its input plus output exceeds the model's context (never served, reported by reason); otherwise it gets
its class (true input bin x predicted output bin), its TTFT deadline, and an instance from the fleet's
routing. After the last arrival no more control: engines drain, bounded by `max_drain_s`.

Deterministic: engines draw jitter from one generator (a child per engine, in creation order), the
injected predictor errors from another; no wall clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.sim.engine_core import SimEngine
from controller.control.cycle import ControlCycle, TickResult
from controller.model.classes import REQUEST_CLASSES, ClassBins
from controller.model.cluster import InstanceSpec
from controller.model.decisions import Decision
from controller.model.fleet import Arrivals, Completions
from controller.policy.predict import OutputPredictor, predict_output_bins, update_many
from controller.sim.evaluation import inject_accuracy
from controller.sim.fleet import SimFleet
from controller.sim.report import within_targets
from controller.sim.traces import Trace

ProgressCallback = Callable[[float], None]
_N_OUT = len(REQUEST_CLASSES) // 3


class RouterClasses:
    """The classes the simulated router routes by: the true input bin x a predicted output bin, from the
    online predictor (run one instance period ahead, with what it learned from completions so far) or
    with injected errors (`accuracy`: the true bin kept with that probability)."""

    def __init__(self, trace: Trace, bins: ClassBins, accuracy: float | None, rng: np.random.Generator):
        self._trace = trace
        self.true_class = bins.class_indices(trace.input_tokens, trace.output_tokens).astype(np.int64)
        self.routed = np.zeros(len(trace), dtype=np.int64)
        self._predictor: OutputPredictor | None = None
        self._upto = 0
        if accuracy is None:
            self._predictor = OutputPredictor(bins=bins)
        else:
            wrong_out = inject_accuracy(self.true_class % _N_OUT, accuracy, rng)
            self.routed[:] = (self.true_class // _N_OUT) * _N_OUT + wrong_out
            self._upto = len(trace)

    def until(self, t_s: float) -> npt.NDArray[np.int64]:
        """Classes of every arrival before `t_s` decided (and the whole array returned)."""
        if self._predictor is not None:
            hi = int(np.searchsorted(self._trace.arrival_s, t_s, side="left"))
            if hi > self._upto:
                lo = self._upto
                out = predict_output_bins(self._predictor, self._trace.input_tokens[lo:hi])
                self.routed[lo:hi] = (self.true_class[lo:hi] // _N_OUT) * _N_OUT + out
                self._upto = hi
        return self.routed

    def learn(self, done: list[tuple[int, int]]) -> None:
        """Completed requests' (input, output) lengths teach the online predictor."""
        if self._predictor is not None and done:
            lengths = np.array(done, dtype=np.int64)
            self._predictor = update_many(self._predictor, lengths[:, 0], lengths[:, 1])
        done.clear()


@dataclass(frozen=True, slots=True)
class KernelSettings:
    max_context_tokens: int
    ttft_slo_s: Sequence[float]  # per class index
    max_drain_s: float
    drain_step_s: float
    series_bin_s: float
    progress_step_s: float
    tbt_slo_s: Sequence[float] = ()  # per class index; empty: no TBT target


@dataclass(slots=True)
class KernelRun:
    """What a run leaves besides the fleet's books."""

    end_s: float
    admitted: npt.NDArray[np.bool_]
    refused: dict[str, int]
    decisions: list[Decision]
    samples: list[tuple[float, Counter[tuple[str, InstanceSpec]]]]


def run(
    trace: Trace,
    cycle: ControlCycle,
    fleet: SimFleet,
    router: RouterClasses,
    settings: KernelSettings,
    on_progress: ProgressCallback | None = None,
) -> KernelRun:
    """Replay `trace` (module docstring); the fleet is closed at the returned end time."""
    return _Kernel(trace, cycle, fleet, router, settings).run(on_progress)


class _Kernel:
    """One run's clock: what happened up to where (arrivals counted into the cycle, series sampled)."""

    def __init__(
        self,
        trace: Trace,
        cycle: ControlCycle,
        fleet: SimFleet,
        router: RouterClasses,
        settings: KernelSettings,
    ) -> None:
        self.trace = trace
        self.cycle = cycle
        self.fleet = fleet
        self.router = router
        self.settings = settings
        self.out = KernelRun(0.0, np.zeros(len(trace), dtype=bool), {}, [], [])
        self.refused: Counter[str] = Counter()
        self.counted = 0  # arrivals [0, counted) have been handed to the cycle
        self._ttft_target_s = np.asarray(settings.ttft_slo_s, dtype=np.float64)
        self._tbt_target_s = np.asarray(
            settings.tbt_slo_s or [math.inf] * len(REQUEST_CLASSES), dtype=np.float64
        )
        self.next_sample_s = 0.0

    def run(self, on_progress: ProgressCallback | None) -> KernelRun:
        trace, settings, fleet = self.trace, self.settings, self.fleet
        self.apply(self.cycle.start(0.0))
        self.router.until(self.cycle.next_tick_s())
        next_progress_s = settings.progress_step_s
        for i, t, inputs, outputs in _arrivals(trace):
            if t >= next_progress_s:
                if on_progress is not None:
                    on_progress(t)
                next_progress_s = (math.floor(t / settings.progress_step_s) + 1) * settings.progress_step_s
                fleet.fold_tbt_logs()
            self.control_until(t, i)
            self.admit(i, t, inputs, outputs)
        self.control_until(trace.duration_s, len(trace))

        engines = [s.engine for s in fleet.slots.values() if s.engine is not None]
        self.out.end_s = drain(engines, trace.duration_s, settings.max_drain_s, settings.drain_step_s)
        if on_progress is not None:
            on_progress(self.out.end_s)
        fleet.close(self.out.end_s)
        self.sample(self.out.end_s - 1e-9)
        self.out.refused = dict(self.refused)
        return self.out

    def admit(self, i: int, t_s: float, input_tokens: int, output_tokens: int) -> None:
        """Admission (the context limit, empty requests), then routing with the class's TTFT deadline."""
        if input_tokens + output_tokens > self.settings.max_context_tokens:
            self.refused["context_length"] += 1
            return
        if input_tokens < 1 or output_tokens < 1:
            self.refused["empty"] += 1
            return
        self.out.admitted[i] = True
        c = int(self.router.routed[i])
        deadline_s = t_s + self.settings.ttft_slo_s[c]
        if not self.fleet.admit(i, c, t_s, input_tokens, output_tokens, deadline_s):
            self.fleet.outcomes.rejected += 1
            self.fleet.outcomes.dropped.append(i)

    def control_until(self, t_s: float, upto: int) -> None:
        """Every control event at or before `t_s` (and not past the trace's end), in time order; at equal
        times loads finishing, then actions falling due, then the tick."""
        while True:
            t_ready = self.fleet.next_ready_s()
            t_action = self.cycle.next_action_s()
            t_tick = self.cycle.next_tick_s()
            t_next = min(t_ready, t_action, t_tick)
            if t_next > t_s or t_next > self.trace.duration_s:
                return
            if t_ready == t_next:
                self.apply(self.cycle.on_events(self.fleet.ready_until(t_ready)))
            elif t_action == t_next:
                self.apply(self.cycle.due(t_action))
            else:
                self.tick(t_tick, upto)

    def tick(self, t_s: float, upto: int) -> None:
        events = self.fleet.advance(t_s)
        if events:
            self.apply(self.cycle.on_events(events))
        self.router.learn(self.fleet.outcomes.done_lengths)
        mask = self.out.admitted[self.counted : upto]
        arrivals = Arrivals(
            self.trace.arrival_s[self.counted : upto][mask],
            self.router.routed[self.counted : upto][mask],
            self.trace.input_tokens[self.counted : upto][mask].astype(np.int64),
        )
        self.counted = upto
        self.sample(t_s)
        self.apply(self.cycle.tick(t_s, self.fleet.view(), arrivals, self.completions()))
        self.router.until(self.cycle.next_tick_s())

    def completions(self) -> Completions:
        """The requests finished since the last tick, per routed class, judged as the report judges them
        (`within_targets`, by the targets of their true class, known once their lengths are), and those
        dropped after admission (misses), with the true classes each routed class served; then
        forgotten."""
        out = self.fleet.outcomes
        n = len(REQUEST_CLASSES)
        done = np.asarray(out.finished, dtype=np.int64)
        dropped = np.asarray(out.dropped, dtype=np.int64)
        out.finished.clear()
        out.dropped.clear()
        true_class = self.router.true_class[done]
        ok = within_targets(
            out.ttft_s[done],
            out.tbt_mean_s[done],
            self.trace.output_tokens[done],
            self._ttft_target_s[true_class],
            self._tbt_target_s[true_class],
        )
        routed_done = self.router.routed[done]
        met = np.bincount(routed_done[ok], minlength=n)
        total = np.bincount(routed_done, minlength=n) + np.bincount(self.router.routed[dropped], minlength=n)
        pairs = np.concatenate((done, dropped))
        served = np.bincount(self.router.routed[pairs] * n + self.router.true_class[pairs], minlength=n * n)
        return Completions(
            tuple(met.tolist()),
            tuple(total.tolist()),
            tuple(tuple(row) for row in served.reshape(n, n).tolist()),
        )

    def apply(self, result: TickResult) -> None:
        self.out.decisions.extend(result.decisions)
        self.fleet.apply(result)

    def sample(self, t_s: float) -> None:
        """The instance mix at every series bin start up to `t_s`."""
        while self.next_sample_s <= t_s:
            self.out.samples.append((self.next_sample_s, self.fleet.mix()))
            self.next_sample_s += self.settings.series_bin_s


def _arrivals(trace: Trace, chunk: int = 1 << 16) -> Iterator[tuple[int, float, int, int]]:
    """(index, arrival_s, input_tokens, output_tokens) of every request, as Python numbers: converted a
    chunk at a time, since whole-trace lists would take ~100 bytes a request (2.7 GB for a week)."""
    for lo in range(0, len(trace), chunk):
        hi = min(lo + chunk, len(trace))
        yield from zip(
            range(lo, hi),
            trace.arrival_s[lo:hi].tolist(),
            trace.input_tokens[lo:hi].tolist(),
            trace.output_tokens[lo:hi].tolist(),
            strict=True,
        )


def drain(engines: list[SimEngine], trace_end_s: float, max_drain_s: float, step_s: float) -> float:
    """Advance past the trace's end until every engine is idle or the drain limit is reached; the end time."""
    limit_s = trace_end_s + max_drain_s
    for engine in engines:
        engine.advance_to(trace_end_s)
    busy = [e for e in engines if e.num_waiting or e.num_running]
    t = trace_end_s
    while busy and t < limit_s:
        t = min(t + step_s, limit_s)
        for engine in busy:
            engine.advance_to(t)
        busy = [e for e in busy if e.num_waiting or e.num_running]
    # The run ends at the drain step in which the last engine went idle, or later if an iteration
    # started in that step ended after it.
    return max([trace_end_s, *(e.now_s for e in engines)]) if engines else trace_end_s
