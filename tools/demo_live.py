#!/usr/bin/env python3
"""`make demo-live`: the whole product working on loopback, time-compressed, dynamollm against singlepool.

What it does, per policy (dynamollm, then singlepool pinned to the size the simulator's comparison gave
it): starts three simulated node agents of 8 GPUs (`dynamollm-agent --simulated --time-scale X`), the
controller in apply mode (`--policy P --time-scale X`, first plan from the workload's statistics as the
simulator plans), and the router; waits until the first plan's engines serve; replays the synthetic
conversation hour through the router over HTTP, X times compressed (`dctl load`'s replay), with a live
progress line; reads the GPUs' energy counters from the agents once a second (agent API telemetry) and
the engines they run (inventory); stops every process it started. Before the two runs it asks the
simulator (`dctl simulate --compare dynamollm --nodes 3`) what the same trace costs on the same three
servers, so the table puts the prediction beside each measured figure.

Energy is counted on the simulator's basis: the GPUs of the servers that hold at least one engine (a
server with none would be powered down or lent out), and also for the whole three-node fleet (what a
meter on the three servers would read), where the prediction adds idle power for the servers the
simulated run did not hold. The controller's cycle starts (`control.origin_unix_s`) LEAD_S after it is
launched: the first plan's engines come up meanwhile, and the load starts at the cycle's time 0, so that
the cycle starts warm and its 30-min / 5-min steps fall at the simulator's trace times.

Output (`--out DIR`, default demo-live-out): report.json (dynamollm.livedemo/v1), table.txt, power.png,
each run's load report and daemon logs, and the simulator's comparison under simulated/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from agent.api.client import AgentClient  # noqa: E402
from agent.api.errors import DynamoError  # noqa: E402
from agent.sim.gpu import idle_power_w  # noqa: E402
from agent.sim.node import NodeDir, process_alive  # noqa: E402
from controller.api.client import AdminClient  # noqa: E402
from controller.loadgen import (  # noqa: E402
    Progress,
    ReplayConfig,
    build_report,
    probe,
    replay,
    requests_from_trace,
)
from controller.model.classes import CLASS_NAMES  # noqa: E402
from controller.profiles import default_profile  # noqa: E402
from controller.sim.compare import resolve_trace  # noqa: E402

MODEL, GPU = "llama2-70b", "h100-sxm"
TRACE = "synthetic:conversation"
NODES, GPUS_PER_NODE = 3, 8
# The controller's cycle starts this long after the controller (control.origin_unix_s): the first plan's
# engines load meanwhile, so that the cycle, like the simulator, starts with them serving.
LEAD_S = 20.0
START_TIMEOUT_S = 60.0
LIVE_ENGINE_STATES = (1, 2, 3)  # STARTING, READY, DRAINING: the engine holds its GPUs
SCHEMA = "dynamollm.livedemo/v1"


def log(message: str) -> None:
    print(f"demo-live: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Daemons:
    """The processes of one run, all under `root`; `stop()` ends every one of them and their engines."""

    root: Path
    speedup: float
    procs: list[tuple[str, asyncio.subprocess.Process]] = field(default_factory=list)
    agents: list[tuple[str, str]] = field(default_factory=list)  # (name, address)

    async def spawn(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Start `python ARGS` (stderr to NAME.log) and return the JSON line it prints when listening."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMOLLM_")}
        with open(self.root / f"{name}.log", "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, env={**clean, **(env or {})}, stdout=asyncio.subprocess.PIPE,
                stderr=err, cwd=ROOT,
            )  # fmt: skip
        self.procs.append((name, proc))
        assert proc.stdout is not None
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
            if line:
                event: dict[str, Any] = json.loads(line)
                return event
        tail = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} did not start (exit {proc.returncode}); its log ends:\n{tail}")

    async def start_agents(self) -> None:
        async def one(i: int) -> tuple[str, str]:
            event = await self.spawn(
                f"agent-n{i}",
                ["-m", "agent.app", "--simulated", "--gpus", str(GPUS_PER_NODE), "--time-scale",
                 str(self.speedup), "--listen", "127.0.0.1:0", "--metrics-listen", "",
                 "--runtime-dir", str(self.root / f"n{i}")],
                {"DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0"},
            )  # fmt: skip
            return f"n{i}", f"127.0.0.1:{event['port']}"

        self.agents = list(await asyncio.gather(*(one(i) for i in range(NODES))))

    async def start_controller(self, policy: str, config: str) -> str:
        (self.root / "controller.toml").write_text(config)
        args = ["-m", "controller.app", "--config", str(self.root / "controller.toml"), "--listen",
                "127.0.0.1:0", "--metrics-listen", "", "--store", str(self.root / "controller.db"),
                "--mode", "apply", "--policy", policy, "--time-scale", str(self.speedup)]  # fmt: skip
        for name, address in self.agents:
            args += ["--node", f"{name}={address}"]
        event = await self.spawn("controller", args)
        return f"127.0.0.1:{event['port']}"

    async def start_router(self, controller: str) -> str:
        event = await self.spawn(
            "router",
            ["-m", "controller.router.app", "--listen", "127.0.0.1:0", "--controller", controller,
             "--time-scale", str(self.speedup)],
            {"DYNAMOLLM_ROUTER_REPORT_INTERVAL_S": "0.1"},
        )  # fmt: skip
        return f"http://127.0.0.1:{event['port']}"

    async def stop(self) -> None:
        """Router and controller first (the router drains), then the agents (they stop their engines
        and restore their GPUs), SIGKILL for whatever is left, and every engine process group."""
        for name, proc in reversed(self.procs):
            await _stop(proc, 20.0 if name.startswith("agent") else 10.0)
        for i in range(NODES):
            node = NodeDir(self.root / f"n{i}" / "simnode")
            for gpu in range(GPUS_PER_NODE):
                with contextlib.suppress(Exception):
                    pid = node.read_activity(gpu).pid
                    if pid > 0 and process_alive(pid):
                        os.killpg(pid, signal.SIGKILL)


async def _stop(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout_s)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ------------------------------------------------------------------------------------------ sampling


@dataclass
class NodeSamples:
    """One node's energy counter (all GPUs, J) and whether it held an engine, once a wall second."""

    t_s: list[float] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    held: list[bool] = field(default_factory=list)


