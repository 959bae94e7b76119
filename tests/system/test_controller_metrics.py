"""The controller's energy-per-class, reconfiguration and SLO-guard metrics, scraped from a running
`dynamollm-controller` over a simulated agent (real processes on loopback, `tests.system.stack`).

What it proves, through `/metrics` only (plus ListPools to learn the plan's pools and ReportTraffic to
play a router):
1. apply mode, with traffic reported for two pools and a 2-s energy ledger: the attributed class energy,
   finished requests and output tokens per (pool, class) count exactly what was reported; a pool's
   energy is shared over its classes by their output tokens and never exceeds the pool's own energy;
   idle GPUs' energy goes to no class; the per-request and per-token gauges are the interval's energy
   over its requests and tokens; every start the policy decided is counted by kind and, once the
   agent confirmed it, timed; the guard gauges show a pool it raised (factor above 1, active) and the
   attainment of a pool whose completions it holds without acting (too few samples);
2. observe mode counts the reconfigurations the policy decided but times none (nothing was sent).
"""

from __future__ import annotations

import math
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from controller.api.v1 import admin_pb2
from tests.system.stack import Controller, Pending, Stack, wait_for
from tests.system.test_controller_stack import bounded

LEDGER_ENV = {"DYNAMOLLM_CONTROLLER_CONTROL_LEDGER_INTERVAL_S": "2"}
Labels = tuple[tuple[str, str], ...]
Scrape = dict[str, dict[Labels, float]]


