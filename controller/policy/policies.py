"""The cluster policies of `dctl simulate --policy` (DESIGN §8): DynamoLLM, its one-knob baselines, the
static baselines and the oracle, as pure frozen values.

Where it sits: the simulator (`controller.sim.cluster`) asks a policy for its initial plan, then, for
dynamic policies, calls `cluster_step` / `pool_step` / `instance_step` at their periods with the
observed state (`ClusterObs`); it turns each answer into actions with
`controller.orchestrator.plan_reconfiguration` (using `instance_model` for capacities and power) and
executes them. The same code will run in the live controller.

- `dynamollm`: every knob. Cluster level: per-class rate forecasts (`forecast.forecast_next_rate_rps`:
  the Poisson noise the profile's capacities absorb is not added again) -> pools and GPU budgets
  (`cluster_manager.plan_pools`). Pool level: per pool, the MILP
  (`pool.solve_pool`) over TP in {2, 4, 8} x every profiled clock, for the pool's forecast rate over
  the next pool period plus a start-up time (instances it adds are up before the load they are for),
  with the current instances and the reconfiguration costs. Instance level: each active instance's
  clock from its measured and sustained load with a dead-band (`frequency.next_clock`); pool steps
  keep the clocks of the instances they keep (`keep_current_clocks`). Bursts: each class's forecast
  is raised by the service rate that drains its largest recent sub-minute burst beyond Poisson within
  its TTFT target (`class_burst_rps`, from `ClusterObs.class_burst_history_rps`), in the budgets and
  in the pool loads, except bursts small enough to fit a miss budget of 0.5% of the arrivals
  (docs/control.md, "Burst-aware provisioning").
- `scaleinst`: one pool, TP8 at the maximum clock, only the instance count changes (the MILP
  restricted to that one configuration, over the whole cluster's GPUs).
- `scaleshard`: one pool holding singlepool's GPUs throughout, only the TP degree changes (all
  instances of one TP; the least-power TP that covers the forecast), maximum clock.
- `scalefreq`: singlepool's instances, only the clock changes (instance level, as in `dynamollm`).
- `multipool`: static, one pool per class, TP8 at the maximum clock, each sized for its class's peak
  (at least one instance, so a class with no requests still holds one: the fragmentation the paper
  measures). Static like `singlepool`.
- `oracle`: `dynamollm`'s optimisation fed the TRUE per-class rates and bursts of the coming period
  (`ClusterObs.true_next_rate_rps`, `true_next_burst_rps`, by the classes the router uses) and no
  reconfiguration cost (`reconfiguration_free`: the simulator applies its changes instantly): the
  lower bound the others are measured against.

Consistency between levels without state: a pool step re-derives the pools and budgets of the epoch in
force from the history up to the last cluster boundary (the same inputs the cluster step had), so both
levels agree without the policy remembering anything. Start-ahead: when the next cluster boundary
falls within the coming pool period plus a start-up time, the pool step forecasts up to the first
pool period of the next epoch and takes the larger budget, so the next epoch's instances are running
when it begins.

The initial plan (t = 0, no history yet) of the dynamic policies comes from the workload's statistics,
as `singlepool`'s does: the operator provisions for the expected load before the first decision.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from types import MappingProxyType

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec, PoolPlan
from controller.model.profile import Profile
from controller.model.state import ClusterObs, InstanceObs, Periods, Phase
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.base import ArrivalStats, SimPolicy
from controller.policy.capacity import ConfigCapacity, capacities_by_clock, pool_capacities
from controller.policy.cluster_manager import (
    DEFAULT_LARGEST_HEADROOM,
    DEFAULT_MERGE_FILL,
    PoolBudget,
    plan_pools,
    trim_budgets,
)
from controller.policy.forecast import forecast_next_peak_rps, forecast_next_rate_rps
from controller.policy.frequency import DEFAULT_CLOCK_HEADROOM, next_clock
from controller.policy.pool import (
    DEFAULT_MIP_REL_GAP,
    DEFAULT_TIME_LIMIT_S,
    RECONFIG_KINDS,
    reconfig_cost_j_per_gpu,
    solve_pool,
)
from controller.policy.singlepool import POOL_NAME, SinglePool, singlepool_plan, size_singlepool

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
# Distinct (profile, pool mix) capacity tables kept by `_capacities`.
_CAPACITY_CACHE_SIZE = 256
DEFAULT_PERIODS = Periods()
DEFAULT_COSTS = ReconfigCosts()


# ------------------------------------------------------------------ observations


def recent_class_rates_rps(obs: ClusterObs, window_s: float) -> tuple[float, ...]:
    """Mean arrival rate of each class (CLASS_NAMES order) over the last `window_s` of history."""
    bins = max(1, round(window_s / obs.history_bin_s))
    out: list[float] = []
    for series in obs.class_rate_history_rps:
        tail = series[-bins:]
        out.append(sum(tail) / len(tail) if tail else 0.0)
    return tuple(out)


def _mix_rates_rps(obs: ClusterObs, window_s: float, pool_s: float) -> tuple[float, ...]:
    """`recent_class_rates_rps` as of the last pool boundary: the mix the pool step planned with, fixed for
    the whole pool period, so the instance steps in between reuse its capacity tables (`_capacities`)."""
    n = _history_len(obs)
    since_bins = round((obs.now_s - math.floor(obs.now_s / pool_s + 1e-9) * pool_s) / obs.history_bin_s)
    if 0 < since_bins < n:
        upto = tuple(s[: n - since_bins] for s in obs.class_rate_history_rps)
        bursts = tuple(tuple(s[: n - since_bins] for s in w) for w in obs.class_burst_history_rps)
        obs = replace(obs, class_rate_history_rps=upto, class_burst_history_rps=bursts)
    return recent_class_rates_rps(obs, window_s)


_CapacityKey = tuple[int, tuple[tuple[str, float], ...]]
_capacity_cache: dict[_CapacityKey, tuple[Profile, tuple[ConfigCapacity, ...]]] = {}


def _capacities(profile: Profile, class_shares: Mapping[str, float]) -> tuple[ConfigCapacity, ...]:
    """`pool_capacities`, memoised: the instance level asks for the same mix every 5 s within a pool
    period. A pure function's memo (keyed by the profile object, which is immutable, and the shares)."""
    key = (id(profile), tuple(sorted(class_shares.items())))
    hit = _capacity_cache.get(key)
    if hit is not None and hit[0] is profile:
        return hit[1]
    caps = pool_capacities(profile, class_shares)
    if len(_capacity_cache) >= _CAPACITY_CACHE_SIZE:
        _capacity_cache.pop(next(iter(_capacity_cache)))  # oldest entry first (insertion order)
    _capacity_cache[key] = (profile, caps)
    return caps


