"""The agent (in-process, real gRPC on loopback) and what holds or runs its GPUs: processes it does not
own, the clocks it applied against the clocks the GPUs run at, and engines a previous agent left running.

- A GPU held by a process that is not one of the agent's engines is reported in GetInventory
  (`GpuInfo.foreign_process_mem_used_bytes`) and refused for new engines (FAILED_PRECONDITION naming the
  GPU and the pid); on the simulated node (a live process registered on the GPU) and over the fake NVML
  library (`FAKE_NVML_COMPUTE_PIDS`, nvmlDeviceGetComputeRunningProcesses).
- Target and effective clocks: the lock the agent applied, the lock read back (simulated GPUs; NVML has
  no getter) and the measured SM clock, in GetInventory and in every telemetry sample; a GPU that cannot
  hold its lock (`FAKE_NVML_SM_CLOCK_CAP_MHZ`) shows `sm_clock_below_target`.
- An agent that dies without stopping its engine (here: abandoned, so the parent-death signal does not
  fire): the next agent on the same runtime directory adopts the engine, and the same request starts no
  second one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import RunningAgent, start_agent
from agent.engine.ownership import process_start_ticks
from agent.settings import AgentSettings, merge_settings
from agent.sim.node import GpuActivity, NodeDir
from tests.fakenvml import FakeNvml
from tests.fakenvml.fixtures import fake_nvml, fake_nvml_lib  # noqa: F401 (fixtures)

MODEL = "llama3.1-8b"


def settings_for(tmp_path: Path, **extra: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(tmp_path / "run"),
        "auth": {"allow_unauthenticated_loopback": True},
        "telemetry": {"period_s": 0.05, "min_period_s": 0.05},
        "engine": {"base_port": 0, "ready_timeout_s": 20.0, "stop_grace_s": 5.0, "drain_timeout_s": 1.0},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return merge_settings(values, {}, {}, hostname="gpu-ownership")


def simulated(tmp_path: Path) -> AgentSettings:
    return settings_for(tmp_path, gpu={"backend": "simulated"}, simulated={"gpus": 2})


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.ctl = control_pb2_grpc.NodeControlStub(channel)
        self.tel = telemetry_pb2_grpc.NodeTelemetryStub(channel)

    async def inventory(self) -> telemetry_pb2.GetInventoryResponse:
        return await self.tel.GetInventory(telemetry_pb2.GetInventoryRequest())

    async def sample(self, wanted: Any = None) -> telemetry_pb2.TelemetrySample:
        """The first sample (within 100) for which `wanted(sample)` holds; the last one otherwise."""
        stream = self.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest())
        sample = telemetry_pb2.TelemetrySample()
        try:
            for _ in range(100):
                got = await stream.read()
                assert isinstance(got, telemetry_pb2.TelemetrySample)
                sample = got
                if wanted is None or wanted(sample):
                    break
        finally:
            stream.cancel()
        return sample


@contextlib.asynccontextmanager
async def serving(settings: AgentSettings) -> AsyncIterator[tuple[RunningAgent, Client]]:
    running = await start_agent(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, Client(channel)
    finally:
        await running.stop()


@pytest.fixture
def bystander() -> Iterator[int]:
    """A live process that is not the agent's: it stands for someone's job on a GPU."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def reconfigure(
    generation: int, gpus: list[int], engine_id: str = "e1"
) -> control_pb2.ReconfigureEngineRequest:
    return control_pb2.ReconfigureEngineRequest(
        generation=generation,
        engine_id=engine_id,
        model=MODEL,
        gpu_indices=gpus,
        tp_degree=len(gpus),
        engine_options={"startup-s": "0.05"},
        drain_timeout_s=1.0,
    )


