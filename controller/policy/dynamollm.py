"""`--policy dynamollm`: every knob of the DynamoLLM hierarchy, as a pure frozen value.

Where it sits: `controller.control.ControlCycle` asks it for the initial plan, then calls `cluster_step`,
`pool_step` and `instance_step` at their periods with the observed state (`ClusterObs`); the cycle turns
each desired plan into costed actions (`controller.orchestrator.plan_reconfiguration`) and commands.

- Cluster level: per-class rate forecasts (`forecast.forecast_next_rate_rps`: the Poisson noise the
  profile's capacities absorb is not added again) -> pools and GPU budgets (`cluster_manager.plan_pools`).
- Objective (`objective`, `controller.policy.objective`): energy (default), cost (rental + energy: the
  MILP prices each held GPU) or carbon (the same decisions as energy, see that module).
- Pool level: per pool, the MILP (`pool.solve_pools`; one joint MILP with the servers the pools fill
  under the cost objective) over TP in {2, 4, 8} x every profiled clock: capacity for the pool's
  planned load (forecast rate over the next pool period plus a start-up time, plus bursts, times the
  guard factor) at each TP's most capable clock, energy priced at the typical load (the forecast rate),
  with the current instances and the reconfiguration costs (the same `ReconfigCosts` the executor
  times changes with). Capacity is that of the classes the pool really serves (`served_shares` over
  `ClusterObs.served_mix`). Each pool's decision is returned as data: budget, forecast, solver status,
  shortfall, the chosen mix and the greedy runner-up with their power.
- Instance level: each active instance's clock from its measured and sustained load with a dead-band
  (`frequency.next_clock`); pool steps keep the clocks of the instances they keep
  (`observed.keep_current_clocks`).
- SLO guard (closed loop, `controller.control.guard`): a pool whose realised SLO attainment falls
  below target gets a guard factor on its planned load (and GPU budget) at the pool step and a clock
  floor at the instance level, both from the observation (`ClusterObs.guard`); while it is below
  target its pool step never plans less capacity than it runs; they relax slowly once it is well
  above target.
- Bursts: each class's forecast is raised by the service rate that drains its largest recent
  sub-minute burst beyond Poisson within its TTFT target (`bursts.class_burst_rps`), in the budgets and
  in the pool loads, except bursts small enough to fit a miss budget of 0.5% of the arrivals.

Consistency between levels without state: a pool step re-derives the pools and budgets of the epoch in
force from the history up to the epoch's start (`ClusterObs.epoch_start_s`, the same inputs the cluster
step had), so both levels agree without the policy remembering anything. Start-ahead: when the next
cluster boundary falls within the coming pool period plus a start-up time, the pool step forecasts up to
the first pool period of the next epoch and takes the larger budget, so the next epoch's instances are
running when it begins.

The initial plan (t = 0, no history yet) comes from the workload's statistics, as `singlepool`'s does:
the operator provisions for the expected load before the first decision. The solver's problem cache
and the capacity memo belong to the policy object (a daemon solves in a worker thread).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from controller.model.classes import CLASS_NAMES
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec, PoolPlan
from controller.model.decisions import MixChoice, PlanStep, PoolDecision
from controller.model.profile import Profile
from controller.model.state import ClusterObs, GuardState, Periods
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.base import ArrivalStats
from controller.policy.bursts import class_burst_rps
from controller.policy.capacity import length_scales
from controller.policy.cluster_manager import (
    DEFAULT_LARGEST_HEADROOM,
    DEFAULT_MERGE_FILL,
    DEFAULT_MERGE_TTFT_RATIO,
    PoolBudget,
    plan_pools,
    trim_budgets,
)
from controller.policy.forecast import forecast_next_rate_rps
from controller.policy.frequency import DEFAULT_CLOCK_HEADROOM
from controller.policy.instance_model import CapacityCache, served_shares
from controller.policy.objective import (
    DEFAULT_ENERGY_USD_PER_KWH,
    DEFAULT_GPU_USD_PER_SERVER_HOUR,
    gpu_hold_j_per_gpu_s,
)
from controller.policy.observed import (
    choose_clocks,
    forecast_now_unix_s,
    guard_of,
    history_len,
    idle_instance,
    keep_current_clocks,
    live_counts,
    pool_forecast_rps,
    recent_class_rates_rps,
    reconfig_cost_j,
)
from controller.policy.pool import (
    DEFAULT_MIP_REL_GAP,
    DEFAULT_TIME_LIMIT_S,
    PoolInput,
    ProblemCache,
    allowed_configs,
    greedy_decision,
    solve_pools,
)
from controller.policy.pool import (
    PoolDecision as PoolSolution,
)

# Class shares of a pool's mix are measured over this much recent history: long enough for a stable
# mix at low rates, short against the daily cycle.
DEFAULT_MIX_WINDOW_S = 900.0
# An instance's sustained load (what its clock follows, `frequency.next_clock`) is its share of its
# pool's arrivals over this window: two history bins, ~100 requests per instance at 1 req/s (noise ~10%,
# within the clock headroom), short against the pool period.
DEFAULT_SUSTAINED_WINDOW_S = 120.0
# Share of the arrivals whose TTFT the burst term lets bursts cost (`class_burst_rps`): half of the 1%
# a 99% SLO target leaves, the other half for forecast misses and the queueing of rate changes.
DEFAULT_BURST_MISS_SHARE = 0.005
DEFAULT_PERIODS = Periods()
DEFAULT_COSTS = ReconfigCosts()


def mix_choice(solution: PoolSolution, epoch_s: float) -> MixChoice:
    """A solver answer as the decision record's mix: counts and mean power over the epoch."""
    return MixChoice(counts=tuple(solution.counts.items()), power_w=solution.energy_j_estimate / epoch_s)


