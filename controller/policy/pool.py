"""Pool manager (docs/pool-manager.md): the instance mix of one pool for the next pool epoch, as a small MILP.

Where it sits: every pool period (default 5 min) the policy (`controller.policy.dynamollm`) calls
`solve_pool` once per pool with the pool's expected load (a forecast peak), its GPU budget from the
cluster manager, the mix's per-configuration capacities (`controller.policy.capacity.pool_capacities`)
and the pool's current instances. The answer (instance counts per (TP, clock)) becomes the pool's
`PoolPlan`; the orchestrator plan (`controller.orchestrator.plan`) turns the difference into actions.

The problem, per configuration k = (tp_k, clock_k) with capacity cap_k (x (1 - headroom)), fitted power
idle_k + slope_k * load and current count m_k:

    minimise   epoch_s * sum_k ((idle_k + hold tp_k) n_k + slope_k x_k)        (serving energy)
             + c_clock * sum_k tp_k u_k                                       (instances arriving at k)
             + c_start * sum_t A_t + c_stop * sum_t R_t
             + min(0, c_retp - c_start - c_stop) * Z                          (GPUs moved between TPs)
    s.t.       sum_k tp_k n_k <= gpu_budget;  sum_k x_k >= typical;  0 <= x_k <= cap_k n_k
               sum_k top_k n_k >= load
               u_k >= n_k - m_k;  A_t - R_t = t (N_t - M_t) per TP degree t;  Z <= sum A, Z <= sum R
               n_k integer in [0, gpu_budget // tp_k];  u, A, R, Z >= 0

`load` is the load the pool must be able to take (a forecast peak with its margins) and `typical` the
load it typically carries (the forecast rate; `typical` = `load` when not given); top_k is the largest
capacity of config k's TP degree at any allowed clock. Capacity is counted at that clock because the
instance level raises an instance's clock within seconds when its load rises, and energy is priced at
the typical load because that is what the instances carry most of the time, at the clocks the instance
level then gives them: planned at the peak and at the clock chosen now, the MILP would buy many slow
instances that spend the epoch nearly idle (docs/control.md, "Pool manager").

`hold` is what holding a GPU for a second costs beyond its power, in J (`objective.gpu_hold_j_per_gpu_s`:
0 under the energy objective, the rental in energy terms under the cost objective).

N_t / M_t are the new / current instance counts at TP degree t (current ones include configurations no
longer allowed, which must go). A_t / R_t are GPUs entering / leaving TP degree t; Z of them move from
one TP degree to another: a re-shard (`retp`) instead of a stop plus a start, when cheaper. Every
instance arriving at a configuration pays at least a clock change. Costs are J per GPU of the instance
concerned (`reconfig_cost_j`, keys RECONFIG_KINDS; `reconfig_cost_j_per_gpu` derives them from
durations). Solved with HiGHS through CVXPY with a relative MIP gap and a time limit; a time-limited run
with an incumbent is accepted ("incumbent"). The CVXPY problem is built once per structure (the
configurations' TP degrees and the TP degrees present) with a `cp.Parameter` for every number that
changes between calls, and kept in a small cache the caller owns (`ProblemCache`, one per policy):
CVXPY compiles it on its first solve (DPP) and afterwards only substitutes the values, instead of
canonicalising a new problem each call.

Fallbacks, explicit in `PoolDecision.status`: when the load cannot be covered within the budget the MILP
is infeasible ("fallback-infeasible"; also used if the solver fails outright), and when the time limit
passes with no incumbent ("fallback-timeout"), a greedy answer is used instead: configurations in order of
energy per request at full load, each taking as many instances as the remaining load needs and the
remaining budget allows; if that leaves load uncovered, the budget is instead filled at maximum
performance (most capacity per GPU first, i.e. TP8 at the top clock on the default profile) and the
uncovered load is reported as `shortfall_rps`. The MILP itself always covers the load (shortfall 0).

Pure as seen from outside: CVXPY is imported inside the solve (slow to import; `dctl` must not pay for
it at start-up); the cache changes only how fast an answer comes, never the answer (each call sets every
parameter, and HiGHS is not warm-started from the previous call); `solve_s` is the solver's own reported
run time, not a wall-clock reading.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.cluster import GPUS_PER_SERVER, InstanceSpec
from controller.policy.capacity import ConfigCapacity

PoolStatus = Literal["optimal", "incumbent", "fallback-infeasible", "fallback-timeout"]

RECONFIG_KINDS = ("start", "stop", "retp", "clock")

# The pool manager plans for a forecast PEAK of the epoch, so by default it keeps no extra margin; the
# instance manager (`frequency.choose_clock`) keeps one against the load of the moment.
DEFAULT_POOL_HEADROOM = 0.0
DEFAULT_MIP_REL_GAP = 0.02
DEFAULT_TIME_LIMIT_S = 0.5

# Relative tolerance below which uncovered load counts as covered (float round-off in the greedy walk).
_FEASIBILITY_RTOL = 1e-6
# HiGHS primal_solution_status value meaning "a feasible solution is held".
_HIGHS_SOLUTION_FEASIBLE = 2


@dataclass(frozen=True, slots=True)
class PoolDecision:
    """The pool's instance mix for the next epoch and how it was obtained.

    `counts`: instances per spec (non-zero entries only, ordered by tp then clock). `load_shares_rps`:
    load routed to all instances of each spec together. `energy_j_estimate`: serving energy over the
    epoch from the fitted power lines; `reconfig_j_estimate`: the reconfiguration cost the MILP charged
    for moving from the current counts (0 for fallbacks, which ignore it). `solve_s`: solver run time
    (0 when no solver ran).
    """

    counts: Mapping[InstanceSpec, int]
    load_shares_rps: Mapping[InstanceSpec, float]
    energy_j_estimate: float
    reconfig_j_estimate: float
    status: PoolStatus
    shortfall_rps: float
    solve_s: float

    @property
    def gpus(self) -> int:
        return sum(spec.tp * n for spec, n in self.counts.items())

    def instances(self) -> tuple[InstanceSpec, ...]:
        """One spec per instance (the `PoolPlan.instances` form), ordered by tp then clock."""
        return tuple(spec for spec, n in self.counts.items() for _ in range(n))


def reconfig_cost_j_per_gpu(
    gpu_idle_power_w: float, *, start_s: float, stop_s: float, retp_s: float, clock_s: float
) -> dict[str, float]:
    """Reconfiguration costs in J per GPU: each kind holds the GPU idle (serving nothing) for its duration.

    Durations come from the reconfiguration model (docs/pool-manager.md: warm start ~60 s, restart
    re-shard ~90 s, clock change ~0.065 s; stop ~0: a draining instance keeps serving its requests).
    """
    costs = {"start": start_s, "stop": stop_s, "retp": retp_s, "clock": clock_s}
    for kind, duration_s in costs.items():
        if not (math.isfinite(duration_s) and duration_s >= 0.0):
            raise InvalidArgumentError(f"{kind}_s", duration_s, "a finite duration >= 0 s")
    if not (math.isfinite(gpu_idle_power_w) and gpu_idle_power_w >= 0.0):
        raise InvalidArgumentError("gpu_idle_power_w", gpu_idle_power_w, "a finite power >= 0 W")
    return {kind: gpu_idle_power_w * duration_s for kind, duration_s in costs.items()}


def _validate(
    load_rps: float,
    gpu_budget: int,
    reconfig_cost_j: Mapping[str, float],
    epoch_s: float,
    mip_rel_gap: float,
    time_limit_s: float,
    headroom: float,
    current_counts: Mapping[InstanceSpec, int],
) -> None:
    if not (math.isfinite(load_rps) and load_rps >= 0.0):
        raise InvalidArgumentError("load_rps", load_rps, "a finite rate >= 0")
    if isinstance(gpu_budget, bool) or not isinstance(gpu_budget, int) or gpu_budget < 0:
        raise InvalidArgumentError("gpu_budget", gpu_budget, "an integer >= 0")
    if set(reconfig_cost_j) != set(RECONFIG_KINDS):
        raise InvalidArgumentError("reconfig_cost_j", sorted(reconfig_cost_j), RECONFIG_KINDS)
    for kind, cost in reconfig_cost_j.items():
        if not (math.isfinite(cost) and cost >= 0.0):
            raise InvalidArgumentError(f"reconfig_cost_j[{kind}]", cost, "a finite cost >= 0 J")
    if not (math.isfinite(epoch_s) and epoch_s > 0.0):
        raise InvalidArgumentError("epoch_s", epoch_s, "a positive duration")
    if not (0.0 <= mip_rel_gap < 1.0):
        raise InvalidArgumentError("mip_rel_gap", mip_rel_gap, "0 <= gap < 1")
    if not (math.isfinite(time_limit_s) and time_limit_s > 0.0):
        raise InvalidArgumentError("time_limit_s", time_limit_s, "a positive number of seconds")
    if not (0.0 <= headroom < 1.0):
        raise InvalidArgumentError("headroom", headroom, "0 <= headroom < 1")
    for spec, n in current_counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(f"current_counts[{spec}]", n, "an integer >= 0")


def _allowed(
    capacities: Sequence[ConfigCapacity], allowed_tps: Sequence[int], allowed_clocks: Sequence[int] | None
) -> tuple[ConfigCapacity, ...]:
    seen: set[tuple[int, int]] = set()
    out: list[ConfigCapacity] = []
    for c in sorted(capacities, key=lambda c: (c.tp, c.clock_mhz)):
        key = (c.tp, c.clock_mhz)
        if key in seen:
            raise InvalidArgumentError("capacities", key, "one entry per (tp, clock_mhz)")
        seen.add(key)
        if c.tp in allowed_tps and (allowed_clocks is None or c.clock_mhz in allowed_clocks):
            out.append(c)
    return tuple(out)


def _decision(
    configs: Sequence[ConfigCapacity],
    counts: Sequence[int],
    shares_rps: Sequence[float],
    *,
    epoch_s: float,
    reconfig_j: float,
    status: PoolStatus,
    shortfall_rps: float,
    solve_s: float,
) -> PoolDecision:
    keep = [i for i, n in enumerate(counts) if n > 0]
    energy_j = epoch_s * sum(
        configs[i].power_idle_w * counts[i] + configs[i].power_slope_w_per_rps * shares_rps[i] for i in keep
    )
    return PoolDecision(
        counts={configs[i].spec: counts[i] for i in keep},
        load_shares_rps={configs[i].spec: shares_rps[i] for i in keep},
        energy_j_estimate=energy_j,
        reconfig_j_estimate=reconfig_j,
        status=status,
        shortfall_rps=shortfall_rps,
        solve_s=solve_s,
    )


def _fill(
    order: Sequence[int],
    configs: Sequence[ConfigCapacity],
    usable_rps: Sequence[float],
    load_rps: float,
    gpu_budget: int,
) -> tuple[list[int], list[float], float]:
    """Walk configurations in `order`, each taking the instances the remaining load needs, within budget.

    Returns (counts, load per configuration, uncovered load).
    """
    counts = [0] * len(configs)
    shares = [0.0] * len(configs)
    remaining_rps = load_rps
    budget = gpu_budget
    for i in order:
        if remaining_rps <= load_rps * _FEASIBILITY_RTOL:
            break
        n = min(math.ceil(remaining_rps / usable_rps[i] * (1.0 - _FEASIBILITY_RTOL)), budget // configs[i].tp)
        if n <= 0:
            continue
        counts[i] = n
        shares[i] = min(remaining_rps, n * usable_rps[i])
        remaining_rps -= shares[i]
        budget -= n * configs[i].tp
    return counts, shares, max(0.0, remaining_rps)


def greedy_pool(
    load_rps: float, gpu_budget: int, configs: Sequence[ConfigCapacity], *, headroom: float
) -> tuple[list[int], list[float], float]:
    """The fallback: most energy-efficient per request first; if that cannot cover the load within the
    budget, maximum performance (most capacity per GPU first). Returns (counts, load shares, shortfall)."""
    usable = [c.max_load_rps * (1.0 - headroom) for c in configs]
    efficient = sorted(range(len(configs)), key=lambda i: (configs[i].energy_per_request_j, i))
    counts, shares, short = _fill(efficient, configs, usable, load_rps, gpu_budget)
    if short <= load_rps * _FEASIBILITY_RTOL:
        return counts, shares, 0.0
    fastest = sorted(
        range(len(configs)), key=lambda i: (-usable[i] / configs[i].tp, -configs[i].clock_mhz, i)
    )
    return _fill(fastest, configs, usable, load_rps, gpu_budget)


def solve_pool(
    load_rps: float,
    gpu_budget: int,
    capacities: Sequence[ConfigCapacity],
    current_counts: Mapping[InstanceSpec, int],
    *,
    reconfig_cost_j: Mapping[str, float],
    epoch_s: float,
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    allowed_tps: Sequence[int] = (2, 4, 8),
    allowed_clocks: Sequence[int] | None = None,
    headroom: float = DEFAULT_POOL_HEADROOM,
    problems: ProblemCache | None = None,
    gpu_hold_j_per_gpu_s: float = 0.0,
    typical_rps: float | None = None,
) -> PoolDecision:
    """The pool's instance counts per (tp, clock) minimising epoch energy (plus the GPUs' holding cost
    `gpu_hold_j_per_gpu_s`, in J per GPU-second) plus reconfiguration cost.

    `capacities`: the mix's configurations (`pool_capacities`); only those with tp in `allowed_tps` and
    clock in `allowed_clocks` (None: any) are used, which is how one-knob baselines restrict the search.
    `current_counts`: the pool's instances now (any spec). `epoch_s`: the pool period the plan holds for.
    `problems`: the caller's cache of built problems (None: built for this call alone).
    """
    _validate(
        load_rps, gpu_budget, reconfig_cost_j, epoch_s, mip_rel_gap, time_limit_s, headroom, current_counts
    )
    if not (math.isfinite(gpu_hold_j_per_gpu_s) and gpu_hold_j_per_gpu_s >= 0.0):
        raise InvalidArgumentError("gpu_hold_j_per_gpu_s", gpu_hold_j_per_gpu_s, "a finite cost >= 0 J")
    if typical_rps is not None and not (math.isfinite(typical_rps) and 0.0 <= typical_rps <= load_rps):
        raise InvalidArgumentError("typical_rps", typical_rps, f"a rate in [0, load_rps = {load_rps}]")
    configs = allowed_configs(capacities, allowed_tps, allowed_clocks)
    fits = [c for c in configs if c.tp <= gpu_budget]
    if load_rps == 0.0 and not any(current_counts.values()):
        return _decision(
            configs,
            [0] * len(configs),
            [0.0] * len(configs),
            epoch_s=epoch_s,
            reconfig_j=0.0,
            status="optimal",
            shortfall_rps=0.0,
            solve_s=0.0,
        )
    if not fits and load_rps == 0.0:
        # No instance fits the budget and none is needed: stopping the current ones is the only answer.
        zeros = [0] * len(configs)
        return _decision(
            configs,
            zeros,
            [0.0] * len(configs),
            epoch_s=epoch_s,
            reconfig_j=_reconfig_j(configs, zeros, current_counts, reconfig_cost_j),
            status="optimal",
            shortfall_rps=0.0,
            solve_s=0.0,
        )
    if not fits:
        return _fallback(configs, load_rps, gpu_budget, epoch_s, headroom, "fallback-infeasible", 0.0)
    return _solve_milp(
        load_rps,
        gpu_budget,
        configs,
        current_counts,
        reconfig_cost_j,
        epoch_s,
        mip_rel_gap,
        time_limit_s,
        headroom,
        problems if problems is not None else ProblemCache(size=1),
        gpu_hold_j_per_gpu_s,
        typical_rps,
    )


def allowed_configs(
    capacities: Sequence[ConfigCapacity],
    allowed_tps: Sequence[int],
    allowed_clocks: Sequence[int] | None = None,
) -> tuple[ConfigCapacity, ...]:
    """The configurations a solve may use (TP in `allowed_tps`, clock in `allowed_clocks`; None: any),
    ordered by TP then clock; InvalidArgumentError when none is left."""
    configs = _allowed(capacities, allowed_tps, allowed_clocks)
    if not configs:
        raise InvalidArgumentError(
            "capacities",
            len(capacities),
            f"at least one configuration with tp in {tuple(allowed_tps)}"
            + ("" if allowed_clocks is None else f" and clock_mhz in {tuple(allowed_clocks)}"),
        )
    return configs


def solve_pools(
    pools: Sequence[PoolInput],
    *,
    max_gpus: int,
    unused_gpu_w: float,
    gpu_hold_j_per_gpu_s: float,
    reconfig_cost_j: Mapping[str, float],
    epoch_s: float,
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    headroom: float = DEFAULT_POOL_HEADROOM,
    problems: ProblemCache | None = None,
    pack_servers: bool = True,
) -> tuple[PoolDecision, ...]:
    """Every pool's instance mix from ONE MILP that also counts the 8-GPU servers their GPUs fill
    (server packing): the pools' objectives plus, per held server, its 8 GPUs' holding cost
    (`gpu_hold_j_per_gpu_s`: the rental in J under the cost objective, 0 otherwise) and the idle draw
    `unused_gpu_w` of each of its GPUs no instance uses, over the epoch. Solved apart, each pool would
    round up on its own and the plan could spill onto a server mostly idle; solved together, a pool
    may take a slower, larger mix on GPUs a held server has spare, or a faster, smaller one that frees
    a server. At most `max_gpus` GPUs.

    When the joint problem has no answer (infeasible: a pool's load does not fit its budget; a time-out
    with no incumbent; a solver failure), or with `pack_servers` False, each pool is solved on its own
    (`solve_pool`, with its own fallbacks)."""
    for pool in pools:
        _validate(
            pool.load_rps,
            pool.gpu_budget,
            reconfig_cost_j,
            epoch_s,
            mip_rel_gap,
            time_limit_s,
            headroom,
            pool.current_counts,
        )
    for name, value in (("unused_gpu_w", unused_gpu_w), ("gpu_hold_j_per_gpu_s", gpu_hold_j_per_gpu_s)):
        if not (math.isfinite(value) and value >= 0.0):
            raise InvalidArgumentError(name, value, "a finite number >= 0")
    cache = problems if problems is not None else ProblemCache(size=1)
    alone = [
        not pool.configs or (pool.load_rps == 0.0 and not any(pool.current_counts.values())) for pool in pools
    ]
    joint = [pool for pool, skip in zip(pools, alone, strict=True) if not skip] if pack_servers else []
    alone = alone if pack_servers else [True] * len(pools)
    solved = (
        _solve_joint(
            joint,
            max_gpus,
            unused_gpu_w,
            GPUS_PER_SERVER * gpu_hold_j_per_gpu_s,
            reconfig_cost_j,
            epoch_s,
            mip_rel_gap,
            time_limit_s * max(1, len(joint)),
            headroom,
            cache,
        )
        if joint
        else []
    )

    def by_itself(pool: PoolInput) -> PoolDecision:
        return solve_pool(
            pool.load_rps,
            pool.gpu_budget,
            pool.configs,
            pool.current_counts,
            reconfig_cost_j=reconfig_cost_j,
            epoch_s=epoch_s,
            mip_rel_gap=mip_rel_gap,
            time_limit_s=time_limit_s,
            allowed_tps=sorted({c.tp for c in pool.configs}),
            headroom=headroom,
            problems=cache,
            gpu_hold_j_per_gpu_s=gpu_hold_j_per_gpu_s,
            typical_rps=pool.typical_rps,
        )

    if solved is None:
        return tuple(by_itself(pool) for pool in pools)
    answers = iter(solved)
    return tuple(by_itself(pool) if skip else next(answers) for pool, skip in zip(pools, alone, strict=True))


def _solve_joint(
    pools: Sequence[PoolInput],
    max_gpus: int,
    unused_gpu_w: float,
    server_hold_j_per_s: float,
    reconfig_cost_j: Mapping[str, float],
    epoch_s: float,
    mip_rel_gap: float,
    time_limit_s: float,
    headroom: float,
    problems: ProblemCache,
) -> list[PoolDecision] | None:
    with problems.lock:
        p = problems.get(tuple(pool.structure() for pool in pools), with_servers=True)
        usable = [
            _set_pool(terms, pool, reconfig_cost_j, epoch_s, headroom, 0.0)
            for terms, pool in zip(p.pools, pools, strict=True)
        ]
        p.unused_cost.value = _SCALE * epoch_s * unused_gpu_w
        p.server_cost.value = _SCALE * epoch_s * server_hold_j_per_s
        p.max_servers.value = float(math.ceil(max_gpus / GPUS_PER_SERVER))
        outcome = _run(p.problem, mip_rel_gap, time_limit_s)
        if outcome is None or outcome[0] == "timeout":
            return None
        counts = [_counts(terms) for terms in p.pools]
    status, solve_s = outcome
    return [
        _decision(
            pool.configs,
            c,
            _split_load(pool.typical, c, u),
            epoch_s=epoch_s,
            reconfig_j=_reconfig_j(pool.configs, c, pool.current_counts, reconfig_cost_j),
            status="optimal" if status == "optimal" else "incumbent",
            shortfall_rps=0.0,
            solve_s=solve_s,
        )
        for pool, c, u in zip(pools, counts, usable, strict=True)
    ]


def greedy_decision(
    load_rps: float,
    gpu_budget: int,
    capacities: Sequence[ConfigCapacity],
    *,
    epoch_s: float,
    allowed_tps: Sequence[int] = (2, 4, 8),
    allowed_clocks: Sequence[int] | None = None,
    headroom: float = DEFAULT_POOL_HEADROOM,
) -> PoolDecision:
    """The greedy rule's answer (see `greedy_pool`) as a decision: the runner-up a pool step reports
    beside the MILP's choice, so an operator sees what the optimisation bought."""
    configs = _allowed(capacities, allowed_tps, allowed_clocks)
    return _fallback(configs, load_rps, gpu_budget, epoch_s, headroom, "fallback-infeasible", 0.0)


