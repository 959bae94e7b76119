"""Instance manager clock choice and escalation (controller/policy/frequency.py)."""

from __future__ import annotations

import math
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api.errors import InvalidArgumentError
from controller.policy.capacity import ConfigCapacity, capacities_by_clock, pool_capacities
from controller.policy.frequency import choose_clock, escalate, next_clock
from controller.profiles import default_profile


def _cap(clock_mhz: int, max_load_rps: float, idle_w: float, slope: float, tp: int = 8) -> ConfigCapacity:
    return ConfigCapacity(
        tp=tp,
        clock_mhz=clock_mhz,
        max_load_rps=max_load_rps,
        power_idle_w=idle_w,
        power_slope_w_per_rps=slope,
        energy_per_request_j=(idle_w + slope * max_load_rps) / max_load_rps,
    )


LADDER = {
    800: _cap(800, 2.0, 1000.0, 100.0),
    1400: _cap(1400, 4.0, 1600.0, 90.0),
    1980: _cap(1980, 5.0, 2800.0, 95.0),
}


def test_lowest_power_clock_that_covers_the_load_with_headroom() -> None:
    assert choose_clock(0.0, LADDER, headroom=0.0) == 800
    assert choose_clock(2.0, LADDER, headroom=0.0) == 800
    assert choose_clock(2.0, LADDER, headroom=0.1) == 1400  # 800 MHz keeps only 1.8 rps
    assert choose_clock(4.5, LADDER, headroom=0.0) == 1980
    assert choose_clock(4.5, LADDER, headroom=0.2) == 1980  # nothing covers it: the most capacity


def test_a_faster_clock_wins_when_it_draws_less_at_that_load() -> None:
    # At 1 rps the 1400 MHz line is below the 800 MHz one: slower is not always cheaper.
    ladder = {800: _cap(800, 2.0, 1000.0, 500.0), 1400: _cap(1400, 4.0, 1200.0, 100.0)}
    assert choose_clock(0.1, ladder, headroom=0.0) == 800
    assert choose_clock(1.0, ladder, headroom=0.0) == 1400


def test_ties_go_to_the_higher_clock() -> None:
    ladder = {800: _cap(800, 2.0, 1000.0, 100.0), 1000: _cap(1000, 3.0, 1000.0, 100.0)}
    assert choose_clock(1.0, ladder, headroom=0.0) == 1000


@settings(max_examples=60, deadline=None)
@given(load_rps=st.floats(0.0, 20.0), headroom=st.floats(0.0, 0.5), tp=st.sampled_from((2, 4, 8)))
def test_choice_on_the_default_profile_covers_and_is_cheapest(
    load_rps: float, headroom: float, tp: int
) -> None:
    by_clock = capacities_by_clock(_caps(), tp)
    clock = choose_clock(load_rps, by_clock, headroom=headroom)
    covering = {c for c, cap in by_clock.items() if cap.max_load_rps * (1 - headroom) >= load_rps}
    if covering:
        assert clock in covering
        assert all(by_clock[clock].power_w(load_rps) <= by_clock[c].power_w(load_rps) for c in covering)
    else:
        assert by_clock[clock].max_load_rps == max(cap.max_load_rps for cap in by_clock.values())


@cache
def _caps() -> tuple[ConfigCapacity, ...]:
    return pool_capacities(default_profile("llama2-70b", "h100-sxm"), {"SS": 0.6, "MM": 0.4})


def test_default_headroom_keeps_ten_percent_free_on_a_load_sweep() -> None:
    by_clock = capacities_by_clock(_caps(), 8)
    top_rps = max(c.max_load_rps for c in by_clock.values())
    for load_rps in (x / 10 for x in range(80)):
        cap_rps = by_clock[choose_clock(load_rps, by_clock)].max_load_rps
        assert cap_rps * 0.9 >= load_rps or cap_rps == top_rps


@pytest.mark.parametrize(
    ("load_rps", "by_clock", "headroom", "field"),
    [
        (1.0, {}, 0.1, "capacity_by_clock"),
        (-1.0, LADDER, 0.1, "load_rps"),
        (math.inf, LADDER, 0.1, "load_rps"),
        (1.0, LADDER, 1.0, "headroom"),
        (1.0, {**LADDER, 900: _cap(900, 1.0, 1.0, 1.0, tp=4)}, 0.1, "capacity_by_clock"),
    ],
)
def test_bad_arguments(
    load_rps: float, by_clock: dict[int, ConfigCapacity], headroom: float, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        choose_clock(load_rps, by_clock, headroom=headroom)
    assert err.value.field == field


def test_escalate_goes_to_max_clock_only_on_deadline_misses() -> None:
    assert escalate(0, 1200, 1980) == 1200
    assert escalate(3, 1200, 1980) == 1980
    with pytest.raises(InvalidArgumentError):
        escalate(-1, 1200, 1980)
    with pytest.raises(InvalidArgumentError):
        escalate(0, 2000, 1980)


def test_dead_band_goes_up_at_once_and_down_only_when_both_loads_agree() -> None:
    # Up at once when the sustained load needs more, or the last period overran the current capacity.
    assert next_clock(800, 0.5, 3.0, LADDER, headroom=0.1) == 1400
    assert next_clock(800, 2.5, 0.5, LADDER, headroom=0.1) == 1400
    # A busy period within the current capacity changes nothing.
    assert next_clock(800, 1.9, 0.5, LADDER, headroom=0.1) == 800
    # Down only when the lower clock covers the sustained load AND the last period's load.
    assert next_clock(1980, 3.0, 0.5, LADDER, headroom=0.1) == 1980  # the last period disagrees
    assert next_clock(1980, 0.0, 4.0, LADDER, headroom=0.1) == 1980  # the sustained load disagrees
    assert next_clock(1980, 0.5, 0.5, LADDER, headroom=0.1) == 800
    # A clock outside the table is replaced by the larger of the two loads' choices.
    assert next_clock(1100, 0.1, 3.0, LADDER, headroom=0.1) == 1400
    with pytest.raises(InvalidArgumentError) as err:
        next_clock(800, 1.0, -1.0, LADDER)
    assert err.value.field == "sustained_load_rps"


@settings(max_examples=80, deadline=None)
@given(
    clock=st.sampled_from(sorted(LADDER)),
    load_rps=st.floats(0.0, 8.0),
    sustained_rps=st.floats(0.0, 8.0),
)
def test_dead_band_never_leaves_the_load_short(clock: int, load_rps: float, sustained_rps: float) -> None:
    chosen = next_clock(clock, load_rps, sustained_rps, LADDER, headroom=0.1)
    top = max(c.max_load_rps for c in LADDER.values())
    cap = LADDER[chosen].max_load_rps
    # Never below what the sustained load's own choice offers, nor short of the last period's load.
    assert cap >= LADDER[choose_clock(sustained_rps, LADDER, headroom=0.1)].max_load_rps
    assert cap >= min(load_rps, top)
    # It is the current clock, or a move both loads support.
    if chosen != clock and cap < LADDER[clock].max_load_rps:
        assert cap * 0.9 >= load_rps
