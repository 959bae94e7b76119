"""Acceptance of the controller daemon: ONE trace through the simulator (`ControlCycle` driving a
`SimFleet`) and through `dynamollm-controller` in apply mode driving three real `dynamollm-agent
--simulated` processes (8 GPUs each) on loopback, with the trace's arrivals fed to the daemon over
`ReportTraffic`, gives the same sequence of plan decisions.

What is compared: every cluster- and pool-level decision (its level, its time on the cycle's clock, and
per pool the instance mix chosen: TP degree, clock and count). Both runs use the same policy settings
(periods shortened to cluster 600 s / pool 120 s so a 12-minute trace holds several steps; the same
reconfiguration costs), the same initial plan, a perfect output-length predictor (routed class = true
class), and no escalation (the daemon has no router yet to carry out queue moves). The daemon's cycle
runs 24x faster than the wall clock so the trace replays in 30 s; every tick runs at its grid time with
exactly the arrivals reported up to it, so the inputs of a plan step are those of the simulator's.

Timing tolerances, stated: decisions may differ in time by at most one instance period (5 s of cycle
time). Not compared: instance-level clock decisions. They follow each instance's measured load, which
the simulator knows per request and the daemon learns from the router (a later component); without it
the daemon's instances report no per-instance load, so their clocks follow the pool's rate alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.sim.node import NodeDir
from controller.api.client import AdminClient
from controller.api.v1 import admin_pb2
from controller.app import even_workload
from controller.model.classes import REQUEST_CLASSES, ClassBins
from controller.model.decisions import StepRecord
from controller.model.state import Periods
from controller.policy.registry import make_policy
from controller.profiles import default_profile
from controller.sim.cluster import SimConfig, simulate_dynamic
from controller.sim.policies import sim_settings
from controller.sim.report import within_targets
from controller.sim.traces import synthetic_trace

ROOT = Path(__file__).resolve().parents[2]
PERIODS = Periods(cluster_s=600.0, pool_s=120.0, instance_s=5.0)
TRACE_S = 720.0
RATE_RPS = 3.0
TIME_SCALE = 24.0
INITIAL_RATE_RPS = 2.0
PLAN_LEVELS = ("cluster", "pool", "guard")
LEAD_S = 20.0  # reports go out this many cycle seconds ahead of their time


def _mix(pools: list[dict[str, Any]]) -> tuple[tuple[str, tuple[tuple[int, int, int], ...]], ...]:
    return tuple(
        sorted(
            (
                p["pool"],
                tuple(sorted((i["tp"], i["clock_mhz"], i["count"]) for i in p["chosen"]["instances"])),
            )
            for p in pools
        )
    )


@dataclass(frozen=True, slots=True)
class Traffic:
    """What a router would have reported of the simulated run: per admitted request its arrival (cycle
    s), class and prompt; per finished request (or one refused after admission) when, and whether it met
    its class's SLO."""

    arrival_s: npt.NDArray[np.float64]
    class_index: npt.NDArray[np.int64]
    input_tokens: npt.NDArray[np.int64]
    instance_id: npt.NDArray[np.int64]  # where the simulator's router sent it (-1: nowhere)
    finished_s: npt.NDArray[np.float64]
    met: npt.NDArray[np.bool_]