class Sampler:
    """Reads every agent once a wall second: its GPUs' energy counters and power (telemetry) and whether
    an engine holds any of its GPUs (inventory)."""

    def __init__(self, agents: Sequence[tuple[str, str]]) -> None:
        self.agents = agents
        self.nodes = {name: NodeSamples() for name, _ in agents}
        self.power_w = 0.0

    async def run(self) -> None:
        await asyncio.gather(*(self._node(name, address) for name, address in self.agents))

    async def _node(self, name: str, address: str) -> None:
        out = self.nodes[name]
        async with AgentClient(address, timeout_s=5.0) as client:
            stream = client.stream_telemetry(period_s=1.0)
            async with contextlib.aclosing(stream):
                async for sample in stream:
                    inventory = await client.inventory()
                    out.t_s.append(sample.ts_unix_ns / 1e9)
                    out.energy_j.append(sum(g.energy_j for g in sample.gpus))
                    out.power_w.append(sum(g.power_w for g in sample.gpus))
                    out.held.append(any(e.state in LIVE_ENGINE_STATES for e in inventory.engines))
                    self.power_w = sum(n.power_w[-1] for n in self.nodes.values() if n.power_w)

    def servers_held(self, start_s: float, end_s: float) -> float:
        """Mean number of nodes holding an engine over the samples between two wall times."""
        counts = Counter[float]()
        for n in self.nodes.values():
            for t_s, held in zip(n.t_s, n.held, strict=True):
                if start_s <= t_s <= end_s:
                    counts[round(t_s)] += held
        return sum(counts.values()) / len(counts) if counts else 0.0

    def energy_j(self, start_s: float, end_s: float) -> tuple[float, float]:
        """(energy of the nodes holding engines, energy of all nodes) between two wall times: the counter
        differences of consecutive samples, a node's interval counted as held when it held an engine at
        either end."""
        held_j = total_j = 0.0
        for n in self.nodes.values():
            for k in range(1, len(n.t_s)):
                if n.t_s[k - 1] < start_s or n.t_s[k] > end_s:
                    continue
                delta_j = n.energy_j[k] - n.energy_j[k - 1]
                total_j += delta_j
                if n.held[k - 1] or n.held[k]:
                    held_j += delta_j
        return held_j, total_j


# ------------------------------------------------------------------------------------------ one run


