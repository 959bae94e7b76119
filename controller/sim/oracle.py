"""`--policy oracle`: DynamoLLM's optimisation fed the TRUE per-class rates and bursts of each coming
period and no reconfiguration cost: the lower bound the other policies are measured against.

Where it sits: only the simulator knows the future, so the oracle lives here, not in the pure policy
core: the simulator hands it a `Foresight` (`TraceForesight`: the trace's coming arrivals by the classes
the router will use) and the control cycle steps it like any policy. Its changes take effect at once
(`reconfiguration_free`: the executor starts instances ACTIVE and clock changes do not stall).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES, REQUEST_CLASSES
from controller.model.decisions import PlanStep
from controller.model.profile import Profile
from controller.model.state import DEFAULT_BURST_WINDOWS_S, ClusterObs
from controller.policy.base import peak_rate_rps
from controller.policy.bursts import burst_excess_rps
from controller.policy.dynamollm import DynamoLLM
from controller.policy.pool import RECONFIG_KINDS

# Windows of the oracle's true short-term peaks of the coming period: the cycle's burst windows plus one
# and two minutes, since its rate is a mean over a pool period and the surges within it are known too.
ORACLE_BURST_WINDOWS_S = (*DEFAULT_BURST_WINDOWS_S, 60.0, 120.0)


@dataclass(frozen=True, slots=True)
class Truth:
    """The coming period of `period_s`: per class (CLASS_NAMES order) its realised rate (the largest mean
    over a pool period within it) and, per window of `burst_windows_s`, its most arrivals within any
    such window divided by the window (rps)."""

    period_s: float
    rates_rps: tuple[float, ...]
    burst_windows_s: tuple[float, ...]
    bursts_rps: tuple[tuple[float, ...], ...]


class Foresight(Protocol):
    def coming(self, now_s: float, period_s: float) -> Truth: ...


class TraceForesight:
    """The trace's future by routed class. `classes_until(t_s)` returns the classes the router gives the
    arrivals before `t_s` (the simulator's predictor runs ahead with what it has learned so far)."""

    def __init__(
        self,
        arrival_s: npt.NDArray[np.float64],
        classes_until: Callable[[float], npt.NDArray[np.int64]],
        pool_s: float,
    ) -> None:
        self._arrival_s = arrival_s
        self._classes_until = classes_until
        self._pool_s = pool_s

    def coming(self, now_s: float, period_s: float) -> Truth:
        t1_s = now_s + period_s
        routed_all = self._classes_until(t1_s)
        lo, hi = np.searchsorted(self._arrival_s, (now_s, t1_s))
        times = self._arrival_s[lo:hi]
        routed = routed_all[lo:hi]
        coming = [times[routed == c.index] for c in REQUEST_CLASSES]
        rates = tuple(peak_rate_rps(a, self._pool_s) for a in coming)
        bursts = tuple(tuple(peak_rate_rps(a, w) for a in coming) for w in ORACLE_BURST_WINDOWS_S)
        return Truth(period_s, rates, ORACLE_BURST_WINDOWS_S, bursts)


@dataclass(frozen=True, slots=True)
class Oracle(DynamoLLM):
    """The oracle (module docstring). `foresight` is given by the simulator; `truth` is set per step."""

    foresight: Foresight | None = None
    truth: Truth | None = None

    forecast_kind = "true"

    @property
    def name(self) -> str:
        return "oracle"

    @property
    def reconfiguration_free(self) -> bool:
        return True

    def cluster_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self._knowing(obs, self.periods.cluster_s)._decide(obs, profile)

    def pool_step(self, obs: ClusterObs, profile: Profile) -> PlanStep:
        return self._knowing(obs, self.periods.pool_s)._decide(obs, profile)

    def _knowing(self, obs: ClusterObs, period_s: float) -> Oracle:
        if self.foresight is None:
            raise InvalidArgumentError("oracle.foresight", None, "the simulator's knowledge of the trace")
        return replace(self, truth=self.foresight.coming(obs.now_s, period_s))

    def _known(self) -> Truth:
        assert self.truth is not None  # set by _knowing before every decision
        return self.truth

    def _can_decide(self, obs: ClusterObs) -> bool:
        return True

    def _reconfig_cost_j(self) -> dict[str, float]:
        return dict.fromkeys(RECONFIG_KINDS, 0.0)

    def _class_peaks(self, obs: ClusterObs, horizon_s: float, bins: int) -> tuple[float, ...]:
        return self._known().rates_rps

    def _pool_load_rps(self, obs: ClusterObs, class_names: Sequence[str], horizon_s: float) -> float:
        rates = self._known().rates_rps
        return sum(rates[CLASS_NAMES.index(c)] for c in class_names)

    def _class_bursts(
        self, obs: ClusterObs, profile: Profile, bins: int, provisioned_rps: Sequence[float]
    ) -> tuple[float, ...]:
        """The same rule on the TRUE bursts of the coming period. The Poisson quantile is that of
        dynamollm's memory (a cluster period): the capacities, measured over long Poisson runs, absorb
        a Poisson stream's maximum over that span, and a span of one short period would call the
        ordinary Poisson maximum of every period a burst. The tolerated excess is the miss share of
        the period's own arrivals, so the periods of an epoch together tolerate what one epoch of
        dynamollm's rule does."""
        truth = self._known()
        return burst_excess_rps(
            profile,
            truth.burst_windows_s,
            truth.bursts_rps,
            self.periods.cluster_s,
            provisioned_rps,
            self.burst_miss_share * sum(truth.rates_rps) * truth.period_s / len(CLASS_NAMES),
        )
