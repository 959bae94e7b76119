"""Traffic reported by routers (`ReportTraffic`), held until the control tick that covers it.

Where it sits: the admin servicer adds arrivals and completions as they are reported, on the cycle's
clock; the control loop takes, at each tick at cycle time T, everything that happened at or before T:
the arrivals (class and prompt length) for the cycle's history, the requests routed to each instance
(the instance level's load), the completions per routed class (the SLO guard and the served mix), and
per pool and class the requests finished and output tokens (the energy ledger). Traffic before the
cycle's origin (time 0) is dropped and counted. Reports are bounded:
beyond `max_pending` held items the oldest are dropped and counted, never the daemon's memory.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from controller.model.classes import REQUEST_CLASSES
from controller.model.fleet import Arrivals, Completions

N_CLASSES = len(REQUEST_CLASSES)
CLASS_INDEX = {c.name: i for i, c in enumerate(REQUEST_CLASSES)}


@dataclass(frozen=True, slots=True, order=True)
class Arrival:
    t_s: float
    class_index: int
    input_tokens: int
    instance_id: int  # -1: not known


@dataclass(frozen=True, slots=True, order=True)
class Completion:
    t_s: float
    routed_class: int
    true_class: int  # -1: unknown (taken as the routed class)
    slo_met: bool
    output_tokens: int
    pool: str


@dataclass(slots=True)
class TickTraffic:
    arrivals: Arrivals
    routed: dict[int, int]
    completions: Completions
    finished: Counter[tuple[str, str]] = field(default_factory=Counter)  # (pool, class) -> requests
    output_tokens: Counter[tuple[str, str]] = field(default_factory=Counter)


class TrafficBuffer:
    """See the module docstring."""

    def __init__(self, max_pending: int = 1_000_000) -> None:
        self._arrivals: list[Arrival] = []
        self._completions: list[Completion] = []
        self.max_pending = max_pending
        self.dropped = 0
        self.before_origin = 0

    def add(self, arrivals: list[Arrival], completions: list[Completion]) -> None:
        # Traffic before the cycle's origin (a controller waiting for its configured start) is outside the
        # cycle's time: dropped and counted, as the cycle's history starts at 0.
        kept_a = [a for a in arrivals if a.t_s >= 0.0]
        kept_c = [c for c in completions if c.t_s >= 0.0]
        self.before_origin += len(arrivals) - len(kept_a) + len(completions) - len(kept_c)
        arrivals, completions = kept_a, kept_c
        for a in arrivals:
            bisect.insort(self._arrivals, a)
        for c in completions:
            bisect.insort(self._completions, c)
        for items in (self._arrivals, self._completions):
            excess = len(items) - self.max_pending
            if excess > 0:
                del items[:excess]
                self.dropped += excess

    def take(self, until_s: float) -> TickTraffic:
        k = bisect.bisect_right(self._arrivals, until_s, key=lambda a: a.t_s)
        arrivals, self._arrivals = self._arrivals[:k], self._arrivals[k:]
        j = bisect.bisect_right(self._completions, until_s, key=lambda c: c.t_s)
        done, self._completions = self._completions[:j], self._completions[j:]
        routed = Counter(a.instance_id for a in arrivals if a.instance_id >= 0)
        met = [0] * N_CLASSES
        total = [0] * N_CLASSES
        served = [[0] * N_CLASSES for _ in range(N_CLASSES)]
        out = TickTraffic(
            Arrivals(
                np.array([a.t_s for a in arrivals], dtype=np.float64),
                np.array([a.class_index for a in arrivals], dtype=np.int64),
                np.array([a.input_tokens for a in arrivals], dtype=np.int64),
            ),
            dict(routed),
            Completions(),
        )
        for c in done:
            total[c.routed_class] += 1
            met[c.routed_class] += int(c.slo_met)
            true = c.true_class if c.true_class >= 0 else c.routed_class
            served[c.routed_class][true] += 1
            if c.pool:
                key = (c.pool, REQUEST_CLASSES[true].name)
                out.finished[key] += 1
                out.output_tokens[key] += c.output_tokens
        if done:
            out.completions = Completions(tuple(met), tuple(total), tuple(tuple(row) for row in served))
        return out