async def scrape(ctl: Controller) -> Scrape:
    """Every sample of `/metrics`: name -> labels (sorted pairs) -> value."""
    url = f"http://127.0.0.1:{ctl.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        assert reply.status == 200
        text = await reply.text()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by(scraped: Scrape, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """The samples of `name` keyed by the values of the labels `keys`."""
    return {tuple(dict(labels)[k] for k in keys): v for labels, v in scraped.get(name, {}).items()}


def completions(
    pool: str, cls: str, count: int, met: int, tokens: int, unix_ns: int
) -> list[admin_pb2.TrafficCompletion]:
    return [
        admin_pb2.TrafficCompletion(
            finished_unix_ns=unix_ns, routed_class=cls, slo_met=i < met, output_tokens=tokens, pool=pool
        )
        for i in range(count)
    ]


async def pools_drawing_power(ctl: Controller) -> list[admin_pb2.PoolStatus] | Pending:
    """The plan's pools once every one runs ACTIVE instances and the ledger has energy for them."""
    async with ctl.admin() as admin:
        pools = list((await admin.list_pools()).pools)
    phases = {p.name: sorted({i.phase for i in p.instances}) for p in pools}
    if len(pools) < 2 or any(ph != ["ACTIVE"] for ph in phases.values()):
        return Pending(f"pools and their instance phases {phases}")
    energy = by(await scrape(ctl), "dynamollm_pool_energy_joules_total", "pool")
    if not all(energy.get((p.name,), 0.0) > 0 for p in pools):
        return Pending(f"pool energy {energy}")
    return pools


@bounded
async def test_apply_mode_exports_class_energy_reconfigurations_and_guard(stack: Stack) -> None:
    agents = await stack.start_agents(1)
    ctl = await stack.start_controller(
        [(agent.name, agent.address) for agent in agents], mode="apply", env=LEDGER_ENV
    )
    pools = await wait_for("ACTIVE pools drawing power", lambda: pools_drawing_power(ctl), 25.0, 0.3)
    shared = next((p for p in pools if len(p.class_names) >= 2), None)
    assert shared is not None, [(p.name, list(p.class_names)) for p in pools]
    raised = next(p for p in pools if p.name != shared.name)
    a, b = shared.name, raised.name
    c1, c2, c3 = shared.class_names[0], shared.class_names[1], raised.class_names[0]
    now_ns = time.time_ns()  # one instant: one tick takes them all, so one ledger interval holds them
    reported = [
        *completions(a, c1, 30, 30, 50, now_ns),
        *completions(a, c2, 20, 18, 200, now_ns),  # pool a: 48 of 50 met, too few for the guard to act
        *completions(b, c3, 120, 60, 10, now_ns),  # pool b: half met, over the guard's 100 samples: raised
    ]
    async with ctl.admin() as admin:
        assert (await admin.report_traffic([], reported)).completions_count == len(reported)

    async def everything() -> Scrape | Pending:
        s = await scrape(ctl)
        checks = {
            "class requests": len(by(s, "dynamollm_class_requests_total", "pool", "cls")) == 3,
            "a timed start": by(s, "dynamollm_reconfiguration_duration_seconds_count", "kind").get(
                ("start",)
            ),
            "b raised": by(s, "dynamollm_guard_factor", "pool").get((b,), 1.0) > 1.0,
            "a's attainment": (a,) in by(s, "dynamollm_guard_attainment_ratio", "pool"),
        }
        missing = [what for what, ok in checks.items() if not ok]
        return Pending(f"not yet: {missing}") if missing else s

    s = await wait_for("class energy, a timed start and the guard's gauges", everything, 15.0, 0.3)

    requests = by(s, "dynamollm_class_requests_total", "pool", "cls")
    tokens = by(s, "dynamollm_class_output_tokens_total", "pool", "cls")
    energy = by(s, "dynamollm_class_energy_joules_total", "pool", "cls")
    assert requests == {(a, c1): 30, (a, c2): 20, (b, c3): 120}
    assert tokens == {(a, c1): 1500, (a, c2): 4000, (b, c3): 1200}
    assert set(energy) == set(requests) and all(j > 0 for j in energy.values()), energy
    # a's energy shared by output tokens; neither pool's classes hold more than the pool drew
    assert math.isclose(energy[(a, c1)] / energy[(a, c2)], 1500 / 4000, rel_tol=1e-9)
    pool_energy = by(s, "dynamollm_pool_energy_joules_total", "pool")
    assert energy[(a, c1)] + energy[(a, c2)] <= pool_energy[(a,)] and energy[(b, c3)] <= pool_energy[(b,)]
    # the gauges hold the one interval with traffic: its energy over its requests and tokens
    per_request = by(s, "dynamollm_class_energy_per_request_joules", "pool", "cls")
    per_token = by(s, "dynamollm_class_energy_per_output_token_joules", "pool", "cls")
    assert set(per_request) == set(per_token) == set(energy)
    for key, j in energy.items():
        assert math.isclose(per_request[key], j / requests[key], rel_tol=1e-9), key
        assert math.isclose(per_token[key], j / tokens[key], rel_tol=1e-9), key

    # every reconfiguration kind is exported; each start the agent confirmed was timed from its issue
    counted = by(s, "dynamollm_reconfigurations_total", "kind")
    assert set(counted) == {("start",), ("drain",), ("abort",), ("set_clock",)}
    timed = by(s, "dynamollm_reconfiguration_duration_seconds_count", "kind")
    done = by(s, "dynamollm_commands_total", "kind", "result")
    assert 0 < timed[("start",)] == done[("start", "done")] <= counted[("start",)]
    assert by(s, "dynamollm_reconfiguration_duration_seconds_sum", "kind")[("start",)] > 0

    factor = by(s, "dynamollm_guard_factor", "pool")
    active = by(s, "dynamollm_guard_active", "pool")
    attainment = by(s, "dynamollm_guard_attainment_ratio", "pool")
    assert set(factor) == set(active) == {(p.name,) for p in pools}
    assert active[(b,)] == 1.0 and factor[(a,)] == 1.0 and active[(a,)] == 0.0
    assert math.isclose(attainment[(a,)], 48 / 50)
    assert not set(attainment) - {(a,), (b,)}  # pools without completions have no attainment


@bounded
async def test_observe_mode_counts_reconfigurations_but_times_none(stack: Stack) -> None:
    agents = await stack.start_agents(1)
    ctl = await stack.start_controller([(agent.name, agent.address) for agent in agents], mode="observe")

    async def decided() -> Scrape | Pending:
        s = await scrape(ctl)
        starts = by(s, "dynamollm_reconfigurations_total", "kind").get(("start",), 0.0)
        return s if starts > 0 else Pending("no start counted")

    s = await wait_for("the policy's first starts", decided, 15.0, 0.3)
    starts = by(s, "dynamollm_reconfigurations_total", "kind")[("start",)]
    assert by(s, "dynamollm_commands_total", "kind", "result")[("start", "skipped")] == starts
    assert not any(name.startswith("dynamollm_reconfiguration_duration") for name in s), sorted(s)