def _shares(class_names: Sequence[str], rates_rps: Sequence[float]) -> dict[str, float]:
    return {c: rates_rps[CLASS_NAMES.index(c)] for c in class_names}


def _live_counts(obs: ClusterObs, pool: str) -> dict[InstanceSpec, int]:
    """Instances of `pool` that are running or starting (draining ones are already on their way out)."""
    return dict(Counter(i.spec for i in obs.instances if i.pool == pool and i.phase is not Phase.DRAINING))


def _history_len(obs: ClusterObs) -> int:
    return len(obs.class_rate_history_rps[0])


# ------------------------------------------------------------------ the planner's instance model


@dataclass(frozen=True, slots=True)
class PoolInstanceModel:
    """`controller.orchestrator.InstanceModel` from the profile: per pool, each spec's SLO-meeting
    capacity for the pool's mix and its power at the pool's expected utilisation (capacity-weighted
    routing loads every instance of a pool to the same fraction of its capacity)."""

    capacities: Mapping[str, Mapping[InstanceSpec, ConfigCapacity]]
    utilisation: Mapping[str, float]

    def capacity_rps(self, pool: str, spec: InstanceSpec) -> float:
        cap = self.capacities.get(pool, {}).get(spec)
        return 0.0 if cap is None else cap.max_load_rps

    def power_w(self, pool: str, spec: InstanceSpec) -> float:
        cap = self.capacities.get(pool, {}).get(spec)
        if cap is None:
            return 0.0
        return cap.power_w(self.utilisation.get(pool, 0.0) * cap.max_load_rps)


