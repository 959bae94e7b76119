"""Cluster manager (docs/control.md, issue 3 item 3): which pools exist and how many GPUs each may use.

Where it sits: every cluster period (default 30 min) `DynamoLLM.cluster_step`
(`controller.policy.policies`) forecasts each class's peak rate for the coming epoch
(`controller.policy.forecast`) and calls `plan_pools`; the pool manager (`controller.policy.pool`) then
chooses each pool's instance mix within its GPU budget. Pure arithmetic on the profile.

Rules:
- Capacity is counted at maximum performance: one TP8 instance at the maximum clock takes cap_c
  requests/s of class c within its SLO (`Profile.max_load_rps`). A class's forecast peak l_c needs
  w_c = l_c / cap_c such instances ("work", in instances; work of different classes adds up, the
  harmonic mix rule of `singlepool`).
- TTFT tiers: classes merge only with classes whose TTFT targets are within `merge_ttft_ratio` (default
  2) of each other (`ttft_tiers`). A merged pool's instances serve its requests in one queue, so a
  short prompt waits behind the long prefills of the pool's other classes: a mix is only as good as
  its tightest class's TTFT target allows, and a pool of short (TTFT 0.23 s) and long (2.7 s) prompts
  misses the short ones' target at loads the profile (each class alone) calls safe. With the default
  profile the tiers are the three input bins. Each tier is planned on its own by the rules below.
- Within a tier, classes are taken from the lightest (largest cap_c) to the heaviest. A pool is worth
  GPUs of its own only if it fills them: a class whose load (plus what was moved into it) would fill less than
  `merge_fill` (default: all) of ONE instance at the pool's best configuration does not get a pool;
  its load and its classes move up to the next heavier class's pool. "Best configuration": the (TP,
  clock) with the least energy per request at full load for the pool's mix
  (`capacity.pool_capacities`), the one the pool manager fills first as load grows. Why one whole
  instance: a pool always holds at least one instance, and one it cannot fill pays idle power for
  capacity nobody uses, while the same requests on the next pool's instances ride on idle power that
  pool pays anyway (its instances are rounded up too) and on instances that serve them within their
  SLO (a heavier class's pool serves lighter requests faster than its own). The rule is relative to
  the pool's own capacity, so it means the same at 0.1 req/s of long prompts and at 5 req/s of short
  ones, unlike an absolute rate. The
  heaviest class of each tier always keeps a pool and collects what is left, so every class is served.
- Budget: the pool's work rounded up to whole TP8 instances, times 8 GPUs. Only the pool of each
  tier's heaviest class over-provisions (x (1 + headroom)), the catch-all for load moved up and for
  forecast misses of the tier's light classes. A budget
  is a cap for the pool manager, not an allocation: a pool uses what its MILP chooses, and the lighter
  classes are served more cheaply on TP4/TP2 instances than counted here, which leaves them margin.
- Within `total_gpus`: when the budgets add up to more, the largest budgets give up GPUs first, one TP8
  instance (8 GPUs) at a time, down to one TP2 instance.

Routing is per class (each class is served by exactly one pool), so a class's load moves up whole: the
paper's split of one class's fractional leftover across two pools would need a router that spills, and
the pool budgets' margin covers it instead.

Start-ahead (the instances of the next epoch started before it begins) is the policy's part: in the
last pool period before a cluster boundary, `DynamoLLM.pool_step` sizes each pool for the larger of
this epoch's and the next epoch's forecast, so the new instances are up when the epoch turns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.cluster import GPUS_PER_SERVER
from controller.model.profile import Profile
from controller.policy.capacity import pool_capacities

# Pools smaller than this many GPUs are not trimmed further when the cluster's GPUs run out.
MIN_POOL_GPUS = 2
# A class (with what moved into it) gets its own pool only if its load fills at least this share of one
# instance at the pool's best configuration (module docstring: why one whole instance; docs/control.md:
# what half and two measured).
DEFAULT_MERGE_FILL = 1.0
DEFAULT_LARGEST_HEADROOM = 0.1
# Classes whose TTFT targets differ by more than this factor never share a pool (module docstring).
DEFAULT_MERGE_TTFT_RATIO = 2.0


@dataclass(frozen=True, slots=True)
class PoolBudget:
    """One pool of the coming epoch: the classes it serves, its GPU cap, and its forecast peak load."""

    name: str
    class_names: tuple[str, ...]
    gpu_budget: int
    forecast_rps: float


def class_order(profile: Profile) -> tuple[str, ...]:
    """Classes from the lightest (most requests/s per TP8 instance at max clock) to the heaviest."""
    clock = max(profile.clocks_mhz)
    caps = {c: profile.max_load_rps(c, GPUS_PER_SERVER, clock) for c in CLASS_NAMES}
    return tuple(sorted(CLASS_NAMES, key=lambda c: (-caps[c], CLASS_NAMES.index(c))))


def ttft_tiers(
    profile: Profile, ratio: float, classes: Sequence[str] = CLASS_NAMES
) -> tuple[tuple[str, ...], ...]:
    """`classes` grouped by TTFT target, tightest first: a group starts at its tightest class and takes
    every class whose target is within `ratio` of it (the order of `classes` is kept inside a group)."""
    ttft_s = {c: profile.slo(c).ttft_s for c in classes}
    tiers: list[tuple[str, ...]] = []
    left = sorted(classes, key=lambda c: (ttft_s[c], CLASS_NAMES.index(c)))
    while left:
        limit_s = ttft_s[left[0]] * ratio
        tiers.append(tuple(c for c in classes if c in left and ttft_s[c] <= limit_s))
        left = [c for c in left if c not in tiers[-1]]
    return tuple(tiers)


def plan_pools(
    forecast_peak_rps_by_class: Sequence[float],
    profile: Profile,
    total_gpus: int | None,
    *,
    merge_fill: float = DEFAULT_MERGE_FILL,
    largest_headroom: float = DEFAULT_LARGEST_HEADROOM,
    merge_ttft_ratio: float = DEFAULT_MERGE_TTFT_RATIO,
    capacity_scales: Mapping[str, float] | None = None,
) -> tuple[PoolBudget, ...]:
    """Pools and GPU budgets for forecast peaks given in CLASS_NAMES order (module docstring).

    `total_gpus`: the cluster's GPUs (None: no limit). Pools are named after the heaviest class they
    serve and listed tier by tier (tightest TTFT first), each tier from its lightest pool to its heaviest.
    `capacity_scales`: per class, a factor on its profiled capacity (`capacity.length_scales`).
    """
    if len(forecast_peak_rps_by_class) != len(CLASS_NAMES):
        raise InvalidArgumentError(
            "forecast_peak_rps_by_class", len(forecast_peak_rps_by_class), f"{len(CLASS_NAMES)} classes"
        )
    for name, rate in zip(CLASS_NAMES, forecast_peak_rps_by_class, strict=True):
        if not (math.isfinite(rate) and rate >= 0.0):
            raise InvalidArgumentError(f"forecast_peak_rps_by_class[{name}]", rate, "a finite rate >= 0")
    if not (math.isfinite(merge_fill) and merge_fill >= 0.0):
        raise InvalidArgumentError("merge_fill", merge_fill, "a finite share of one instance >= 0")
    if not (math.isfinite(largest_headroom) and largest_headroom >= 0.0):
        raise InvalidArgumentError("largest_headroom", largest_headroom, "a finite fraction >= 0")
    if not (math.isfinite(merge_ttft_ratio) and merge_ttft_ratio >= 1.0):
        raise InvalidArgumentError("merge_ttft_ratio", merge_ttft_ratio, "a finite ratio >= 1")
    if GPUS_PER_SERVER not in profile.tps:
        raise InvalidArgumentError("profile.tps", profile.tps, f"a profile measuring TP{GPUS_PER_SERVER}")
    load = dict(zip(CLASS_NAMES, forecast_peak_rps_by_class, strict=True))
    pools: list[tuple[tuple[str, ...], float, float]] = []  # (classes, work in instances, load rps)
    for tier in ttft_tiers(profile, merge_ttft_ratio, class_order(profile)):
        pools.extend(_tier_pools(tier, load, profile, merge_fill, largest_headroom, capacity_scales or {}))
    budgets = [GPUS_PER_SERVER * max(1, math.ceil(work * (1.0 - 1e-9))) for _, work, _ in pools]
    if total_gpus is not None:
        budgets = trim_budgets(budgets, total_gpus)
    return tuple(
        PoolBudget(name=classes[-1], class_names=classes, gpu_budget=gpus, forecast_rps=rps)
        for (classes, _, rps), gpus in zip(pools, budgets, strict=True)
    )


def _tier_pools(
    order: Sequence[str],
    load: dict[str, float],
    profile: Profile,
    merge_fill: float,
    headroom: float,
    scales: Mapping[str, float],
) -> list[tuple[tuple[str, ...], float, float]]:
    """The pools of one tier (classes lightest first): (classes, work in TP8 instances, load rps); the
    tier's last pool (its catch-all) with its work raised by `headroom`. A rounding error above a whole
    instance does not buy another one (the caller rounds with a tolerance)."""
    clock = max(profile.clocks_mhz)
    pools: list[tuple[tuple[str, ...], float, float]] = []
    carried_classes: tuple[str, ...] = ()
    carried_work = 0.0
    carried_rps = 0.0
    for i, c in enumerate(order):
        cap = profile.max_load_rps(c, GPUS_PER_SERVER, clock) * scales.get(c, 1.0)
        if cap <= 0.0:
            raise InvalidArgumentError(
                "profile",
                f"class {c} at TP{GPUS_PER_SERVER}, {clock} MHz: max_load_rps 0",
                "a profile in which every class meets its SLO at maximum performance",
            )
        classes = (*carried_classes, c)
        work = carried_work + load[c] / cap
        rps = carried_rps + load[c]
        if i < len(order) - 1 and rps < merge_fill * best_instance_rps(profile, classes, load, scales):
            carried_classes, carried_work, carried_rps = classes, work, rps
            continue
        pools.append((classes, work, rps))
        carried_classes, carried_work, carried_rps = (), 0.0, 0.0
    classes, work, rps = pools[-1]
    pools[-1] = (classes, work * (1.0 + headroom), rps)
    return pools


def best_instance_rps(
    profile: Profile,
    class_names: Sequence[str],
    load_rps: dict[str, float],
    scales: Mapping[str, float] | None = None,
) -> float:
    """SLO-meeting load of one instance at the best configuration (least energy per request at full
    load) for the mix of `class_names` weighted by their loads (evenly when all are 0)."""
    caps = pool_capacities(profile, {c: load_rps[c] for c in class_names}, scales)
    return min(caps, key=lambda c: (c.energy_per_request_j, -c.max_load_rps)).max_load_rps


def trim_budgets(budgets: list[int], total_gpus: int) -> list[int]:
    """GPU budgets cut back, largest first and an instance's worth at a time, to `total_gpus` (none
    below MIN_POOL_GPUS)."""
    if total_gpus < MIN_POOL_GPUS * len(budgets):
        raise InvalidArgumentError(
            "total_gpus", total_gpus, f">= {MIN_POOL_GPUS * len(budgets)} ({len(budgets)} pools)"
        )
    out = list(budgets)
    while sum(out) > total_gpus:
        # The largest budget (the first such when tied) gives up one instance's worth.
        i = max(range(len(out)), key=lambda k: (out[k], -k))
        excess = sum(out) - total_gpus
        out[i] -= min(GPUS_PER_SERVER, excess, out[i] - MIN_POOL_GPUS)
    return out