def _fallback(
    configs: Sequence[ConfigCapacity],
    load_rps: float,
    gpu_budget: int,
    epoch_s: float,
    headroom: float,
    status: PoolStatus,
    solve_s: float,
) -> PoolDecision:
    counts, shares, short = greedy_pool(load_rps, gpu_budget, configs, headroom=headroom)
    return _decision(
        configs,
        counts,
        shares,
        epoch_s=epoch_s,
        reconfig_j=0.0,
        status=status,
        shortfall_rps=short if short > load_rps * _FEASIBILITY_RTOL else 0.0,
        solve_s=solve_s,
    )


@dataclass(frozen=True, slots=True)
class _PoolTerms:
    """One pool's part of a MILP, built once per structure: CVXPY objects whose parameter values each
    call sets. `n` is the integer count variable, `gpus` the GPUs it holds (an expression), `objective`
    and `constraints` the pool's terms; every other field is a `cp.Parameter` (see `_pool_terms`)."""

    n: Any
    gpus: Any
    objective: Any
    constraints: tuple[Any, ...]
    count_max: Any
    gpu_budget: Any
    load_rps: Any
    typical_rps: Any
    min_instances: Any
    usable_rps: Any
    top_rps: Any
    idle_cost: Any
    slope_cost: Any
    current_k: Any
    current_t: Any
    clock_cost: Any
    start_cost: Any
    stop_cost: Any
    retp_saving: Any