@dataclass(frozen=True, slots=True)
class DynamoLLM:
    """`--policy dynamollm`: the full hierarchy (module docstring)."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    merge_fill: float = DEFAULT_MERGE_FILL
    largest_headroom: float = DEFAULT_LARGEST_HEADROOM
    clock_headroom: float = DEFAULT_CLOCK_HEADROOM
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    sustained_window_s: float = DEFAULT_SUSTAINED_WINDOW_S
    burst_miss_share: float = DEFAULT_BURST_MISS_SHARE
    merge_ttft_ratio: float = DEFAULT_MERGE_TTFT_RATIO
    objective: str = "energy"
    gpu_usd_per_server_hour: float = DEFAULT_GPU_USD_PER_SERVER_HOUR
    energy_usd_per_kwh: float = DEFAULT_ENERGY_USD_PER_KWH
    problems: ProblemCache = field(default_factory=ProblemCache, compare=False, repr=False)
    capacities: CapacityCache = field(default_factory=CapacityCache, compare=False, repr=False)

    @property
    def name(self) -> str:
        return "dynamollm"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    @property
    def uses_slo_guard(self) -> bool:
        return True

    @property
    def gpu_hold_j_per_gpu_s(self) -> float:
        """The objective's price of holding a GPU, in J per GPU-second (`controller.policy.objective`)."""
        return gpu_hold_j_per_gpu_s(self.objective, self.gpu_usd_per_server_hour, self.energy_usd_per_kwh)

    # -- knobs the oracle changes
    forecast_kind = "rate"

    def _allowed_tps(self, profile: Profile) -> tuple[int, ...]:
        return tuple(tp for tp in profile.tps if tp in (2, 4, 8))

    def _reconfig_cost_j(self) -> dict[str, float]:
        return reconfig_cost_j(self.costs, self.gpu_hold_j_per_gpu_s)

    def _can_decide(self, obs: ClusterObs) -> bool:
        """Nothing observed yet: the initial plan stands."""
        return history_len(obs) > 0

    def _class_peaks(self, obs: ClusterObs, horizon_s: float, bins: int) -> tuple[float, ...]:
        """Per-class rate forecast over `horizon_s` from the first `bins` history bins."""
        now_unix = forecast_now_unix_s(obs, bins)
        return tuple(
            forecast_next_rate_rps(series[:bins], obs.history_bin_s, horizon_s, now_unix_s=now_unix)
            for series in obs.class_rate_history_rps
        )

    def _pool_load_rps(self, obs: ClusterObs, class_names: Sequence[str], horizon_s: float) -> float:
        return pool_forecast_rps(obs, class_names, horizon_s, history_len(obs), forecast_next_rate_rps)

    def _class_bursts(
        self, obs: ClusterObs, profile: Profile, bins: int, provisioned_rps: Sequence[float]
    ) -> tuple[float, ...]:
        """Per class, the rate to add for bursts: those observed over the last cluster period."""
        return class_burst_rps(
            obs, profile, bins, self.periods.cluster_s, provisioned_rps, miss_share=self.burst_miss_share
        )

    # -- the levels
    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        budgets = plan_pools(
            arrivals.peak_rate_rps_by_class,
            profile,
            None,
            merge_fill=self.merge_fill,
            largest_headroom=self.largest_headroom,
            merge_ttft_ratio=self.merge_ttft_ratio,
        )
        loads = {b.name: b.forecast_rps for b in budgets}
        return self._solve(budgets, loads, arrivals.peak_rate_rps_by_class, {}, profile).plan

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self._decide(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self._decide(obs, profile)

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return choose_clocks(
            obs,
            profile,
            self.capacities,
            headroom=self.clock_headroom,
            mix_window_s=self.mix_window_s,
            sustained_s=self.sustained_window_s,
            floors_mhz={p.name: guard_of(obs, p.class_names).clock_floor_mhz for p in obs.plan.pools},
        )

    def _epoch_budgets(
        self, obs: ClusterObs, profile: Profile, bins: int, scales: Mapping[str, float]
    ) -> tuple[PoolBudget, ...]:
        peaks = self._class_peaks(obs, self.periods.cluster_s, bins)
        bursts = self._class_bursts(obs, profile, bins, peaks)
        return plan_pools(
            tuple(p + b for p, b in zip(peaks, bursts, strict=True)),
            profile,
            obs.total_gpus,
            merge_fill=self.merge_fill,
            largest_headroom=self.largest_headroom,
            merge_ttft_ratio=self.merge_ttft_ratio,
            capacity_scales=scales,
        )

    def _decide(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        if not self._can_decide(obs):
            return PlanStep(plan=obs.plan, pools=())
        n = history_len(obs)
        p = self.periods
        scales = length_scales(profile, obs.class_input_tokens_mean)
        since_bins = round((obs.now_s - obs.epoch_start_s) / obs.history_bin_s)
        # The epoch's pools come from the history the cluster step had; before any history existed at a
        # boundary (the first epoch), from all history so far.
        bins = n - since_bins if n - since_bins > 0 else n
        budgets = self._epoch_budgets(obs, profile, bins, scales)
        horizon_s = p.pool_s + self.costs.start_s
        next_boundary_s = obs.epoch_start_s + p.cluster_s
        if obs.now_s + horizon_s > next_boundary_s and obs.now_s > obs.epoch_start_s:
            # Start-ahead: size for the next epoch's first pool period too, within the larger budget.
            horizon_s = next_boundary_s - obs.now_s + p.pool_s + self.costs.start_s
            following = {b.name: b.gpu_budget for b in self._epoch_budgets(obs, profile, n, scales)}
            budgets = tuple(
                replace(b, gpu_budget=max(b.gpu_budget, following.get(b.name, 0))) for b in budgets
            )
            budgets = fit_total(budgets, obs.total_gpus)
        peaks = self._class_peaks(obs, horizon_s, n)
        bursts = self._class_bursts(obs, profile, n, peaks)
        # The SLO guard's correction: a pool missing its target plans for more load, within a budget
        # raised as much (then fitted to the cluster's GPUs).
        guards = {b.name: guard_of(obs, b.class_names) for b in budgets}
        if any(g.factor > 1.0 for g in guards.values()):
            budgets = fit_total(
                tuple(
                    replace(b, gpu_budget=_scaled_budget(b.gpu_budget, guards[b.name].factor))
                    for b in budgets
                ),
                obs.total_gpus,
            )
        rates = {b.name: self._pool_load_rps(obs, b.class_names, horizon_s) for b in budgets}
        loads = {
            b.name: guards[b.name].factor
            * (rates[b.name] + sum(bursts[CLASS_NAMES.index(c)] for c in b.class_names))
            for b in budgets
        }
        current = {b.name: live_counts(obs, b.name) for b in budgets}
        mix = recent_class_rates_rps(obs, self.mix_window_s)
        budgets, loads = self._hold_short_pools(budgets, loads, current, guards, mix, profile, obs, scales)
        typical = {name: min(rate, loads[name]) for name, rate in rates.items()}
        solved = self._solve(
            budgets, loads, mix, current, profile, guards, obs.total_gpus, typical, obs.served_mix, scales
        )
        forecast = tuple(p + b for p, b in zip(peaks, bursts, strict=True))
        return replace(
            solved,
            plan=keep_current_clocks(solved.plan, obs),
            class_forecast_rps=forecast,
            forecast_kind=self.forecast_kind,
        )

    def _hold_short_pools(
        self,
        budgets: tuple[PoolBudget, ...],
        loads: dict[str, float],
        current: Mapping[str, Mapping[InstanceSpec, int]],
        guards: Mapping[str, GuardState],
        mix: Sequence[float],
        profile: Profile,
        obs: ClusterObs,
        scales: Mapping[str, float],
    ) -> tuple[tuple[PoolBudget, ...], dict[str, float]]:
        """A pool the guard finds below target plans at least the capacity it runs, within a budget of at
        least its GPUs: a forecast that fell since must not undo a correction still under way."""
        held = dict(loads)
        out: list[PoolBudget] = []
        for b in budgets:
            running = current.get(b.name, {})
            if guards[b.name].short and running:
                caps = self.capacities.capacities(
                    profile, served_shares(b.class_names, mix, obs.served_mix), scales
                )
                table = {c.spec: c.max_load_rps for c in caps}
                held[b.name] = max(held[b.name], sum(table.get(s, 0.0) * n for s, n in running.items()))
                b = replace(b, gpu_budget=max(b.gpu_budget, sum(s.tp * n for s, n in running.items())))
            out.append(b)
        return fit_total(tuple(out), obs.total_gpus), held

    def _solve(
        self,
        budgets: Sequence[PoolBudget],
        loads_rps: Mapping[str, float],
        class_rates_rps: Sequence[float],
        current: Mapping[str, Mapping[InstanceSpec, int]],
        profile: Profile,
        guards: Mapping[str, GuardState] | None = None,
        total_gpus: int | None = None,
        typical_rps: Mapping[str, float] | None = None,
        served_mix: Sequence[Sequence[float]] = (),
        scales: Mapping[str, float] | None = None,
    ) -> PlanStep:
        """Every pool's mix (`pool.solve_pools`): under the cost objective from one MILP with the servers
        the pools fill (rental is paid per server); under energy and carbon pool by pool, the servers'
        unused GPUs left to consolidation (docs/control.md, "Server packing": measured, packing made
        the energy objective hold more GPUs and spend more). `total_gpus` None: the budgets' sum.
        `typical_rps`: per pool, the load it typically carries (energy is priced at it, capacity at
        `loads_rps`, `pool.solve_pool`); None: the loads."""
        epoch_s = self.periods.pool_s
        tps = self._allowed_tps(profile)
        caps = [
            self.capacities.capacities(
                profile, served_shares(b.class_names, class_rates_rps, served_mix), scales
            )
            for b in budgets
        ]
        solutions = solve_pools(
            [
                PoolInput(
                    loads_rps[b.name],
                    b.gpu_budget,
                    allowed_configs(c, tps),
                    current.get(b.name, {}),
                    None if typical_rps is None else typical_rps[b.name],
                )
                for b, c in zip(budgets, caps, strict=True)
            ],
            max_gpus=sum(b.gpu_budget for b in budgets) if total_gpus is None else total_gpus,
            unused_gpu_w=self.costs.idle_power_w_per_gpu,
            gpu_hold_j_per_gpu_s=self.gpu_hold_j_per_gpu_s,
            reconfig_cost_j=self._reconfig_cost_j(),
            epoch_s=epoch_s,
            mip_rel_gap=self.mip_rel_gap,
            time_limit_s=self.time_limit_s,
            problems=self.problems,
            pack_servers=self.objective == "cost",
        )
        pools: list[PoolPlan] = []
        decisions: list[PoolDecision] = []
        for b, pool_caps, solution in zip(budgets, caps, solutions, strict=True):
            load_rps = loads_rps[b.name]
            instances = solution.instances() or (idle_instance(pool_caps),)
            pools.append(PoolPlan(name=b.name, class_names=b.class_names, instances=instances))
            runner_up = greedy_decision(load_rps, b.gpu_budget, pool_caps, epoch_s=epoch_s, allowed_tps=tps)
            guard = (guards or {}).get(b.name, GuardState())
            decisions.append(
                PoolDecision(
                    pool=b.name,
                    class_names=tuple(b.class_names),
                    gpu_budget=b.gpu_budget,
                    forecast_rps=load_rps,
                    solver_status=solution.status,
                    shortfall_rps=solution.shortfall_rps,
                    chosen=mix_choice(solution, epoch_s),
                    runner_up=mix_choice(runner_up, epoch_s),
                    guard_factor=guard.factor,
                    clock_floor_mhz=guard.clock_floor_mhz,
                )
            )
        return PlanStep(plan=ClusterPlan(pools=tuple(pools)), pools=tuple(decisions))


def _scaled_budget(gpus: int, factor: float) -> int:
    """A GPU budget raised by `factor`, in whole servers (unchanged at 1)."""
    if factor <= 1.0:
        return gpus
    return max(gpus, GPUS_PER_SERVER * math.ceil(gpus * factor / GPUS_PER_SERVER - 1e-9))


def fit_total(budgets: tuple[PoolBudget, ...], total_gpus: int) -> tuple[PoolBudget, ...]:
    """Budgets raised for start-ahead, trimmed back (largest first) to the cluster's GPUs."""
    gpus = trim_budgets([b.gpu_budget for b in budgets], total_gpus)
    return tuple(replace(b, gpu_budget=g) for b, g in zip(budgets, gpus, strict=True))
