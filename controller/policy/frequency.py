"""Instance manager (docs/control.md): the SM clock of one instance for the next instance period (5 s).

Where it sits: the policy's `instance_step` calls `choose_clock` per active instance with the load it
served over the last period and the capacities of its TP degree for its pool's class mix
(`controller.policy.capacity.pool_capacities` -> `capacities_by_clock`); `escalate` then overrides the
choice with the maximum clock when the instance's queue already shows deadline misses (docs/control.md,
escalation: the first step after reordering by deadline). Never per iteration: a clock
change stalls the engine for 50-80 ms.

Rule (`choose_clock`): among the clocks whose SLO-meeting capacity, less a `headroom` fraction kept
against the load of the next seconds, covers the load, the one with the least fitted power at that load
(= least energy per request); when none covers it, the clock with the most capacity. Ties go to the
higher clock (more margin for the same energy).

Dead-band (`next_clock`), against clock churn: the load of one instance over one 5-s period is a
handful of requests, so its Poisson noise alone (+-45% at 1 req/s) would move the clock back and forth
every period although the profile's capacities, measured under Poisson arrivals, already absorb that
noise. So the clock follows the instance's SUSTAINED load (its share of its pool's arrivals over the
last minute), and the 5-s load only moves it up:
- up, at once: when the sustained load's clock is higher than the current one, or when the last
  period's load exceeds the current clock's whole SLO-meeting capacity (capacity is short now);
- down: only when the lower clock covers both the sustained load and the last period's load (two
  observations agree: the stateless form of "the choice differed for two consecutive periods"; the
  policy keeps no memory between steps);
- otherwise the current clock stays. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from agent.api.errors import InvalidArgumentError
from controller.policy.capacity import ConfigCapacity

# Fraction of an instance's SLO-meeting capacity kept free against load rising within the instance
# period; the measured 5-s load of one instance is noisy (a few requests).
DEFAULT_CLOCK_HEADROOM = 0.1


def choose_clock(
    load_rps: float,
    capacity_by_clock: Mapping[int, ConfigCapacity],
    *,
    headroom: float = DEFAULT_CLOCK_HEADROOM,
) -> int:
    """The lowest-power clock (MHz) whose capacity x (1 - headroom) covers load_rps; else the fastest."""
    if not capacity_by_clock:
        raise InvalidArgumentError("capacity_by_clock", {}, "at least one clock")
    if not (math.isfinite(load_rps) and load_rps >= 0.0):
        raise InvalidArgumentError("load_rps", load_rps, "a finite rate >= 0")
    if not (0.0 <= headroom < 1.0):
        raise InvalidArgumentError("headroom", headroom, "0 <= headroom < 1")
    tps = {c.tp for c in capacity_by_clock.values()}
    if len(tps) != 1:
        raise InvalidArgumentError("capacity_by_clock", sorted(tps), "configurations of one TP degree")
    covering = [
        clock for clock, c in capacity_by_clock.items() if c.max_load_rps * (1.0 - headroom) >= load_rps
    ]
    if not covering:
        return max(capacity_by_clock, key=lambda clock: (capacity_by_clock[clock].max_load_rps, clock))
    return min(covering, key=lambda clock: (capacity_by_clock[clock].power_w(load_rps), -clock))


def escalate(waiting_past_deadline: int, chosen_clock_mhz: int, max_clock_mhz: int) -> int:
    """The clock to run: the maximum when requests in the queue are predicted to miss their deadline."""
    if waiting_past_deadline < 0:
        raise InvalidArgumentError("waiting_past_deadline", waiting_past_deadline, "a count >= 0")
    if chosen_clock_mhz > max_clock_mhz:
        raise InvalidArgumentError(
            "chosen_clock_mhz", chosen_clock_mhz, f"<= max_clock_mhz ({max_clock_mhz})"
        )
    return max_clock_mhz if waiting_past_deadline > 0 else chosen_clock_mhz


def next_clock(
    current_clock_mhz: int,
    load_rps: float,
    sustained_load_rps: float,
    capacity_by_clock: Mapping[int, ConfigCapacity],
    *,
    headroom: float = DEFAULT_CLOCK_HEADROOM,
) -> int:
    """The clock (MHz) for the next instance period with the dead-band of the module docstring.

    `load_rps`: the load over the last instance period; `sustained_load_rps`: the instance's share of its
    pool's load over a longer window. A current clock outside the table is replaced by the choice.
    """
    if not (math.isfinite(sustained_load_rps) and sustained_load_rps >= 0.0):
        raise InvalidArgumentError("sustained_load_rps", sustained_load_rps, "a finite rate >= 0")
    target = choose_clock(sustained_load_rps, capacity_by_clock, headroom=headroom)
    current = capacity_by_clock.get(current_clock_mhz)
    if current is None or load_rps > current.max_load_rps:
        # Short of capacity now (or an unknown clock): the larger of the two loads' clocks, at once.
        instant = choose_clock(load_rps, capacity_by_clock, headroom=headroom)
        return max((target, instant), key=lambda c: (capacity_by_clock[c].max_load_rps, c))
    target_cap = capacity_by_clock[target]
    if target_cap.max_load_rps > current.max_load_rps:
        return target
    if target != current_clock_mhz and target_cap.max_load_rps * (1.0 - headroom) >= load_rps:
        return target
    return current_clock_mhz