@dataclass(frozen=True, slots=True)
class _Problem:
    """A built MILP: one pool's (`servers` None) or several pools' with the servers they fill
    (`solve_pools`): `servers` the integer server count, `unused_cost` / `server_cost` / `max_servers`
    its parameters."""

    problem: Any
    pools: tuple[_PoolTerms, ...]
    servers: Any = None
    unused_cost: Any = None
    server_cost: Any = None
    max_servers: Any = None


# Structures seen in a run: the mixes' configuration sets (a handful per policy) times the TP degrees
# present, so a few dozen at most; the bound only keeps a long-lived process from growing without limit.
_PROBLEM_CACHE_SIZE = 64
_Structure = tuple[tuple[int, ...], tuple[int, ...]]  # (the configurations' TP degrees, TP degrees present)
_ProblemKey = tuple[bool, tuple[_Structure, ...]]  # (with servers, one structure per pool)


class ProblemCache:
    """The built MILPs of each structure, least recently used dropped beyond `size`. Owned by the policy
    object that solves (a daemon solves in a worker thread, hence the lock: one solve at a time per
    cache, since a problem's parameters are set and solved in place)."""

    def __init__(self, size: int = _PROBLEM_CACHE_SIZE) -> None:
        self._size = size
        self._problems: OrderedDict[_ProblemKey, _Problem] = OrderedDict()
        self.lock = threading.Lock()

    # The live controller persists its control cycle (policy included) by pickling it; a cache travels
    # empty (solver objects cannot be pickled, and a rebuilt problem solves the same).
    def __getstate__(self) -> int:
        return self._size

    def __setstate__(self, size: int) -> None:
        self.__init__(size)  # type: ignore[misc]

    def get(self, structures: tuple[_Structure, ...], with_servers: bool) -> _Problem:
        """The problem of these pool structures, built on first use. Call with `lock` held."""
        key = (with_servers, structures)
        p = self._problems.get(key)
        if p is None:
            p = _build_problem(structures, with_servers)
            self._problems[key] = p
            if len(self._problems) > self._size:
                self._problems.popitem(last=False)
        else:
            self._problems.move_to_end(key)
        return p


