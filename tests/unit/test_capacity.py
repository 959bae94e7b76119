"""Capacity model of a pool's class mix (controller/policy/capacity.py)."""

from __future__ import annotations

import math

import pytest

from agent.api.errors import InvalidArgumentError
from controller.model.classes import ClassSlo
from controller.model.profile import ClassProfile, ConfigProfile, Profile, ProfilePoint
from controller.policy.capacity import (
    capacities_by_clock,
    class_fits,
    fit_power_line,
    mix_capacity,
    pool_capacities,
)
from controller.policy.singlepool import mix_capacity_rps
from controller.profiles import default_profile

_SLO = ClassSlo(ttft_s=1.0, tbt_s=0.1)


def _linear_config(
    tp: int, clock_mhz: int, cap_rps: float, idle_w_per_gpu: float, slope_w_per_rps_per_gpu: float
) -> ConfigProfile:
    """Levels at 0.1..2 x cap with power exactly linear in load; latency crosses the SLO at cap."""
    loads = tuple(cap_rps * f for f in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0))
    points = tuple(
        ProfilePoint(
            ttft_p99_s=0.5 if x <= cap_rps else 2.0,
            tbt_p99_s=0.05,
            slo_attainment=1.0 if x <= cap_rps else 0.5,
            power_w=idle_w_per_gpu + slope_w_per_rps_per_gpu * x,
            energy_per_request_j=1.0,
        )
        for x in loads
    )
    return ConfigProfile(tp=tp, clock_mhz=clock_mhz, max_load_rps=cap_rps, load_rps=loads, points=points)


def _linear_profile(zero_for: tuple[str, int, int] | None = None) -> Profile:
    """Two classes, TP 2/8, clocks 1000/2000; class LL cannot be served at `zero_for` if given."""
    spec = {"SS": (4.0, 100.0, 10.0), "LL": (0.5, 120.0, 200.0)}  # cap per TP2 @1000, idle/GPU, slope/GPU
    classes = {}
    for name, (cap, idle, slope) in spec.items():
        configs = {}
        for tp in (2, 8):
            for clock in (1000, 2000):
                scale = (tp / 2) * (clock / 1000)
                if zero_for == (name, tp, clock):
                    configs[(tp, clock)] = ConfigProfile(tp, clock, 0.0, (), ())
                else:
                    configs[(tp, clock)] = _linear_config(tp, clock, cap * scale, idle, slope)
        classes[name] = ClassProfile(name, 100, 100, _SLO, configs)
    return Profile("m", "g", (2, 8), (1000, 2000), classes, {})


def test_single_class_recovers_the_exact_linear_power_line() -> None:
    caps = pool_capacities(_linear_profile(), {"SS": 1.0})
    assert [(c.tp, c.clock_mhz) for c in caps] == [(2, 1000), (2, 2000), (8, 1000), (8, 2000)]
    c = caps[0]
    assert c.max_load_rps == pytest.approx(4.0)
    assert c.power_idle_w == pytest.approx(2 * 100.0)
    assert c.power_slope_w_per_rps == pytest.approx(2 * 10.0)
    assert c.energy_per_request_j == pytest.approx(c.power_w(4.0) / 4.0)


def test_mix_is_harmonic_in_capacity_and_time_weighted_in_idle_power() -> None:
    profile = _linear_profile()
    c = pool_capacities(profile, {"SS": 3.0, "LL": 1.0})[0]  # shares 0.75 / 0.25 at TP2 @ 1000
    cap = 1.0 / (0.75 / 4.0 + 0.25 / 0.5)
    assert c.max_load_rps == pytest.approx(cap)
    w_ss, w_ll = 0.75 / 4.0 * cap, 0.25 / 0.5 * cap
    assert w_ss + w_ll == pytest.approx(1.0)
    assert c.power_idle_w == pytest.approx(2 * (w_ss * 100.0 + w_ll * 120.0))
    assert c.power_slope_w_per_rps == pytest.approx(2 * (0.75 * 10.0 + 0.25 * 200.0))
    # At full load the mix draws the time-weighted average of each class's own full-load power.
    full_ss, full_ll = 2 * (100.0 + 10.0 * 4.0), 2 * (120.0 + 200.0 * 0.5)
    assert c.power_w(cap) == pytest.approx(w_ss * full_ss + w_ll * full_ll)


