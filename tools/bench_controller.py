#!/usr/bin/env python3
"""The controller's three figures, measured end to end over real gRPC on loopback.

    PYTHONPATH=. .venv/bin/python tools/bench_controller.py [--only clock|ingest|store] [--nodes 16]
        [--trials 30] [--reconcile-period-s 0.5 0.1] [--poll-ms 20] [--fake-nodes 256] [--ingest-s 30]
        [--commits 200] [--sim-hours 24] [--json PATH]

1. Clock change decided -> applied on every node (target p99 < 1 s, 16 nodes). `--nodes` simulated
   agents (8 GPUs each) run as real processes (`python -m agent.app --simulated --gpus 8`, no engines);
   this process runs a `GrpcFleet` over them in apply mode with a `DesiredState` and a minimal listener.
   A trial sets the clock of every GPU of every node to a new supported clock (1200, 1410, 990 MHz in
   turn), notes t0 and wakes the fleet, as `ControlLoop` does after committing a step; separate
   `AgentClient`s read every agent's inventory every `--poll-ms` (20 ms) until its 8 GPUs show the
   locked clock. A node's latency is the arrival of the first inventory that shows it (an upper bound,
   to one poll); the fleet's latency is its slowest node. Also shown: when the fleet got the agent's
   ApplyGpuConfig reply (the agent has applied then; no polling error), where a node's time goes (the
   link's GetInventory and ApplyGpuConfig calls are timed by wrapping its client's methods: t0 -> the
   reconciler's pass starts its read, the read, -> the apply call, the call), and the same change
   without the wake: only the reconciler's periodic pass (`FleetSettings.reconcile_period_s`) picks it
   up, which is what a lost wake would cost. Run per `--reconcile-period-s` (default 0.5, the
   FleetSettings default, and 0.1), `--trials` trials each. The polling loads the agents (16 x 50
   GetInventory/s): on a small host it delays what it measures; `--poll-ms 0` polls nothing during a
   trial, takes the reply as the time and reads every inventory once afterwards to confirm.
2. Telemetry ingest CPU for 2048 GPUs at 1 Hz (target < 50% of one core). A second process of this same
   script (`--serve-fake-nodes`, hidden) serves NodeTelemetry on `--fake-nodes` ports (one grpc.aio
   server, one port per fake node): GetInventory with 8 GPUs and 2 engines, StreamTelemetry a sample
   per period with 8 GPUs (power, a rising energy counter, clocks, ...) and 2 engines' metrics. This
   process runs a `GrpcFleet` over them in observe mode (`set_apply(False)`: telemetry, lease keepers,
   silence watchers, idle reconcile loops), its listener doing what `ControlLoop.energy` does per GPU
   sample (a dict sum and a Prometheus counter). After every link is READY and a warm-up, this process's
   CPU time (getrusage: every thread, gRPC's included) over `--ingest-s` seconds / wall time = % of one
   core; also the samples received per second and the event loop's lateness (a 50 ms sleeper).
3. Store write per decision. A real `ControlCycle` (dynamollm policy, llama2-70b on h100-sxm, built as
   `controller.app.new_cycle` does, 128 GPUs / 16 nodes) is ticked through a simulated day (one tick per
   5 s, synthetic diurnal Poisson arrivals, completions, and instances taken as ready / idle on the
   modelled times as in observe mode), so its history and caches are as a day leaves them. Then,
   `--commits` times, what `ControlLoop._commit` does for one step: pickle (cycle, DesiredState) and
   `Store.commit_step` with that snapshot + 1 decision (the last pool-level step record) + 2 commands, on a
   temporary SQLite file (`--store-dir`, default the system temp dir; the controller's store is on disk).
   p50/p99 of the commit, of the pickle alone and of both; the snapshot's size.

Progress goes to stderr; the figures to stdout as a table (and with --json PATH, to a file). Every
process started is in its own process group and is stopped (SIGTERM, then SIGKILL) before exit.
A benchmark, not a test: it prints figures and exits 0 (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import os
import pickle
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchkit import CHILDREN, cpu_s, print_table, quantile, self_cpu_s, spawn, stop_all  # noqa: E402

from agent.api.client import AgentClient  # noqa: E402
from agent.api.errors import DynamoError  # noqa: E402

GPUS = 8
ENGINES = 2
TRIAL_CLOCKS_MHZ = (1200, 1410, 990)
AGENT_START_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 90.0
TRIAL_TIMEOUT_S = 10.0
INGEST_WARMUP_S = 5.0
TICK_S = 5.0
STORE_WARMUP_COMMITS = 10

# Every child process, so that main() can stop whatever a section left behind (interrupt included).


def _progress(message: str) -> None:
    print(f"[bench_controller {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stats_ms(values_s: Sequence[float]) -> dict[str, float]:
    if not values_s:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    return {
        "n": len(values_s),
        "p50_ms": round(quantile(values_s, 0.5) * 1e3, 3),
        "p99_ms": round(quantile(values_s, 0.99) * 1e3, 3),
        "max_ms": round(max(values_s) * 1e3, 3),
    }


def _fmt_ms(s: dict[str, float]) -> str:
    return f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms (n={s['n']})"


# ------------------------------------------------------------------------------------ processes


async def _first_json_line(proc: subprocess.Popen[bytes], out: Path, err: Path, timeout_s: float) -> Any:
    """The child's first stdout line, parsed (it names the bound port or ports)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = out.read_text() if out.exists() else ""
        if "\n" in text:
            return json.loads(text.split("\n", 1)[0])
        if proc.poll() is not None:
            tail = err.read_text()[-2000:] if err.exists() else ""
            raise SystemExit(f"child {proc.args!r} exited with {proc.returncode} before listening:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"child {proc.args!r} printed no listening line within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------ the listener


class BenchListener:
    """A `FleetListener` for a fleet without loops: generations from a counter (above what agents hold,
    as `Store.next_generations` hands them out); `energy` does what `ControlLoop.energy` does when
    `metrics` is given (a dict sum and a Prometheus counter); the rest only counts."""

    def __init__(self, metrics: Any = None) -> None:
        self._generation = 0
        self._metrics = metrics
        self.energy_j: dict[tuple[int, str], float] = {}
        self.energy_calls = 0
        self.node_changes = 0
        self.results = 0

    def instance_ready(self, instance_id: int) -> None:
        pass

    def instance_idle(self, node: int, engine_id: str, instance_id: int) -> None:
        pass

    def node_state(self, node: int, available: bool) -> None:
        self.node_changes += 1

    def command_result(self, command_id: int, status: str, result: str) -> None:
        self.results += 1

    def command_attempt(self, command_id: int, result: str) -> None:
        pass

    def next_generation(self, at_least: int) -> int:
        self._generation = max(self._generation, at_least) + 1
        return self._generation

    def energy(self, node: int, pool: str, energy_j: float) -> None:
        self.energy_calls += 1
        if self._metrics is not None:
            key = (node, pool)
            self.energy_j[key] = self.energy_j.get(key, 0.0) + energy_j
            self._metrics.pool_energy.labels(pool or "idle").inc(energy_j)


async def _wait_ready(fleet: Any, timeout_s: float) -> float:
    """Seconds until every link of `fleet` is READY."""
    t0 = time.perf_counter()
    while not all(link.available for link in fleet.links):
        if time.perf_counter() - t0 > timeout_s:
            down = [link.config.name for link in fleet.links if not link.available]
            errors = {link.config.name: link.last_error for link in fleet.links if link.last_error}
            raise SystemExit(f"nodes not READY after {timeout_s:.0f} s: {down[:10]} errors {errors}")
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ 1. clock change


# Where a node's time goes, from t0 to the ApplyGpuConfig reply: until the reconciler's pass starts its
# GetInventory, that read, from its reply to the ApplyGpuConfig call (the comparison, task start), the call.
STAGES = ("to_pass", "get_inventory", "to_apply", "apply_gpu_config")


@dataclass
class ClockRun:
    reconcile_period_s: float
    wake: bool
    node_s: list[float] = field(default_factory=list)
    fleet_s: list[float] = field(default_factory=list)
    reply_node_s: list[float] = field(default_factory=list)
    reply_fleet_s: list[float] = field(default_factory=list)
    stages_s: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    timeouts: int = 0

    def figures(self) -> dict[str, Any]:
        return {
            "reconcile_period_s": self.reconcile_period_s,
            "wake": self.wake,
            "applied_per_node": _stats_ms(self.node_s),
            "applied_whole_fleet": _stats_ms(self.fleet_s),
            "reply_per_node": _stats_ms(self.reply_node_s),
            "reply_whole_fleet": _stats_ms(self.reply_fleet_s),
            "per_node_stages": {s: _stats_ms(v) for s, v in self.stages_s.items()},
            "timeouts": self.timeouts,
        }


@dataclass(frozen=True, slots=True)
class _Call:
    rpc: str  # "GetInventory" or "ApplyGpuConfig"
    start: float
    end: float
    clocks: frozenset[int] = frozenset()
    gpus: int = 0


async def _start_agents(work: Path, count: int) -> list[tuple[subprocess.Popen[bytes], int]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(
        {
            "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0",
            "DYNAMOLLM_AGENT_LOG_LEVEL": "warning",
        }
    )
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    for i in range(count):
        run_dir = work / f"agent{i:02d}"
        run_dir.mkdir(parents=True)
        out, err = work / f"agent{i:02d}.out", work / f"agent{i:02d}.err"
        args = [
            sys.executable,
            "-m",
            "agent.app",
            "--simulated",
            "--gpus",
            str(GPUS),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--runtime-dir",
            str(run_dir),
        ]
        started.append((spawn(args, env=env, out=out, err=err), out, err))
    lines = await asyncio.gather(
        *(_first_json_line(p, out, err, AGENT_START_TIMEOUT_S) for p, out, err in started)
    )
    return [(p, int(line["port"])) for (p, _, _), line in zip(started, lines, strict=True)]


def _instrument(link: Any, calls: list[_Call]) -> None:
    """Log the link's GetInventory and ApplyGpuConfig calls (wraps the client's methods on the instance;
    the controller's code is not touched)."""
    inventory: Callable[..., Awaitable[Any]] = link.client.inventory
    apply: Callable[..., Awaitable[Any]] = link.client.apply_gpu_config

    async def timed_inventory(**kwargs: Any) -> Any:
        start = time.perf_counter()
        reply = await inventory(**kwargs)
        calls.append(_Call("GetInventory", start, time.perf_counter()))
        return reply

    async def timed_apply(generation: int, gpus: Sequence[Any], **kwargs: Any) -> Any:
        start = time.perf_counter()
        reply = await apply(generation, gpus, **kwargs)
        clocks = frozenset(g.max_clock_mhz for g in gpus)
        calls.append(_Call("ApplyGpuConfig", start, time.perf_counter(), clocks, len(gpus)))
        return reply

    link.client.inventory = timed_inventory
    link.client.apply_gpu_config = timed_apply


def _applied_call(calls: Sequence[_Call], target: int) -> _Call | None:
    return next(
        (c for c in calls if c.rpc == "ApplyGpuConfig" and c.clocks == {target} and c.gpus == GPUS), None
    )


def _locked_at(inventory: Any, target: int) -> bool:
    locks = [g.sm_clock_lock.max_clock_mhz for g in inventory.gpus if g.HasField("sm_clock_lock")]
    return len(locks) == GPUS and all(c == target for c in locks)


async def _observe_until_applied(
    observers: Sequence[AgentClient], target: int, t0: float, poll_s: float
) -> dict[int, float]:
    """Per node index, seconds from t0 until an inventory showing every GPU locked at `target` arrived."""
    done: dict[int, float] = {}

    async def check(i: int) -> None:
        try:
            inventory = await observers[i].inventory(timeout_s=2.0)
        except DynamoError:
            return
        arrived = time.perf_counter()
        if _locked_at(inventory, target):
            done[i] = arrived - t0

    next_poll = t0
    while len(done) < len(observers) and time.perf_counter() - t0 < TRIAL_TIMEOUT_S:
        await asyncio.gather(*(check(i) for i in range(len(observers)) if i not in done))
        next_poll += poll_s
        await asyncio.sleep(max(0.0, next_poll - time.perf_counter()))
    return done


async def _trial(
    run: ClockRun,
    fleet: Any,
    calls: Sequence[list[_Call]],
    observers: Sequence[AgentClient],
    target: int,
    poll_s: float,
) -> bool:
    """One clock change on every node; False when a node did not apply it within TRIAL_TIMEOUT_S."""
    n = len(observers)
    for log in calls:
        log.clear()
    t0 = time.perf_counter()
    if run.wake:
        fleet.wake()
    if poll_s > 0:
        done = await _observe_until_applied(observers, target, t0, poll_s)
    # the fleet may get its reply after an observer saw the new clocks: wait for the replies too
    while time.perf_counter() - t0 < TRIAL_TIMEOUT_S and not all(_applied_call(c, target) for c in calls):
        await asyncio.sleep(0.002)
    applied = [_applied_call(c, target) for c in calls]
    if poll_s <= 0:  # no polling during the trial: the reply is the time; one read afterwards confirms it
        inventories = await asyncio.gather(*(o.inventory() for o in observers))
        done = {
            i: a.end - t0
            for i, (a, inv) in enumerate(zip(applied, inventories, strict=True))
            if a is not None and _locked_at(inv, target)
        }
    per_node = [done.get(i, TRIAL_TIMEOUT_S) for i in range(n)]
    run.node_s += per_node
    run.fleet_s.append(max(per_node))
    reply_s = [TRIAL_TIMEOUT_S if a is None else a.end - t0 for a in applied]
    run.reply_node_s += reply_s
    run.reply_fleet_s.append(max(reply_s))
    for log, a in zip(calls, applied, strict=True):
        if a is None:
            continue
        reads = [c for c in log if c.rpc == "GetInventory" and t0 <= c.start and c.end <= a.start]
        if reads:
            read = reads[-1]
            run.stages_s["to_pass"].append(read.start - t0)
            run.stages_s["get_inventory"].append(read.end - read.start)
            run.stages_s["to_apply"].append(a.start - read.end)
        run.stages_s["apply_gpu_config"].append(a.end - a.start)
    return len(done) == n


async def _clock_runs(
    ports: Sequence[int], period_s: float, trials: int, poll_s: float, rng: random.Random
) -> list[ClockRun]:
    from controller.fleet.desired import DesiredState
    from controller.fleet.grpc_fleet import FleetSettings, GrpcFleet, NodeConfig

    nodes = [NodeConfig(f"sim{i:02d}", f"127.0.0.1:{port}") for i, port in enumerate(ports)]
    desired = DesiredState(len(nodes), drain_timeout_s=0.0)
    listener = BenchListener()
    settings = FleetSettings(model="llama2-70b", reconcile_period_s=period_s)
    fleet = GrpcFleet(nodes, settings, lambda: desired, listener)
    calls: list[list[_Call]] = [[] for _ in nodes]
    for link in fleet.links:
        _instrument(link, calls[link.index])
    observers = [AgentClient(n.address, timeout_s=5.0) for n in nodes]
    runs = [ClockRun(period_s, True), ClockRun(period_s, False)]
    try:
        fleet.set_apply(True)
        fleet.start()
        ready_s = await _wait_ready(fleet, READY_TIMEOUT_S)
        _progress(f"  fleet of {len(nodes)} nodes READY in {ready_s:.2f} s (reconcile_period_s={period_s})")
        supported = list((await observers[0].inventory()).gpus[0].supported_sm_clocks_mhz)
        clocks = [
            c if c in supported else supported[len(supported) // 2 + k]
            for k, c in enumerate(TRIAL_CLOCKS_MHZ)
        ]
        k = 0
        for run in runs:
            for trial in range(trials):
                target = clocks[k % len(clocks)]
                k += 1
                # a random phase against the reconcile loops' timers
                await asyncio.sleep(rng.uniform(0.05, 0.05 + period_s))
                for node in desired.nodes:
                    for gpu in range(GPUS):
                        node.clocks_mhz[gpu] = target
                if not await _trial(run, fleet, calls, observers, target, poll_s):
                    run.timeouts += 1
                    _progress(f"  trial {trial}: some node(s) did not apply {target} MHz in time")
            mode = "with wake" if run.wake else "periodic pass only"
            _progress(
                f"  period {period_s} s, {mode}: whole fleet {_fmt_ms(_stats_ms(run.fleet_s))}, "
                f"{run.timeouts} timeouts"
            )
        errors = {link.config.name: link.last_error for link in fleet.links if link.last_error}
        if errors:
            _progress(f"  link errors seen: {errors}")
    finally:
        await fleet.close()
        for c in observers:
            await c.close()
    return runs


async def bench_clock(
    work: Path, nodes: int, trials: int, periods: Sequence[float], poll_s: float
) -> dict[str, Any]:
    _progress(f"clock: starting {nodes} simulated agents ({GPUS} GPUs each) as processes")
    t0 = time.perf_counter()
    agents: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        agents = await _start_agents(work, nodes)
        _progress(f"clock: {nodes} agents listening after {time.perf_counter() - t0:.1f} s")
        rng = random.Random(4)
        runs: list[ClockRun] = []
        for period_s in periods:
            runs += await _clock_runs([port for _, port in agents], period_s, trials, poll_s, rng)
    finally:
        await asyncio.to_thread(stop_all, [p for p, _ in agents] or list(CHILDREN))
    return {
        "nodes": nodes,
        "gpus_per_node": GPUS,
        "trials": trials,
        "poll_ms": poll_s * 1e3,
        "runs": [r.figures() for r in runs],
    }


# ------------------------------------------------------------------------------------ 2. ingest


def _fake_inventory(node: int) -> Any:
    from agent.api.v1 import common_pb2, telemetry_pb2

    clocks = list(range(810, 1981, 15))
    gpus = [
        common_pb2.GpuInfo(
            gpu_index=g,
            uuid=f"GPU-fake-{node:04d}-{g}",
            name="NVIDIA H100 80GB HBM3",
            pci_bus_id=f"00000000:{g + 0x10:02X}:00.0",
            supported_sm_clocks_mhz=clocks,
            min_power_limit_w=200.0,
            max_power_limit_w=700.0,
            default_power_limit_w=700.0,
            power_limit_w=700.0,
            mem_total_bytes=80 << 30,
            sm_clock_mhz=1980,
            sm_clock_lock_readable=True,
        )
        for g in range(GPUS)
    ]
    per = GPUS // ENGINES
    engines = [
        common_pb2.EngineInfo(
            engine_id=f"i{node * ENGINES + e}",
            model="llama2-70b",
            kind=common_pb2.ENGINE_KIND_SIMULATED,
            gpu_indices=list(range(e * per, (e + 1) * per)),
            tp_degree=per,
            state=common_pb2.ENGINE_STATE_READY,
            http_port=20000 + e,
            generation=1,
        )
        for e in range(ENGINES)
    ]
    return telemetry_pb2.GetInventoryResponse(
        node_id=f"fake{node:04d}",
        hostname=f"fake{node:04d}",
        agent_version="bench",
        gpu_backend=common_pb2.GPU_BACKEND_KIND_SIMULATED,
        gpus=gpus,
        engines=engines,
        lease=common_pb2.LeaseState(),
    )


async def _serve_fake_nodes(count: int) -> int:
    """Hidden mode: NodeTelemetry for `count` fake nodes, one port each, until SIGTERM."""
    import grpc

    from agent.api.v1 import common_pb2, telemetry_pb2, telemetry_pb2_grpc

    streams = 0
    inventory = _fake_inventory(0)

    class FakeNode(telemetry_pb2_grpc.NodeTelemetryServicer):
        async def GetInventory(self, request: Any, context: Any) -> Any:
            reply = telemetry_pb2.GetInventoryResponse()
            reply.CopyFrom(inventory)
            reply.ts_unix_ns = time.time_ns()
            return reply

        async def StreamTelemetry(self, request: Any, context: Any) -> Any:
            nonlocal streams
            node = streams
            streams += 1
            rng = random.Random(node)
            period_s = request.period_s or 1.0
            energy = [0.0] * GPUS
            tokens = [0] * ENGINES
            finished = [0] * ENGINES
            loop = asyncio.get_running_loop()
            next_s = loop.time()
            while True:
                gpus = []
                for g in range(GPUS):
                    power = rng.uniform(250.0, 650.0)
                    energy[g] += power * period_s
                    gpus.append(
                        common_pb2.GpuSample(
                            gpu_index=g,
                            power_w=power,
                            energy_j=energy[g],
                            sm_clock_mhz=1410,
                            mem_clock_mhz=2619,
                            util_gpu_ratio=rng.random(),
                            util_mem_ratio=rng.random(),
                            mem_used_bytes=70 << 30,
                            temperature_c=rng.uniform(40.0, 75.0),
                            enforced_power_limit_w=700.0,
                            target_sm_clock_lock=common_pb2.SmClockRange(
                                min_clock_mhz=1410, max_clock_mhz=1410
                            ),
                            effective_sm_clock_lock=common_pb2.SmClockRange(
                                min_clock_mhz=1410, max_clock_mhz=1410
                            ),
                        )
                    )
                engines = []
                for e in range(ENGINES):
                    rate = rng.uniform(500.0, 3000.0)
                    tokens[e] += int(rate * period_s)
                    finished[e] += rng.randrange(0, 20)
                    engines.append(
                        common_pb2.EngineMetrics(
                            engine_id=f"i{node * ENGINES + e}",
                            state=common_pb2.ENGINE_STATE_READY,
                            running_requests_count=rng.randrange(0, 64),
                            waiting_requests_count=rng.randrange(0, 8),
                            kv_cache_usage_ratio=rng.random(),
                            prompt_tokens=tokens[e] * 3,
                            generation_tokens=tokens[e],
                            finished_requests_count=finished[e],
                            prompt_tokens_per_s=rate * 3,
                            generation_tokens_per_s=rate,
                        )
                    )
                yield telemetry_pb2.TelemetrySample(
                    ts_unix_ns=time.time_ns(), period_s=period_s, gpus=gpus, engines=engines
                )
                next_s += period_s
                await asyncio.sleep(max(0.0, next_s - loop.time()))

    server = grpc.aio.server()
    telemetry_pb2_grpc.add_NodeTelemetryServicer_to_server(FakeNode(), server)
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(count)]
    await server.start()
    print(json.dumps({"event": "fake_nodes_listening", "ports": ports}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    return 0


async def _loop_lateness(out: list[float], period_s: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(period_s)
        out.append(loop.time() - t - period_s)


async def bench_ingest(work: Path, fake_nodes: int, ingest_s: float) -> dict[str, Any]:
    from controller.fleet.desired import DesiredState
    from controller.fleet.grpc_fleet import FleetSettings, GrpcFleet, NodeConfig
    from controller.metrics import ControllerMetrics

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out, err = work / "fake-nodes.out", work / "fake-nodes.err"
    args = [sys.executable, str(Path(__file__).resolve()), "--serve-fake-nodes", str(fake_nodes)]
    _progress(f"ingest: starting {fake_nodes} fake nodes ({fake_nodes * GPUS} GPUs) in a separate process")
    proc = spawn(args, env=env, out=out, err=err)
    fleet = None
    try:
        ports = (await _first_json_line(proc, out, err, AGENT_START_TIMEOUT_S))["ports"]
        nodes = [NodeConfig(f"fake{i:04d}", f"127.0.0.1:{port}") for i, port in enumerate(ports)]
        desired = DesiredState(len(nodes), drain_timeout_s=0.0)
        listener = BenchListener(ControllerMetrics())
        settings = FleetSettings(model="llama2-70b")
        fleet = GrpcFleet(nodes, settings, lambda: desired, listener)
        fleet.set_apply(False)
        fleet.start()
        ready_s = await _wait_ready(fleet, READY_TIMEOUT_S)
        _progress(f"ingest: {len(nodes)} links READY in {ready_s:.1f} s; warm-up {INGEST_WARMUP_S:.0f} s")
        await asyncio.sleep(INGEST_WARMUP_S)
        lateness: list[float] = []
        sleeper = asyncio.create_task(_loop_lateness(lateness))
        try:
            _progress(f"ingest: measuring {ingest_s:.0f} s")
            calls0, cpu0, server0, t0 = (
                listener.energy_calls,
                self_cpu_s(),
                cpu_s(proc.pid),
                time.perf_counter(),
            )
            await asyncio.sleep(ingest_s)
            wall_s = time.perf_counter() - t0
            ingest_cpu_s = self_cpu_s() - cpu0
            server_cpu_s = cpu_s(proc.pid) - server0
            calls = listener.energy_calls - calls0
        finally:
            sleeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sleeper
        ready = sum(link.available for link in fleet.links)
        gpu_samples_per_s = calls / wall_s
        return {
            "fake_nodes": len(nodes),
            "gpus": len(nodes) * GPUS,
            "telemetry_period_s": settings.telemetry_period_s,
            "window_s": round(wall_s, 2),
            "cpu_s": round(ingest_cpu_s, 3),
            "cpu_pct_of_one_core": round(ingest_cpu_s / wall_s * 100, 2),
            "gpu_samples_per_s": round(gpu_samples_per_s, 1),
            "node_samples_per_s": round(gpu_samples_per_s / GPUS, 1),
            "nodes_ready_at_end": ready,
            "loop_lateness_p50_ms": round(quantile(lateness, 0.5) * 1e3, 2) if lateness else math.nan,
            "loop_lateness_p99_ms": round(quantile(lateness, 0.99) * 1e3, 2) if lateness else math.nan,
            "loop_lateness_max_ms": round(max(lateness) * 1e3, 2) if lateness else math.nan,
            "fake_server_cpu_pct_of_one_core": round(server_cpu_s / wall_s * 100, 2),
        }
    finally:
        if fleet is not None:
            await fleet.close()
        await asyncio.to_thread(stop_all, [proc])


# ------------------------------------------------------------------------------------ 3. store


def _diurnal_rps(t_s: float, peak_rps: float) -> float:
    """Trough at 04:00 (0.25 x peak), peak at 16:00."""
    return peak_rps * (0.625 - 0.375 * math.cos(2 * math.pi * (t_s - 4 * 3600.0) / 86400.0))


def _simulated_day(day_s: float, peak_rps: float, seed: int) -> tuple[Any, Any, list[Any], list[Any], float]:
    """A ControlCycle and its DesiredState after `day_s` simulated seconds (module docstring); also the
    decisions and commands of the run and the cycle time reached."""
    import numpy as np

    from controller.app import initial_plan
    from controller.control.cycle import ControlCycle, CycleConfig, FixedPlan
    from controller.fleet.desired import DesiredState
    from controller.model.classes import REQUEST_CLASSES
    from controller.model.fleet import (
        Arrivals,
        Completions,
        DrainInstance,
        FleetView,
        InstanceIdle,
        InstanceReady,
        StartInstance,
    )
    from controller.policy.base import DynamicPolicy
    from controller.policy.registry import make_policy
    from controller.profiles import default_profile

    nodes = 16
    profile = default_profile("llama2-70b", "h100-sxm")
    policy = make_policy("dynamollm")
    plan = initial_plan(policy, profile, 1.0)  # control.initial_rate_rps's default
    driven = policy if isinstance(policy, DynamicPolicy) else FixedPlan(policy.name)
    config = CycleConfig(total_gpus=GPUS * nodes, max_nodes=nodes, start_unix_s=time.time() - day_s)
    cycle = ControlCycle(driven, profile, plan, config)
    desired = DesiredState(nodes, drain_timeout_s=30.0)
    decisions: list[Any] = []
    commands: list[Any] = []
    shadow: list[tuple[float, int, Any]] = []
    counter = [0, 0]  # generation, event sequence

    def handle(result: Any) -> None:
        decisions.extend(result.decisions)
        for command in result.commands:
            counter[0] += 1
            desired.apply(command, counter[0], counter[0])
            commands.append(command)
            # observe mode's model of the effects (ControlLoop._model_effect)
            if isinstance(command, StartInstance) and command.load_s > 0:
                counter[1] += 1
                at = command.at_s + command.load_s
                heapq.heappush(shadow, (at, counter[1], InstanceReady(command.instance_id, at)))
            elif isinstance(command, DrainInstance):
                counter[1] += 1
                heapq.heappush(
                    shadow, (command.at_s, counter[1], InstanceIdle(command.instance_id, command.at_s))
                )
                target = desired.engine(command.instance_id)
                if target is not None:
                    desired.forget(target.node, target.engine_id)

    rng = np.random.default_rng(seed)
    n_classes = len(REQUEST_CLASSES)
    class_p = rng.dirichlet(np.full(n_classes, 2.0))
    handle(cycle.start(0.0))
    previous = np.zeros(n_classes, dtype=np.int64)
    t = 0.0
    next_progress_s = 3 * 3600.0
    while cycle.next_tick_s() <= day_s:
        t = cycle.next_tick_s()
        while True:  # events and staggered actions due before the tick, in time order
            t_action = cycle.next_action_s()
            t_event = shadow[0][0] if shadow else math.inf
            if min(t_action, t_event) > t:
                break
            if t_event <= t_action:
                events = []
                while shadow and shadow[0][0] <= t_event:
                    events.append(heapq.heappop(shadow)[2])
                handle(cycle.on_events(events))
            else:
                handle(cycle.due(t_action))
        k = int(rng.poisson(_diurnal_rps(t, peak_rps) * TICK_S))
        arrival_s = np.sort(rng.uniform(t - TICK_S, t, k))
        cls = rng.choice(n_classes, size=k, p=class_p).astype(np.int64)
        input_tokens = rng.integers(64, 4096, size=k).astype(np.int64)
        met = rng.binomial(previous, 0.97)
        done = Completions(tuple(int(m) for m in met), tuple(int(x) for x in previous))
        handle(cycle.tick(t, FleetView(), Arrivals(arrival_s, cls, input_tokens), done))
        previous = np.bincount(cls, minlength=n_classes).astype(np.int64)
        if t >= next_progress_s:
            _progress(f"store: simulated {t / 3600:.0f} h of {day_s / 3600:.0f} h")
            next_progress_s += 3 * 3600.0
    return cycle, desired, decisions, commands, t


def bench_store(commits: int, day_s: float, peak_rps: float, store_dir: str | None) -> dict[str, Any]:
    from controller.loops.control import COMMAND_KINDS, snapshot_version
    from controller.model.decisions import StepRecord
    from controller.store import NewCommand, NewDecision, Store

    _progress(f"store: ticking a ControlCycle through {day_s / 3600:.0f} simulated hours")
    t0 = time.perf_counter()
    cycle, desired, decisions, commands, now_s = _simulated_day(day_s, peak_rps, seed=7)
    sim_wall_s = time.perf_counter() - t0
    _progress(
        f"store: simulated {day_s / 3600:g} h in {sim_wall_s:.1f} s: {len(decisions)} decisions, "
        f"{len(commands)} commands, "
        f"{len(cycle.executor.instances)} instances now"
    )
    records = [d for d in decisions if isinstance(d, StepRecord) and d.level == "pool"] or decisions
    decision = records[-1]
    level = decision.level if isinstance(decision, StepRecord) else "instance"
    detail = json.dumps(decision.to_json())
    new_decision = NewDecision(decision.t_s, level, f"{level} step (bench)", detail)
    sample_commands = commands[-2:]
    version = snapshot_version("bench")

    def rows(first_generation: int) -> list[NewCommand]:
        out = []
        for j, c in enumerate(sample_commands):
            body = asdict(c)
            body["kind"] = COMMAND_KINDS[type(c)]
            out.append(
                NewCommand(
                    cycle_time_s=now_s,
                    generation=first_generation + j,
                    node=f"node{j:02d}",
                    kind=COMMAND_KINDS[type(c)],
                    target="i1",
                    request_json=json.dumps(body),
                )
            )
        return out

    pickle_s: list[float] = []
    commit_s: list[float] = []
    step_s: list[float] = []
    blob = b""
    parent = store_dir or tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=parent) as tmp:
        store = Store(Path(tmp) / "controller.db")
        try:
            for i in range(STORE_WARMUP_COMMITS + commits):
                a = time.perf_counter()
                blob = pickle.dumps((cycle, desired), protocol=pickle.HIGHEST_PROTOCOL)
                b = time.perf_counter()
                store.commit_step(
                    snapshot=(blob, now_s, version), decisions=[new_decision], commands=rows(2 * i + 1)
                )
                c = time.perf_counter()
                if i >= STORE_WARMUP_COMMITS:
                    pickle_s.append(b - a)
                    commit_s.append(c - b)
                    step_s.append(c - a)
            db_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
        finally:
            store.close()
    a = time.perf_counter()
    pickle.loads(blob)
    unpickle_s = time.perf_counter() - a
    fs = _fs_type(parent)
    return {
        "simulated_s": now_s,
        "simulation_wall_s": round(sim_wall_s, 1),
        "decisions_in_day": len(decisions),
        "commands_in_day": len(commands),
        "snapshot_kib": round(len(blob) / 1024, 1),
        "decision_detail_bytes": len(detail),
        "store_dir": parent,
        "store_fs": fs,
        "db_files_mib_after": round(db_bytes / 2**20, 1),
        "commit_step": _stats_ms(commit_s),
        "pickle": _stats_ms(pickle_s),
        "pickle_plus_commit": _stats_ms(step_s),
        "unpickle_ms": round(unpickle_s * 1e3, 2),
    }


def _fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (from /proc/mounts; "" if unknown)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            inside = len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/"))
            if inside and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


# ------------------------------------------------------------------------------------ report


def _table(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    clock = results.get("clock")
    if clock:
        for run in clock["runs"]:
            how = "wake" if run["wake"] else "no wake (periodic pass)"
            tag = f"clock, {clock['nodes']} nodes, reconcile {run['reconcile_period_s']} s, {how}"
            target = "p99 < 1 s" if run["wake"] else "(a lost wake)"
            rows.append((f"{tag}: applied, whole fleet", _fmt_ms(run["applied_whole_fleet"]), target))
            rows.append((f"{tag}: applied, per node", _fmt_ms(run["applied_per_node"]), ""))
            rows.append((f"{tag}: ApplyGpuConfig reply, whole fleet", _fmt_ms(run["reply_whole_fleet"]), ""))
            stages = run["per_node_stages"]
            rows.append(
                (
                    f"{tag}: per node p50 / p99 stages",
                    ", ".join(f"{s} {v['p50_ms']:.0f}/{v['p99_ms']:.0f} ms" for s, v in stages.items()),
                    "",
                )
            )
            if run["timeouts"]:
                rows.append((f"{tag}: trials timed out", str(run["timeouts"]), "0"))
    ingest = results.get("ingest")
    if ingest:
        hz = 1 / ingest["telemetry_period_s"]
        tag = f"ingest, {ingest['gpus']} GPUs ({ingest['fake_nodes']} nodes) x {hz:g} Hz"
        rows.append((f"{tag}: controller CPU", f"{ingest['cpu_pct_of_one_core']:.1f}% of one core", "< 50%"))
        rows.append(
            (
                f"{tag}: samples received",
                f"{ingest['node_samples_per_s']:.1f} node samples/s "
                f"({ingest['gpu_samples_per_s']:.0f} GPU samples/s), "
                f"{ingest['nodes_ready_at_end']} nodes READY",
                "",
            )
        )
        rows.append(
            (
                f"{tag}: event loop lateness",
                f"p50 {ingest['loop_lateness_p50_ms']:.1f} ms, p99 {ingest['loop_lateness_p99_ms']:.1f} ms, "
                f"max {ingest['loop_lateness_max_ms']:.1f} ms",
                "",
            )
        )
        rows.append(
            (
                f"{tag}: fake server's CPU (other process)",
                f"{ingest['fake_server_cpu_pct_of_one_core']:.1f}%",
                "",
            )
        )
    store = results.get("store")
    if store:
        rows.append(
            (
                "store: Store.commit_step (snapshot + 1 decision + 2 commands)",
                _fmt_ms(store["commit_step"]),
                "",
            )
        )
        rows.append(("store: pickle (cycle, desired) alone", _fmt_ms(store["pickle"]), ""))
        rows.append(("store: pickle + commit (one step's write)", _fmt_ms(store["pickle_plus_commit"]), ""))
        rows.append(
            (
                "store: snapshot size",
                f"{store['snapshot_kib']:.0f} KiB after {store['simulated_s'] / 3600:.0f} simulated h "
                f"(unpickle {store['unpickle_ms']:.0f} ms)",
                "",
            )
        )
        rows.append(("store: database file system", f"{store['store_fs'] or '?'} ({store['store_dir']})", ""))
    return rows


# ------------------------------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # agents' runtime dirs: a tmpfs, as /run
    with tempfile.TemporaryDirectory(prefix="bench-controller-", dir=shm) as tmp:
        work = Path(tmp)
        if args.only in (None, "clock"):
            results["clock"] = await bench_clock(
                work / "clock", args.nodes, args.trials, args.reconcile_period_s, args.poll_ms / 1e3
            )
        if args.only in (None, "ingest"):
            (work / "ingest").mkdir()
            results["ingest"] = await bench_ingest(work / "ingest", args.fake_nodes, args.ingest_s)
    if args.only in (None, "store"):
        results["store"] = await asyncio.to_thread(
            bench_store, args.commits, args.sim_hours * 3600.0, args.peak_rps, args.store_dir
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", choices=["clock", "ingest", "store"], default=None)
    parser.add_argument("--nodes", type=int, default=16, help="simulated agents for the clock figure (16)")
    parser.add_argument("--trials", type=int, default=30, help="clock changes per setting (30)")
    parser.add_argument(
        "--reconcile-period-s",
        type=float,
        nargs="+",
        default=[0.5, 0.1],
        help="FleetSettings.reconcile_period_s values to measure (default: 0.5, the default, and 0.1)",
    )
    parser.add_argument("--poll-ms", type=float, default=20.0, help="inventory polling interval (20 ms)")
    parser.add_argument("--fake-nodes", type=int, default=256, help="fake nodes of 8 GPUs for ingest (256)")
    parser.add_argument("--ingest-s", type=float, default=30.0, help="ingest CPU window (30 s)")
    parser.add_argument("--commits", type=int, default=200, help="store commits timed (200)")
    parser.add_argument("--sim-hours", type=float, default=24.0, help="simulated hours before the store (24)")
    parser.add_argument("--peak-rps", type=float, default=12.0, help="peak arrival rate of the day (12 rps)")
    parser.add_argument("--store-dir", default=None, help="folder for the store file (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write figures as JSON")
    parser.add_argument("--serve-fake-nodes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from agent.api.log import configure_logging

    configure_logging("error")
    if args.serve_fake_nodes:
        return asyncio.run(_serve_fake_nodes(args.serve_fake_nodes))
    from controller.dctl.output import reserved_stdout

    started = time.perf_counter()
    try:
        with reserved_stdout():  # the solver's banner goes to stderr: stdout carries the figures only
            results = asyncio.run(run(args))
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    finally:
        stop_all(list(CHILDREN))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"{results['host']}: {results['cpus']} CPUs, Python {results['python']}, {results['wall_s']} s")
    print_table(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