def _pool_terms(config_tps: tuple[int, ...], tps: tuple[int, ...]) -> _PoolTerms:
    """The terms of one pool with configurations of TP degrees `config_tps` and TP degrees `tps` (those
    of the configurations and of the current instances), every number that varies between calls a
    parameter.

    DPP (CVXPY's disciplined parametrised programming): a parameter only ever multiplies a
    parameter-free expression, so products of inputs (epoch x power, cost x TP degree, the kJ scale)
    are folded into one parameter each, and CVXPY compiles the problem once and afterwards only
    substitutes values into the matrices it hands HiGHS. The count bound [0, budget // tp] is a row,
    not a variable bound: a parametrised bound would make the objective's parameter products non-DPP.
    """
    import cvxpy as cp

    k = len(config_tps)
    tp_k = np.array(config_tps, dtype=np.float64)
    # Instances per TP degree: new ones are member[t] @ n, current ones include specs no longer allowed.
    member = np.array([[1.0 if tp == t else 0.0 for tp in config_tps] for t in tps])
    tps_arr = np.array(tps, dtype=np.float64)
    ones_t = np.ones(len(tps))

    n = cp.Variable(k, integer=True, nonneg=True)
    x = cp.Variable(k, nonneg=True)
    u = cp.Variable(k, nonneg=True)
    gpus_in = cp.Variable(len(tps), nonneg=True)
    gpus_out = cp.Variable(len(tps), nonneg=True)
    moved = cp.Variable(nonneg=True)

    count_max = cp.Parameter(k)
    gpu_budget = cp.Parameter()
    load_rps = cp.Parameter()
    typical_rps = cp.Parameter()
    min_instances = cp.Parameter()
    usable_rps = cp.Parameter(k)
    top_rps = cp.Parameter(k)
    idle_cost = cp.Parameter(k)
    slope_cost = cp.Parameter(k)
    current_k = cp.Parameter(k)
    current_t = cp.Parameter(len(tps))
    clock_cost = cp.Parameter(k)
    start_cost = cp.Parameter()
    stop_cost = cp.Parameter()
    retp_saving = cp.Parameter()

    objective = (
        idle_cost @ n
        + slope_cost @ x
        + clock_cost @ u
        + start_cost * (ones_t @ gpus_in)
        + stop_cost * (ones_t @ gpus_out)
        + retp_saving * moved
    )
    constraints = (
        tp_k @ n <= gpu_budget,
        np.ones(k) @ x >= typical_rps,
        x <= cp.multiply(usable_rps, n),  # type: ignore[attr-defined]
        top_rps @ n >= load_rps,
        u >= n - current_k,
        gpus_in - gpus_out == np.diag(tps_arr) @ (member @ n - current_t),
        moved <= ones_t @ gpus_in,
        moved <= ones_t @ gpus_out,
        # 1 when there is load, else 0: redundant for the exact problem, but it stops a tiny load from
        # being "covered" by a count within HiGHS's integrality tolerance of zero.
        np.ones(k) @ n >= min_instances,
        n <= count_max,
    )
    return _PoolTerms(
        n=n,
        gpus=tp_k @ n,
        objective=objective,
        constraints=constraints,
        count_max=count_max,
        gpu_budget=gpu_budget,
        load_rps=load_rps,
        typical_rps=typical_rps,
        min_instances=min_instances,
        usable_rps=usable_rps,
        top_rps=top_rps,
        idle_cost=idle_cost,
        slope_cost=slope_cost,
        current_k=current_k,
        current_t=current_t,
        clock_cost=clock_cost,
        start_cost=start_cost,
        stop_cost=stop_cost,
        retp_saving=retp_saving,
    )