def simulate(settings: Any) -> tuple[list[tuple[str, float, Any]], Traffic]:
    profile = default_profile("llama2-70b", "h100-sxm")
    policy = make_policy("dynamollm", settings)
    plan = policy.initial_plan(even_workload(INITIAL_RATE_RPS), profile)
    trace = synthetic_trace("conversation", TRACE_S, seed=3, rate_rps=RATE_RPS)
    config = SimConfig(total_gpus=24, escalation=False, predictor_accuracy=1.0, seed=3)
    result = simulate_dynamic(trace, policy, profile, plan, config=config)
    decisions = [
        (d.level, d.t_s, _mix([p.to_json() for p in d.step.pools]))
        for d in result.decisions
        if isinstance(d, StepRecord) and d.level in PLAN_LEVELS
    ]
    admitted = result.admitted_mask
    index = ClassBins().class_indices(trace.input_tokens, trace.output_tokens).astype(np.int64)
    ttft_target = np.array([profile.slo(c.name).ttft_s for c in REQUEST_CLASSES])[index]
    tbt_target = np.array([profile.slo(c.name).tbt_s for c in REQUEST_CLASSES])[index]
    met = within_targets(result.ttft_s, result.tbt_mean_s, trace.output_tokens, ttft_target, tbt_target)
    # A completed request's last token: its first token, then (output - 1) gaps of its mean TBT; one
    # refused after admission counts as a miss at its arrival.
    last_token_s = result.ttft_s + np.nan_to_num(result.tbt_mean_s) * np.maximum(trace.output_tokens - 1, 0)
    finished = np.where(result.completed, trace.arrival_s + last_token_s, trace.arrival_s)
    traffic = Traffic(
        trace.arrival_s[admitted],
        index[admitted],
        trace.input_tokens[admitted].astype(np.int64),
        result.instance_index[admitted].astype(np.int64),
        finished[admitted],
        met[admitted],
    )
    return decisions, traffic


def _policy_toml(settings: Any) -> str:
    c = settings.costs
    lines = [
        "[policy.periods]",
        f"cluster_s = {PERIODS.cluster_s}",
        f"pool_s = {PERIODS.pool_s}",
        f"instance_s = {PERIODS.instance_s}",
        "[policy.costs]",
    ]
    for name in ("warm_start_s", "cold_start_s", "restart_reshard_s", "fast_reshard_s", "clock_change_s",
                 "idle_power_w_per_gpu", "stagger_s"):  # fmt: skip
        lines.append(f"{name} = {float(getattr(c, name))}")
    lines += [f"fast_reshard = {str(c.fast_reshard).lower()}", f"cold_starts = {str(c.cold_starts).lower()}"]
    return "\n".join(lines) + "\n"