def instance_model(
    profile: Profile, plan: ClusterPlan, class_rates_rps: Sequence[float]
) -> PoolInstanceModel:
    """The planner's model for `plan` (the desired state) with the classes' current rates (CLASS_NAMES
    order). Pools absent from `plan` have no capacity there (nothing routes to them)."""
    if len(class_rates_rps) != len(CLASS_NAMES):
        raise InvalidArgumentError("class_rates_rps", len(class_rates_rps), f"{len(CLASS_NAMES)} classes")
    capacities: dict[str, dict[InstanceSpec, ConfigCapacity]] = {}
    utilisation: dict[str, float] = {}
    for pool in plan.pools:
        table = {c.spec: c for c in pool_capacities(profile, _shares(pool.class_names, class_rates_rps))}
        capacities[pool.name] = table
        total_rps = sum(table[s].max_load_rps for s in pool.instances if s in table)
        load_rps = sum(_shares(pool.class_names, class_rates_rps).values())
        utilisation[pool.name] = min(1.0, load_rps / total_rps) if total_rps > 0 else 0.0
    return PoolInstanceModel(capacities=capacities, utilisation=utilisation)


# ------------------------------------------------------------------ shared pieces


def _reconfig_cost_j(costs: ReconfigCosts) -> dict[str, float]:
    """The pool MILP's reconfiguration prices (J per GPU) from the planner's durations."""
    return reconfig_cost_j_per_gpu(
        costs.idle_power_w_per_gpu,
        start_s=costs.start_s,
        stop_s=0.0,
        retp_s=costs.reshard_s,
        clock_s=costs.clock_change_s,
    )


def _idle_instance(capacities: Sequence[ConfigCapacity]) -> InstanceSpec:
    """The configuration drawing least at no load: what a pool forecast to be idle keeps running, so a
    request that does arrive is served while the pool manager reacts."""
    return min(capacities, key=lambda c: (c.power_idle_w, -c.max_load_rps)).spec


def _choose_clocks(
    obs: ClusterObs, profile: Profile, headroom: float, mix_window_s: float, pool_s: float, sustained_s: float
) -> dict[int, int]:
    """Instance level: every active instance's clock from its load, with the dead-band of
    `frequency.next_clock`. An instance's sustained load is its pool's arrival rate over the last
    `sustained_s` times its share of the pool's capacity (the router weights instances by capacity)."""
    rates = _mix_rates_rps(obs, mix_window_s, pool_s)
    recent = recent_class_rates_rps(obs, sustained_s) if _history_len(obs) else None
    pools = {p.name: p for p in obs.plan.pools}
    tables: dict[tuple[str, int], dict[int, ConfigCapacity]] = {}
    active = [i for i in obs.instances if i.phase is Phase.ACTIVE and i.pool in pools]

    def table(inst: InstanceObs) -> dict[int, ConfigCapacity]:
        key = (inst.pool, inst.spec.tp)
        if key not in tables:
            caps = _capacities(profile, _shares(pools[inst.pool].class_names, rates))
            tables[key] = capacities_by_clock(caps, inst.spec.tp)
        return tables[key]

    def capacity_rps(inst: InstanceObs) -> float:
        cap = table(inst).get(inst.spec.clock_mhz)
        return 0.0 if cap is None else cap.max_load_rps

    pool_capacity_rps: dict[str, float] = {}
    for inst in active:
        pool_capacity_rps[inst.pool] = pool_capacity_rps.get(inst.pool, 0.0) + capacity_rps(inst)
    out: dict[int, int] = {}
    for inst in active:
        by_clock = table(inst)
        if not by_clock:
            out[inst.instance_id] = inst.spec.clock_mhz
            continue
        if recent is None or pool_capacity_rps.get(inst.pool, 0.0) <= 0.0:
            sustained_rps = inst.load_rps  # no history yet: the last period is all there is
        else:
            pool_rps = sum(_shares(pools[inst.pool].class_names, recent).values())
            sustained_rps = pool_rps * capacity_rps(inst) / pool_capacity_rps[inst.pool]
        out[inst.instance_id] = next_clock(
            inst.spec.clock_mhz, inst.load_rps, sustained_rps, by_clock, headroom=headroom
        )
    return out


