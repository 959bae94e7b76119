#!/usr/bin/env python3
"""Benchmark of the policy core's decision times (docs/control.md: the pool manager must decide in well
under a pool period; targets: one pool's MILP p50 < 50 ms and p99 < 500 ms, a full decision at 4096
GPUs < 2 s).

Where it sits: a developer tool over `controller.policy` (pure code), timed here with the wall clock.

1. Pool manager: `solve_pool` for 9 pools (one per request class, the paper's layout), each with a budget
   of `--pool-gpus` GPUs (default 512), at random loads (5-100% of what the budget holds at maximum
   performance) and with the pool's previous decision as its current instances (what the control loop
   sees every 5 minutes). Reports p50/p99/max wall time per call (CVXPY parameter substitution + HiGHS;
   the first call of each problem structure also builds and compiles it into the caller's
   `ProblemCache`, as in a policy object over a real run), the solver's own run time, and how often
   each status (fallbacks included) came out.
2. Full decision at `--cluster-gpus` GPUs (default 4096): `DynamoLLM.pool_step` (forecast per class ->
   `plan_pools` -> per pool `pool_capacities` + `solve_pool` + the greedy runner-up of its decision
   record) on an observed state with an hour of per-minute history, loads scaled to fill about 80% of
   the cluster at maximum performance; epochs in force as the control cycle would have them.

Usage: PYTHONPATH=. .venv/bin/python tools/bench_policy.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from controller.model.classes import CLASS_NAMES
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.profile import Profile
from controller.model.state import ClusterObs, InstanceObs, Periods, Phase
from controller.policy.capacity import pool_capacities
from controller.policy.dynamollm import DynamoLLM
from controller.policy.pool import ProblemCache, reconfig_cost_j_per_gpu, solve_pool
from controller.profiles import default_profile

EPOCH_S = 300.0
COSTS_J = reconfig_cost_j_per_gpu(75.0, start_s=60.0, stop_s=0.0, retp_s=90.0, clock_s=0.065)


def _pct(values_s: Sequence[float]) -> str:
    a = np.asarray(values_s) * 1e3
    return f"p50 {np.percentile(a, 50):7.1f} ms  p99 {np.percentile(a, 99):7.1f} ms  max {a.max():7.1f} ms"


def bench_pools(profile: Profile, pool_gpus: int, trials: int, rng: np.random.Generator) -> None:
    caps = {c: pool_capacities(profile, {c: 1.0}) for c in CLASS_NAMES}
    top = max(profile.clocks_mhz)
    full_rps = {c: pool_gpus // 8 * profile.max_load_rps(c, 8, top) for c in CLASS_NAMES}
    current: dict[str, dict[InstanceSpec, int]] = {c: {} for c in CLASS_NAMES}
    wall_s: list[float] = []
    solver_s: list[float] = []
    decision_s: list[float] = []
    statuses: Counter[str] = Counter()
    problems = ProblemCache()  # the built MILPs, owned by the caller as a policy object owns its own
    # import + warm
    solve_pool(1.0, pool_gpus, caps["SS"], {}, reconfig_cost_j=COSTS_J, epoch_s=EPOCH_S, problems=problems)
    for _ in range(trials):
        t_decision = 0.0
        for c in CLASS_NAMES:
            load = float(rng.uniform(0.05, 1.0)) * full_rps[c]
            t0 = time.perf_counter()
            d = solve_pool(
                load,
                pool_gpus,
                caps[c],
                current[c],
                reconfig_cost_j=COSTS_J,
                epoch_s=EPOCH_S,
                problems=problems,
            )
            dt = time.perf_counter() - t0
            t_decision += dt
            wall_s.append(dt)
            solver_s.append(d.solve_s)
            statuses[d.status] += 1
            current[c] = dict(d.counts)
        decision_s.append(t_decision)
    print(f"solve_pool, 9 pools x {pool_gpus} GPUs, {trials} rounds ({len(wall_s)} calls):")
    print(f"  per call, wall     {_pct(wall_s)}")
    print(f"  per call, HiGHS    {_pct(solver_s)}")
    print(f"  9 pools together   {_pct(decision_s)}")
    print(
        "  status: " + ", ".join(f"{k} {v} ({100 * v / len(wall_s):.1f}%)" for k, v in statuses.most_common())
    )


def _obs(
    profile: Profile, rates_rps: np.ndarray, plan: ClusterPlan, total_gpus: int, now_s: float
) -> ClusterObs:
    instances = tuple(
        InstanceObs(
            instance_id=i,
            pool=pool,
            spec=spec,
            phase=Phase.ACTIVE,
            load_rps=0.0,
            waiting=0,
            running=0,
        )
        for i, (pool, spec) in enumerate((p.name, s) for p in plan.pools for s in p.instances)
    )
    periods = Periods()  # the epochs in force, as a control cycle started at t = 0 has them
    return ClusterObs(
        now_s=now_s,
        start_unix_s=None,
        plan=plan,
        instances=instances,
        history_bin_s=60.0,
        class_rate_history_rps=tuple(tuple(float(v) for v in row) for row in rates_rps),
        total_gpus=total_gpus,
        epoch_start_s=now_s // periods.cluster_s * periods.cluster_s,
        pool_period_start_s=now_s // periods.pool_s * periods.pool_s,
    )


def bench_cluster(profile: Profile, cluster_gpus: int, trials: int, rng: np.random.Generator) -> None:
    policy = DynamoLLM()
    top = max(profile.clocks_mhz)
    # Class mix of the Azure conversation trace, roughly; scaled so the peaks fill ~80% of the cluster.
    shares = np.array([0.25, 0.2, 0.05, 0.15, 0.12, 0.03, 0.1, 0.07, 0.03])
    work_per_rps = float(
        sum(s / profile.max_load_rps(c, 8, top) for c, s in zip(CLASS_NAMES, shares, strict=True))
    )
    total_rps = 0.8 * cluster_gpus / 8 / work_per_rps
    plan = ClusterPlan(pools=(PoolPlan(name="LL", class_names=CLASS_NAMES, instances=()),))
    times_s: list[float] = []
    gpus: list[int] = []
    statuses: Counter[str] = Counter()
    policy.pool_step(_obs(profile, _history(shares, total_rps, rng), plan, cluster_gpus, 3600.0), profile)
    for k in range(trials):
        obs = _obs(profile, _history(shares, total_rps, rng), plan, cluster_gpus, 3600.0 + 300.0 * k)
        t0 = time.perf_counter()
        step = policy.pool_step(obs, profile)
        times_s.append(time.perf_counter() - t0)
        plan = step.plan
        gpus.append(plan.gpus)
        statuses.update(d.solver_status for d in step.pools)
    print(f"DynamoLLM.pool_step (forecast + plan_pools + 9x solve_pool), {cluster_gpus} GPUs, {trials} runs:")
    print(f"  wall               {_pct(times_s)}")
    print(f"  GPUs planned       mean {np.mean(gpus):.0f} of {cluster_gpus}, {total_rps:.0f} rps offered")
    print("  pool status: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common()))


def _history(shares: np.ndarray, total_rps: float, rng: np.random.Generator) -> np.ndarray:
    """An hour of per-minute rates per class: a slow ramp with Poisson-like noise."""
    level = total_rps * rng.uniform(0.6, 1.0)
    ramp = np.linspace(0.8, 1.0, 60)
    noise = rng.normal(1.0, 0.05, size=(len(shares), 60)).clip(0.5, 1.5)
    rates: np.ndarray = shares[:, None] * level * ramp[None, :] * noise
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--trials", type=int, default=100, help="rounds of 9 pool solves (default 100)")
    ap.add_argument("--cluster-trials", type=int, default=20, help="full decisions (default 20)")
    ap.add_argument("--pool-gpus", type=int, default=512)
    ap.add_argument("--cluster-gpus", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    profile = default_profile("llama2-70b", "h100-sxm")
    rng = np.random.default_rng(args.seed)
    bench_pools(profile, args.pool_gpus, args.trials, rng)
    bench_cluster(profile, args.cluster_gpus, args.cluster_trials, rng)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
