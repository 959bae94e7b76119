#!/usr/bin/env python3
"""The node agent's three figures of issue 4, measured end to end over real gRPC on loopback.

    PYTHONPATH=. .venv/bin/python tools/bench_agent.py [--only clock|telemetry|reconfigure] [--calls 1000]
                                                        [--cpu-s 30] [--load-clients 16]

1. Clock change: `AgentClient.apply_gpu_config` -> gRPC -> in-process agent -> the real `NvmlBackend` ->
   nvidia-ml-py -> the fake libnvidia-ml.so.1 (tests/fakenvml, built with gcc), N calls alternating the
   locked clock of one GPU (and of all 8 GPUs per call): p50/p99/max latency. Target p99 < 5 ms.
2. Telemetry: samples/s one client receives from one agent (simulated backend, 8 GPUs) at the fastest
   period the default config allows (0.1 s) and with the sampler configured at 1 ms (the ceiling); and the
   agent's CPU cost (process CPU time / wall time, from /proc) at 8 GPUs x 1 Hz over --cpu-s seconds, the
   agent a subprocess (`python -m agent.app --simulated --gpus 8`) with one client streaming.
3. Engine reconfigure TP 4 -> 8 of a simulated engine (the real `python -m agent.sim.engine` program)
   under --load-clients concurrent clients: the reply's drain/stop/start times, the wall time until the
   new engine is READY, and requests lost. A request is lost when the engine accepted it
   (HTTP 200 of a streamed completion) and did not deliver all its tokens, when the connection broke after
   the request was sent, or when the answer was anything but 200 or 503; 503 answers (draining, not ready)
   and refused connections (restart gap) are retried by the clients after 50 ms, as a router would.

A benchmark, not a test: it prints figures and exits 0 (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.api.client import AgentClient, GenerationSource, GpuClockSetting  # noqa: E402
from agent.settings import AgentSettings, merge_settings  # noqa: E402

GPUS = 8
WARMUP_CALLS = 50
RETRY_S = 0.05


def _settings(run_dir: Path, values: dict[str, Any]) -> AgentSettings:
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(run_dir),
        "log_level": "error",
        "auth": {"allow_unauthenticated_loopback": True},  # a benchmark on loopback, no tokens
    }
    return merge_settings({**base, **values}, {}, {}, hostname="bench")


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------------ 1. clock change


async def bench_clock_change(work: Path, calls: int) -> None:
    from agent.app import start_agent
    from agent.gpu.nvml import NvmlBackend
    from tests.fakenvml import STATE_ENV, FakeNvmlState, bind_pynvml, build_fake_nvml

    library = build_fake_nvml(work / "fakenvml")
    bind_pynvml(library)
    state = FakeNvmlState(work / "fake-nvml-state")
    os.environ[STATE_ENV] = str(state.path)
    state.update({"gpus": GPUS})
    backend = NvmlBackend()
    agent = await start_agent(_settings(work / "run-clock", {"gpu": {"backend": "nvml"}}), backend=backend)
    try:
        async with AgentClient(f"127.0.0.1:{agent.port}") as client:
            inventory = await client.inventory()
            clocks = list(inventory.gpus[0].supported_sm_clocks_mhz)
            generations = GenerationSource()
            for gpus_per_call in (1, GPUS):
                latencies_s: list[float] = []
                last = 0
                for i in range(WARMUP_CALLS + calls):
                    last = clocks[-1 - (i % 8)]  # 1980, 1965, ... : every call changes the lock
                    settings = [GpuClockSetting(g, last, last) for g in range(gpus_per_call)]
                    t0 = time.perf_counter()
                    await client.apply_gpu_config(generations.next(), settings, lease_s=60.0)
                    if i >= WARMUP_CALLS:
                        latencies_s.append(time.perf_counter() - t0)
                seen = state.gpu(gpus_per_call - 1).locked_clocks_mhz
                assert seen == (last, last), f"the fake library holds {seen}, expected {(last, last)}"
                print(
                    f"clock change, {gpus_per_call} GPU(s) per ApplyGpuConfig, {calls} calls: "
                    f"p50 {_quantile(latencies_s, 0.5) * 1e3:.2f} ms, "
                    f"p99 {_quantile(latencies_s, 0.99) * 1e3:.2f} ms, "
                    f"max {max(latencies_s) * 1e3:.2f} ms (target p99 < 5 ms)"
                )
            # the same path without acting (no NVML call, no state file, no audit line): what gRPC and
            # validation alone cost, to tell the transport from the work
            dry_s: list[float] = []
            for i in range(calls):
                settings = [GpuClockSetting(0, clocks[-1 - (i % 8)], clocks[-1 - (i % 8)])]
                t0 = time.perf_counter()
                await client.apply_gpu_config(generations.next(), settings, lease_s=60.0, dry_run=True)
                dry_s.append(time.perf_counter() - t0)
            print(
                f"  for comparison, dry run (gRPC + validation only), {calls} calls: "
                f"p50 {_quantile(dry_s, 0.5) * 1e3:.2f} ms, p99 {_quantile(dry_s, 0.99) * 1e3:.2f} ms"
            )
            await client.restore_defaults(generations.next())
    finally:
        await agent.stop()


# ------------------------------------------------------------------------------------ 2. telemetry


async def _stream_rate(port: int, period_s: float, duration_s: float) -> tuple[float, int]:
    async with AgentClient(f"127.0.0.1:{port}") as client:
        stream = client.stream_telemetry(period_s=period_s)
        await anext(stream)  # the stream is open and the sampler running
        count, dropped, t0 = 0, 0, time.perf_counter()
        async for sample in stream:
            count += 1
            dropped = sample.dropped_samples_count
            if time.perf_counter() - t0 >= duration_s:
                break
        rate = count / (time.perf_counter() - t0)
        await stream.aclose()
    return rate, dropped


async def bench_telemetry_rate(work: Path) -> None:
    from agent.app import start_agent

    for period_s, label in ((0.1, "default fastest period 0.1 s"), (0.001, "sampler at 1 ms (ceiling)")):
        values = {
            "gpu": {"backend": "simulated"},
            "simulated": {"gpus": GPUS, "node_dir": str(work / f"simnode-{period_s}")},
            "telemetry": {"period_s": period_s, "min_period_s": period_s, "subscriber_queue": 1024},
        }
        agent = await start_agent(_settings(work / f"run-tel-{period_s}", values))
        try:
            rate, dropped = await _stream_rate(agent.port, period_s, 5.0)
        finally:
            await agent.stop()
        print(
            f"telemetry, {label}: {rate:.1f} samples/s to one client ({rate * GPUS:.0f} GPU samples/s, "
            f"{GPUS} GPUs), {dropped} dropped"
        )


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def bench_telemetry_cpu(work: Path, duration_s: float) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DYNAMOLLM_AGENT_RUNTIME_DIR=str(work / "run-cpu"))
    env["DYNAMOLLM_AGENT_LOG_LEVEL"] = "warning"
    proc = await asyncio.create_subprocess_exec(
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
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 30.0)).decode()
        port = _port_from_line(first)
        async with AgentClient(f"127.0.0.1:{port}") as client:
            stream = client.stream_telemetry(period_s=1.0)
            await anext(stream)
            cpu0, t0 = _cpu_s(proc.pid), time.perf_counter()
            samples = 0
            async for _ in stream:
                samples += 1
                if time.perf_counter() - t0 >= duration_s:
                    break
            cpu_s, wall_s = _cpu_s(proc.pid) - cpu0, time.perf_counter() - t0
            await stream.aclose()
        print(
            f"telemetry CPU, {GPUS} GPUs x 1 Hz, one client streaming, {wall_s:.0f} s: agent CPU "
            f"{cpu_s:.2f} s = {cpu_s / wall_s * 100:.2f}% of one core ({samples} samples received)"
        )
    finally:
        proc.terminate()
        await proc.wait()


def _port_from_line(line: str) -> int:
    """The agent's first stdout line names its port (`agent_listening ... port=N` or JSON "port": N)."""
    import json
    import re

    text = line.strip()
    if text.startswith("{"):
        return int(json.loads(text)["port"])
    match = re.search(r"port[=:\s\"]+(\d+)", text)
    if match is None:
        raise SystemExit(f"no port in the agent's first line: {text!r}")
    return int(match.group(1))