def class_burst_rps(
    obs: ClusterObs,
    profile: Profile,
    bins: int,
    memory_s: float,
    provisioned_rps: Sequence[float],
    *,
    miss_share: float = 0.0,
) -> tuple[float, ...]:
    """Per class (CLASS_NAMES order), the service rate to add to `provisioned_rps` (what the class is
    sized for, its forecast peak) so that the largest short-term burst of the last `memory_s` of the
    first `bins` history bins drains within the class's TTFT target (docs/control.md, "Burst-aware
    provisioning"): max over bins and windows w of max(0, N_w - poisson_peak_w) / (w + ttft), N_w the
    most arrivals in a window w. `poisson_peak_w` is the largest count a Poisson stream at the
    provisioned rate reaches in one of the memory's windows (its 1 - w / memory quantile): the profile's
    capacities are measured under Poisson arrivals, so capacity for that rate already absorbs that
    much. 0 without burst observations.

    `miss_share`: the share of the memory's arrivals (all classes) whose TTFT the policy lets bursts
    cost, split evenly over the classes: a burst whose excess is at most a class's share (M) of those
    requests is left to queue, and a larger one is provisioned in full, (N_w - poisson_peak_w) / (w +
    ttft) (a threshold, not a deduction: docs/control.md says why). 0 keeps every request of every
    burst on time."""
    if len(provisioned_rps) != len(CLASS_NAMES):
        raise InvalidArgumentError("provisioned_rps", len(provisioned_rps), f"{len(CLASS_NAMES)} classes")
    if not (math.isfinite(miss_share) and 0.0 <= miss_share < 1.0):
        raise InvalidArgumentError("miss_share", miss_share, "a share in [0, 1)")
    if not obs.burst_windows_s or bins <= 0:
        return (0.0,) * len(CLASS_NAMES)
    lo = max(0, bins - max(1, round(memory_s / obs.history_bin_s)))
    arrivals = sum(sum(series[lo:bins]) for series in obs.class_rate_history_rps) * obs.history_bin_s
    peaks_rps = tuple(
        tuple(max(per_class[c][lo:bins], default=0.0) for c in range(len(CLASS_NAMES)))
        for per_class in obs.class_burst_history_rps
    )
    return burst_excess_rps(
        profile,
        obs.burst_windows_s,
        peaks_rps,
        (bins - lo) * obs.history_bin_s,
        provisioned_rps,
        miss_share * arrivals / len(CLASS_NAMES),
    )


def burst_excess_rps(
    profile: Profile,
    windows_s: Sequence[float],
    peaks_rps: Sequence[Sequence[float]],
    span_s: float,
    provisioned_rps: Sequence[float],
    tolerated: float,
) -> tuple[float, ...]:
    """The rule of `class_burst_rps` on given short-term peaks: `peaks_rps[k][c]` the most arrivals of
    class c in a window `windows_s[k]` within a span of `span_s` (divided by the window), `tolerated`
    the excess requests per class left to queue. Per class (CLASS_NAMES order), max over the windows
    whose excess N_w - poisson_peak_w exceeds `tolerated` of that excess / (w + ttft); 0 if none."""
    out: list[float] = []
    for c, name in enumerate(CLASS_NAMES):
        ttft_s = profile.slo(name).ttft_s
        extra_rps = 0.0
        for window_s, per_class in zip(windows_s, peaks_rps, strict=True):
            peak = poisson_quantile(provisioned_rps[c] * window_s, 1.0 - min(1.0, window_s / span_s))
            count = per_class[c] * window_s
            excess = count - peak
            if excess > tolerated:
                extra_rps = max(extra_rps, excess / (window_s + ttft_s))
        out.append(extra_rps)
    return tuple(out)


# Above this mean a Poisson count is taken as normal (its quantile within one count of the exact one).
_POISSON_NORMAL_MEAN = 200.0