def _build_problem(structures: tuple[_Structure, ...], with_servers: bool) -> _Problem:
    """One pool's MILP, or several pools' coupled by the servers their GPUs fill (`solve_pools`)."""
    import cvxpy as cp

    pools = tuple(_pool_terms(config_tps, tps) for config_tps, tps in structures)
    objective = sum((t.objective for t in pools), start=cp.Constant(0.0))
    constraints = [c for t in pools for c in t.constraints]
    if not with_servers:
        return _Problem(problem=cp.Problem(cp.Minimize(objective), constraints), pools=pools)
    servers = cp.Variable(integer=True, nonneg=True)
    unused_cost = cp.Parameter(nonneg=True)
    server_cost = cp.Parameter(nonneg=True)
    max_servers = cp.Parameter()
    gpus = sum((t.gpus for t in pools), start=cp.Constant(0.0))
    objective = objective + unused_cost * (GPUS_PER_SERVER * servers - gpus) + server_cost * servers
    constraints += [gpus <= GPUS_PER_SERVER * servers, servers <= max_servers]
    return _Problem(
        problem=cp.Problem(cp.Minimize(objective), constraints),
        pools=pools,
        servers=servers,
        unused_cost=unused_cost,
        server_cost=server_cost,
        max_servers=max_servers,
    )


