"""Decisions as data: what each control step decided and why, as pure values.

Flow: a policy's cluster and pool steps return a `PlanStep` (the whole desired plan plus one
`PoolDecision` per pool); `controller.control.ControlCycle` stamps them with the time and level and adds
`ClockDecision`s for the instance level. The simulator's report keeps them (`decisions`) and the live
controller stores them, so `dctl ... --explain` shows the same records wherever they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from controller.model.cluster import ClusterPlan, InstanceSpec

# "guard": a pool step the SLO guard ran between pool boundaries, after raising a pool's planned load.
Level = Literal["initial", "cluster", "pool", "guard"]
# How a pool's mix was obtained: the MILP's optimum or its time-limited incumbent, a fallback (greedy,
# or maximum performance when even that falls short), or a fixed rule (the baselines).
SolverStatus = Literal["optimal", "incumbent", "fallback-infeasible", "fallback-timeout", "rule"]


@dataclass(frozen=True, slots=True)
class MixChoice:
    """One candidate instance mix of a pool and its estimated serving power at the planned load."""

    counts: tuple[tuple[InstanceSpec, int], ...]
    power_w: float

    def to_json(self) -> dict[str, Any]:
        return {
            "instances": [{"tp": s.tp, "clock_mhz": s.clock_mhz, "count": n} for s, n in self.counts],
            "power_w": round(self.power_w, 3),
        }


@dataclass(frozen=True, slots=True)
class PoolDecision:
    """What a cluster or pool step decided for one pool: the classes it serves, its GPU budget, the load
    it planned for (forecast rate plus burst allowance, rps), how the mix was found, the load it could
    not cover, the chosen mix and the runner-up (the best alternative the step considered), and the
    closed-loop SLO guard's correction in force for it (load factor, clock floor)."""

    pool: str
    class_names: tuple[str, ...]
    gpu_budget: int
    forecast_rps: float
    solver_status: SolverStatus
    shortfall_rps: float
    chosen: MixChoice
    runner_up: MixChoice | None
    guard_factor: float = 1.0  # the SLO guard's factor on the planned load (forecast_rps includes it)
    clock_floor_mhz: int = 0  # the SLO guard's clock floor for the pool's instances (0: none)

    def to_json(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "classes": list(self.class_names),
            "gpu_budget": self.gpu_budget,
            "forecast_rps": round(self.forecast_rps, 6),
            "solver_status": self.solver_status,
            "shortfall_rps": round(self.shortfall_rps, 6),
            "chosen": self.chosen.to_json(),
            "runner_up": None if self.runner_up is None else self.runner_up.to_json(),
            "guard_factor": round(self.guard_factor, 6),
            "clock_floor_mhz": self.clock_floor_mhz,
        }


@dataclass(frozen=True, slots=True)
class PlanStep:
    """A cluster or pool step's answer: the whole desired plan, the per-pool decisions behind it and the
    per-class forecast (rps, CLASS_NAMES order) it planned with, with the forecaster's kind ("rate": mean
    rate over the horizon; "peak": peak bin rate; "true": the oracle's known future; "none": no
    forecast, e.g. a static plan)."""

    plan: ClusterPlan
    pools: tuple[PoolDecision, ...]
    class_forecast_rps: tuple[float, ...] = ()
    forecast_kind: str = "none"


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A `PlanStep` as the cycle recorded it: when, at which level, over which horizon."""

    t_s: float
    level: Level
    horizon_s: float
    step: PlanStep
    generation: int

    def to_json(self) -> dict[str, Any]:
        return {
            "t_s": self.t_s,
            "level": self.level,
            "horizon_s": self.horizon_s,
            "generation": self.generation,
            "forecast_kind": self.step.forecast_kind,
            "class_forecast_rps": [round(x, 6) for x in self.step.class_forecast_rps],
            "pools": [p.to_json() for p in self.step.pools],
        }


ClockReason = Literal["load", "escalation"]


@dataclass(frozen=True, slots=True)
class ClockDecision:
    """The instance level changed an instance's clock at `t_s`, and why: its load, or a predicted TTFT
    miss (escalation to the maximum clock). Clock changes of a plan are in its step's decisions."""

    t_s: float
    instance_id: int
    from_mhz: int
    to_mhz: int
    reason: ClockReason

    def to_json(self) -> dict[str, Any]:
        return {
            "t_s": self.t_s,
            "instance_id": self.instance_id,
            "from_mhz": self.from_mhz,
            "to_mhz": self.to_mhz,
            "reason": self.reason,
        }


Decision = StepRecord | ClockDecision