async def expect(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


# ------------------------------------------------------------------------------ foreign processes


async def test_simulated_gpu_held_by_a_foreign_process_is_reported_and_refused(
    tmp_path: Path, bystander: int
) -> None:
    settings = simulated(tmp_path)
    async with serving(settings) as (_, node):
        NodeDir(settings.simulated.node_dir).write_activity(
            1, GpuActivity(bystander, 0.0, 0.0, 0.0, 0, False, 3 * 2**30)
        )
        details = await expect(
            node.ctl.ReconfigureEngine(reconfigure(1, [1])), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "GPU 1" in details and str(bystander) in details and "sleep" in details
        inv = await node.inventory()
        assert dict(inv.gpus[1].foreign_process_mem_used_bytes) == {bystander: 3 * 2**30}
        assert inv.engines == []  # nothing was started

        ready = await node.ctl.ReconfigureEngine(reconfigure(1, [0]), timeout=60)  # GPU 0 is free
        assert ready.engine.state == common_pb2.ENGINE_STATE_READY
        inv = await node.inventory()
        assert dict(inv.gpus[0].foreign_process_mem_used_bytes) == {}  # our own engine is not foreign
        assert NodeDir(settings.simulated.node_dir).read_activity(0).pid > 0


async def test_nvml_gpu_held_by_a_foreign_process_is_reported_and_refused(
    fake_nvml: FakeNvml,  # noqa: F811
    tmp_path: Path,
    bystander: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_NVML_COMPUTE_PIDS", f"1:{bystander}:123456789")
    command = (
        f"{sys.executable} -m agent.sim.engine --model {{model}} --tp {{tp}} --port {{port}} --gpus {{gpus}}"
    )
    settings = settings_for(
        tmp_path, engine={"command": command, "models": [MODEL], "options_allowed": ["startup-s"]}
    )
    async with serving(settings) as (_, node):
        inv = await node.inventory()
        assert inv.gpu_backend == common_pb2.GPU_BACKEND_KIND_NVML
        assert dict(inv.gpus[1].foreign_process_mem_used_bytes) == {bystander: 123456789}
        assert dict(inv.gpus[0].foreign_process_mem_used_bytes) == {}
        details = await expect(
            node.ctl.ReconfigureEngine(reconfigure(1, [0, 1])), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "GPU 1" in details and str(bystander) in details
        ready = await node.ctl.ReconfigureEngine(reconfigure(1, [0]), timeout=60)
        assert ready.engine.state == common_pb2.ENGINE_STATE_READY


# --------------------------------------------------------------------------- target and effective


async def test_simulated_clocks_target_and_effective(tmp_path: Path) -> None:
    async with serving(simulated(tmp_path)) as (_, node):
        before = await node.sample()
        assert not before.gpus[0].HasField("target_sm_clock_lock")
        assert not before.gpus[0].HasField("effective_sm_clock_lock")
        await node.ctl.ApplyGpuConfig(
            control_pb2.ApplyGpuConfigRequest(
                generation=1,
                lease_s=30,
                gpus=[control_pb2.GpuSetting(gpu_index=0, min_clock_mhz=1200, max_clock_mhz=1410)],
            )
        )
        inv = await node.inventory()
        gpu = inv.gpus[0]
        assert gpu.sm_clock_lock_readable
        assert (gpu.sm_clock_lock.min_clock_mhz, gpu.sm_clock_lock.max_clock_mhz) == (1200, 1410)
        assert (gpu.effective_sm_clock_lock.min_clock_mhz, gpu.effective_sm_clock_lock.max_clock_mhz) == (
            1200,
            1410,
        )
        assert gpu.sm_clock_mhz == 1410 and not inv.gpus[1].HasField("effective_sm_clock_lock")
        sample = await node.sample(lambda s: s.gpus[0].HasField("target_sm_clock_lock"))
        g0, g1 = sample.gpus
        assert (g0.target_sm_clock_lock.min_clock_mhz, g0.target_sm_clock_lock.max_clock_mhz) == (1200, 1410)
        assert g0.effective_sm_clock_lock == g0.target_sm_clock_lock and g0.sm_clock_mhz == 1410
        assert not g0.sm_clock_below_target
        assert not g1.HasField("target_sm_clock_lock")


async def test_nvml_gpu_that_cannot_hold_its_lock_is_visible(
    fake_nvml: FakeNvml,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_NVML_SM_CLOCK_CAP_MHZ", "0:1005")  # GPU 0 tops out at 1005 MHz (too hot)
    async with serving(settings_for(tmp_path)) as (_, node):
        await node.ctl.ApplyGpuConfig(
            control_pb2.ApplyGpuConfigRequest(
                generation=1,
                lease_s=30,
                gpus=[
                    control_pb2.GpuSetting(gpu_index=0, min_clock_mhz=1410, max_clock_mhz=1410),
                    control_pb2.GpuSetting(gpu_index=1, min_clock_mhz=1410, max_clock_mhz=1410),
                ],
            )
        )
        inv = await node.inventory()
        assert not inv.gpus[0].sm_clock_lock_readable  # NVML: no getter for locked clocks
        assert not inv.gpus[0].HasField("effective_sm_clock_lock")
        assert inv.gpus[0].sm_clock_lock.max_clock_mhz == 1410 and inv.gpus[0].sm_clock_mhz == 1005
        assert inv.gpus[0].clock_event_reasons_mask & 0x20
        sample = await node.sample(lambda s: s.gpus[0].HasField("target_sm_clock_lock"))
        held, capped = sample.gpus[1], sample.gpus[0]
        assert capped.target_sm_clock_lock.min_clock_mhz == 1410 and capped.sm_clock_mhz == 1005
        assert capped.sm_clock_below_target and capped.clock_event_reasons_mask & 0x20
        assert not capped.HasField("effective_sm_clock_lock")
        assert held.sm_clock_mhz == 1410 and not held.sm_clock_below_target


# ----------------------------------------------------------------------------------- adoption


async def test_restarted_agent_adopts_the_engine_a_dead_agent_left(tmp_path: Path) -> None:
    settings = simulated(tmp_path)
    node_dir = NodeDir(settings.simulated.node_dir)
    first = await start_agent(settings)
    pid = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            ready = await Client(channel).ctl.ReconfigureEngine(reconfigure(1, [0, 1]), timeout=60)
        port = ready.engine.http_port
        pid = node_dir.read_activity(0).pid
        assert pid > 0
        # The agent "dies": no shutdown, no engine stop (its process, ours, lives on: no parent-death
        # signal either; the engine is an orphan as far as the next agent knows).
        await first.server.stop(0)
        for task in first.tasks:
            task.cancel()
        async with serving(settings) as (_, node):
            (engine,) = (await node.inventory()).engines
            assert (engine.engine_id, engine.state, engine.http_port) == (
                "e1",
                common_pb2.ENGINE_STATE_READY,
                port,
            )
            same = await node.ctl.ReconfigureEngine(reconfigure(2, [0, 1]), timeout=60)
            assert not same.restarted  # adopted: no second engine on GPUs 0 and 1
            assert node_dir.read_activity(0).pid == pid
        assert process_start_ticks(pid) is None  # the second agent's stop took the adopted engine along
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        await first.agent.driver.close()
        first.agent.workers.close()