@dataclass(frozen=True, slots=True)
class PoolInput:
    """One pool of a solve: the load it must take and the one it typically carries, its GPU budget,
    configurations (the allowed ones) and current instances."""

    load_rps: float
    gpu_budget: int
    configs: tuple[ConfigCapacity, ...]
    current_counts: Mapping[InstanceSpec, int]
    typical_rps: float | None = None  # None: load_rps (module docstring: load and typical)

    @property
    def typical(self) -> float:
        return self.load_rps if self.typical_rps is None else self.typical_rps

    def structure(self) -> _Structure:
        config_tps = tuple(c.tp for c in self.configs)
        present = {s.tp for s, n in self.current_counts.items() if n > 0}
        return config_tps, tuple(sorted(set(config_tps) | present))


# Objective in kJ so HiGHS sees coefficients of moderate size.
_SCALE = 1e-3


def _set_pool(
    terms: _PoolTerms,
    pool: PoolInput,
    reconfig_cost_j: Mapping[str, float],
    epoch_s: float,
    headroom: float,
    gpu_hold_j_per_gpu_s: float,
) -> npt.NDArray[np.float64]:
    """Every parameter of one pool's terms; returns the usable capacity per configuration."""
    configs = pool.configs
    _, tps = pool.structure()
    tp_k = np.array([c.tp for c in configs], dtype=np.float64)
    usable_k = np.array([c.max_load_rps * (1.0 - headroom) for c in configs])
    retp_saving_j = min(0.0, reconfig_cost_j["retp"] - reconfig_cost_j["start"] - reconfig_cost_j["stop"])
    terms.count_max.value = np.floor(pool.gpu_budget / tp_k)
    terms.gpu_budget.value = float(pool.gpu_budget)
    # Without a typical load the top-clock row is implied by the others; 0 keeps it out of HiGHS's way.
    terms.load_rps.value = 0.0 if pool.typical_rps is None else pool.load_rps
    terms.typical_rps.value = pool.typical
    terms.min_instances.value = 1.0 if pool.load_rps > 0.0 else 0.0
    terms.usable_rps.value = usable_k
    # each TP degree at its most capable allowed clock (capacity is not always monotone in the clock)
    top = {tp: max(c.max_load_rps for c in configs if c.tp == tp) for tp in {c.tp for c in configs}}
    terms.top_rps.value = np.array([top[c.tp] * (1.0 - headroom) for c in configs])
    terms.idle_cost.value = (
        _SCALE * epoch_s * (np.array([c.power_idle_w for c in configs]) + gpu_hold_j_per_gpu_s * tp_k)
    )
    terms.slope_cost.value = _SCALE * epoch_s * np.array([c.power_slope_w_per_rps for c in configs])
    current = pool.current_counts
    terms.current_k.value = np.array([current.get(c.spec, 0) for c in configs], dtype=np.float64)
    terms.current_t.value = np.array(
        [sum(n for s, n in current.items() if s.tp == t) for t in tps], dtype=np.float64
    )
    terms.clock_cost.value = _SCALE * reconfig_cost_j["clock"] * tp_k
    terms.start_cost.value = _SCALE * reconfig_cost_j["start"]
    terms.stop_cost.value = _SCALE * reconfig_cost_j["stop"]
    terms.retp_saving.value = _SCALE * retp_saving_j
    return usable_k