def test_shares_are_scale_free_and_all_zero_means_even() -> None:
    profile = _linear_profile()
    assert pool_capacities(profile, {"SS": 1.0, "LL": 1.0}) == pool_capacities(
        profile, {"SS": 7.0, "LL": 7.0}
    )
    assert pool_capacities(profile, {"SS": 0.0, "LL": 0.0}) == pool_capacities(profile, {"SS": 1, "LL": 1})
    # A zero share drops the class from the mix.
    assert pool_capacities(profile, {"SS": 1.0, "LL": 0.0}) == pool_capacities(profile, {"SS": 1.0})


def test_configuration_that_cannot_serve_a_class_of_the_mix_is_left_out() -> None:
    profile = _linear_profile(zero_for=("LL", 8, 2000))
    assert (8, 2000) not in [(c.tp, c.clock_mhz) for c in pool_capacities(profile, {"LL": 1.0, "SS": 1.0})]
    assert (8, 2000) in [(c.tp, c.clock_mhz) for c in pool_capacities(profile, {"SS": 1.0})]
    assert mix_capacity(profile, {"LL": 1.0}, 8, 2000) is None


@pytest.mark.parametrize(
    "shares",
    [{}, {"XX": 1.0}, {"SS": -1.0}, {"SS": math.nan}, {"SS": math.inf}],
)
def test_bad_shares_are_rejected(shares: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError):
        pool_capacities(_linear_profile(), shares)


def test_fit_power_line_keeps_intercept_and_slope_non_negative() -> None:
    assert fit_power_line([1.0, 2.0, 3.0], [5.0, 7.0, 9.0]) == pytest.approx((3.0, 2.0))
    assert fit_power_line([1.0, 2.0], [9.0, 7.0]) == pytest.approx((8.0, 0.0))  # falling: flat at mean
    intercept, slope = fit_power_line([1.0, 2.0], [1.0, 5.0])  # would cross below zero: through origin
    assert intercept == 0.0 and slope == pytest.approx(11.0 / 5.0)
    assert fit_power_line([2.0], [4.0]) == (4.0, 0.0)
    with pytest.raises(InvalidArgumentError):
        fit_power_line([], [])


def test_default_profile_capacities_match_singlepool_and_track_measured_power() -> None:
    profile = default_profile("llama2-70b", "h100-sxm")
    shares = {"SS": 0.3, "SM": 0.4, "MM": 0.2, "LL": 0.1}
    caps = pool_capacities(profile, shares)
    assert caps
    tuple_shares = tuple(shares.get(n, 0.0) for n in profile.class_names)
    for c in caps:
        assert c.max_load_rps == pytest.approx(mix_capacity_rps(tuple_shares, profile, c.tp, c.clock_mhz))
        assert c.power_idle_w >= 0.0 and c.power_slope_w_per_rps >= 0.0
    # Single class: the fitted line stays within 12% of the measured power at the SLO-meeting maximum
    # (the worst case, LL on TP2, has a concave power curve: its small KV cache caps the batch early).
    for name in profile.class_names:
        for c in pool_capacities(profile, {name: 1.0}):
            measured_w = profile.point(name, c.tp, c.clock_mhz, c.max_load_rps).power_w * c.tp
            assert c.power_w(c.max_load_rps) == pytest.approx(measured_w, rel=0.12)


def test_capacities_by_clock_selects_one_tp() -> None:
    caps = pool_capacities(_linear_profile(), {"SS": 1.0})
    by_clock = capacities_by_clock(caps, 8)
    assert sorted(by_clock) == [1000, 2000]
    assert all(c.tp == 8 for c in by_clock.values())
    assert capacities_by_clock(caps, 4) == {}


def test_precomputed_class_fits_give_the_same_tables() -> None:
    """The instance level's cache derives its tables from `class_fits` computed once per profile."""
    profile = default_profile("llama2-70b", "h100-sxm")
    fits = class_fits(profile)
    assert len(fits) == len(profile.class_names) * len(profile.tps) * len(profile.clocks_mhz)
    for shares, scales in (({"SS": 3.0, "ML": 1.0}, None), ({"LS": 1.0, "LL": 2.0}, {"LS": 0.5})):
        assert pool_capacities(profile, shares, scales, fits) == pool_capacities(profile, shares, scales)
