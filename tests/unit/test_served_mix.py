"""The realised class mix behind the predictor (controller/control/served.py), how DynamoLLM sizes a pool
with it (controller/policy/instance_model.served_shares), and the cycle handing it to the policy."""

from __future__ import annotations

import math

import pytest

from agent.api.errors import InvalidArgumentError
from controller.control.cycle import ControlCycle, CycleConfig
from controller.control.served import ServedMix
from controller.model.classes import CLASS_NAMES
from controller.model.fleet import Arrivals, Completions, FleetView, InstanceView
from controller.policy.capacity import pool_capacities
from controller.policy.instance_model import served_shares
from controller.policy.singlepool import singlepool_plan
from tests.unit.test_control_cycle import LOW, PERIODS, PROFILE, Scripted

N = len(CLASS_NAMES)
LS, LL = CLASS_NAMES.index("LS"), CLASS_NAMES.index("LL")


def served(pairs: dict[tuple[int, int], int]) -> tuple[tuple[int, ...], ...]:
    table = [[0] * N for _ in range(N)]
    for (r, t), n in pairs.items():
        table[r][t] = n
    return tuple(tuple(row) for row in table)


def test_rows_are_identity_until_enough_completions_then_the_realised_shares() -> None:
    mix = ServedMix(window_s=600.0, min_samples=50)
    mix.observe(10.0, served({(LS, LS): 20, (LS, LL): 20}))
    assert mix.shares()[LS][LS] == 1.0  # 40 < 50: too few to tell
    mix.observe(20.0, served({(LS, LS): 10, (LS, LL): 30}))
    row = mix.shares()[LS]
    assert (
        row[LS] == pytest.approx(0.375) and row[LL] == pytest.approx(0.625) and sum(row) == pytest.approx(1)
    )
    assert mix.shares()[LL][LL] == 1.0  # nothing routed as LL: as routed
    mix.observe(615.0, ())  # the first report left the window
    assert mix.shares()[LS][LS] == 1.0  # 40 left
    with pytest.raises(InvalidArgumentError, match="served"):
        mix.observe(700.0, ((1, 2),))
    with pytest.raises(InvalidArgumentError, match="served"):
        Completions((0,) * N, (0,) * N, ((0,) * N,))


def test_a_pool_planned_for_short_answers_that_serves_long_ones_is_sized_for_them() -> None:
    rates = [0.0] * N
    rates[LS] = 2.0
    mix = [[1.0 if t == r else 0.0 for t in range(N)] for r in range(N)]
    mix[LS] = [0.5 if t in (LS, LL) else 0.0 for t in range(N)]
    shares = served_shares(("LS",), rates, mix)
    assert shares == {"LS": 1.0, "LL": 1.0}
    assert served_shares(("LS",), rates, ()) == {"LS": 2.0}
    as_routed = max(c.max_load_rps for c in pool_capacities(PROFILE, {"LS": 2.0}))
    as_served = max(c.max_load_rps for c in pool_capacities(PROFILE, shares))
    assert as_served < as_routed  # long answers take longer: less load per instance


def test_the_cycle_hands_the_mix_of_the_last_plan_step_to_the_policy() -> None:
    policy = Scripted([])
    cycle = ControlCycle(policy, PROFILE, singlepool_plan(1, 8, LOW), CycleConfig(escalation=False))
    cycle.start(0.0)
    view = FleetView({0: InstanceView(0, 0, 0, math.inf, 0)})
    report = Completions((100,) + (0,) * (N - 1), (100,) + (0,) * (N - 1), served({(0, 1): 60, (0, 0): 40}))
    cycle.tick(5.0, view, Arrivals.none(), report)
    assert policy.seen[-1].served_mix == ()  # no plan step yet: nothing handed over
    t = 10.0
    while t <= PERIODS.pool_s:
        cycle.tick(t, view, Arrivals.none())
        t += PERIODS.instance_s
    pool_obs = [o for o in policy.seen if o.served_mix]
    assert pool_obs and pool_obs[0].served_mix[0][1] == pytest.approx(0.6)
