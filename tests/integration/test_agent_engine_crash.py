"""Fault test: the agent killed with SIGKILL in the middle of a ReconfigureEngine, then restarted.

`python -m agent.app --simulated` runs as a real process; while it is starting an engine (the engine
process exists, its /health still answers 503) it gets SIGKILL. Before engines were owned, that engine
was re-parented and kept running, the restarted agent did not know it and started a second engine on the
same GPUs for the same request, and the SIGTERM of the new agent left the orphan behind. Now the engine
dies with its agent (parent-death signal) or is adopted by the next one (the driver's record file), so
exactly one engine runs on the GPUs, and none after the SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def engine_pids(node_dir: Path) -> list[int]:
    """Live simulated-engine processes started with `--node-dir node_dir`, whoever their parent is."""
    wanted = str(node_dir)
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if "agent.sim.engine" in words and wanted in words and state != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


class AgentProcess:
    """`python -m agent.app --simulated --gpus 2` on a runtime directory; port from its first stdout line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, runtime_dir: Path, log_path: Path) -> AgentProcess:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0",
            "DYNAMOLLM_AGENT_AUTH_ALLOW_UNAUTHENTICATED_LOOPBACK": "true",
        }
        with open(log_path, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.app", "--simulated", "--gpus", "2", "--listen", "127.0.0.1:0",
                "--metrics-listen", "", "--runtime-dir", str(runtime_dir),
                env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
            )  # fmt: skip
        assert proc.stdout is not None
        try:
            event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        assert event["event"] == "agent_listening"
        return cls(proc, int(event["port"]))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def reconfigure(generation: int) -> control_pb2.ReconfigureEngineRequest:
    return control_pb2.ReconfigureEngineRequest(
        generation=generation,
        engine_id="e1",
        model="llama3.1-8b",
        gpu_indices=[0, 1],
        tp_degree=2,
        engine_options={"startup-s": "1.5"},  # /health answers 503 this long: the agent dies meanwhile
        ready_timeout_s=60,
    )


async def test_agent_kill_9_mid_reconfigure_leaves_one_engine_and_sigterm_leaves_none(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "run"
    node_dir = runtime_dir / "simnode"
    log_path = tmp_path / "agent.log"
    first = await AgentProcess.start(runtime_dir, log_path)
    second: AgentProcess | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            call = asyncio.ensure_future(
                control_pb2_grpc.NodeControlStub(channel).ReconfigureEngine(reconfigure(1), timeout=60)
            )
            assert await wait_until(lambda: len(engine_pids(node_dir)) == 1, 20), "no engine started"
            (orphan,) = engine_pids(node_dir)
            await first.kill()  # SIGKILL mid-reconfigure: no clean-up of any kind
            with pytest.raises(grpc.aio.AioRpcError):
                await call
        # The engine goes with its agent (parent-death signal) or is adopted by the next agent.
        await wait_until(lambda: orphan not in engine_pids(node_dir), 10)

        second = await AgentProcess.start(runtime_dir, log_path)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            ctl = control_pb2_grpc.NodeControlStub(channel)
            reply = await ctl.ReconfigureEngine(reconfigure(2), timeout=60)
            assert reply.engine.state == common_pb2.ENGINE_STATE_READY
            running = engine_pids(node_dir)
            assert len(running) == 1, f"engines on GPUs 0,1 after the restart: {running} (first: {orphan})"
            again = await ctl.ReconfigureEngine(reconfigure(3), timeout=60)
            assert not again.restarted and engine_pids(node_dir) == running  # no second engine
        second.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.proc.wait(), 30) == 0
        assert await wait_until(lambda: engine_pids(node_dir) == [], 5), (
            f"left behind: {engine_pids(node_dir)}"
        )
    finally:
        for agent in (first, second):
            if agent is not None:
                await agent.kill()
        for pid in engine_pids(node_dir):  # a failed test must not leave engines running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
