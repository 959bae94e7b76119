"""The agent with the real NvmlBackend and nvidia-ml-py over the fake libnvidia-ml.so.1 (tests/fakenvml):
in-process (settings visible in the fake's state file, permission errors rolled back, lease expiry) and
as a subprocess (`python -m agent.app`): kill -9 then restart or `restore-defaults` puts the defaults
back, SIGTERM restores them and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import RunningAgent, start_agent
from agent.settings import merge_settings
from tests.fakenvml import FakeNvml
from tests.fakenvml.fixtures import fake_nvml, fake_nvml_lib  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def gpu(index: int, lo: int, hi: int, power_limit_w: float | None = None) -> control_pb2.GpuSetting:
    setting = control_pb2.GpuSetting(gpu_index=index, min_clock_mhz=lo, max_clock_mhz=hi)
    if power_limit_w is not None:
        setting.power_limit_w = power_limit_w
    return setting


def apply_request(generation: int, *gpus: control_pb2.GpuSetting, lease_s: float = 30.0) -> Any:
    return control_pb2.ApplyGpuConfigRequest(generation=generation, lease_s=lease_s, gpus=list(gpus))


@dataclass
class Node:
    running: RunningAgent
    tel: telemetry_pb2_grpc.NodeTelemetryStub
    ctl: control_pb2_grpc.NodeControlStub


@pytest.fixture
async def node(fake_nvml: FakeNvml, tmp_path: Path) -> AsyncIterator[Node]:  # noqa: F811
    settings = merge_settings(
        {
            "listen": "127.0.0.1:0",
            "metrics_listen": "",
            "runtime_dir": str(tmp_path / "run"),
            # An NVML node refuses unauthenticated control by default; these tests call over loopback.
            "auth": {"allow_unauthenticated_loopback": True},
            "telemetry": {"period_s": 0.05, "min_period_s": 0.05},
        },
        {},
        {},
        hostname="nvml-node",
    )
    running = await start_agent(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        try:
            yield Node(
                running,
                telemetry_pb2_grpc.NodeTelemetryStub(channel),
                control_pb2_grpc.NodeControlStub(channel),
            )
        finally:
            await running.stop()


async def test_inventory_and_settings_reach_the_driver(node: Node, fake_nvml: FakeNvml) -> None:  # noqa: F811
    inv = await node.tel.GetInventory(telemetry_pb2.GetInventoryRequest())
    assert inv.gpu_backend == common_pb2.GPU_BACKEND_KIND_NVML
    assert len(inv.gpus) == fake_nvml.state.gpu_count() == 2
    clocks = list(inv.gpus[0].supported_sm_clocks_mhz)
    assert clocks[-1] == 1980 and clocks == sorted(set(clocks))
    assert (inv.gpus[0].min_power_limit_w, inv.gpus[0].max_power_limit_w) == (200.0, 700.0)

    reply = await node.ctl.ApplyGpuConfig(apply_request(1, gpu(0, 1200, 1410), gpu(1, 990, 990, 300.0)))
    assert reply.applied[1].power_limit_w == 300.0
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1200, 1410)
    assert fake_nvml.state.gpu(1).locked_clocks_mhz == (990, 990)
    assert fake_nvml.state.gpu(1).power_limit_w == 300.0
    sample = await node.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(gpu_indices=[1])).read()
    assert sample.gpus[0].sm_clock_mhz <= 990 and sample.gpus[0].enforced_power_limit_w == 300.0

    await node.ctl.RestoreDefaults(control_pb2.RestoreDefaultsRequest(generation=2))
    assert fake_nvml.state.gpu(0).locked_clocks_mhz is None
    assert fake_nvml.state.gpu(1).locked_clocks_mhz is None
    assert fake_nvml.state.gpu(1).power_limit_w == 700.0


async def test_permission_denied_leaves_nothing_half_applied(node: Node, fake_nvml: FakeNvml) -> None:  # noqa: F811
    fake_nvml.state.deny_set_power()
    request = apply_request(1, gpu(0, 1200, 1200), gpu(1, 1200, 1200, 300.0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.ctl.ApplyGpuConfig(request)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # GPU 0's and GPU 1's clocks were locked before the power limit failed: both rolled back
    assert fake_nvml.state.gpu(0).locked_clocks_mhz is None
    assert fake_nvml.state.gpu(1).locked_clocks_mhz is None
    assert fake_nvml.state.gpu(1).power_limit_w == 700.0
    inv = await node.tel.GetInventory(telemetry_pb2.GetInventoryRequest())
    assert not any(g.modified for g in inv.gpus) and not inv.lease.active
    # the failure is the recorded outcome of generation 1
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await node.ctl.ApplyGpuConfig(request)
    assert again.value.code() == grpc.StatusCode.PERMISSION_DENIED
    fake_nvml.state.clear_failures()
    await node.ctl.ApplyGpuConfig(apply_request(2, gpu(0, 1200, 1200), gpu(1, 1200, 1200, 300.0)))
    assert fake_nvml.state.gpu(1).power_limit_w == 300.0


async def test_clock_permission_denied(node: Node, fake_nvml: FakeNvml) -> None:  # noqa: F811
    fake_nvml.state.deny_set_clocks()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.ctl.ApplyGpuConfig(apply_request(1, gpu(1, 1200, 1200)))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert fake_nvml.state.gpu(1).locked_clocks_mhz is None


async def test_lease_expiry_resets_the_driver(node: Node, fake_nvml: FakeNvml) -> None:  # noqa: F811
    await node.ctl.ApplyGpuConfig(apply_request(1, gpu(0, 1200, 1200, 400.0), lease_s=0.3))
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1200, 1200)
    await asyncio.sleep(0.8)
    assert fake_nvml.state.gpu(0).locked_clocks_mhz is None
    assert fake_nvml.state.gpu(0).power_limit_w == 700.0


# ------------------------------------------------------------------------------------ subprocess


class AgentProcess:
    """`python -m agent.app` over the fake library; the port comes from stdout's first line. Every one
    started is in `started`, so that a failing test does not leave agents running (`_reap_agents`)."""

    started: ClassVar[list[asyncio.subprocess.Process]] = []

    def __init__(self, proc: asyncio.subprocess.Process, port: int, stderr_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.stderr_path = stderr_path

    @classmethod
    async def start(cls, fake: FakeNvml, runtime_dir: Path, *args: str) -> AgentProcess:
        env = fake.env()
        env["PYTHONPATH"] = str(ROOT)
        env["DYNAMOLLM_AGENT_GPU_BACKEND"] = "nvml"
        env["DYNAMOLLM_AGENT_AUTH_ALLOW_UNAUTHENTICATED_LOOPBACK"] = "true"
        stderr_path = runtime_dir.parent / f"agent-{len(list(runtime_dir.parent.glob('agent-*')))}.log"
        with open(stderr_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent.app",
                *args,
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "",
                "--runtime-dir",
                str(runtime_dir),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
            )
        cls.started.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line:
            await proc.wait()
            raise AssertionError(f"agent exited {proc.returncode}: {stderr_path.read_text()}")
        event = json.loads(line)
        assert event["event"] == "agent_listening"
        return cls(proc, int(event["port"]), stderr_path)

    async def apply(self, request: Any) -> control_pb2.ApplyGpuConfigResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            reply: control_pb2.ApplyGpuConfigResponse = await control_pb2_grpc.NodeControlStub(
                channel
            ).ApplyGpuConfig(request)
            return reply

    async def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 20)


@pytest.fixture(autouse=True)
async def _reap_agents() -> AsyncIterator[None]:
    yield
    while AgentProcess.started:
        proc = AgentProcess.started.pop()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_kill_9_then_restart_restores_defaults(fake_nvml: FakeNvml, tmp_path: Path) -> None:  # noqa: F811
    runtime = tmp_path / "run"
    agent = await AgentProcess.start(fake_nvml, runtime)
    await agent.apply(apply_request(7, gpu(0, 1200, 1200, 350.0), gpu(1, 810, 1005)))
    assert await agent.kill(signal.SIGKILL) == -signal.SIGKILL
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1200, 1200)  # nobody restored them
    assert fake_nvml.state.gpu(0).power_limit_w == 350.0

    again = await AgentProcess.start(fake_nvml, runtime)
    try:
        assert fake_nvml.state.gpu(0).locked_clocks_mhz is None
        assert fake_nvml.state.gpu(1).locked_clocks_mhz is None
        assert fake_nvml.state.gpu(0).power_limit_w == 700.0
        assert "gpu_defaults_restored_after_crash" in again.stderr_path.read_text()
        # the generation survived the crash: an old one is still refused
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await again.apply(apply_request(6, gpu(0, 1200, 1200)))
        assert info.value.code() == grpc.StatusCode.ABORTED
    finally:
        assert await again.kill(signal.SIGTERM) == 0


async def test_kill_9_then_restore_defaults_command(fake_nvml: FakeNvml, tmp_path: Path) -> None:  # noqa: F811
    runtime = tmp_path / "run"
    agent = await AgentProcess.start(fake_nvml, runtime)
    await agent.apply(apply_request(1, gpu(1, 1200, 1200, 250.0)))
    await agent.kill(signal.SIGKILL)
    assert fake_nvml.state.gpu(1).locked_clocks_mhz == (1200, 1200)
    env = fake_nvml.env()
    env["PYTHONPATH"] = str(ROOT)
    env["DYNAMOLLM_AGENT_GPU_BACKEND"] = "nvml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.app", "restore-defaults", "--runtime-dir", str(runtime),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode().splitlines()[0]) == {"event": "gpu_defaults_restored", "gpu_indices": [1]}
    assert fake_nvml.state.gpu(1).locked_clocks_mhz is None and fake_nvml.state.gpu(1).power_limit_w == 700.0
    state = json.loads((runtime / "state.json").read_text())
    assert state["applied"] == {} and state["gpu_scope"]["generation"] == 1


async def test_sigterm_restores_and_exits_0(fake_nvml: FakeNvml, tmp_path: Path) -> None:  # noqa: F811
    agent = await AgentProcess.start(fake_nvml, tmp_path / "run")
    await agent.apply(apply_request(1, gpu(0, 1500, 1500, 500.0)))
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1500, 1500)
    assert await agent.kill(signal.SIGTERM) == 0
    assert fake_nvml.state.gpu(0).locked_clocks_mhz is None
    assert fake_nvml.state.gpu(0).power_limit_w == 700.0
    assert "gpu_defaults_restored_on_shutdown" in agent.stderr_path.read_text()


def test_missing_library_fails_start_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(PYTHONPATH=str(ROOT), DYNAMOLLM_AGENT_GPU_BACKEND="nvml", LD_LIBRARY_PATH=str(tmp_path))
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "agent.app", "--listen", "127.0.0.1:0", "--runtime-dir", str(tmp_path / "r")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    if done.returncode == 0:
        pytest.skip("a real NVIDIA driver is installed here")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("dynamollm-agent: error: NVML is not usable")
