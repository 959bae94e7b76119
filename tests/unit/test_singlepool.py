"""The singlepool baseline's sizing, the arrival statistics it sizes from, and cluster plans."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES, ClassSlo
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan, pack_servers
from controller.model.profile import ClassProfile, ConfigProfile, Profile, ProfilePoint
from controller.policy.base import ArrivalStats, arrival_stats, peak_rate_rps
from controller.policy.singlepool import SinglePool, mix_capacity_rps, size_singlepool

CLOCKS = (1400, 1980)


def _config(tp: int, clock: int, cap_rps: float) -> ConfigProfile:
    if cap_rps == 0:
        return ConfigProfile(tp, clock, 0.0, (), ())
    point = ProfilePoint(
        ttft_p99_s=0.1, tbt_p99_s=0.05, slo_attainment=1.0, power_w=300.0, energy_per_request_j=100.0
    )
    return ConfigProfile(tp, clock, cap_rps, (0.0, cap_rps), (point, point))


def make_profile(cap_rps_at_max_clock: dict[str, float]) -> Profile:
    """A profile whose TP8 max-clock capacity per class is given; lower clocks serve half as much."""
    classes = {
        name: ClassProfile(
            name=name,
            input_tokens=100,
            output_tokens=100,
            slo=ClassSlo(1.0, 0.1),
            configs={
                (8, clock): _config(8, clock, cap if clock == max(CLOCKS) else cap / 2)
                for clock in CLOCKS
                for cap in [cap_rps_at_max_clock[name]]
            },
        )
        for name in CLASS_NAMES
    }
    return Profile("m", "g", (8,), CLOCKS, classes, {})


UNIFORM = make_profile(dict.fromkeys(CLASS_NAMES, 2.0))


def _stats(requests_by_class: tuple[int, ...], peak_rps: float) -> ArrivalStats:
    return ArrivalStats(
        duration_s=3600.0,
        window_s=60.0,
        requests_by_class=requests_by_class,
        peak_rate_rps=peak_rps,
        peak_rate_rps_by_class=(0.0,) * 9,
    )


def test_peak_rate_counts_the_busiest_window() -> None:
    arrivals = np.array([0.0, 1.0, 2.0, 10.0, 10.5, 11.0, 11.5, 40.0])
    assert peak_rate_rps(arrivals, 2.0) == 4 / 2.0  # [10, 12) holds four
    assert peak_rate_rps(arrivals, 100.0) == 8 / 100.0
    assert peak_rate_rps(np.array([]), 60.0) == 0.0


@given(st.lists(st.floats(0, 1000, allow_nan=False), max_size=60), st.floats(0.5, 200))
def test_peak_rate_equals_brute_force(times: list[float], window_s: float) -> None:
    a = np.sort(np.array(times, dtype=np.float64))
    brute = max((int(np.sum((a >= t) & (a < t + window_s))) for t in a), default=0)
    assert peak_rate_rps(a, window_s) == brute / window_s


def test_arrival_stats_per_class() -> None:
    arrivals = np.array([0.0, 1.0, 2.0, 3.0])
    classes = np.array([0, 0, 8, 4], dtype=np.int8)
    s = arrival_stats(arrivals, classes, duration_s=4.0, window_s=60.0)
    assert s.requests_by_class == (2, 0, 0, 0, 1, 0, 0, 0, 1)
    assert s.requests == 4
    assert s.class_shares[0] == 0.5
    assert s.peak_rate_rps == 4 / 60.0
    assert s.peak_rate_rps_by_class[0] == 2 / 60.0
    assert s.mean_rate_rps == 1.0
    with pytest.raises(InvalidArgumentError, match="window_s"):
        arrival_stats(arrivals, classes, 4.0, window_s=0.0)


def test_mix_capacity_is_the_share_weighted_harmonic_mean() -> None:
    caps = dict.fromkeys(CLASS_NAMES, 1.0) | {"SS": 4.0, "LL": 1.0}
    profile = make_profile(caps)
    shares = (0.5, 0, 0, 0, 0, 0, 0, 0, 0.5)
    assert mix_capacity_rps(shares, profile, 8, 1980) == pytest.approx(1 / (0.5 / 4.0 + 0.5 / 1.0))
    only_ss = (1.0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert mix_capacity_rps(only_ss, profile, 8, 1980) == pytest.approx(4.0)


def test_sizing_is_ceil_of_peak_over_capacity_at_tp8_max_clock() -> None:
    s = size_singlepool(_stats((10,) * 9, peak_rps=5.0), UNIFORM)
    assert s.capacity_rps == pytest.approx(2.0)
    assert s.plan.instances == 3
    (pool,) = s.plan.pools
    assert pool.class_names == CLASS_NAMES
    assert set(pool.instances) == {InstanceSpec(8, 1980)}
    assert s.plan.gpus == 24 and s.plan.servers == 3
    assert SinglePool().initial_plan(_stats((10,) * 9, 5.0), UNIFORM) == s.plan
    assert SinglePool().name == "singlepool"


def test_an_exact_multiple_needs_no_extra_instance_and_empty_load_keeps_one() -> None:
    assert size_singlepool(_stats((1,) * 9, peak_rps=6.0), UNIFORM).plan.instances == 3
    assert size_singlepool(_stats((1,) * 9, peak_rps=0.01), UNIFORM).plan.instances == 1
    assert size_singlepool(_stats((0,) * 9, peak_rps=0.0), UNIFORM).plan.instances == 1


@given(
    st.lists(st.integers(0, 1000), min_size=9, max_size=9).filter(lambda c: sum(c) > 0),
    st.floats(0.01, 500),
    st.floats(1.0, 3.0),
)
def test_more_load_never_means_fewer_instances(counts: list[int], peak_rps: float, factor: float) -> None:
    base = size_singlepool(_stats(tuple(counts), peak_rps), UNIFORM)
    more = size_singlepool(_stats(tuple(counts), peak_rps * factor), UNIFORM)
    assert more.plan.instances >= base.plan.instances
    # sized for the peak: enough capacity, and one instance fewer would not be
    assert base.plan.instances * base.capacity_rps >= peak_rps * (1 - 1e-9)
    assert base.plan.instances == 1 or (base.plan.instances - 1) * base.capacity_rps < peak_rps


def test_a_class_the_profile_cannot_serve_is_an_error_only_if_it_has_requests() -> None:
    profile = make_profile(dict.fromkeys(CLASS_NAMES, 2.0) | {"LL": 0.0})
    with pytest.raises(InvalidArgumentError, match="LL"):
        size_singlepool(_stats((1,) * 9, 1.0), profile)
    assert size_singlepool(_stats((1,) * 8 + (0,), 1.0), profile).plan.instances == 1


def test_servers_pack_instances_without_splitting_them() -> None:
    instances = tuple(InstanceSpec(tp, 1980) for tp in (2, 4, 1, 2, 8, 1, 4, 2))  # 24 GPUs
    plan = ClusterPlan((PoolPlan("a", ("SS",), instances[:4]), PoolPlan("b", ("LL",), instances[4:])))
    servers = pack_servers(plan)
    assert plan.gpus == 24 and plan.servers == 3 == len(servers) and plan.allocated_gpus == 24
    tps = {(p.name, i): spec.tp for p in plan.pools for i, spec in enumerate(p.instances)}
    assert all(sum(tps[k] for k in server) <= 8 for server in servers)
    assert sorted(k for server in servers for k in server) == sorted(tps)
    odd = ClusterPlan((PoolPlan("a", ("SS",), (InstanceSpec(4, 1980), InstanceSpec(2, 1980))),))
    assert odd.servers == 1 and odd.allocated_gpus == 8


@given(st.lists(st.sampled_from((1, 2, 4, 8)), max_size=40))
def test_server_count_is_optimal(tps: list[int]) -> None:
    plan = ClusterPlan((PoolPlan("a", CLASS_NAMES, tuple(InstanceSpec(tp, 1980) for tp in tps)),))
    assert plan.servers == math.ceil(sum(tps) / 8)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: InstanceSpec(3, 1980), "tp"),
        (lambda: InstanceSpec(8, 0), "clock_mhz"),
        (lambda: PoolPlan("a", ("XX",), ()), "class_names"),
        (lambda: PoolPlan("a", ("SS", "SS"), ()), "class_names"),
        (lambda: PoolPlan("", ("SS",), ()), "pool.name"),
        (lambda: ClusterPlan((PoolPlan("a", ("SS",), ()), PoolPlan("b", ("SS",), ()))), "pools"),
        (lambda: ClusterPlan((PoolPlan("a", ("SS",), ()), PoolPlan("a", ("LL",), ()))), "pools"),
    ],
)
def test_invalid_plans_name_the_field(build: object, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        build()  # type: ignore[operator]
    assert field in err.value.field
    assert CLASS_NAMES[0] in str(err.value) or "allowed" in str(err.value)
