"""The `singlepool` baseline of the DynamoLLM paper (docs/evaluation.md): how fleets are run today.

One pool serves all nine request classes with identical TP8 instances at the maximum SM clock, never
reconfigured, sized for the workload's peak with the SLO met:

    n_instances = max(1, ceil(peak_rate_rps / capacity_rps))

`peak_rate_rps` is the largest arrival rate over sliding windows of `ArrivalStats.window_s` (default
60 s). `capacity_rps` is one instance's SLO-meeting throughput for the workload's class mix: the
profile gives, per class c, the largest load `cap_c` one instance sustains with that class alone within
its SLO (`Profile.max_load_rps(c, 8, max clock)`); a mix with shares s_c takes 1/cap = sum_c s_c / cap_c
(each request of class c occupies 1/cap_c instance-seconds). Pure: statistics and profile in, plan out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES, REQUEST_CLASSES
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan, InstanceSpec, PoolPlan
from controller.model.profile import Profile
from controller.policy.base import ArrivalStats

POLICY_NAME = "singlepool"
POOL_NAME = "all"
_RATIO_RTOL = 1e-9


def mix_capacity_rps(class_shares: tuple[float, ...], profile: Profile, tp: int, clock_mhz: int) -> float:
    """Requests/s one instance serves within the SLO for this class mix (harmonic, weighted by share)."""
    inverse = 0.0
    for c, share in zip(REQUEST_CLASSES, class_shares, strict=True):
        if share <= 0:
            continue
        cap_rps = profile.max_load_rps(c.name, tp, clock_mhz)
        if cap_rps <= 0:
            raise InvalidArgumentError(
                "profile",
                f"class {c.name} at TP{tp}, {clock_mhz} MHz: max_load_rps 0",
                "a profile in which every class of the workload meets its SLO at some load",
            )
        inverse += share / cap_rps
    if inverse == 0.0:
        raise InvalidArgumentError("arrivals", class_shares, "a workload with at least one request")
    return 1.0 / inverse


@dataclass(frozen=True, slots=True)
class SinglePoolSizing:
    """The sizing and the figures it came from (kept for reports and tests)."""

    plan: ClusterPlan
    peak_rate_rps: float
    capacity_rps: float


def size_singlepool(arrivals: ArrivalStats, profile: Profile, tp: int = GPUS_PER_SERVER) -> SinglePoolSizing:
    """One pool of identical TP`tp` instances at the profile's maximum clock, sized for the peak."""
    if tp not in profile.tps:
        raise InvalidArgumentError("tp", tp, profile.tps)
    clock_mhz = max(profile.clocks_mhz)
    if arrivals.requests == 0:
        # Nothing to size for: a single instance stands ready, as a static fleet would.
        capacity_rps = math.inf
        count = 1
    else:
        capacity_rps = mix_capacity_rps(arrivals.class_shares, profile, tp, clock_mhz)
        ratio = arrivals.peak_rate_rps / capacity_rps
        # A ratio a rounding error above an integer (the harmonic sum is inexact) needs no extra instance.
        count = max(1, math.ceil(ratio * (1.0 - _RATIO_RTOL)))
    plan = singlepool_plan(count, tp, clock_mhz)
    return SinglePoolSizing(plan=plan, peak_rate_rps=arrivals.peak_rate_rps, capacity_rps=capacity_rps)


def singlepool_plan(instances: int, tp: int, clock_mhz: int) -> ClusterPlan:
    """One pool of `instances` identical TP`tp` instances at `clock_mhz` serving every class."""
    if instances < 1:
        raise InvalidArgumentError("instances", instances, "an integer >= 1")
    spec = InstanceSpec(tp=tp, clock_mhz=clock_mhz)
    return ClusterPlan(
        pools=(PoolPlan(name=POOL_NAME, class_names=CLASS_NAMES, instances=(spec,) * instances),)
    )


@dataclass(frozen=True, slots=True)
class SinglePool:
    """`--policy singlepool` as a `SimPolicy`: static, so its initial plan is its only decision."""

    tp: int = GPUS_PER_SERVER

    @property
    def name(self) -> str:
        return POLICY_NAME

    def initial_plan(self, arrivals: ArrivalStats, profile: Profile) -> ClusterPlan:
        return size_singlepool(arrivals, profile, self.tp).plan

    def plan_with(self, instances: int, profile: Profile) -> ClusterPlan:
        """The same pool with a given instance count (for sizing by simulation, or an operator's count)."""
        return singlepool_plan(instances, self.tp, max(profile.clocks_mhz))