def _run(problem: Any, mip_rel_gap: float, time_limit_s: float) -> tuple[str, float] | None:
    """Solve in place; (status, solve time), "timeout" for a time-limited run with no incumbent, None
    when the solver failed or the problem is infeasible."""
    import cvxpy as cp

    try:
        with warnings.catch_warnings():
            # A time-limited run warns "may be inaccurate"; the status handling below says what happened.
            warnings.simplefilter("ignore", UserWarning)
            # warm_start=False: HiGHS would otherwise start from the previous call's solution (of
            # another pool, or another epoch), and the answer would depend on the call history.
            problem.solve(
                solver=cp.HIGHS,
                warm_start=False,
                mip_rel_gap=mip_rel_gap,
                time_limit=time_limit_s,
                random_seed=0,
                threads=1,
            )
    except cp.error.SolverError:
        return None
    stats = problem.solver_stats
    solve_s = float(stats.solve_time) if stats is not None and stats.solve_time is not None else 0.0
    if problem.status == cp.OPTIMAL:
        return "optimal", solve_s
    if problem.status == cp.USER_LIMIT:
        return ("incumbent" if _has_incumbent(stats) else "timeout"), solve_s
    return None


def _counts(terms: _PoolTerms) -> list[int]:
    return [int(v) for v in np.rint(np.asarray(terms.n.value)).ravel()]