# ------------------------------------------------------------------------------------ 3. reconfigure


@dataclass
class _Load:
    port: int
    stop: bool = False
    completed: int = 0
    lost: int = 0
    retries: int = 0
    lost_reasons: list[str] = field(default_factory=list)


async def _streamed_tokens(response: Any) -> tuple[int, bool]:
    """(completion tokens from the final usage chunk, whether `data: [DONE]` arrived) of an SSE answer."""
    import json

    tokens, done = 0, False
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[len(b"data: ") :].strip()
        if payload == b"[DONE]":
            done = True
        elif (usage := json.loads(payload).get("usage")) is not None:
            tokens = usage["completion_tokens"]
    return tokens, done


async def _client_loop(load: _Load, max_tokens: int) -> None:
    import aiohttp

    body = {
        "model": "llama2-70b",
        "prompt": "word " * 200,
        "max_tokens": max_tokens,
        "stream": True,  # the 200 comes at admission: an accepted request is one that saw it
        "stream_options": {"include_usage": True},
    }
    # one connection per request: a refused connection then means "not sent", never a stale keep-alive
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while not load.stop:
            while True:  # one request, retried until an engine accepts it
                url = f"http://127.0.0.1:{load.port}/v1/completions"
                try:
                    async with session.post(url, json=body) as response:
                        if response.status == 503:
                            load.retries += 1
                        elif response.status != 200:
                            load.lost += 1
                            load.lost_reasons.append(f"HTTP {response.status}")
                            break
                        else:
                            tokens, done = await _streamed_tokens(response)
                            if done and tokens == max_tokens:
                                load.completed += 1
                            else:
                                load.lost += 1
                                load.lost_reasons.append(f"accepted, then cut: {tokens} tokens, done={done}")
                            break
                except aiohttp.ClientConnectorError:
                    load.retries += 1  # nothing listens (restart gap): not sent, retry
                except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
                    # the engine had the request (connected, sent) and dropped it: lost
                    load.lost += 1
                    load.lost_reasons.append(type(exc).__name__)
                    break
                await asyncio.sleep(RETRY_S)


