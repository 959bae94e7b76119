"""The seam between the simulator (or the live controller) and a cluster policy, and the arrival
statistics a policy sizes from.

Flow: the caller summarises arrivals per request class (`arrival_stats`) and asks the policy for a
`ClusterPlan` (`SimPolicy.initial_plan`). Static policies stop there; dynamic policies
(`DynamicPolicy`) are then stepped by `controller.control.ControlCycle` at their periods. Pure: arrays
in, frozen values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.classes import REQUEST_CLASSES
from controller.model.cluster import ClusterPlan
from controller.model.decisions import PlanStep
from controller.model.profile import Profile
from controller.model.state import ClusterObs, Periods
from controller.orchestrator.plan import ReconfigCosts

# Sliding-window length over which a "peak" arrival rate is measured: long enough that a few
# back-to-back requests do not count as a peak, short against the minutes a cluster needs to react.
DEFAULT_PEAK_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class ArrivalStats:
    """Per-class request counts and peak rates of a workload (indices follow REQUEST_CLASSES)."""

    duration_s: float
    window_s: float
    requests_by_class: tuple[int, ...]
    peak_rate_rps: float
    peak_rate_rps_by_class: tuple[float, ...]

    @property
    def requests(self) -> int:
        return sum(self.requests_by_class)

    @property
    def mean_rate_rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def class_shares(self) -> tuple[float, ...]:
        """Fraction of requests in each class (all zero for an empty workload)."""
        n = self.requests
        return tuple(c / n if n else 0.0 for c in self.requests_by_class)


WORKLOAD_SCHEMA = "dynamollm.workloadstats/v1"


def arrival_stats_to_json(stats: ArrivalStats) -> dict[str, object]:
    """`stats` as a `dynamollm.workloadstats/v1` document (classes by name)."""
    names = [c.name for c in REQUEST_CLASSES]
    return {
        "schema": WORKLOAD_SCHEMA,
        "duration_s": stats.duration_s,
        "window_s": stats.window_s,
        "requests_by_class": dict(zip(names, stats.requests_by_class, strict=True)),
        "peak_rate_rps": stats.peak_rate_rps,
        "peak_rate_rps_by_class": dict(zip(names, stats.peak_rate_rps_by_class, strict=True)),
    }


def arrival_stats_from_json(doc: object) -> ArrivalStats:
    """The inverse of `arrival_stats_to_json`; InvalidArgumentError naming the field that is wrong."""
    if not isinstance(doc, Mapping) or doc.get("schema") != WORKLOAD_SCHEMA:
        raise InvalidArgumentError(
            "schema", doc.get("schema") if isinstance(doc, Mapping) else doc, WORKLOAD_SCHEMA
        )

    def number(key: str, value: object, positive: bool) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
            raise InvalidArgumentError(key, value, "a finite number " + ("> 0" if positive else ">= 0"))
        return float(value)  # type: ignore[arg-type]

    def per_class(key: str, integer: bool) -> tuple[float, ...]:
        table = doc.get(key)
        names = [c.name for c in REQUEST_CLASSES]
        if not isinstance(table, Mapping) or set(table) != set(names):
            raise InvalidArgumentError(key, table, f"a table with one entry per class {names}")
        values = [number(f"{key}.{n}", table[n], False) for n in names]
        if integer and any(v != int(v) for v in values):
            raise InvalidArgumentError(key, table, "whole numbers of requests")
        return tuple(values)

    return ArrivalStats(
        duration_s=number("duration_s", doc.get("duration_s"), True),
        window_s=number("window_s", doc.get("window_s"), True),
        requests_by_class=tuple(int(v) for v in per_class("requests_by_class", True)),
        peak_rate_rps=number("peak_rate_rps", doc.get("peak_rate_rps"), False),
        peak_rate_rps_by_class=per_class("peak_rate_rps_by_class", False),
    )


def peak_rate_rps(arrival_s: npt.NDArray[np.float64], window_s: float) -> float:
    """Largest number of arrivals in any window [t, t + window_s), divided by window_s.

    `arrival_s` must be sorted. Windows starting at an arrival suffice: sliding any window forward to
    its first arrival loses none of the arrivals it holds.
    """
    if len(arrival_s) == 0:
        return 0.0
    ends = np.searchsorted(arrival_s, arrival_s + window_s, side="left")
    counts = ends - np.arange(len(arrival_s))
    return float(counts.max()) / window_s


def arrival_stats(
    arrival_s: npt.NDArray[np.float64],
    class_index: npt.NDArray[np.integer],
    duration_s: float,
    window_s: float = DEFAULT_PEAK_WINDOW_S,
) -> ArrivalStats:
    """Summarise sorted arrivals and their class indices (0..8) over a workload of `duration_s`."""
    if not window_s > 0:
        raise InvalidArgumentError("window_s", window_s, "a positive number of seconds")
    if len(arrival_s) != len(class_index):
        raise InvalidArgumentError(
            "class_index", len(class_index), f"{len(arrival_s)} entries, one per arrival"
        )
    counts = np.bincount(class_index, minlength=len(REQUEST_CLASSES)) if len(class_index) else None
    by_class = tuple(int(c) for c in counts) if counts is not None else (0,) * len(REQUEST_CLASSES)
    peaks = tuple(peak_rate_rps(arrival_s[class_index == c.index], window_s) for c in REQUEST_CLASSES)
    return ArrivalStats(
        duration_s=duration_s,
        window_s=window_s,
        requests_by_class=by_class,
        peak_rate_rps=peak_rate_rps(arrival_s, window_s),
        peak_rate_rps_by_class=peaks,
    )


class SimPolicy(Protocol):
    """A cluster policy as the simulator drives it."""

    @property
    def name(self) -> str:
        """The `--policy` name."""
        ...

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        """The cluster to start the run with, from the workload's statistics and the profile."""
        ...


@runtime_checkable
class SizablePolicy(SimPolicy, Protocol):
    """A static policy whose plan has one free size: the number of identical instances."""

    def plan_with(self, instances: int, profile: Profile) -> ClusterPlan:
        """The policy's plan with exactly `instances` instances."""
        ...


@runtime_checkable
class DynamicPolicy(SimPolicy, Protocol):
    """A policy that re-decides during the run, at three time scales (docs/control.md). Pure: each step
    maps the observed state (and the profile) to the whole desired state and the decisions behind it; the
    control cycle turns the difference with the current state into costed, staggered
    reconfigurations, priced and timed with the policy's own `costs`."""

    @property
    def periods(self) -> Periods: ...

    @property
    def costs(self) -> ReconfigCosts: ...

    @property
    def reconfiguration_free(self) -> bool:
        """True only for `oracle`: its changes take effect instantly and cost nothing."""
        ...

    @property
    def uses_slo_guard(self) -> bool:
        """True for the policies that act on the SLO guard's state (DynamoLLM, the oracle): only they
        get the guard's early pool steps; the others step at their own periods alone."""
        ...

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        """Every cluster period: pools (which classes each serves) and their instances."""
        ...

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        """Every pool period: the instance mix (TP, clock) of each pool within its GPU budget."""
        ...

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        """Every instance period: SM clock (MHz) per active instance id."""
        ...
