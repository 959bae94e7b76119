"""What the policies read off an observation, shared by every policy family: recent class rates, a pool's
live instances, forecasts from the history, the instance level's clock choice, and the rule that keeps
the clocks the instance level chose across pool steps. Pure functions of `ClusterObs` and the profile.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.profile import Profile
from controller.model.state import ClusterObs, GuardState, InstanceObs, Phase
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.capacity import ConfigCapacity, capacities_by_clock, length_scales
from controller.policy.forecast import forecast_next_peak_rps
from controller.policy.frequency import next_clock
from controller.policy.instance_model import CapacityCache, class_shares, served_shares
from controller.policy.pool import reconfig_cost_j_per_gpu

Forecaster = Callable[..., float]


def recent_class_rates_rps(obs: ClusterObs, window_s: float) -> tuple[float, ...]:
    """Mean arrival rate of each class (CLASS_NAMES order) over the last `window_s` of history."""
    bins = max(1, round(window_s / obs.history_bin_s))
    out: list[float] = []
    for series in obs.class_rate_history_rps:
        tail = series[-bins:]
        out.append(sum(tail) / len(tail) if tail else 0.0)
    return tuple(out)


def mix_rates_rps(obs: ClusterObs, window_s: float) -> tuple[float, ...]:
    """`recent_class_rates_rps` as of the last pool boundary: the mix the pool step planned with, fixed for
    the whole pool period, so the instance steps in between reuse its capacity tables (`CapacityCache`)."""
    n = history_len(obs)
    since_bins = round((obs.now_s - obs.pool_period_start_s) / obs.history_bin_s)
    if 0 < since_bins < n:
        upto = tuple(s[: n - since_bins] for s in obs.class_rate_history_rps)
        bursts = tuple(tuple(s[: n - since_bins] for s in w) for w in obs.class_burst_history_rps)
        obs = replace(obs, class_rate_history_rps=upto, class_burst_history_rps=bursts)
    return recent_class_rates_rps(obs, window_s)


_CapacityKey = tuple[int, tuple[tuple[str, float], ...]]
_capacity_cache: dict[_CapacityKey, tuple[Profile, tuple[ConfigCapacity, ...]]] = {}


def live_counts(obs: ClusterObs, pool: str) -> dict[InstanceSpec, int]:
    """Instances of `pool` that are running or starting (draining ones are already on their way out)."""
    return dict(Counter(i.spec for i in obs.instances if i.pool == pool and i.phase is not Phase.DRAINING))


def history_len(obs: ClusterObs) -> int:
    return len(obs.class_rate_history_rps[0])


def reconfig_cost_j(costs: ReconfigCosts, gpu_hold_j_per_gpu_s: float = 0.0) -> dict[str, float]:
    """The pool MILP's reconfiguration prices (J per GPU) from the planner's durations: a GPU held
    serving nothing costs its idle power plus, under the cost objective, its rental in J
    (`gpu_hold_j_per_gpu_s`)."""
    return reconfig_cost_j_per_gpu(
        costs.idle_power_w_per_gpu + gpu_hold_j_per_gpu_s,
        start_s=costs.start_s,
        stop_s=0.0,
        retp_s=costs.reshard_s,
        clock_s=costs.clock_change_s,
    )


def idle_instance(capacities: Sequence[ConfigCapacity]) -> InstanceSpec:
    """The configuration drawing least at no load: what a pool forecast to be idle keeps running, so a
    request that does arrive is served while the pool manager reacts."""
    return min(capacities, key=lambda c: (c.power_idle_w, -c.max_load_rps)).spec


def choose_clocks(
    obs: ClusterObs,
    profile: Profile,
    cache: CapacityCache,
    *,
    headroom: float,
    mix_window_s: float,
    sustained_s: float,
    floors_mhz: Mapping[str, int] | None = None,
) -> dict[int, int]:
    """Instance level: every active instance's clock from its load, with the dead-band of
    `frequency.next_clock`. An instance's sustained load is its pool's arrival rate over the last
    `sustained_s` times its share of the pool's capacity (the router weights instances by capacity).
    `floors_mhz`: per pool, a clock no instance of it goes below (the SLO guard's floor: the lowest
    profiled clock at or above it, else the highest)."""
    rates = mix_rates_rps(obs, mix_window_s)
    recent = recent_class_rates_rps(obs, sustained_s) if history_len(obs) else None
    pools = {p.name: p for p in obs.plan.pools}
    scales = length_scales(profile, obs.class_input_tokens_mean)
    tables: dict[tuple[str, int], dict[int, ConfigCapacity]] = {}
    active = [i for i in obs.instances if i.phase is Phase.ACTIVE and i.pool in pools]

    def table(inst: InstanceObs) -> dict[int, ConfigCapacity]:
        key = (inst.pool, inst.spec.tp)
        if key not in tables:
            caps = cache.capacities(
                profile,
                served_shares(pools[inst.pool].class_names, rates, obs.served_mix),
                scales,
            )
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
            pool_rps = sum(class_shares(pools[inst.pool].class_names, recent).values())
            sustained_rps = pool_rps * capacity_rps(inst) / pool_capacity_rps[inst.pool]
        clock = next_clock(inst.spec.clock_mhz, inst.load_rps, sustained_rps, by_clock, headroom=headroom)
        floor = (floors_mhz or {}).get(inst.pool, 0)
        if clock < floor:
            clock = min((c for c in by_clock if c >= floor), default=max(by_clock))
        out[inst.instance_id] = clock
    return out


def guard_of(obs: ClusterObs, class_names: Sequence[str]) -> GuardState:
    """The SLO guard's state for a pool serving `class_names`: the largest factor and floor of the pools
    of the plan in force that serve any of them (a pool the cluster step regroups keeps its classes'
    corrections)."""
    states = [
        obs.guard[p.name]
        for p in obs.plan.pools
        if p.name in obs.guard and any(c in p.class_names for c in class_names)
    ]
    if not states:
        return GuardState()
    return GuardState(
        max(s.factor for s in states),
        max(s.clock_floor_mhz for s in states),
        short=any(s.short for s in states),
    )


def max_clocks(obs: ClusterObs, profile: Profile) -> dict[int, int]:
    """Instance level of the one-knob baselines that keep every active instance at the maximum clock."""
    clock = max(profile.clocks_mhz)
    return {i.instance_id: clock for i in obs.instances if i.phase is Phase.ACTIVE}


def pool_forecast_rps(
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
    return forecaster(summed, obs.history_bin_s, horizon_s, now_unix_s=forecast_now_unix_s(obs, bins))


def forecast_now_unix_s(obs: ClusterObs, bins: int) -> float | None:
    """Unix time at the end of the first `bins` history bins (None without a trace start time)."""
    end_s = obs.now_s - (history_len(obs) - bins) * obs.history_bin_s
    return None if obs.start_unix_s is None else obs.start_unix_s + end_s


def whole_cluster_forecast(obs: ClusterObs, horizon_s: float) -> float:
    return pool_forecast_rps(obs, CLASS_NAMES, horizon_s, history_len(obs))


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
        live = live_counts(obs, pool.name)
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
