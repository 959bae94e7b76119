"""Cluster manager (controller/policy/cluster_manager.py): pools, merges, budgets, the GPU cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES
from controller.model.profile import Profile
from controller.policy.cluster_manager import (
    DEFAULT_MERGE_TTFT_RATIO,
    best_instance_rps,
    class_order,
    plan_pools,
    ttft_tiers,
)
from controller.profiles import default_profile

PROFILE = default_profile("llama2-70b", "h100-sxm")
MAX_CLOCK = max(PROFILE.clocks_mhz)


def cap(profile: Profile, c: str) -> float:
    return profile.max_load_rps(c, 8, MAX_CLOCK)


def test_class_order_is_lightest_first() -> None:
    order = class_order(PROFILE)
    assert sorted(order) == sorted(CLASS_NAMES)
    caps = [cap(PROFILE, c) for c in order]
    assert caps == sorted(caps, reverse=True)


TIERS = ttft_tiers(PROFILE, DEFAULT_MERGE_TTFT_RATIO, class_order(PROFILE))


def test_ttft_tiers_group_classes_by_target_within_the_ratio() -> None:
    # The default profile's targets follow the input bin: short, medium and long prompts.
    assert [set(t) for t in TIERS] == [{"SS", "SM", "SL"}, {"MS", "MM", "ML"}, {"LS", "LM", "LL"}]
    for tier in TIERS:
        targets = [PROFILE.slo(c).ttft_s for c in tier]
        assert max(targets) <= DEFAULT_MERGE_TTFT_RATIO * min(targets)
    # A ratio wide enough puts every class in one tier; each tier keeps the order it was given.
    (one,) = ttft_tiers(PROFILE, 100.0, class_order(PROFILE))
    assert one == class_order(PROFILE)


def test_each_busy_class_gets_a_pool_sized_at_max_performance() -> None:
    # Each class fills a whole instance of its best configuration: no merging.
    loads = [best_instance_rps(PROFILE, (c,), {c: 1.0}) for c in CLASS_NAMES]
    load_of = dict(zip(CLASS_NAMES, loads, strict=True))
    budgets = plan_pools(loads, PROFILE, None, merge_fill=0.5, largest_headroom=0.1)
    assert [b.class_names for b in budgets] == [(c,) for tier in TIERS for c in tier]
    catch_alls = {tier[-1] for tier in TIERS}
    for b in budgets:
        work = load_of[b.name] / cap(PROFILE, b.name) * (1.1 if b.name in catch_alls else 1.0)
        assert b.gpu_budget == 8 * math.ceil(work * (1 - 1e-9))


def test_classes_of_different_ttft_tiers_never_share_a_pool() -> None:
    # Nearly idle everywhere: every tier collapses into its catch-all pool, never across tiers.
    budgets = plan_pools([0.01] * len(CLASS_NAMES), PROFILE, None)
    assert [b.class_names for b in budgets] == list(TIERS)
    one_tier = plan_pools([0.01] * len(CLASS_NAMES), PROFILE, None, merge_ttft_ratio=100.0)
    assert [b.class_names for b in one_tier] == [class_order(PROFILE)]


def test_nearly_idle_classes_merge_upward_and_every_class_is_served() -> None:
    tier = TIERS[0]
    loads = dict.fromkeys(CLASS_NAMES, 0.0)
    loads[tier[0]] = 0.01  # lightest: nearly idle, joins the next pool of its tier
    loads[tier[1]] = 3.0
    budgets = plan_pools([loads[c] for c in CLASS_NAMES], PROFILE, None, merge_fill=0.5)
    assert budgets[0].class_names == (tier[0], tier[1])
    assert budgets[0].name == tier[1]
    assert budgets[0].forecast_rps == pytest.approx(3.01)
    served = [c for b in budgets for c in b.class_names]
    assert sorted(served) == sorted(CLASS_NAMES)
    # The idle classes of the other tiers all end up with their tier's heaviest, which keeps its pool.
    assert [b.class_names for b in budgets[-2:]] == list(TIERS[1:])


def test_a_class_merges_below_half_an_instance_of_its_best_configuration() -> None:
    light, next_one = TIERS[0][0], TIERS[0][1]
    one_instance_rps = best_instance_rps(PROFILE, (light,), {light: 1.0})
    loads = dict.fromkeys(CLASS_NAMES, 0.0)
    loads[next_one] = 3.0
    for fill, own_pool in ((0.45, False), (0.55, True)):
        loads[light] = fill * one_instance_rps
        budgets = plan_pools([loads[c] for c in CLASS_NAMES], PROFILE, None, merge_fill=0.5)
        assert (budgets[0].class_names == (light,)) is own_pool, fill
    # The same rate is "nearly idle" for a class with a large instance capacity, and a pool's worth
    # for the heaviest classes: the threshold is relative, not a rate.
    heavy = TIERS[-1][-2]
    assert best_instance_rps(PROFILE, (heavy,), {heavy: 1.0}) < one_instance_rps
    # No merging at all with a zero fill (multipool's static split).
    unmerged = plan_pools([0.01] * len(CLASS_NAMES), PROFILE, None, merge_fill=0.0)
    assert len(unmerged) == len(CLASS_NAMES)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=50.0), min_size=9, max_size=9),
    st.integers(min_value=18, max_value=600),
)
def test_budgets_respect_the_cluster_and_cover_all_classes(loads: list[float], total: int) -> None:
    budgets = plan_pools(loads, PROFILE, total)
    assert sum(b.gpu_budget for b in budgets) <= total
    assert all(b.gpu_budget >= 2 for b in budgets)
    assert sorted(c for b in budgets for c in b.class_names) == sorted(CLASS_NAMES)
    assert sum(b.forecast_rps for b in budgets) == pytest.approx(sum(loads))
    unlimited = plan_pools(loads, PROFILE, None)
    assert [b.class_names for b in unlimited] == [b.class_names for b in budgets]
    assert all(u.gpu_budget >= b.gpu_budget for u, b in zip(unlimited, budgets, strict=True))


def test_bad_input_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match="forecast_peak_rps_by_class"):
        plan_pools([1.0] * 8, PROFILE, None)
    with pytest.raises(InvalidArgumentError, match="forecast_peak_rps_by_class"):
        plan_pools([1.0] * 8 + [-1.0], PROFILE, None)
    with pytest.raises(InvalidArgumentError, match="merge_fill"):
        plan_pools([1.0] * 9, PROFILE, None, merge_fill=-0.5)
    with pytest.raises(InvalidArgumentError, match="merge_ttft_ratio"):
        plan_pools([1.0] * 9, PROFILE, None, merge_ttft_ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="total_gpus"):
        plan_pools([5.0] * 9, PROFILE, 4, merge_fill=0.0)