def poisson_quantile(mean: float, quantile: float) -> int:
    """Smallest k with P(Poisson(mean) <= k) >= quantile."""
    if not (math.isfinite(mean) and mean >= 0.0):
        raise InvalidArgumentError("mean", mean, "a finite number >= 0")
    if not 0.0 <= quantile < 1.0:
        raise InvalidArgumentError("quantile", quantile, "a probability in [0, 1)")
    if mean > _POISSON_NORMAL_MEAN:
        return math.ceil(mean + NormalDist().inv_cdf(max(quantile, 0.5)) * math.sqrt(mean))
    k = 0
    pmf = math.exp(-mean)
    cdf = pmf
    while cdf < quantile:
        k += 1
        pmf *= mean / k
        cdf += pmf
    return k


Forecaster = Callable[..., float]


def _pool_forecast_rps(
    obs: ClusterObs,
    class_names: Sequence[str],
    horizon_s: float,
    bins: int,
    forecaster: Forecaster = forecast_next_peak_rps,
) -> float:
    """Forecast (`forecaster`: peak or rate) of the summed arrival rate of `class_names` from the first
    `bins` history bins."""
    idx = [CLASS_NAMES.index(c) for c in class_names]
    summed = [sum(obs.class_rate_history_rps[i][b] for i in idx) for b in range(bins)]
    return forecaster(summed, obs.history_bin_s, horizon_s, now_unix_s=_forecast_now_unix_s(obs, bins))


def _forecast_now_unix_s(obs: ClusterObs, bins: int) -> float | None:
    """Unix time at the end of the first `bins` history bins (None without a trace start time)."""
    end_s = obs.now_s - (_history_len(obs) - bins) * obs.history_bin_s
    return None if obs.start_unix_s is None else obs.start_unix_s + end_s


