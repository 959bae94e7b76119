"""Fault tests of the agent's control path: callers that go away mid-call, kill -9 at chosen moments of
an apply, and generations at the edge of their range.

Real agents only: in-process (`agent.app.start_agent`) behind real gRPC on loopback, or `python -m
agent.app` as a subprocess, over the fake libnvidia-ml.so.1 (tests/fakenvml) or the simulated backend.
The moment of a fault is chosen with the fake library's hold (tests/fakenvml/hold.py): an NVML call
parks its worker thread and announces it in a file; the test then cancels the caller or kills the
process, and releases the thread or restarts the agent. No test hook exists in the agent itself.

What each test pins down (DESIGN §9, docs/agent.md "Safety model"):
- a caller that is cancelled, times out or drops its connection mid-call does not stop the operation:
  it completes under its lease, its outcome is recorded under its generation, a retry replays it;
- the intent (generation, GPUs, settings, lease) is on disk before the first hardware write;
- kill -9 before or after a hardware write: the restarted agent (or `restore-defaults`) puts every GPU
  back to exactly the power limit it had before the agent's first write, not to a value read later;
- generations outside the allowed range are INVALID_ARGUMENT naming `generation`, nothing changed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from agent.api.generations import MAX_GENERATION
from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import start_agent
from agent.scopes import FinishedOperation
from agent.settings import AgentSettings, merge_settings
from tests.fakenvml import FakeNvml
from tests.fakenvml.fixtures import fake_nvml, fake_nvml_lib  # noqa: F401 (fixtures)
from tests.fakenvml.hold import NvmlHold
from tests.integration.test_agent_service import Node, gpu

ROOT = Path(__file__).resolve().parents[2]
UUID0 = "GPU-fa4e0000-0000-4000-8000-000000000000"  # the fake library's GPU 0
ADMIN_LIMIT_MW = 650_000  # GPU 0's limit before the agent: set by an admin, below the 700 W driver default


def apply_request(generation: int, *gpus: control_pb2.GpuSetting, lease_s: float = 60.0) -> Any:
    return control_pb2.ApplyGpuConfigRequest(generation=generation, lease_s=lease_s, gpus=list(gpus))


async def eventually(check: Any, what: str, timeout_s: float = 10.0) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline_s = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline_s:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {last!r})")


# ------------------------------------------------------------------------------ in-process agent


def _settings(tmp_path: Path, **extra: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(tmp_path / "run"),
        "log_json": True,
        "telemetry": {"period_s": 0.2},
        "auth": {"allow_unauthenticated_loopback": True},  # control over loopback without tokens
        "engine": {"base_port": 0, "ready_timeout_s": 20.0, "stop_grace_s": 5.0, "drain_timeout_s": 2.0},
        **extra,
    }
    return merge_settings(values, {}, {}, hostname="fault-node")


@pytest.fixture
async def open_node() -> AsyncIterator[Any]:
    """`await open_node(settings)` starts an in-process agent with a channel; all are stopped at the end."""
    opened: list[Node] = []

    async def open_(settings: AgentSettings) -> Node:
        running = await start_agent(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        node = Node(
            running,
            channel,
            telemetry_pb2_grpc.NodeTelemetryStub(channel),
            control_pb2_grpc.NodeControlStub(channel),
            settings,
        )
        opened.append(node)
        return node

    try:
        yield open_
    finally:
        for node in opened:
            await node.channel.close()
            await node.running.stop()


@pytest.mark.parametrize("how", ["cancel", "deadline", "channel_closed"])
async def test_caller_gone_mid_apply_operation_completes_under_lease_and_replays(
    how: str,
    fake_nvml: FakeNvml,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    open_node: Any,
) -> None:
    """The caller goes away while GPU 0's clock write is in the driver: the apply still completes (power
    limit written too), the GPUs are held by the lease of its generation (never modified without an
    active lease), the outcome is recorded, and the retry replays it instead of answering INTERNAL."""
    hold = NvmlHold("nvmlDeviceSetGpuLockedClocks", tmp_path / "held")
    for key, value in hold.env().items():
        monkeypatch.setenv(key, value)  # before the agent's threads exist; the library reads it per call
    node = await open_node(_settings(tmp_path))
    request = apply_request(1, gpu(0, 1200, 1200, 300.0), gpu(1, 1410, 1410))
    side = grpc.aio.insecure_channel(f"127.0.0.1:{node.running.port}")
    call = control_pb2_grpc.NodeControlStub(side).ApplyGpuConfig(
        request, timeout=1.5 if how == "deadline" else 60
    )
    try:
        await hold.wait_held(request=call)
        if how == "cancel":
            call.cancel()
        elif how == "channel_closed":
            await side.close()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call
        await asyncio.sleep(0.2)  # the server has seen the caller go; the operation is still parked
    finally:
        await side.close()
        hold.release()  # also when the test fails: the agent's stop waits for the parked operation

    async def settled() -> telemetry_pb2.GetInventoryResponse | None:
        inv = await node.inventory()
        return inv if inv.gpus[0].power_limit_w == 300.0 and inv.lease.generation == 1 else None

    inv = await eventually(settled, "the apply completes after its caller went away")
    assert inv.lease.active, inv.lease  # modified GPUs are always under an active lease
    assert inv.gpus[0].modified and inv.gpus[1].sm_clock_lock.max_clock_mhz == 1410
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1200, 1200)
    assert fake_nvml.state.gpu(0).power_limit_w == 300.0
    retry = await node.ctl.ApplyGpuConfig(request)
    assert retry.replayed and retry.lease.generation == 1
    assert [a.power_limit_w for a in retry.applied] == [300.0, 700.0]
    saved = json.loads(node.settings.state_file.read_text())
    assert saved["gpu_scope"]["generation"] == 1 and saved["gpu_scope"]["code"] == "OK"
    assert saved["pending"] == {}


async def test_detached_operation_reports_its_outcome(
    fake_nvml: FakeNvml,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    open_node: Any,
) -> None:
    """The hook for the audit of cancelled calls: the caller of NodeAgent.apply_gpu_config is cancelled,
    and `on_detached` later receives the operation's final outcome (once)."""
    hold = NvmlHold("nvmlDeviceSetGpuLockedClocks", tmp_path / "held")
    for key, value in hold.env().items():
        monkeypatch.setenv(key, value)
    node = await open_node(_settings(tmp_path))
    finished: list[FinishedOperation] = []
    call = asyncio.create_task(
        node.running.agent.apply_gpu_config(
            apply_request(3, gpu(1, 1200, 1200)), "ctl", on_detached=finished.append
        )
    )
    try:
        await hold.wait_held(request=call)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert finished == []
    finally:
        hold.release()
    await eventually(lambda: asyncio.sleep(0, finished), "the detached outcome")
    (done,) = finished
    assert (done.scope, done.generation, done.code, done.recorded) == ("GPU-scope", 3, "OK", True)
    assert done.rpc == "ApplyGpuConfig" and done.duration_s > 0.0


