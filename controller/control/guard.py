"""The closed-loop SLO guard: what the control cycle learns from realised SLO outcomes. Pure.

The profiles a policy plans with are measured under Poisson arrivals on one engine per class; real
traffic (burstier arrivals, merged pools, mispredicted output lengths routing requests to pools not
sized for them) may miss more than the profile promised. The guard closes the loop: the driver reports
the completions since the last tick per routed class (`Completions`: met / total, a request rejected
past its deadline counted as a miss); the guard keeps a sliding window of them and, per pool of the
plan in force, its windowed attainment (the completions of the pool's classes pooled together).

Corrections, in order of cost, while a pool's attainment is below `target` (checked every
`interval_s`):
- instance level: the pool's clock floor is raised one profiled clock step above the lowest clock the
  pool runs at (or above the floor already set); the instance step never chooses a clock below it;
- pool level: the pool's guard factor (the planned load is multiplied by it at the pool step) grows by
  `factor_step` times how many times the allowed miss share the pool misses by (`(target -
  attainment) / (1 - target)`, at least 1, at most `max_step_multiple`), up to `max_factor`, at most once
  per `factor_interval_s`. A raise makes the control cycle run a pool step at once (not at the next pool
  boundary), so the correction is in place within a minute, not up to a pool period later.
A raise restarts the evidence: later checks count only the completions reported after it, so a
correction is judged on what followed it, not on the misses that caused it.
Both relax only after `relax_checks` consecutive checks with attainment at or above `relax` (the
hysteresis): the floor one clock step at a time, the factor by `factor_decay`. A check with fewer than
`min_samples` completions in the window holds the state. The guard never lowers capacity (factor or
floor) at a check where the attainment is below target, and marks the pool `short` until a check finds
it at target: the pool step then never plans less capacity for it than it runs (a forecast that fell
meanwhile must not undo the correction).

The guard's state reaches the policy through the observation (`ClusterObs.guard`); only policies that
use it (DynamoLLM) act on it, the baselines ignore it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.fleet import Completions
from controller.model.state import GuardState


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Knobs of the SLO guard (module docstring)."""

    window_s: float = 300.0
    interval_s: float = 30.0
    target: float = 0.993
    relax: float = 0.997
    relax_checks: int = 6
    min_samples: int = 100
    factor_interval_s: float = 60.0
    factor_step: float = 0.1
    max_step_multiple: float = 4.0
    factor_decay: float = 0.05
    max_factor: float = 2.0

    def __post_init__(self) -> None:
        if not (0.0 < self.target <= self.relax <= 1.0):
            raise InvalidArgumentError("target", (self.target, self.relax), "0 < target <= relax <= 1")
        for name in ("window_s", "interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgumentError(name, value, "a positive finite number of seconds")
        if not (self.max_factor >= 1.0 and self.factor_step >= 0.0 and self.factor_decay >= 0.0):
            raise InvalidArgumentError("max_factor", self.max_factor, ">= 1 with steps >= 0")
        if not self.max_step_multiple >= 1.0:
            raise InvalidArgumentError("max_step_multiple", self.max_step_multiple, ">= 1")


def check(
    state: GuardState,
    met: int,
    total: int,
    now_s: float,
    clocks_mhz: Sequence[int],
    lowest_running_mhz: int,
    config: GuardConfig,
) -> GuardState:
    """One check of one pool at `now_s`: the new state from `met` of `total` completions in the window
    since the pool's last raise (`GuardState.since_s`: a correction is judged on what followed it).
    `clocks_mhz`: the profiled clocks (sorted); `lowest_running_mhz`: the lowest clock the pool's active
    instances run at now (0: none)."""
    if total < config.min_samples:
        return replace(state, attainment=(met / total if total else 1.0), samples=total)
    attainment = met / total
    if attainment < config.target:
        base = max(state.clock_floor_mhz, lowest_running_mhz)
        above = [c for c in clocks_mhz if c > base]
        floor = max(above[0] if above else base, state.clock_floor_mhz)
        factor, raised_s = state.factor, state.factor_raised_s
        if now_s - state.factor_raised_s >= config.factor_interval_s:
            misses = (config.target - attainment) / (1.0 - config.target) if config.target < 1.0 else 1.0
            step = config.factor_step * min(config.max_step_multiple, max(1.0, misses))
            factor, raised_s = (max(state.factor, min(config.max_factor, state.factor + step)), now_s)
        return GuardState(factor, floor, attainment, total, 0, now_s, raised_s, short=True)
    if attainment >= config.relax:
        calm = state.calm_checks + 1
        if calm >= config.relax_checks:
            below = [c for c in clocks_mhz if c < state.clock_floor_mhz]
            floor = below[-1] if below and state.clock_floor_mhz > 0 else 0
            if clocks_mhz and floor <= min(clocks_mhz):
                floor = 0
            factor = max(1.0, state.factor - config.factor_decay)
            return replace(
                state,
                factor=factor,
                clock_floor_mhz=floor,
                attainment=attainment,
                samples=total,
                calm_checks=0,
                short=False,
            )
        return replace(state, attainment=attainment, samples=total, calm_checks=calm, short=False)
    return replace(state, attainment=attainment, samples=total, calm_checks=0, short=False)


class SloGuard:
    """The sliding window of completions and the per-pool guard state (module docstring)."""

    def __init__(self, clocks_mhz: Sequence[int], config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.clocks_mhz = tuple(sorted(set(clocks_mhz)))
        self._window: deque[tuple[float, Completions]] = deque()
        self._next_check_s = -math.inf
        self.state: dict[str, GuardState] = {}
        self._pools: dict[str, tuple[str, ...]] = {}

    def observe(self, now_s: float, completions: Completions) -> None:
        if completions.any():
            self._window.append((now_s, completions))
        while self._window and self._window[0][0] <= now_s - self.config.window_s:
            self._window.popleft()

    def windowed(self, after_s: float = -math.inf) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per class (CLASS_NAMES order): completions met and in all, over the window (only those
        reported after `after_s`)."""
        met = [0] * len(CLASS_NAMES)
        total = [0] * len(CLASS_NAMES)
        for t, c in self._window:
            if t <= after_s:
                continue
            for i in range(len(CLASS_NAMES)):
                met[i] += c.met[i]
                total[i] += c.total[i]
        return tuple(met), tuple(total)

    def update(
        self,
        now_s: float,
        pools: Mapping[str, Sequence[str]],
        lowest_running_mhz: Mapping[str, int],
    ) -> dict[str, GuardState]:
        """The per-pool state at `now_s` (checked when a check is due): `pools` maps each pool of the plan
        in force to its classes. A pool new to the guard inherits the largest state of the pools that
        served any of its classes."""
        old = self.state
        served_by = {c: name for name, classes in self._pools.items() for c in classes}
        state: dict[str, GuardState] = {}
        for name, classes in pools.items():
            if name in old:
                state[name] = old[name]
                continue
            inherited = [old[served_by[c]] for c in classes if c in served_by and served_by[c] in old]
            state[name] = (
                GuardState(
                    factor=max(s.factor for s in inherited),
                    clock_floor_mhz=max(s.clock_floor_mhz for s in inherited),
                    since_s=max(s.since_s for s in inherited),
                    factor_raised_s=max(s.factor_raised_s for s in inherited),
                )
                if inherited
                else GuardState()
            )
        self._pools = {name: tuple(classes) for name, classes in pools.items()}
        if now_s + 1e-9 >= self._next_check_s:
            self._next_check_s = now_s + self.config.interval_s
            for name, classes in pools.items():
                met, total = self.windowed(state[name].since_s)
                idx = [CLASS_NAMES.index(c) for c in classes]
                m, n = sum(met[i] for i in idx), sum(total[i] for i in idx)
                state[name] = check(
                    state[name], m, n, now_s, self.clocks_mhz, lowest_running_mhz.get(name, 0), self.config
                )
        self.state = state
        return dict(state)