async def wait_serving(admin: AdminClient, url: str) -> None:
    """Until every instance of the first plan is ACTIVE and the router answers through it."""
    deadline = time.monotonic() + 120.0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(DynamoError):
                pools = await admin.list_pools()
                phases = [i.phase for p in pools.pools for i in p.instances]
                if phases and all(ph == "ACTIVE" for ph in phases):
                    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.post(url + "/v1/completions", json=body) as resp:
                            if resp.status == 200:
                                return
            await asyncio.sleep(0.5)
    raise RuntimeError("the first plan's engines did not come up within 120 s")


async def wait_for_origin(admin: AdminClient) -> None:
    """Sleep until the cycle's time 0: the load's t = 0 falls on it, as the simulator's does."""
    status = await admin.cluster_status()
    late_s = time.time() - status.origin_unix_ns / 1e9
    if late_s > 0:
        log(f"warning: the first plan served {late_s:.1f} s after the cycle's origin; the replay starts late")
    await asyncio.sleep(max(0.0, -late_s))


async def run_policy(
    policy: str, out: Path, speedup: float, config: str, trace: Any, slos: Mapping[str, Any]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    daemons = Daemons(out, speedup)
    try:
        log(f"{policy}: starting 3 simulated agents, the controller (apply) and the router")
        await daemons.start_agents()
        controller = await daemons.start_controller(policy, config)
        url = await daemons.start_router(controller)
        log(f"{policy}: watch it live from another terminal: .venv/bin/dctl top --controller {controller}")
        sampler = Sampler(daemons.agents)
        sampling = asyncio.create_task(sampler.run())
        async with AdminClient(controller, timeout_s=5.0) as admin:
            await wait_serving(admin, url)
            await wait_for_origin(admin)
            log(f"{policy}: engines serving; replaying {TRACE} ({len(trace)} requests) at {speedup:g}x")
            report, wall = await _replay(policy, url, trace, speedup, slos, sampler)
            status = await admin.cluster_status()
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError, DynamoError):
            await sampling
        held_j, total_j = sampler.energy_j(*wall)
        (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
        return {
            "policy": policy,
            "energy_j": held_j,
            "fleet_energy_j": total_j,
            "avg_servers": sampler.servers_held(*wall),
            "load": {k: report[k] for k in ("requests", "ok", "rejected", "refused", "failed", "admitted")},
            "slo_attainment": report["slo_attainment"],
            "ttft_s_p99": report["ttft_s_p99"],
            "tbt_s_p99": report["tbt_s_p99"],
            "reconfigurations_by_kind": _commands(out / "controller.db"),
            "wall_s": wall[1] - wall[0],
            "power_series": _power_series(sampler, wall[0], speedup),
            "controller_cycle_time_s": status.cycle_time_s,
        }
    finally:
        await daemons.stop()


async def _replay(
    policy: str, url: str, trace: Any, speedup: float, slos: Mapping[str, Any], sampler: Sampler
) -> tuple[dict[str, Any], tuple[float, float]]:
    requests = requests_from_trace(trace, speedup)
    last_print = [0.0]

    def progress(p: Progress) -> None:
        if p.elapsed_s - last_print[0] < 2.0:
            return
        last_print[0] = p.elapsed_s
        slo = f"{100.0 * p.slo_met / p.judged:.2f}%" if p.judged else "-"
        log(
            f"{policy}: {p.elapsed_s * speedup / 60.0:5.1f} min of trace  sent {p.sent}  done {p.done}  "
            f"SLO so far {slo}  cluster power {sampler.power_w / 1000.0:.1f} kW"
        )

    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
        info = await probe(s, url, MODEL)
        config = ReplayConfig(
            url=url, model=info.model, speedup=speedup, timeout_s=120.0, max_model_len=info.max_model_len,
            slos=slos,
        )  # fmt: skip
        start_s = time.time()
        result = await replay(requests, config, on_progress=progress, session=s)
        end_s = time.time()
    meta = {"trace": TRACE, "window": {"start_s": 0.0, "duration_s": trace.duration_s}, "seed": 0}
    # the last counters are read up to a second after the last answer
    return build_report(result, config, meta=meta), (start_s, end_s + 1.5)


def _commands(store: Path) -> dict[str, int]:
    """Commands the controller issued from the cycle's time 0 (the load's start), as the simulator counts
    reconfigurations: instance starts, stops (drains) and clock changes."""
    import sqlite3

    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = dict(
            conn.execute(
                "SELECT kind, COUNT(*) FROM commands WHERE cycle_time_s >= 0 GROUP BY kind"
            ).fetchall()
        )
    finally:
        conn.close()
    return {"start": rows.get("start", 0), "stop": rows.get("drain", 0), "clock": rows.get("set_clock", 0)}


def _power_series(sampler: Sampler, start_s: float, speedup: float) -> dict[str, list[float]]:
    """Cluster power (W) against trace time (s), summed over the nodes' samples."""
    t: list[float] = []
    p: list[float] = []
    first = next(iter(sampler.nodes.values()))
    for k, ts in enumerate(first.t_s):
        if ts < start_s:
            continue
        t.append((ts - start_s) * speedup)
        p.append(sum(n.power_w[k] for n in sampler.nodes.values() if k < len(n.power_w)))
    return {"trace_s": t, "power_w": p}


# ------------------------------------------------------------------------------------------ prediction


def predict(out: Path, duration_s: float, rate_scale: float) -> tuple[dict[str, dict[str, Any]], Path]:
    """The simulator's comparison of the same trace on the same three servers (singlepool sized by
    simulation, dynamollm), and the workload statistics both live runs start from."""
    stats = out / "workload.json"
    subprocess.run(
        [sys.executable, "-m", "controller.dctl.main", "simulate", "--trace", TRACE, "--duration",
         str(duration_s), "--rate-scale", str(rate_scale), "--compare", "dynamollm", "--nodes", str(NODES),
         "--out", str(out / "simulated"), "--workload-stats", str(stats), "--no-progress"],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    runs = json.loads((out / "simulated" / "report.json").read_text())
    return {r["policy"]: r for r in runs}, stats


def fleet_energy_j(sim: Mapping[str, Any]) -> float:
    """The simulator's energy plus the idle GPUs of the servers it did not hold, over its duration: the
    prediction for a meter on all three servers."""
    idle_w = idle_power_w(MODEL, GPU)
    unheld_gpu_s = max(0.0, NODES - float(sim["avg_servers"])) * GPUS_PER_NODE * float(sim["duration_s"])
    return float(sim["energy_j"]) + idle_w * unheld_gpu_s


# ------------------------------------------------------------------------------------------ report


def table(live: Mapping[str, dict[str, Any]], sim: Mapping[str, dict[str, Any]], speedup: float) -> str:
    base_live, base_sim = live["singlepool"], sim["singlepool"]
    lines = [
        f"live demo: {TRACE} ({base_live['load']['requests']} requests) replayed {speedup:g}x compressed "
        f"through the router; 3 simulated nodes x 8 {GPU}; {MODEL}",
        f"{'policy':<11}{'energy kWh':>12}{'(sim)':>8}{'energy x':>10}{'(sim)':>8}{'servers':>9}{'(sim)':>7}"
        f"{'fleet x':>9}"
        f"{'(sim)':>8}{'SLO met':>9}{'(sim)':>9}{'TTFT p99':>10}{'(sim)':>8}{'TBT p99':>9}{'(sim)':>8}"
        f"{'reconf':>8}{'(sim)':>7}",
    ]
    for policy in ("singlepool", "dynamollm"):
        r, s = live[policy], sim[policy]
        lines.append(
            f"{policy:<11}{r['energy_j'] / 3.6e6:>12.3f}{s['energy_j'] / 3.6e6:>8.3f}"
            f"{r['energy_j'] / base_live['energy_j']:>10.3f}{s['energy_j'] / base_sim['energy_j']:>8.3f}"
            f"{r['avg_servers']:>9.2f}{s['avg_servers']:>7.2f}"
            f"{r['fleet_energy_j'] / base_live['fleet_energy_j']:>9.3f}"
            f"{fleet_energy_j(s) / fleet_energy_j(base_sim):>8.3f}"
            f"{100 * r['slo_attainment']:>8.2f}%{100 * s['slo_attainment']:>8.2f}%"
            f"{r['ttft_s_p99']:>10.3f}{s['ttft_s_p99']:>8.3f}{r['tbt_s_p99']:>9.4f}{s['tbt_s_p99']:>8.4f}"
            f"{sum(r['reconfigurations_by_kind'].values()):>8}{s['reconfigurations']:>7}"
        )
    lines += [
        "energy: from the agents' GPU energy counters, GPUs of the servers holding an engine (the "
        "simulator's basis; servers: how many on average); fleet x: all 24 GPUs (prediction: the "
        "simulator's energy plus idle power of the servers it did not hold)",
        "SLO met, TTFT/TBT p99 (simulated seconds): measured at the client by dctl load's replay; reconf: "
        "instance starts, stops and clock changes during the replay",
    ]
    return "\n".join(lines)


def plot(live: Mapping[str, dict[str, Any]], sim: Mapping[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for policy, color in (("singlepool", "tab:gray"), ("dynamollm", "tab:green")):
        series = live[policy]["power_series"]
        ax.plot([t / 60 for t in series["trace_s"]], [p / 1000 for p in series["power_w"]], color=color,
                label=f"{policy} live (agents)")  # fmt: skip
        ts = sim[policy]["timeseries"]
        minutes = [(k + 0.5) * ts["bin_s"] / 60 for k in range(len(ts["power_w"]))]
        ax.plot(minutes, [p / 1000 for p in ts["power_w"]], color=color, linestyle="--",
                label=f"{policy} simulated")  # fmt: skip
    ax.set_xlabel("trace time (min)")
    ax.set_ylabel("GPU power, 3 nodes (kW)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log("asking the simulator what the same trace costs (dctl simulate --compare dynamollm)")
    sim, stats = predict(out, args.duration, args.rate_scale)
    singlepool_instances = int(sum(p["instances"][0]["count"] for p in sim["singlepool"]["plan"]["pools"]))
    # a synthetic trace: no folder is read
    trace = resolve_trace(TRACE, trace_dir=out, duration_s=args.duration, rate_scale=args.rate_scale)
    profile = default_profile(MODEL, GPU)
    slos = {name: profile.slo(name) for name in CLASS_NAMES}
    first_plan = {
        "dynamollm": f'initial_workload = "{stats.resolve()}"',
        "singlepool": f"instances = {singlepool_instances}",
    }
    live = {}
    for policy in ("dynamollm", "singlepool"):
        config = f"[control]\n{first_plan[policy]}\norigin_unix_s = {time.time() + LEAD_S}\n"
        live[policy] = await run_policy(policy, out / policy, args.speedup, config, trace, slos)
    text = table(live, sim, args.speedup)
    (out / "table.txt").write_text(text + "\n")
    keys = ("energy_j", "slo_attainment", "ttft_s_p99", "tbt_s_p99", "reconfigurations_by_kind",
            "avg_servers", "duration_s")  # fmt: skip
    predicted = {p: {**{k: sim[p][k] for k in keys}, "fleet_energy_j": fleet_energy_j(sim[p])} for p in live}
    report = {"schema": SCHEMA, "trace": TRACE, "speedup": args.speedup, "live": live, "simulated": predicted}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(live, sim, out / "power.png")
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--out", default="demo-live-out", help="output folder (default demo-live-out)")
    p.add_argument(
        "--speedup",
        type=float,
        default=None,
        help="time compression (default: 12, the hour in 5 minutes per policy, with 6 cores or more; "
        "2 x the cores below that)",
    )
    p.add_argument(
        "--duration", type=float, default=3600.0, help="trace seconds to replay (default 3600: the hour)"
    )
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate (default 1)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.rate_scale) and 0.05 <= args.rate_scale <= 2.0):
        p.error(f"--rate-scale: {args.rate_scale} not allowed; allowed: 0.05..2")
    if not (math.isfinite(args.duration) and 60.0 <= args.duration <= 3600.0):
        p.error(f"--duration: {args.duration} not allowed; allowed: 60..3600 seconds")
    if args.speedup is None:
        cores = len(os.sched_getaffinity(0))
        args.speedup = min(12.0, 2.0 * cores)
        if args.speedup < 12.0:
            log(
                f"{cores} cores: replaying at {args.speedup:g}x, not 12x (a client measures wall time x the "
                "speedup, so at 12x the scheduling delays of ~15 processes on this many cores would show "
                "as SLO misses; --speedup 12 to see it)"
            )
    if not (math.isfinite(args.speedup) and 1.0 <= args.speedup <= 60.0):
        p.error(f"--speedup: {args.speedup} not allowed; allowed: 1..60")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