def _solve_milp(
    load_rps: float,
    gpu_budget: int,
    configs: Sequence[ConfigCapacity],
    current_counts: Mapping[InstanceSpec, int],
    reconfig_cost_j: Mapping[str, float],
    epoch_s: float,
    mip_rel_gap: float,
    time_limit_s: float,
    headroom: float,
    problems: ProblemCache,
    gpu_hold_j_per_gpu_s: float,
    typical_rps: float | None,
) -> PoolDecision:
    pool = PoolInput(load_rps, gpu_budget, tuple(configs), current_counts, typical_rps)
    with problems.lock:
        p = problems.get((pool.structure(),), with_servers=False)
        usable_k = _set_pool(p.pools[0], pool, reconfig_cost_j, epoch_s, headroom, gpu_hold_j_per_gpu_s)
        outcome = _run(p.problem, mip_rel_gap, time_limit_s)
        counts = None if outcome is None or outcome[0] == "timeout" else _counts(p.pools[0])
    if outcome is None:
        return _fallback(configs, load_rps, gpu_budget, epoch_s, headroom, "fallback-infeasible", 0.0)
    status, solve_s = outcome
    if counts is None:
        return _fallback(configs, load_rps, gpu_budget, epoch_s, headroom, "fallback-timeout", solve_s)
    return _decision(
        configs,
        counts,
        _split_load(pool.typical, counts, usable_k),
        epoch_s=epoch_s,
        reconfig_j=_reconfig_j(configs, counts, current_counts, reconfig_cost_j),
        status="optimal" if status == "optimal" else "incumbent",
        shortfall_rps=0.0,
        solve_s=solve_s,
    )


def _has_incumbent(stats: Any) -> bool:
    info = getattr(stats, "extra_stats", None)
    return getattr(info, "primal_solution_status", 0) == _HIGHS_SOLUTION_FEASIBLE


def _split_load(load_rps: float, counts: Sequence[int], usable_rps: Any) -> list[float]:
    """Load per configuration in proportion to its usable capacity (what a capacity-weighted router does).

    The LP's own x is one optimum among many when slopes tie; the proportional split is deterministic and
    within every configuration's capacity whenever the counts cover the load.
    """
    cap = [n * float(c) for n, c in zip(counts, usable_rps, strict=True)]
    total = sum(cap)
    return [load_rps * c / total if total > 0 else 0.0 for c in cap]


def _reconfig_j(
    configs: Sequence[ConfigCapacity],
    counts: Sequence[int],
    current_counts: Mapping[InstanceSpec, int],
    reconfig_cost_j: Mapping[str, float],
) -> float:
    """The MILP's reconfiguration cost of moving from current_counts to counts, recomputed exactly."""
    new = {c.spec: n for c, n in zip(configs, counts, strict=True)}
    arriving_gpus = sum(s.tp * max(0, n - current_counts.get(s, 0)) for s, n in new.items())
    tps = {s.tp for s in new} | {s.tp for s in current_counts}
    delta_t = {
        t: t
        * (
            sum(n for s, n in new.items() if s.tp == t)
            - sum(n for s, n in current_counts.items() if s.tp == t)
        )
        for t in tps
    }
    gpus_in = sum(max(0, d) for d in delta_t.values())
    gpus_out = sum(max(0, -d) for d in delta_t.values())
    retp_saving_j = min(0.0, reconfig_cost_j["retp"] - reconfig_cost_j["start"] - reconfig_cost_j["stop"])
    return (
        reconfig_cost_j["clock"] * arriving_gpus
        + reconfig_cost_j["start"] * gpus_in
        + reconfig_cost_j["stop"] * gpus_out
        + retp_saving_j * min(gpus_in, gpus_out)
    )