# --------------------------------------------------------------------------- engines (simulated)


def _sim_settings(tmp_path: Path) -> AgentSettings:
    return _settings(tmp_path, gpu={"backend": "simulated"}, simulated={"gpus": 2})


def reconfigure(generation: int, engine_id: str, gpus: list[int], startup_s: float) -> Any:
    return control_pb2.ReconfigureEngineRequest(
        generation=generation,
        engine_id=engine_id,
        model="llama3.1-8b",
        gpu_indices=gpus,
        tp_degree=len(gpus),
        engine_options={"startup-s": f"{startup_s:g}"},
        drain_timeout_s=1.0,
    )


async def test_reconfigure_past_its_deadline_ends_ready_at_its_generation(
    tmp_path: Path, open_node: Any
) -> None:
    """The engine needs 1.5 s to start and the caller gives up after 0.3 s: the start goes on, the engine
    ends READY with the call's generation (not STARTING at generation 0), and the retry replays."""
    node = await open_node(_sim_settings(tmp_path))
    request = reconfigure(1, "e1", [0, 1], startup_s=1.5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.ctl.ReconfigureEngine(request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def ready() -> common_pb2.EngineInfo | None:
        engines = (await node.inventory()).engines
        return engines[0] if engines and engines[0].state == common_pb2.ENGINE_STATE_READY else None

    engine = await eventually(ready, "the engine becomes READY after its caller went away", 20.0)
    assert engine.generation == 1
    retry = await node.ctl.ReconfigureEngine(request, timeout=30)
    assert retry.replayed and retry.engine.state == common_pb2.ENGINE_STATE_READY
    assert retry.engine.generation == 1 and retry.restarted
    # A long completion keeps the drain busy for its whole timeout: the caller goes away meanwhile.
    url = f"http://127.0.0.1:{engine.http_port}/v1/completions"
    async with aiohttp.ClientSession() as session:
        long_request = asyncio.create_task(
            session.post(url, json={"prompt_token_ids": [1] * 64, "max_tokens": 4000})
        )
        await asyncio.sleep(0.3)
        stop = control_pb2.StopEngineRequest(generation=2, engine_id="e1", drain_timeout_s=1.5)
        call = node.ctl.StopEngine(stop, timeout=30)

        async def draining() -> bool:
            (e,) = (await node.inventory()).engines
            return e.state == common_pb2.ENGINE_STATE_DRAINING

        await eventually(draining, "the stop begins its drain")
        call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call
        for done in await asyncio.gather(long_request, return_exceptions=True):
            if isinstance(done, aiohttp.ClientResponse):
                done.release()

    async def stopped() -> common_pb2.EngineInfo | None:
        (e,) = (await node.inventory()).engines
        return e if e.state == common_pb2.ENGINE_STATE_STOPPED and e.generation == 2 else None

    await eventually(stopped, "the stop completes after its caller went away")
    again = await node.ctl.StopEngine(stop)
    assert again.engine.state == common_pb2.ENGINE_STATE_STOPPED
    saved = json.loads(node.settings.state_file.read_text())
    assert saved["engine_scopes"]["e1"]["generation"] == 2 and saved["pending"] == {}


async def test_agent_stop_interrupts_an_engine_start_and_records_it(tmp_path: Path, open_node: Any) -> None:
    """Shielded from its caller, not from the agent: SIGTERM's stop does not wait out a model load (here
    30 s); the interrupted call's outcome is recorded, and its engine is stopped with the others."""
    node = await open_node(_sim_settings(tmp_path))
    call = node.ctl.ReconfigureEngine(reconfigure(1, "e1", [0], startup_s=30), timeout=60)

    async def starting() -> bool:
        engines = (await node.inventory()).engines
        return bool(engines) and engines[0].state == common_pb2.ENGINE_STATE_STARTING

    await eventually(starting, "the engine starts")
    t0 = time.monotonic()
    await node.running.stop()
    assert time.monotonic() - t0 < 15.0
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    saved = json.loads(node.settings.state_file.read_text())
    record = saved["engine_scopes"]["e1"]
    assert (record["generation"], record["code"]) == (1, "UNAVAILABLE")
    assert "interrupted by the agent's shutdown" in record["message"] and saved["pending"] == {}
    assert node.running.agent.driver.engine("e1").pid is None


# --------------------------------------------------------------------------------- generations


async def test_generations_out_of_range_are_refused_and_change_nothing(
    tmp_path: Path, open_node: Any
) -> None:
    node = await open_node(_sim_settings(tmp_path))
    await node.ctl.ApplyGpuConfig(apply_request(5, gpu(0, 1200, 1200)))
    before = node.settings.state_file.read_bytes()
    inv_before = await node.inventory()
    far = time.time_ns() + 2**41  # beyond the agent's clock + 2^40 and beyond 5 + 2^32
    calls = [
        node.ctl.ApplyGpuConfig(apply_request(2**64 - 1, gpu(1, 1200, 1200))),
        node.ctl.ApplyGpuConfig(apply_request(MAX_GENERATION + 1, gpu(1, 1200, 1200))),
        node.ctl.ApplyGpuConfig(apply_request(far, gpu(1, 1200, 1200))),
        node.ctl.RestoreDefaults(control_pb2.RestoreDefaultsRequest(generation=2**64 - 1)),
        node.ctl.ReconfigureEngine(reconfigure(2**64 - 1, "e1", [1], startup_s=0.05)),
        node.ctl.StopEngine(control_pb2.StopEngineRequest(generation=2**64 - 1, engine_id="e1")),
        node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=2**64 - 1, lease_s=5)),
    ]
    dry = apply_request(2**64 - 1, gpu(1, 1200, 1200))
    dry.dry_run = True
    calls.append(node.ctl.ApplyGpuConfig(dry))
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        details = info.value.details() or ""
        assert details.startswith("generation: got ") and "allowed: 1.." in details, details
    assert node.settings.state_file.read_bytes() == before
    inv = await node.inventory()
    assert inv.lease.generation == 5 and not inv.engines
    assert [g.modified for g in inv.gpus] == [g.modified for g in inv_before.gpus]
    # the scope is not stuck: the next generations work, wall-clock ones (dctl's) included
    await node.ctl.ApplyGpuConfig(apply_request(6, gpu(1, 1200, 1200)))
    reply = await node.ctl.ApplyGpuConfig(apply_request(time.time_ns(), gpu(1, 990, 990)))
    assert reply.lease.active
    top = await node.ctl.RestoreDefaults(
        control_pb2.RestoreDefaultsRequest(generation=reply.generation + 2**32)
    )
    assert not top.lease.active


