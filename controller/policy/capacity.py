"""Capacity and power model of one engine configuration serving a pool's class mix (docs/control.md).

Where it sits: the profile (`controller.model.profile`) measures each request class alone, per (TP,
clock), at a ladder of load levels. The pool manager (`controller.policy.pool.solve_pool`) and the
instance manager (`controller.policy.frequency.choose_clock`) need, for the MIX of classes a pool serves,
two numbers per configuration: how much load one instance takes within the SLO, and how its power grows
with load. This module derives them; pure arithmetic on the profile.

Per class c and configuration (tp, clock):
- cap_c = `Profile.max_load_rps(c, tp, clock)`, the largest SLO-meeting load;
- instance power P_c(l) ~ idle_c + slope_c * l: a least-squares line through the measured levels up to
  cap_c plus the interpolated point at cap_c (power_w per GPU x tp). The line is fitted only where the
  instance may run (within the SLO), never extrapolated beyond the measured range; the lowest level is
  ~2% of saturation, so idle_c is the line's intercept, not a measured idle draw.

For a mix with shares s_c (requests of class c / all requests):
- capacity: 1/cap = sum_c s_c / cap_c (each request of class c occupies 1/cap_c instance-seconds; the
  same harmonic rule `singlepool` sizes with);
- power: idle = sum_c w_c idle_c with w_c = (s_c / cap_c) * cap (class c's share of the instance's busy
  time at full load), slope = sum_c s_c slope_c (each request of class c adds its class's dynamic
  energy). At full load the mix then draws sum_c w_c P_c(cap_c): the time-weighted average of the
  classes' full-load power.
- energy per request at full load: P(cap) / cap.

A configuration that cannot serve some class of the mix within its SLO (cap_c = 0) is left out.

Prompt lengths (`length_scales`): where a workload's prompts of an input bin are much longer than the
profile's were, each class of the bin is treated as cap_c x s_c (s_c < 1) with each request costing
1 / s_c times the dynamic energy (`mix_capacity(..., scales)`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES, class_by_name
from controller.model.cluster import InstanceSpec
from controller.model.profile import Profile

# A class's capacity is never scaled below this share of its profiled value for long prompts: the
# longest prompts of a bin are at most about 2.2x its profiled mean (4,096 / 1,845 tokens for LS).
MIN_LENGTH_SCALE = 0.25
# Prompts up to this factor longer than profiled are left to the profile's margin and the SLO guard;
# beyond it, the capacity is scaled down by the excess (`length_scales`).
LENGTH_TOLERANCE = 1.2


@dataclass(frozen=True, slots=True)
class ConfigCapacity:
    """One (TP, clock) for a pool's class mix: SLO-meeting load of one instance and its power line.

    Power figures are per INSTANCE (all `tp` GPUs): power_w(l) = power_idle_w + power_slope_w_per_rps * l.
    """

    tp: int
    clock_mhz: int
    max_load_rps: float
    power_idle_w: float
    power_slope_w_per_rps: float
    energy_per_request_j: float  # at max_load_rps, from the fitted line

    @property
    def spec(self) -> InstanceSpec:
        return InstanceSpec(tp=self.tp, clock_mhz=self.clock_mhz)

    def power_w(self, load_rps: float) -> float:
        """Fitted instance power at load_rps (meaningful for 0 <= load_rps <= max_load_rps)."""
        return self.power_idle_w + self.power_slope_w_per_rps * load_rps


@dataclass(frozen=True, slots=True)
class ClassFit:
    """One class alone on one (TP, clock): its SLO-meeting load and instance power line."""

    max_load_rps: float
    idle_w: float
    slope_w_per_rps: float


# (class name, tp, clock_mhz) -> its fit: `class_fits(profile)`.
ClassFits = Mapping[tuple[str, int, int], ClassFit]


def fit_power_line(load_rps: Sequence[float], power_w: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept_w, slope_w_per_rps), both kept >= 0.

    A negative slope (noise on a flat curve) becomes a flat line at the mean; a negative intercept
    becomes a line through the origin. One point gives a flat line.
    """
    n = len(load_rps)
    if n == 0 or n != len(power_w):
        raise InvalidArgumentError("load_rps", n, f"a non-empty sequence as long as power_w ({len(power_w)})")
    mean_l = sum(load_rps) / n
    mean_p = sum(power_w) / n
    var_l = sum((x - mean_l) ** 2 for x in load_rps)
    if var_l <= 0.0:
        return mean_p, 0.0
    slope = sum((x - mean_l) * (y - mean_p) for x, y in zip(load_rps, power_w, strict=True)) / var_l
    if slope <= 0.0:
        return mean_p, 0.0
    intercept = mean_p - slope * mean_l
    if intercept < 0.0:
        slope = sum(x * y for x, y in zip(load_rps, power_w, strict=True)) / sum(x * x for x in load_rps)
        intercept = 0.0
    return intercept, slope


def _class_fit(profile: Profile, class_name: str, tp: int, clock_mhz: int) -> ClassFit:
    cfg = profile.config(class_name, tp, clock_mhz)
    cap = cfg.max_load_rps
    if cap <= 0.0:
        return ClassFit(0.0, 0.0, 0.0)
    loads = [x for x in cfg.load_rps if x <= cap]
    powers = [p.power_w * tp for x, p in zip(cfg.load_rps, cfg.points, strict=True) if x <= cap]
    if not loads or loads[-1] < cap:
        loads.append(cap)
        powers.append(cfg.point(cap).power_w * tp)
    idle_w, slope = fit_power_line(loads, powers)
    return ClassFit(cap, idle_w, slope)


