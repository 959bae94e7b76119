"""Burst-aware provisioning (docs/control.md, "Burst-aware provisioning"): the service rate a class needs
beyond its forecast so that short bursts above what a Poisson stream would bring drain within its TTFT
target. Pure arithmetic on the observation's burst peaks and the profile's SLOs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.profile import Profile
from controller.model.state import ClusterObs


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
