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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.sim.engine_core import SimEngine
from controller.control.cycle import ControlCycle, TickResult
from controller.model.classes import REQUEST_CLASSES, ClassBins
from controller.model.cluster import InstanceSpec
from controller.model.decisions import Decision
from controller.model.fleet import Arrivals
from controller.policy.predict import OutputPredictor, predict_output_bins, update_many
from controller.sim.evaluation import inject_accuracy
from controller.sim.fleet import SimFleet
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
    n = len(trace)
    end_trace_s = trace.duration_s
    arrival = trace.arrival_s.tolist()
    inputs = trace.input_tokens.tolist()
    outputs = trace.output_tokens.tolist()
    admitted = np.zeros(n, dtype=bool)
    refused: Counter[str] = Counter()
    out = KernelRun(0.0, admitted, {}, [], [])
    next_sample_s = 0.0

    def apply(result: TickResult) -> None:
        out.decisions.extend(result.decisions)
        fleet.apply(result)

    def sample(t_s: float) -> None:
        nonlocal next_sample_s
        while next_sample_s <= t_s:
            out.samples.append((next_sample_s, fleet.mix()))
            next_sample_s += settings.series_bin_s

    counted = 0

    def tick(t_s: float, upto: int) -> None:
        nonlocal counted
        events = fleet.advance(t_s)
        if events:
            apply(cycle.on_events(events))
        router.learn(fleet.outcomes.done_lengths)
        mask = admitted[counted:upto]
        arrivals = Arrivals(trace.arrival_s[counted:upto][mask], router.routed[counted:upto][mask])
        counted = upto
        sample(t_s)
        apply(cycle.tick(t_s, fleet.view(), arrivals))
        router.until(cycle.next_tick_s())

    def control_until(t_s: float, upto: int) -> None:
        """Every control event at or before `t_s` (and not past the trace's end)."""
        while True:
            t_ready = fleet.next_ready_s()
            t_action = cycle.next_action_s()
            t_tick = cycle.next_tick_s()
            t_next = min(t_ready, t_action, t_tick)
            if t_next > t_s or t_next > end_trace_s:
                return
            if t_ready == t_next:
                apply(cycle.on_events(fleet.ready_until(t_ready)))
            elif t_action == t_next:
                apply(cycle.due(t_action))
            else:
                tick(t_tick, upto)

    apply(cycle.start(0.0))
    router.until(cycle.next_tick_s())
    next_progress_s = settings.progress_step_s
    for i in range(n):
        t = arrival[i]
        if t >= next_progress_s:
            if on_progress is not None:
                on_progress(t)
            next_progress_s = (math.floor(t / settings.progress_step_s) + 1) * settings.progress_step_s
            fleet.fold_tbt_logs()
        control_until(t, i)
        size = inputs[i] + outputs[i]
        if size > settings.max_context_tokens:
            refused["context_length"] += 1
            continue
        if inputs[i] < 1 or outputs[i] < 1:
            refused["empty"] += 1
            continue
        admitted[i] = True
        c = int(router.routed[i])
        if not fleet.admit(i, c, t, inputs[i], outputs[i], t + settings.ttft_slo_s[c]):
            fleet.outcomes.rejected += 1
    control_until(end_trace_s, n)

    engines = [s.engine for s in fleet.slots.values() if s.engine is not None]
    out.end_s = drain(engines, end_trace_s, settings.max_drain_s, settings.drain_step_s)
    if on_progress is not None:
        on_progress(out.end_s)
    fleet.close(out.end_s)
    sample(out.end_s - 1e-9)
    out.refused = dict(refused)
    return out


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