# ------------------------------------------------------------------ dynamollm and oracle


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

    @property
    def name(self) -> str:
        return "dynamollm"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    # -- knobs the baselines and the oracle change
    def _allowed_tps(self, profile: Profile) -> tuple[int, ...]:
        return tuple(tp for tp in profile.tps if tp in (2, 4, 8))

    def _reconfig_cost_j(self) -> dict[str, float]:
        return _reconfig_cost_j(self.costs)

    def _class_peaks(self, obs: ClusterObs, horizon_s: float, bins: int) -> tuple[float, ...]:
        """Per-class rate forecast over `horizon_s` from the first `bins` history bins."""
        now_unix = _forecast_now_unix_s(obs, bins)
        return tuple(
            forecast_next_rate_rps(series[:bins], obs.history_bin_s, horizon_s, now_unix_s=now_unix)
            for series in obs.class_rate_history_rps
        )

    def _pool_load_rps(self, obs: ClusterObs, class_names: Sequence[str], horizon_s: float) -> float:
        return _pool_forecast_rps(obs, class_names, horizon_s, _history_len(obs), forecast_next_rate_rps)

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
        )
        loads = {b.name: b.forecast_rps for b in budgets}
        return self._solve(budgets, loads, arrivals.peak_rate_rps_by_class, {}, profile)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        return self._decide(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        return self._decide(obs, profile)

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return _choose_clocks(
            obs,
            profile,
            self.clock_headroom,
            self.mix_window_s,
            self.periods.pool_s,
            self.sustained_window_s,
        )

    def _epoch_budgets(self, obs: ClusterObs, profile: Profile, bins: int) -> tuple[PoolBudget, ...]:
        peaks = self._class_peaks(obs, self.periods.cluster_s, bins)
        bursts = self._class_bursts(obs, profile, bins, peaks)
        return plan_pools(
            tuple(p + b for p, b in zip(peaks, bursts, strict=True)),
            profile,
            obs.total_gpus,
            merge_fill=self.merge_fill,
            largest_headroom=self.largest_headroom,
        )

    def _decide(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        n = _history_len(obs)
        if n == 0 and obs.true_next_rate_rps is None:
            return obs.plan  # nothing observed yet: the initial plan stands
        p = self.periods
        boundary_s = math.floor(obs.now_s / p.cluster_s + 1e-9) * p.cluster_s
        since_bins = round((obs.now_s - boundary_s) / obs.history_bin_s)
        # The epoch's pools come from the history the cluster step had; before any history existed at a
        # boundary (the first epoch), from all history so far.
        bins = n - since_bins if n - since_bins > 0 else n
        budgets = self._epoch_budgets(obs, profile, bins)
        horizon_s = p.pool_s + self.costs.start_s
        next_boundary_s = boundary_s + p.cluster_s
        if obs.now_s + horizon_s > next_boundary_s and obs.now_s > boundary_s:
            # Start-ahead: size for the next epoch's first pool period too, within the larger budget.
            horizon_s = next_boundary_s - obs.now_s + p.pool_s + self.costs.start_s
            following = {b.name: b.gpu_budget for b in self._epoch_budgets(obs, profile, n)}
            budgets = tuple(
                replace(b, gpu_budget=max(b.gpu_budget, following.get(b.name, 0))) for b in budgets
            )
            budgets = _fit_total(budgets, obs.total_gpus)
        bursts = self._class_bursts(obs, profile, n, self._class_peaks(obs, horizon_s, n))
        loads = {
            b.name: self._pool_load_rps(obs, b.class_names, horizon_s)
            + sum(bursts[CLASS_NAMES.index(c)] for c in b.class_names)
            for b in budgets
        }
        current = {b.name: _live_counts(obs, b.name) for b in budgets}
        solved = self._solve(budgets, loads, recent_class_rates_rps(obs, self.mix_window_s), current, profile)
        return keep_current_clocks(solved, obs)

    def _solve(
        self,
        budgets: Sequence[PoolBudget],
        loads_rps: Mapping[str, float],
        class_rates_rps: Sequence[float],
        current: Mapping[str, Mapping[InstanceSpec, int]],
        profile: Profile,
    ) -> ClusterPlan:
        pools: list[PoolPlan] = []
        for b in budgets:
            caps = _capacities(profile, _shares(b.class_names, class_rates_rps))
            decision = solve_pool(
                loads_rps[b.name],
                b.gpu_budget,
                caps,
                current.get(b.name, {}),
                reconfig_cost_j=self._reconfig_cost_j(),
                epoch_s=self.periods.pool_s,
                mip_rel_gap=self.mip_rel_gap,
                time_limit_s=self.time_limit_s,
                allowed_tps=self._allowed_tps(profile),
            )
            instances = decision.instances() or (_idle_instance(caps),)
            pools.append(PoolPlan(name=b.name, class_names=b.class_names, instances=instances))
        return ClusterPlan(pools=tuple(pools))


def keep_current_clocks(plan: ClusterPlan, obs: ClusterObs) -> ClusterPlan:
    """`plan` with each instance that stays keeping the clock it runs at now: clocks belong to the instance
    level, which re-chooses them every few seconds from the measured load; a pool step that also set them
    would undo that choice and the instance level would redo it (two clock changes for nothing).

    Per pool and TP degree, the plan's count decides how many instances there are. Of the live
    (not draining) instances of that TP, up to that many stay at their current clocks, the highest
    clocks first (the ones the instance level found busiest); instances the plan adds take the plan's
    clocks (highest first), which the instance level adjusts once they serve.
    """
    pools: list[PoolPlan] = []
    for pool in plan.pools:
        live = _live_counts(obs, pool.name)
        specs: list[InstanceSpec] = []
        for tp in sorted({s.tp for s in pool.instances}):
            wanted = sorted((s for s in pool.instances if s.tp == tp), key=lambda s: -s.clock_mhz)
            running = sorted(
                (s for s, n in live.items() if s.tp == tp for _ in range(n)), key=lambda s: -s.clock_mhz
            )
            kept = running[: len(wanted)]
            specs.extend(kept + wanted[: len(wanted) - len(kept)])
        specs.sort(key=lambda s: (s.tp, s.clock_mhz))
        pools.append(replace(pool, instances=tuple(specs)))
    return replace(plan, pools=tuple(pools))


def _fit_total(budgets: tuple[PoolBudget, ...], total_gpus: int) -> tuple[PoolBudget, ...]:
    """Budgets raised for start-ahead, trimmed back (largest first) to the cluster's GPUs."""
    gpus = trim_budgets([b.gpu_budget for b in budgets], total_gpus)
    return tuple(replace(b, gpu_budget=g) for b, g in zip(budgets, gpus, strict=True))


@dataclass(frozen=True, slots=True)
class Oracle(DynamoLLM):
    """`--policy oracle`: DynamoLLM's optimisation with the true coming peaks and free reconfiguration."""

    @property
    def name(self) -> str:
        return "oracle"

    @property
    def reconfiguration_free(self) -> bool:
        return True

    def _reconfig_cost_j(self) -> dict[str, float]:
        return dict.fromkeys(RECONFIG_KINDS, 0.0)

    def _true_rates(self, obs: ClusterObs) -> tuple[float, ...]:
        if obs.true_next_rate_rps is None:
            raise InvalidArgumentError(
                "obs.true_next_rate_rps",
                None,
                "the true per-class rates (the simulator fills them for oracle)",
            )
        return obs.true_next_rate_rps

    def _class_peaks(self, obs: ClusterObs, horizon_s: float, bins: int) -> tuple[float, ...]:
        return self._true_rates(obs)

    def _pool_load_rps(self, obs: ClusterObs, class_names: Sequence[str], horizon_s: float) -> float:
        rates = self._true_rates(obs)
        return sum(rates[CLASS_NAMES.index(c)] for c in class_names)

    def _class_bursts(
        self, obs: ClusterObs, profile: Profile, bins: int, provisioned_rps: Sequence[float]
    ) -> tuple[float, ...]:
        """The same rule on the TRUE bursts of the coming period. The Poisson quantile is that of
        dynamollm's memory (a cluster period): the capacities, measured over long Poisson runs, absorb
        a Poisson stream's maximum over that span, and a span of one short period would call the
        ordinary Poisson maximum of every period a burst. The tolerated excess is the miss share of
        the period's own arrivals, so the periods of an epoch together tolerate what one epoch of
        dynamollm's rule does."""
        rates = self._true_rates(obs)
        if not obs.true_burst_windows_s:
            return (0.0,) * len(CLASS_NAMES)
        return burst_excess_rps(
            profile,
            obs.true_burst_windows_s,
            obs.true_next_burst_rps,
            self.periods.cluster_s,
            provisioned_rps,
            self.burst_miss_share * sum(rates) * obs.true_period_s / len(CLASS_NAMES),
        )


# ------------------------------------------------------------------ one-knob baselines


def _whole_cluster_forecast(obs: ClusterObs, horizon_s: float) -> float:
    return _pool_forecast_rps(obs, CLASS_NAMES, horizon_s, _history_len(obs))


def _max_clocks(obs: ClusterObs, profile: Profile) -> dict[int, int]:
    """Instance level of the one-knob baselines that keep every active instance at the maximum clock."""
    clock = max(profile.clocks_mhz)
    return {i.instance_id: clock for i in obs.instances if i.phase is Phase.ACTIVE}


@dataclass(frozen=True, slots=True)
class ScaleInst:
    """`--policy scaleinst`: one pool of TP8 instances at the maximum clock; only their count changes."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    time_limit_s: float = DEFAULT_TIME_LIMIT_S

    @property
    def name(self) -> str:
        return "scaleinst"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile).plan

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        return self.pool_step(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        if _history_len(obs) == 0:
            return obs.plan
        load_rps = _whole_cluster_forecast(obs, self.periods.pool_s + self.costs.start_s)
        caps = pool_capacities(profile, _shares(CLASS_NAMES, recent_class_rates_rps(obs, self.mix_window_s)))
        clock = max(profile.clocks_mhz)
        decision = solve_pool(
            load_rps,
            obs.total_gpus,
            caps,
            _live_counts(obs, POOL_NAME),
            reconfig_cost_j=_reconfig_cost_j(self.costs),
            epoch_s=self.periods.pool_s,
            time_limit_s=self.time_limit_s,
            allowed_tps=(GPUS_PER_SERVER,),
            allowed_clocks=(clock,),
        )
        count = max(1, sum(decision.counts.values()))
        return singlepool_plan(count, GPUS_PER_SERVER, clock)

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return _max_clocks(obs, profile)


@dataclass(frozen=True, slots=True)
class ScaleShard:
    """`--policy scaleshard`: singlepool's GPUs held throughout, split into instances of one TP degree
    (the least power at the forecast load among those covering it; else the most capacity), max clock."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    mix_window_s: float = DEFAULT_MIX_WINDOW_S

    @property
    def name(self) -> str:
        return "scaleshard"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile).plan

    def plan_with(self, instances: int, profile: Profile) -> ClusterPlan:
        """Singlepool's plan with `instances` TP8 instances: fixes the GPUs this policy re-shards."""
        return SinglePool().plan_with(instances, profile)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        return self.pool_step(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        gpus = obs.plan.gpus
        if _history_len(obs) == 0 or gpus == 0:
            return obs.plan
        load_rps = _whole_cluster_forecast(obs, self.periods.pool_s + self.costs.start_s)
        caps = pool_capacities(profile, _shares(CLASS_NAMES, recent_class_rates_rps(obs, self.mix_window_s)))
        clock = max(profile.clocks_mhz)
        options: list[tuple[bool, float, int]] = []  # (covers, power or -capacity, tp)
        for cap in caps:
            if cap.clock_mhz != clock or gpus % cap.tp:
                continue
            n = gpus // cap.tp
            total_rps = n * cap.max_load_rps
            if total_rps >= load_rps:
                options.append((True, n * cap.power_w(load_rps / n), cap.tp))
            else:
                options.append((False, -total_rps, cap.tp))
        if not options:
            return obs.plan
        covering = [o for o in options if o[0]]
        _, _, tp = min(covering or options, key=lambda o: (o[1], -o[2]))
        return singlepool_plan(gpus // tp, tp, clock)

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return _max_clocks(obs, profile)


@dataclass(frozen=True, slots=True)
class ScaleFreq:
    """`--policy scalefreq`: singlepool's instances, never changed; only each instance's clock."""

    periods: Periods = DEFAULT_PERIODS
    clock_headroom: float = DEFAULT_CLOCK_HEADROOM
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    sustained_window_s: float = DEFAULT_SUSTAINED_WINDOW_S

    @property
    def name(self) -> str:
        return "scalefreq"

    @property
    def reconfiguration_free(self) -> bool:
        return False

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile).plan

    def plan_with(self, instances: int, profile: Profile) -> ClusterPlan:
        """Singlepool's plan with `instances` instances: the fleet whose clocks this policy tunes."""
        return SinglePool().plan_with(instances, profile)

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        return obs.plan

    def pool_step(self, obs: ClusterObs, profile: Profile) -> ClusterPlan:
        return obs.plan

    def instance_step(self, obs: ClusterObs, profile: Profile) -> Mapping[int, int]:
        return _choose_clocks(
            obs,
            profile,
            self.clock_headroom,
            self.mix_window_s,
            self.periods.pool_s,
            self.sustained_window_s,
        )


# ------------------------------------------------------------------ static multipool


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


# ------------------------------------------------------------------ registry

PolicyFactory = Callable[[], SimPolicy]

POLICIES: Mapping[str, PolicyFactory] = MappingProxyType(
    {
        "singlepool": SinglePool,
        "multipool": MultiPool,
        "scaleinst": ScaleInst,
        "scaleshard": ScaleShard,
        "scalefreq": ScaleFreq,
        "dynamollm": DynamoLLM,
        "oracle": Oracle,
    }
)


def make_policy(
    name: str, *, periods: Periods | None = None, costs: ReconfigCosts | None = None
) -> SimPolicy:
    """The policy called `name`, with the simulator's periods and reconfiguration costs where it has them.

    Errors name the flag: `--policy` for an unknown name.
    """
    factory = POLICIES.get(name)
    if factory is None:
        raise InvalidArgumentError("--policy", name, tuple(POLICIES))
    policy = factory()
    fields = getattr(policy, "__dataclass_fields__", {})
    changes: dict[str, object] = {}
    if periods is not None and "periods" in fields:
        changes["periods"] = periods
    if costs is not None and "costs" in fields:
        changes["costs"] = costs
    return replace(policy, **changes) if changes else policy  # type: ignore[type-var]