# ----------------------------------------------------------------------- kill -9 (subprocesses)


class AgentProcess:
    """`python -m agent.app` over the fake library; the port comes from stdout's first line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @staticmethod
    def env(fake: FakeNvml, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = fake.env()
        env.update(
            PYTHONPATH=str(ROOT),
            DYNAMOLLM_AGENT_GPU_BACKEND="nvml",
            DYNAMOLLM_AGENT_AUTH_ALLOW_UNAUTHENTICATED_LOOPBACK="true",
            **(extra or {}),
        )
        return env

    @classmethod
    async def start(
        cls, fake: FakeNvml, runtime_dir: Path, extra_env: Mapping[str, str] | None = None
    ) -> AgentProcess:
        log_path = runtime_dir.parent / f"agent-{len(list(runtime_dir.parent.glob('agent-*')))}.log"
        with open(log_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.app", "--listen", "127.0.0.1:0", "--metrics-listen", "",
                "--runtime-dir", str(runtime_dir),
                env=cls.env(fake, extra_env), stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
            )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            await proc.wait()
            raise AssertionError(f"agent exited {proc.returncode}: {log_path.read_text()}")
        event = json.loads(line)
        assert event["event"] == "agent_listening"
        return cls(proc, int(event["port"]), log_path)

    def stub(self, channel: grpc.aio.Channel) -> control_pb2_grpc.NodeControlStub:
        return control_pb2_grpc.NodeControlStub(channel)

    async def apply(self, request: Any) -> control_pb2.ApplyGpuConfigResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            reply: control_pb2.ApplyGpuConfigResponse = await self.stub(channel).ApplyGpuConfig(
                request, timeout=30
            )
            return reply

    async def restore(self, generation: int) -> control_pb2.RestoreDefaultsResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            reply: control_pb2.RestoreDefaultsResponse = await self.stub(channel).RestoreDefaults(
                control_pb2.RestoreDefaultsRequest(generation=generation), timeout=30
            )
            return reply

    async def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def ensure_dead(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def _kill_9_mid_apply(
    fake: FakeNvml, tmp_path: Path, hold: NvmlHold
) -> tuple[Path, dict[str, Any], Any]:
    """GPU 0 (admin limit 650 W) is modified by generation 1 (clocks only); generation 2 adds a 300 W
    limit and is stopped by `hold`, where the agent is killed with SIGKILL. Returns the runtime
    directory, the state file as it was at the kill, and the interrupted request."""
    fake.state.update({"gpus": 2, "gpu0.power_limit_mw": ADMIN_LIMIT_MW})
    runtime = tmp_path / "run"
    agent = await AgentProcess.start(fake, runtime, hold.env())
    try:
        await agent.apply(apply_request(1, gpu(0, 1200, 1200)))
        interrupted = apply_request(2, gpu(0, 1410, 1410, 300.0))
        pending = asyncio.create_task(agent.apply(interrupted))
        await hold.wait_held(request=pending)
        at_kill = json.loads((runtime / "state.json").read_text())
        assert await agent.kill(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(grpc.aio.AioRpcError):
            await pending
    finally:
        await agent.ensure_dead()
    return runtime, at_kill, interrupted


async def _restart_and_check_restored(
    fake: FakeNvml, runtime: Path, interrupted: Any, *, via_restore_command: bool
) -> None:
    """Restart (or run `restore-defaults` first): GPU 0 is back at exactly 650 W, unlocked; a retry of the
    interrupted generation gets its recorded outcome; a later apply and restore return to 650 W again."""
    if via_restore_command:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.app", "restore-defaults", "--runtime-dir", str(runtime),
            env=AgentProcess.env(fake), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert fake.state.gpu(0).locked_clocks_mhz is None
        assert fake.state.gpu(0).power_limit_w == ADMIN_LIMIT_MW / 1000
    agent = await AgentProcess.start(fake, runtime)
    try:
        assert fake.state.gpu(0).locked_clocks_mhz is None
        assert fake.state.gpu(0).power_limit_w == ADMIN_LIMIT_MW / 1000  # not 300 W, not the 700 W default
        assert fake.state.gpu(1).power_limit_w == 700.0
        if not via_restore_command:
            assert "gpu_defaults_restored_after_crash" in agent.log_path.read_text()
            # the same generation, the same request: its recorded outcome (the interruption)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.apply(interrupted)
            assert info.value.code() == grpc.StatusCode.ABORTED, info.value.details()
            assert "interrupted" in (info.value.details() or "")
        await agent.apply(apply_request(3, gpu(0, 1200, 1200, 400.0)))
        assert fake.state.gpu(0).power_limit_w == 400.0
        restored = await agent.restore(4)
        assert restored.restored[0].power_limit_w == ADMIN_LIMIT_MW / 1000
        assert fake.state.gpu(0).power_limit_w == ADMIN_LIMIT_MW / 1000
        await agent.apply(apply_request(5, gpu(0, 1200, 1200, 350.0)))
        assert await agent.kill(signal.SIGTERM) == 0
        assert fake.state.gpu(0).power_limit_w == ADMIN_LIMIT_MW / 1000
        saved = json.loads((runtime / "state.json").read_text())
        assert saved["defaults"][UUID0]["power_limit_w"] == ADMIN_LIMIT_MW / 1000
    finally:
        await agent.ensure_dead()


async def test_kill_9_between_journal_and_hardware_write(fake_nvml: FakeNvml, tmp_path: Path) -> None:  # noqa: F811
    """(a) Killed with generation 2 parked in its first hardware write (GPU 0's clock lock): the intent
    (generation, the settings to write, the armed lease) was already on disk."""
    hold = NvmlHold("nvmlDeviceSetGpuLockedClocks@2", tmp_path / "held")  # call 1 is generation 1's
    runtime, at_kill, interrupted = await _kill_9_mid_apply(fake_nvml, tmp_path, hold)
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1200, 1200)  # generation 2 wrote nothing yet
    intent = at_kill["pending"]["gpu"]
    assert (intent["rpc"], intent["generation"]) == ("ApplyGpuConfig", 2)
    assert intent["gpu_writes"][UUID0] == {"sm_clock_lock": [1410, 1410], "power_limit_w": 300.0}
    assert at_kill["lease"]["generation"] == 2 and at_kill["lease"]["expires_unix_ns"] > time.time_ns()
    assert at_kill["defaults"][UUID0]["power_limit_w"] == ADMIN_LIMIT_MW / 1000
    await _restart_and_check_restored(fake_nvml, runtime, interrupted, via_restore_command=False)


@pytest.mark.parametrize("via_restore_command", [False, True], ids=["restart", "restore-defaults"])
async def test_kill_9_between_hardware_write_and_state_write(
    fake_nvml: FakeNvml,  # noqa: F811
    tmp_path: Path,
    via_restore_command: bool,
) -> None:
    """(b) Killed after generation 2's 300 W limit reached GPU 0 and before its outcome was saved: the
    next start (or systemd's `restore-defaults`) must not take 300 W for the default."""
    hold = NvmlHold("after:nvmlDeviceSetPowerManagementLimit", tmp_path / "held")
    runtime, at_kill, interrupted = await _kill_9_mid_apply(fake_nvml, tmp_path, hold)
    assert fake_nvml.state.gpu(0).power_limit_w == 300.0  # the write happened; the outcome was not saved
    assert at_kill["gpu_scope"]["generation"] == 1
    await _restart_and_check_restored(
        fake_nvml, runtime, interrupted, via_restore_command=via_restore_command
    )
