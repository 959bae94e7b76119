"""Observed state of a cluster as the policy core sees it at a decision point (docs/control.md).

Built by `controller.control.ControlCycle` from the fleet view and its arrival history at every tick,
whoever drives it (the simulator or the live controller); consumed by the pure policy functions
(`controller.policy`). Level-based: a policy reads the whole observed state and returns the whole
desired state (`ClusterPlan`, clocks), never a delta. Knowledge of the future is not part of it: the
oracle (`controller.sim.oracle`) gets its foresight from the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec

# Windows over which the control cycle measures each class's short-term arrival peaks
# (`ClusterObs.class_burst_history_rps`): from the trace's one-second granularity up to a third of a
# 60-s history bin, beyond which the per-bin rates themselves show a burst.
DEFAULT_BURST_WINDOWS_S = (1.0, 2.0, 5.0, 10.0, 20.0)


@dataclass(frozen=True, slots=True)
class Periods:
    """How often each control level decides (docs/control.md defaults)."""

    cluster_s: float = 1800.0
    pool_s: float = 300.0
    instance_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.instance_s <= self.pool_s <= self.cluster_s:
            periods = (self.cluster_s, self.pool_s, self.instance_s)
            raise InvalidArgumentError("periods", periods, "0 < instance_s <= pool_s <= cluster_s")


class Phase(Enum):
    """Life cycle of an instance in the cluster."""

    STARTING = "starting"  # GPUs allocated, engine loading (cold/warm start or TP restart): serves nothing
    ACTIVE = "active"  # serving
    DRAINING = "draining"  # admits nothing new, finishes its requests, then its GPUs are released


@dataclass(frozen=True, slots=True)
class InstanceObs:
    """One instance as observed at a decision point."""

    instance_id: int
    pool: str
    spec: InstanceSpec  # current TP degree and SM clock
    phase: Phase
    load_rps: float  # requests routed to it per second over the last instance period
    waiting: int  # requests queued, not yet started
    running: int  # requests in its batch


@dataclass(frozen=True, slots=True)
class GuardState:
    """The closed-loop SLO guard's state of one pool (`controller.control.guard`): the factor its planned
    load is multiplied by at the pool step, the clock below which its instances do not go (0: none), the
    windowed SLO attainment it was judged on, the completions in that window, how many checks in a row
    found it well above target (the hysteresis before relaxing), when it was last raised, and whether
    its last check found it below target (`short`: while so, a pool step never lowers its capacity)."""

    factor: float = 1.0
    clock_floor_mhz: int = 0
    attainment: float = 1.0
    samples: int = 0
    calm_checks: int = 0
    since_s: float = -math.inf  # the last raise: later checks judge only what followed it
    factor_raised_s: float = -math.inf  # the last raise of the factor
    short: bool = False


@dataclass(frozen=True, slots=True)
class ClusterObs:
    """Everything a policy may look at when it decides.

    `class_rate_history_rps[c]` is the observed arrival rate of class c (index order of CLASS_NAMES) in
    consecutive bins of `history_bin_s`, oldest first, ending at `now_s`.

    `epoch_start_s` is when the cluster epoch in force began and `pool_period_start_s` when the pool
    period in force began: explicit state of the cycle (not `now_s` modulo a period from t = 0), so a
    controller that restarts keeps its boundaries.

    `class_burst_history_rps[k][c][b]`: the short-term peak of class c in history bin b, measured over
    window `burst_windows_s[k]`: the most arrivals of the class within any window of that length ending
    at an arrival in the bin, divided by the window (rps). The 60-s rates hide sub-minute bursts, which
    a queue absorbs only within the class's TTFT target; the policies size for them from this
    (docs/control.md, "Burst-aware provisioning"). Empty (both fields) when not measured.

    `guard`: per pool of the plan, the closed-loop SLO guard's state (`GuardState`; empty: no guard).
    Policies that use it (DynamoLLM) scale the pool's planned load and floor its clocks; others ignore it.

    `served_mix[r][t]`: of the recent completions routed as class r, the share that were of class t
    (`controller.control.served`; empty: as routed). DynamoLLM sizes a pool for what it really serves.

    `class_input_tokens_mean[c]`: the mean prompt length of class c's recent arrivals (0: none seen;
    empty: not reported). DynamoLLM scales a class's profiled capacity by how much longer its prompts
    are than those it was profiled with (`controller.policy.capacity.length_scales`).
    """

    now_s: float
    start_unix_s: float | None  # wall time of t = 0 (weekly templates align to it); None if unknown
    plan: ClusterPlan  # desired state in force
    instances: tuple[InstanceObs, ...]
    history_bin_s: float
    class_rate_history_rps: tuple[tuple[float, ...], ...]
    total_gpus: int  # GPUs the cluster may use at most
    burst_windows_s: tuple[float, ...] = ()
    class_burst_history_rps: tuple[tuple[tuple[float, ...], ...], ...] = ()
    epoch_start_s: float = 0.0
    pool_period_start_s: float = 0.0
    guard: Mapping[str, GuardState] = field(default_factory=dict)
    served_mix: tuple[tuple[float, ...], ...] = ()
    class_input_tokens_mean: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.class_rate_history_rps) != len(CLASS_NAMES):
            raise InvalidArgumentError(
                "class_rate_history_rps", len(self.class_rate_history_rps), f"{len(CLASS_NAMES)} classes"
            )
        windows = self.burst_windows_s
        if not all(math.isfinite(w) and w > 0 for w in windows) or list(windows) != sorted(set(windows)):
            raise InvalidArgumentError("burst_windows_s", windows, "increasing positive seconds")
        if not self.epoch_start_s <= self.pool_period_start_s <= self.now_s:
            starts = (self.epoch_start_s, self.pool_period_start_s, self.now_s)
            raise InvalidArgumentError(
                "epoch_start_s", starts, "epoch_start_s <= pool_period_start_s <= now_s"
            )
        if len(self.class_burst_history_rps) != len(windows):
            raise InvalidArgumentError(
                "class_burst_history_rps",
                len(self.class_burst_history_rps),
                f"one per window ({len(windows)})",
            )
        bins = tuple(len(row) for row in self.class_rate_history_rps)
        for per_window in self.class_burst_history_rps:
            if tuple(len(row) for row in per_window) != bins:
                raise InvalidArgumentError(
                    "class_burst_history_rps",
                    tuple(len(row) for row in per_window),
                    f"the shape of class_rate_history_rps ({len(bins)} classes of {bins} bins)",
                )