async def _start_agent(tmp: Path, i: int) -> tuple[asyncio.subprocess.Process, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0"}
    with open(tmp / f"agent{i}.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.app", "--simulated", "--gpus", "8", "--listen", "127.0.0.1:0",
            "--metrics-listen", "", "--runtime-dir", str(tmp / f"run{i}"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip
    assert proc.stdout is not None
    event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    return proc, int(event["port"])


async def _feed(client: AdminClient, status: admin_pb2.ClusterStatusResponse, traffic: Traffic) -> None:
    """Report the run's arrivals and completions on the daemon's clock, each some cycle seconds before it
    is due (the daemon holds a report until the tick that covers it)."""
    origin_ns, scale = status.origin_unix_ns, status.time_scale_factor
    names = [c.name for c in REQUEST_CLASSES]

    def unix_ns(t_s: float) -> int:
        return origin_ns + round(t_s / scale * 1e9)

    order = np.argsort(traffic.finished_s, kind="stable")
    finished_sorted = traffic.finished_s[order]
    sent_a = sent_c = 0
    while sent_a < len(traffic.arrival_s) or sent_c < len(order):
        horizon_s = (time.time() - origin_ns / 1e9) * scale + LEAD_S
        upto_a = int(np.searchsorted(traffic.arrival_s, horizon_s, side="right"))
        upto_c = int(np.searchsorted(finished_sorted, horizon_s, side="right"))
        arrivals = [
            admin_pb2.TrafficArrival(
                arrival_unix_ns=unix_ns(float(traffic.arrival_s[i])),
                class_name=names[int(traffic.class_index[i])],
                input_tokens=int(traffic.input_tokens[i]),
                instance_id=int(traffic.instance_id[i]) if traffic.instance_id[i] >= 0 else None,
            )
            for i in range(sent_a, upto_a)
        ]
        completions = [
            admin_pb2.TrafficCompletion(
                finished_unix_ns=unix_ns(float(traffic.finished_s[i])),
                routed_class=names[int(traffic.class_index[i])],
                true_class=names[int(traffic.class_index[i])],
                slo_met=bool(traffic.met[i]),
            )
            for i in order[sent_c:upto_c]
        ]
        if arrivals or completions:
            await client.report_traffic(arrivals, completions)
        sent_a, sent_c = upto_a, upto_c
        await asyncio.sleep(0.1)


async def daemon_decisions(tmp: Path, settings: Any, traffic: Traffic) -> list[tuple[str, float, Any]]:
    agents = [await _start_agent(tmp, i) for i in range(3)]
    config = tmp / "controller.toml"
    config.write_text(_policy_toml(settings))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DYNAMOLLM_CONTROLLER_CONTROL_TIME_SCALE": str(TIME_SCALE),
        "DYNAMOLLM_CONTROLLER_CONTROL_INITIAL_RATE_RPS": str(INITIAL_RATE_RPS),
        "DYNAMOLLM_CONTROLLER_ENGINE_OPTIONS": "startup-s=0",
    }
    args = [sys.executable, "-m", "controller.app", "--config", str(config), "--listen", "127.0.0.1:0",
            "--metrics-listen", "", "--store", str(tmp / "controller.db"), "--mode", "apply"]  # fmt: skip
    for i, (_, port) in enumerate(agents):
        args += ["--node", f"n{i}=127.0.0.1:{port}"]
    with open(tmp / "controller.log", "wb") as err:
        ctl = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT
        )
    try:
        assert ctl.stdout is not None
        event = json.loads(await asyncio.wait_for(ctl.stdout.readline(), 60))
        async with AdminClient(f"127.0.0.1:{event['port']}") as client:
            status = await client.cluster_status()
            await asyncio.wait_for(_feed(client, status, traffic), TRACE_S / TIME_SCALE + 60)
            while (await client.cluster_status()).cycle_time_s < TRACE_S + 1:
                await asyncio.sleep(0.2)
            rows: list[admin_pb2.DecisionRecord] = []
            token = ""
            while True:
                page = await client.list_decisions(page_size=1000, page_token=token)
                rows += page.decisions
                token = page.next_page_token
                if not token:
                    break
            nodes = await client.list_nodes()
        ready = sum(1 for n in nodes.nodes for e in n.engines if e.state == "READY")
        assert ready > 0, "the daemon drove no engine to READY"
        out = []
        for r in rows:
            if r.level in PLAN_LEVELS:
                d = json.loads(r.detail_json)
                if d["t_s"] <= TRACE_S:
                    out.append((r.level, float(d["t_s"]), _mix(d["pools"])))
        return out
    finally:
        for proc in [ctl, *(a for a, _ in agents)]:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [ctl, *(a for a, _ in agents)]:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
        for i in range(3):
            node = NodeDir(tmp / f"run{i}" / "simnode")
            for gpu in range(8):
                activity = node.read_activity(gpu)
                if activity is not None and activity.pid > 0:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(activity.pid, signal.SIGKILL)


async def test_daemon_and_simulator_decide_the_same_plans(tmp_path: Path) -> None:
    base = sim_settings("llama2-70b", "h100-sxm", periods=PERIODS)
    # A modelled start of 120 s (5 s of wall time at 24x) that every engine process beats on a loaded
    # 2-core machine (they start at once: startup-s 0), so both runs take instances as serving at the same
    # modelled time.
    settings = replace(base, costs=replace(base.costs, warm_start_s=120.0))
    expected, traffic = simulate(settings)
    assert len(expected) >= 5  # the trace holds several pool steps and a cluster step
    got = await daemon_decisions(tmp_path, settings, traffic)
    assert [(level, mix) for level, _, mix in got] == [(level, mix) for level, _, mix in expected]
    for (_, t_got, _), (_, t_want, _) in zip(got, expected, strict=True):
        assert abs(t_got - t_want) <= PERIODS.instance_s + 1e-6