async def bench_reconfigure(work: Path, clients: int) -> None:
    from agent.app import start_agent

    values = {
        "gpu": {"backend": "simulated"},
        "simulated": {"gpus": GPUS, "node_dir": str(work / "simnode-reconf")},
        "engine": {"base_port": 0},
    }
    agent = await start_agent(_settings(work / "run-reconf", values))
    try:
        async with AgentClient(f"127.0.0.1:{agent.port}", timeout_s=300.0) as client:
            generations = GenerationSource()
            t0 = time.perf_counter()
            first = await client.reconfigure_engine(
                generations.next(), "bench", model="llama2-70b", gpu_indices=range(4), tp_degree=4
            )
            ready_s = time.perf_counter() - t0
            print(f"reconfigure: TP4 engine READY in {ready_s:.2f} s (start {first.start_s:.2f} s)")
            load = _Load(port=first.engine.http_port)
            tasks = [asyncio.create_task(_client_loop(load, max_tokens=64)) for _ in range(clients)]
            await asyncio.sleep(3.0)
            before = load.completed
            t0 = time.perf_counter()
            second = await client.reconfigure_engine(
                generations.next(),
                "bench",
                model="llama2-70b",
                gpu_indices=range(8),
                tp_degree=8,
                drain_timeout_s=60.0,
            )
            wall_s = time.perf_counter() - t0
            load.port = second.engine.http_port
            await asyncio.sleep(3.0)
            load.stop = True
            await asyncio.gather(*tasks)
            await client.stop_engine(generations.next(), "bench", drain_timeout_s=30.0)
        print(
            f"reconfigure TP4 -> TP8 under {clients} clients: READY after {wall_s:.2f} s "
            f"(drain {second.drain_s:.2f} s, stop {second.stop_s:.2f} s, start {second.start_s:.2f} s); "
            f"requests completed {load.completed} ({before} before the change), lost {load.lost}, "
            f"retried {load.retries} times (503 or refused)"
        )
        if load.lost_reasons:
            print(f"  lost: {sorted(set(load.lost_reasons))}")
    finally:
        await agent.stop()


# ------------------------------------------------------------------------------------ main


async def run(only: str | None, calls: int, cpu_s: float, clients: int, runtime_parent: str | None) -> None:
    cpu = os.cpu_count()
    print(
        f"{platform.node()}: {platform.processor() or platform.machine()}, {cpu} CPUs, "
        f"Python {platform.python_version()}"
    )
    # The agent's runtime directory is /run/dynamollm-agent in deployment (systemd RuntimeDirectory=, a
    # tmpfs), where saving the state file costs no disk flush: measure on a tmpfs too where there is one.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    parent = runtime_parent or shm
    print(f"runtime dir under {parent or tempfile.gettempdir()}")
    with tempfile.TemporaryDirectory(prefix="bench-agent-", dir=parent) as tmp:
        work = Path(tmp)
        if only in (None, "clock"):
            await bench_clock_change(work, calls)
        if only in (None, "telemetry"):
            await bench_telemetry_rate(work)
            await bench_telemetry_cpu(work, cpu_s)
        if only in (None, "reconfigure"):
            await bench_reconfigure(work, clients)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["clock", "telemetry", "reconfigure"], default=None)
    parser.add_argument("--calls", type=int, default=1000, help="ApplyGpuConfig calls timed (default 1000)")
    parser.add_argument("--cpu-s", type=float, default=30.0, help="CPU measurement window (default 30 s)")
    parser.add_argument("--load-clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument(
        "--runtime-parent",
        default=None,
        metavar="DIR",
        help="folder for the agent's runtime dir (default /dev/shm, a tmpfs like /run; give a disk folder "
        "to measure the state file's flushes on e.g. ext4)",
    )
    args = parser.parse_args(argv)
    from agent.api.log import configure_logging

    configure_logging("error")
    asyncio.run(run(args.only, args.calls, args.cpu_s, args.load_clients, args.runtime_parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
