"""`python -m agent.app --simulated --gpus 2 --time-scale 20` as a real process: an engine started through
ReconfigureEngine with startup-s=20 (simulated seconds) is READY after about one wall second; under load
the GPUs' energy counters grow 20 times the reported power per wall second (simulated joules, physical
watts), and the agent's counter-versus-integrated-power check, which runs every 2.5 s here, stays quiet."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import grpc

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.sim.node import NodeDir

ROOT = Path(__file__).resolve().parents[2]
SCALE = 20.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _complete(session: aiohttp.ClientSession, url: str, max_tokens: int) -> None:
    body = {"model": "llama2-70b", "prompt": "hello " * 200, "max_tokens": max_tokens}
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        assert answer["usage"]["completion_tokens"] == max_tokens


async def _load(url: str, until_s: float) -> int:
    """Eight clients sending completions back to back until `until_s` (monotonic); how many completed."""
    done = 0

    async def client() -> None:
        nonlocal done
        while time.monotonic() < until_s:
            await _complete(session, url, 100)
            done += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client() for _ in range(8)))
    return done


async def test_time_compressed_node_starts_fast_and_counts_simulated_joules(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0",
        # a sampler period of 0.25 s: the energy cross-check runs every 2.5 s (ten samples)
        "DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S": "0.25",
    }
    with open(tmp_path / "agent.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.app", "--simulated", "--gpus", "2", "--time-scale", str(SCALE),
            "--listen", "127.0.0.1:0", "--metrics-listen", "", "--runtime-dir", str(tmp_path / "run"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip
    engine_pid = 0
    try:
        assert proc.stdout is not None
        event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert event["event"] == "agent_listening" and event["port"] > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{event['port']}") as channel:
            ctl = control_pb2_grpc.NodeControlStub(channel)
            tel = telemetry_pb2_grpc.NodeTelemetryStub(channel)
            started = time.monotonic()
            reply = await ctl.ReconfigureEngine(
                control_pb2.ReconfigureEngineRequest(
                    generation=1,
                    engine_id="e1",
                    model="llama2-70b",
                    gpu_indices=[0, 1],
                    tp_degree=2,
                    engine_options={"startup-s": "20"},
                ),
                timeout=60,
            )
            start_wall_s = time.monotonic() - started
            assert reply.engine.state == common_pb2.ENGINE_STATE_READY
            # 20 simulated seconds of loading = 1 wall second (plus the program's own start-up)
            assert 0.9 <= start_wall_s < 8.0, start_wall_s
            engine_pid = NodeDir(tmp_path / "run" / "simnode").read_activity(0).pid
            inv = await tel.GetInventory(telemetry_pb2.GetInventoryRequest())
            (engine,) = [e for e in inv.engines if e.engine_id == "e1"]
            url = f"http://127.0.0.1:{engine.http_port}/v1/completions"

            samples: list[telemetry_pb2.TelemetrySample] = []

            async def collect() -> None:
                stream = tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(period_s=0.25))
                async for sample in stream:
                    samples.append(sample)

            collector = asyncio.create_task(collect())
            try:
                await asyncio.sleep(1.0)  # a second of samples before the load
                completed = await asyncio.wait_for(_load(url, time.monotonic() + 6.0), 40)
                await asyncio.sleep(3.0)  # the power average returns to idle; more energy checks run
            finally:
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)
        assert completed >= 8
        # per GPU: energy over the window per wall second vs 20 x the average reported power (readings
        # are the average over the last wall second, so the window starts one second after the first)
        for gpu in (0, 1):
            points = [(s.ts_unix_ns / 1e9, g) for s in samples for g in s.gpus if g.gpu_index == gpu]
            assert len(points) > 30
            first = next(i for i, (t, _) in enumerate(points) if t >= points[0][0] + 1.0)
            window = points[first:]
            wall_s = window[-1][0] - window[0][0]
            energy_j = window[-1][1].energy_j - window[0][1].energy_j
            mean_power_w = sum(g.power_w for _, g in window[1:]) / (len(window) - 1)
            assert max(g.power_w for _, g in window) > 1.5 * min(g.power_w for _, g in window)  # loaded
            ratio = energy_j / wall_s / (SCALE * mean_power_w)
            assert 0.7 <= ratio <= 1.3, (gpu, ratio, energy_j, wall_s, mean_power_w)
        log_text = (tmp_path / "agent.log").read_text()
        assert "energy_counter_mismatch" not in log_text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if engine_pid and _alive(engine_pid):  # engines run in their own process group
            os.killpg(engine_pid, signal.SIGKILL)
