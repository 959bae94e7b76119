"""The paper's baselines (docs/evaluation.md), as pure frozen values driven by the same control cycle as
`dynamollm`: three one-knob dynamic policies and the static `multipool` (`singlepool` lives in
`controller.policy.singlepool`).

- `scaleinst`: one pool, TP8 at the maximum clock, only the instance count changes (the MILP restricted
  to that one configuration, over the whole cluster's GPUs).
- `scaleshard`: one pool holding singlepool's GPUs throughout, only the TP degree changes (all instances
  of one TP; the least-power TP that covers the forecast), maximum clock.
- `scalefreq`: singlepool's instances, only the clock changes (instance level, as in `dynamollm`).
- `multipool`: static, one pool per class, TP8 at the maximum clock, each sized for its class's peak (at
  least one instance, so a class with no requests still holds one: the fragmentation the paper
  measures).

Their steps return the plan with a decision record per pool (`rule_step`), so every policy's report
explains itself the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.model.classes import CLASS_NAMES
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import MixChoice, PlanStep, PoolDecision, SolverStatus
from controller.model.profile import Profile
from controller.model.state import ClusterObs, Periods
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.base import ArrivalStats
from controller.policy.cluster_manager import plan_pools
from controller.policy.dynamollm import (
    DEFAULT_COSTS,
    DEFAULT_MIX_WINDOW_S,
    DEFAULT_PERIODS,
    DEFAULT_SUSTAINED_WINDOW_S,
    mix_choice,
)
from controller.policy.frequency import DEFAULT_CLOCK_HEADROOM
from controller.policy.instance_model import CapacityCache, class_shares
from controller.policy.observed import (
    choose_clocks,
    history_len,
    live_counts,
    max_clocks,
    recent_class_rates_rps,
    reconfig_cost_j,
    whole_cluster_forecast,
)
from controller.policy.pool import DEFAULT_TIME_LIMIT_S, ProblemCache, solve_pool
from controller.policy.singlepool import POOL_NAME, SinglePool, singlepool_plan, size_singlepool


def rule_step(
    plan: ClusterPlan,
    load_rps: float,
    *,
    status: SolverStatus = "rule",
    power_w: float = 0.0,
    shortfall_rps: float = 0.0,
) -> PlanStep:
    """A baseline's answer as a decision record: each pool's mix from its rule, the load it was for."""
    pools = tuple(
        PoolDecision(
            pool=p.name,
            class_names=p.class_names,
            gpu_budget=p.gpus,
            forecast_rps=load_rps,
            solver_status=status,
            shortfall_rps=shortfall_rps,
            chosen=MixChoice(counts=tuple(p.instance_counts().items()), power_w=power_w),
            runner_up=None,
        )
        for p in plan.pools
    )
    return PlanStep(plan=plan, pools=pools, forecast_kind="peak" if load_rps else "none")


@dataclass(frozen=True, slots=True)
class ScaleInst:
    """`--policy scaleinst`: one pool of TP8 instances at the maximum clock; only their count changes."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    problems: ProblemCache = field(default_factory=ProblemCache, compare=False, repr=False)
    capacities: CapacityCache = field(default_factory=CapacityCache, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "scaleinst"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile).plan

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self.pool_step(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        if history_len(obs) == 0:
            return PlanStep(plan=obs.plan, pools=())
        load_rps = whole_cluster_forecast(obs, self.periods.pool_s + self.costs.start_s)
        shares = class_shares(CLASS_NAMES, recent_class_rates_rps(obs, self.mix_window_s))
        caps = self.capacities.capacities(profile, shares)
        clock = max(profile.clocks_mhz)
        solution = solve_pool(
            load_rps,
            obs.total_gpus,
            caps,
            live_counts(obs, POOL_NAME),
            reconfig_cost_j=reconfig_cost_j(self.costs),
            epoch_s=self.periods.pool_s,
            time_limit_s=self.time_limit_s,
            allowed_tps=(GPUS_PER_SERVER,),
            allowed_clocks=(clock,),
            problems=self.problems,
        )
        count = max(1, sum(solution.counts.values()))
        return rule_step(
            singlepool_plan(count, GPUS_PER_SERVER, clock),
            load_rps,
            status=solution.status,
            power_w=mix_choice(solution, self.periods.pool_s).power_w,
            shortfall_rps=solution.shortfall_rps,
        )

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return max_clocks(obs, profile)


@dataclass(frozen=True, slots=True)
class ScaleShard:
    """`--policy scaleshard`: singlepool's GPUs held throughout, split into instances of one TP degree
    (the least power at the forecast load among those covering it; else the most capacity), max clock."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    capacities: CapacityCache = field(default_factory=CapacityCache, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "scaleshard"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile).plan

    def plan_with(self, instances: int, profile: Profile) -> ClusterPlan:
        """Singlepool's plan with `instances` TP8 instances: fixes the GPUs this policy re-shards."""
        return SinglePool().plan_with(instances, profile)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self.pool_step(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        gpus = obs.plan.gpus
        if history_len(obs) == 0 or gpus == 0:
            return PlanStep(plan=obs.plan, pools=())
        load_rps = whole_cluster_forecast(obs, self.periods.pool_s + self.costs.start_s)
        shares = class_shares(CLASS_NAMES, recent_class_rates_rps(obs, self.mix_window_s))
        clock = max(profile.clocks_mhz)
        options: list[tuple[bool, float, int]] = []  # (covers, power or -capacity, tp)
        for cap in self.capacities.capacities(profile, shares):
            if cap.clock_mhz != clock or gpus % cap.tp:
                continue
            n = gpus // cap.tp
            total_rps = n * cap.max_load_rps
            if total_rps >= load_rps:
                options.append((True, n * cap.power_w(load_rps / n), cap.tp))
            else:
                options.append((False, -total_rps, cap.tp))
        if not options:
            return PlanStep(plan=obs.plan, pools=())
        covering = [o for o in options if o[0]]
        _, power_w, tp = min(covering or options, key=lambda o: (o[1], -o[2]))
        return rule_step(singlepool_plan(gpus // tp, tp, clock), load_rps, power_w=max(0.0, power_w))

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return max_clocks(obs, profile)


@dataclass(frozen=True, slots=True)
class ScaleFreq:
    """`--policy scalefreq`: singlepool's instances, never changed; only each instance's clock."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    clock_headroom: float = DEFAULT_CLOCK_HEADROOM
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    sustained_window_s: float = DEFAULT_SUSTAINED_WINDOW_S
    capacities: CapacityCache = field(default_factory=CapacityCache, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "scalefreq"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile).plan

    def plan_with(self, instances: int, profile: Profile) -> ClusterPlan:
        """Singlepool's plan with `instances` instances: the fleet whose clocks this policy tunes."""
        return SinglePool().plan_with(instances, profile)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return PlanStep(plan=obs.plan, pools=())

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return PlanStep(plan=obs.plan, pools=())

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return choose_clocks(
            obs,
            profile,
            self.capacities,
            headroom=self.clock_headroom,
            mix_window_s=self.mix_window_s,
            sustained_s=self.sustained_window_s,
        )


@dataclass(frozen=True, slots=True)
class MultiPool:
    """`--policy multipool`: static, a pool per class of TP8 instances at the maximum clock, each sized
    for its class's peak (ceil(peak_c / cap_c), at least one)."""

    @property
    def name(self) -> str:
        return "multipool"

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        # No merging keeps every class in its own pool; no headroom anywhere.
        budgets = plan_pools(
            arrivals.peak_rate_rps_by_class, profile, None, merge_fill=0.0, largest_headroom=0.0
        )
        spec = InstanceSpec(tp=GPUS_PER_SERVER, clock_mhz=max(profile.clocks_mhz))
        return ClusterPlan(
            pools=tuple(
                PoolPlan(
                    name=b.name,
                    class_names=b.class_names,
                    instances=(spec,) * (b.gpu_budget // GPUS_PER_SERVER),
                )
                for b in budgets
            )
        )