def class_fits(profile: Profile) -> dict[tuple[str, int, int], ClassFit]:
    """Every class's fit at every profiled (TP, clock): what `mix_capacity` derives a mix from. The
    instance level asks for mixes every few seconds, so its cache (`CapacityCache`) keeps these."""
    return {
        (name, tp, clock): _class_fit(profile, name, tp, clock)
        for name in profile.class_names
        for tp in profile.tps
        for clock in profile.clocks_mhz
    }


def _scaled(fit: ClassFit, scale: float) -> ClassFit:
    """A class's fit for requests `1 / scale` times the work: less capacity, as much power at it."""
    if scale == 1.0:
        return fit
    return ClassFit(fit.max_load_rps * scale, fit.idle_w, fit.slope_w_per_rps / scale)


def _normalised_shares(profile: Profile, class_shares: Mapping[str, float]) -> dict[str, float]:
    if not class_shares:
        raise InvalidArgumentError("class_shares", dict(class_shares), "at least one request class")
    for name, share in class_shares.items():
        if name not in profile.classes:
            raise InvalidArgumentError("class_shares", name, profile.class_names)
        if not (math.isfinite(share) and share >= 0.0):
            raise InvalidArgumentError(f"class_shares[{name}]", share, "a finite share >= 0")
    total = sum(class_shares.values())
    if total == 0.0:
        # A pool with no observed load yet: plan for an even mix of the classes it serves.
        return {name: 1.0 / len(class_shares) for name in class_shares}
    return {name: share / total for name, share in class_shares.items() if share > 0.0}


def length_scales(profile: Profile, input_tokens_mean: Sequence[float]) -> dict[str, float]:
    """Per class, the factor its profiled capacity is scaled by for the prompts its input bin sees
    (`input_tokens_mean`, CLASS_NAMES order, the bin's observed mean; 0: none seen) against the bin's
    profiled mean (the mean of its classes' `load_input_tokens_mean`). Up to LENGTH_TOLERANCE times
    longer is left to the profile's margin and the SLO guard; beyond, the capacity is scaled down by
    the excess, to at least MIN_LENGTH_SCALE; shorter prompts are not credited. Classes of a bin without
    a recorded or observed length: 1."""
    out: dict[str, float] = {}
    if not input_tokens_mean:
        return out
    for name, observed in zip(CLASS_NAMES, input_tokens_mean, strict=True):
        reference = _bin_reference_tokens(profile, class_by_name(name).input_bin)
        if reference is not None and observed > LENGTH_TOLERANCE * reference:
            out[name] = round(max(MIN_LENGTH_SCALE, LENGTH_TOLERANCE * reference / observed), 2)
    return out


def _bin_reference_tokens(profile: Profile, input_bin: int) -> float | None:
    means = [
        c.load_input_tokens_mean
        for c in profile.classes.values()
        if class_by_name(c.name).input_bin == input_bin and c.load_input_tokens_mean is not None
    ]
    return sum(means) / len(means) if means else None


def mix_capacity(
    profile: Profile,
    shares: Mapping[str, float],
    tp: int,
    clock_mhz: int,
    scales: Mapping[str, float] | None = None,
    fits: ClassFits | None = None,
) -> ConfigCapacity | None:
    """The mix's capacity and power line at (tp, clock); None if some class of the mix cannot be served.

    `shares` must already be normalised (positive, summing to 1); `pool_capacities` does that.
    `scales`: per class, a factor on its capacity (`length_scales`; each of its requests then costs
    1/factor times the energy), 1 where absent. `fits`: `class_fits(profile)`, if already at hand.
    """
    by_class = {
        name: _scaled(
            _class_fit(profile, name, tp, clock_mhz) if fits is None else fits[(name, tp, clock_mhz)],
            (scales or {}).get(name, 1.0),
        )
        for name in shares
    }
    if any(f.max_load_rps <= 0.0 for f in by_class.values()):
        return None
    cap = 1.0 / sum(s / by_class[name].max_load_rps for name, s in shares.items())
    idle_w = sum(s / by_class[name].max_load_rps * cap * by_class[name].idle_w for name, s in shares.items())
    slope = sum(s * by_class[name].slope_w_per_rps for name, s in shares.items())
    return ConfigCapacity(
        tp=tp,
        clock_mhz=clock_mhz,
        max_load_rps=cap,
        power_idle_w=idle_w,
        power_slope_w_per_rps=slope,
        energy_per_request_j=(idle_w + slope * cap) / cap,
    )


def pool_capacities(
    profile: Profile,
    class_shares: Mapping[str, float],
    scales: Mapping[str, float] | None = None,
    fits: ClassFits | None = None,
) -> tuple[ConfigCapacity, ...]:
    """Every profiled (tp, clock) able to serve the mix, ordered by tp then clock.

    `class_shares`: class name -> share of the pool's requests (any non-negative scale; normalised
    here). All zero means "no load observed yet": the classes named are weighted evenly. `scales` and
    `fits`: as in `mix_capacity`.
    """
    shares = _normalised_shares(profile, class_shares)
    out: list[ConfigCapacity] = []
    for tp in profile.tps:
        for clock in profile.clocks_mhz:
            cap = mix_capacity(profile, shares, tp, clock, scales, fits)
            if cap is not None:
                out.append(cap)
    return tuple(out)


def capacities_by_clock(capacities: Sequence[ConfigCapacity], tp: int) -> dict[int, ConfigCapacity]:
    """The configurations of one TP degree keyed by clock (the instance manager's view)."""
    return {c.clock_mhz: c for c in capacities if c.tp == tp}
