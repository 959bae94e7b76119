"""`python -m agent.app --simulated` as a real process: the listening line, an engine started through
ReconfigureEngine, and SIGTERM (GPU defaults restored in the simulated node, engine process gone, exit 0);
the warning that a simulated node accepts unauthenticated loopback control."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import grpc

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.sim.node import NodeDir

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigterm_stops_engines_restores_gpus_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0"}
    with open(tmp_path / "agent.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.app", "--simulated", "--gpus", "2", "--listen", "127.0.0.1:0",
            "--metrics-listen", "", "--runtime-dir", str(tmp_path / "run"),
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
            reply = await ctl.ReconfigureEngine(
                control_pb2.ReconfigureEngineRequest(
                    generation=1, engine_id="e1", model="llama2-70b", gpu_indices=[0, 1], tp_degree=2
                ),
                timeout=60,
            )
            assert reply.engine.state == common_pb2.ENGINE_STATE_READY
            await ctl.ApplyGpuConfig(
                control_pb2.ApplyGpuConfigRequest(
                    generation=1,
                    lease_s=60,
                    gpus=[control_pb2.GpuSetting(gpu_index=1, min_clock_mhz=1200, max_clock_mhz=1200)],
                )
            )
            inv = await tel.GetInventory(telemetry_pb2.GetInventoryRequest())
            assert inv.gpus[1].modified and inv.gpus[1].sm_clock_lock.max_clock_mhz == 1200
        node_dir = NodeDir(tmp_path / "run" / "simnode")
        locked = node_dir.read_control(1)
        assert locked is not None and locked.locked_max_clock_mhz == 1200
        engine_pid = node_dir.read_activity(0).pid  # the simulated engine registers itself on its GPUs
        assert engine_pid > 0 and _alive(engine_pid)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not _alive(engine_pid)
        control = node_dir.read_control(1)
        assert control is not None and not control.locked
        log = (tmp_path / "agent.log").read_text()
        for event_name in ("gpu_defaults_restored_on_shutdown", "engine_stopped", "agent_stopped"):
            assert event_name in log
        # --simulated without credentials: unauthenticated loopback control, said out loud at start-up
        assert "unauthenticated_loopback_control_allowed" in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if engine_pid and _alive(engine_pid):  # engines run in their own process group: a failed test
            os.killpg(engine_pid, signal.SIGKILL)  # must not leave one behind


async def test_sd_notify_ready_and_watchdog(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.app", "--simulated", "--gpus", "1", "--listen", "127.0.0.1:0",
        "--metrics-listen", "", "--runtime-dir", str(tmp_path / "run"),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        messages = [(await asyncio.wait_for(loop.sock_recv(sock, 64), 20)).decode() for _ in range(3)]
        assert messages == ["READY=1", "WATCHDOG=1", "WATCHDOG=1"]  # pinged every WATCHDOG_USEC / 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert (await asyncio.wait_for(loop.sock_recv(sock, 64), 5)).decode() in ("STOPPING=1", "WATCHDOG=1")
    finally:
        sock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
