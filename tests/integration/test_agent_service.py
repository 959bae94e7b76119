"""The agent in-process (`agent.app.start_agent`) with the simulated backend, over real gRPC on loopback:
every RPC, bad input on every field with state unchanged, replay and stale generations, dry run, lease
renewal and expiry, RestoreDefaults, telemetry streams with drops, health, reflection, authorization,
and engines (the real simulated engine program as a subprocess)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import RunningAgent, start_agent
from agent.settings import AgentSettings, merge_settings

GPUS = 4
MAX_LEASE_S = 60.0


def make_settings(tmp_path: Path, **extra: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(tmp_path / "run"),
        "max_lease_s": MAX_LEASE_S,
        "log_json": True,
        "gpu": {"backend": "simulated"},
        "simulated": {"gpus": GPUS},
        "telemetry": {"period_s": 0.05, "min_period_s": 0.05, "subscriber_queue": 4},
        "engine": {"base_port": 0, "ready_timeout_s": 20.0, "stop_grace_s": 5.0, "drain_timeout_s": 2.0},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return merge_settings(values, {}, {}, hostname="test-node")


@dataclass
class Node:
    running: RunningAgent
    channel: grpc.aio.Channel
    tel: telemetry_pb2_grpc.NodeTelemetryStub
    ctl: control_pb2_grpc.NodeControlStub
    settings: AgentSettings

    async def inventory(self) -> telemetry_pb2.GetInventoryResponse:
        return await self.tel.GetInventory(telemetry_pb2.GetInventoryRequest())


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    settings = make_settings(tmp_path)
    running = await start_agent(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Node(
            running,
            channel,
            telemetry_pb2_grpc.NodeTelemetryStub(channel),
            control_pb2_grpc.NodeControlStub(channel),
            settings,
        )
    finally:
        await channel.close()
        await running.stop()


def gpu(index: int, lo: int, hi: int, power_limit_w: float | None = None) -> control_pb2.GpuSetting:
    setting = control_pb2.GpuSetting(gpu_index=index, min_clock_mhz=lo, max_clock_mhz=hi)
    if power_limit_w is not None:
        setting.power_limit_w = power_limit_w
    return setting


def apply_request(generation: int, *gpus: control_pb2.GpuSetting, lease_s: float = 30.0) -> Any:
    return control_pb2.ApplyGpuConfigRequest(generation=generation, lease_s=lease_s, gpus=list(gpus))


async def expect_error(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def stable(inv: telemetry_pb2.GetInventoryResponse) -> telemetry_pb2.GetInventoryResponse:
    """The inventory without what moves with time."""
    out = telemetry_pb2.GetInventoryResponse()
    out.CopyFrom(inv)
    out.ts_unix_ns = 0
    out.lease.remaining_s = 0
    out.lease.expires_unix_ns = 0
    return out


# ------------------------------------------------------------------------------------------- GPU


async def test_inventory(node: Node) -> None:
    inv = await node.inventory()
    assert inv.node_id == "test-node" and inv.agent_version == "0.1.0" and inv.hostname
    assert inv.gpu_backend == common_pb2.GPU_BACKEND_KIND_SIMULATED
    assert [g.gpu_index for g in inv.gpus] == list(range(GPUS))
    g0 = inv.gpus[0]
    assert g0.uuid.startswith("GPU-") and len({g.uuid for g in inv.gpus}) == GPUS
    clocks = list(g0.supported_sm_clocks_mhz)
    assert clocks == sorted(set(clocks)) and clocks[-1] == 1980 and 1200 in clocks
    assert (g0.min_power_limit_w, g0.max_power_limit_w, g0.default_power_limit_w) == (200.0, 700.0, 700.0)
    assert g0.power_limit_w == 700.0 and not g0.modified and not g0.HasField("sm_clock_lock")
    assert g0.mem_total_bytes > 0
    assert not inv.engines
    assert not inv.lease.active and inv.lease.generation == 0
    assert inv.ts_unix_ns > 0


async def test_apply_replay_stale_and_reuse(node: Node) -> None:
    reply = await node.ctl.ApplyGpuConfig(apply_request(3, gpu(1, 1200, 1400, 500.0), gpu(0, 1980, 1980)))
    assert reply.generation == 3 and not reply.replayed and not reply.dry_run
    assert [a.gpu_index for a in reply.applied] == [0, 1]  # ascending, whatever the request order
    assert (reply.applied[1].sm_clock_lock.min_clock_mhz, reply.applied[1].sm_clock_lock.max_clock_mhz) == (
        1200,
        1400,
    )
    assert reply.applied[1].power_limit_w == 500.0 and reply.applied[0].power_limit_w == 700.0
    assert reply.lease.active and reply.lease.generation == 3 and reply.lease.holder.startswith("peer:")
    assert 29.0 < reply.lease.remaining_s <= 30.0
    inv = await node.inventory()
    assert inv.gpus[1].modified and inv.gpus[1].power_limit_w == 500.0
    assert inv.gpus[1].sm_clock_lock.max_clock_mhz == 1400
    assert inv.gpus[0].modified and not inv.gpus[2].modified

    again = await node.ctl.ApplyGpuConfig(apply_request(3, gpu(1, 1200, 1400, 500.0), gpu(0, 1980, 1980)))
    assert again.replayed
    assert again.lease.expires_unix_ns == reply.lease.expires_unix_ns  # recorded, not re-acted

    details = await expect_error(
        node.ctl.ApplyGpuConfig(apply_request(3, gpu(1, 1200, 1200))), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("generation: got 3")
    details = await expect_error(
        node.ctl.ApplyGpuConfig(apply_request(2, gpu(1, 1200, 1200))), grpc.StatusCode.ABORTED
    )
    assert "in force, 3" in details
    assert stable(await node.inventory()) == stable(inv)

    # concurrent retries of one new generation: acted on once, the others replay the same outcome
    replies = await asyncio.gather(
        *(node.ctl.ApplyGpuConfig(apply_request(4, gpu(2, 800, 800))) for _ in range(5))
    )
    assert sorted(r.replayed for r in replies) == [False, True, True, True, True]
    assert len({r.lease.expires_unix_ns for r in replies}) == 1


async def test_dry_run_changes_and_records_nothing(node: Node) -> None:
    before = stable(await node.inventory())
    request = apply_request(1, gpu(2, 1000, 1000, 300.0))
    request.dry_run = True
    reply = await node.ctl.ApplyGpuConfig(request)
    assert reply.dry_run and reply.applied[0].power_limit_w == 300.0
    assert reply.applied[0].sm_clock_lock.min_clock_mhz == 1000 and reply.lease.generation == 1
    assert stable(await node.inventory()) == before
    real = await node.ctl.ApplyGpuConfig(apply_request(1, gpu(2, 1000, 1000, 300.0)))  # generation still free
    assert not real.replayed and not real.dry_run


def _bad_requests() -> list[tuple[str, str, Callable[[], Any], str]]:
    """(id, rpc, request, field named by the error); generation 10 is above the fixture's 5."""
    apply = "ApplyGpuConfig"

    def a(*gpus: control_pb2.GpuSetting, lease_s: float = 10.0, generation: int = 10) -> Callable[[], Any]:
        return lambda: apply_request(generation, *gpus, lease_s=lease_s)

    def reconf(**fields: Any) -> Callable[[], Any]:
        base: dict[str, Any] = dict(
            generation=10, engine_id="e1", model="llama2-70b", gpu_indices=[0, 1], tp_degree=2
        )
        base.update(fields)
        return lambda: control_pb2.ReconfigureEngineRequest(**base)

    def stop(**fields: Any) -> Callable[[], Any]:
        base: dict[str, Any] = dict(generation=10, engine_id="e1")
        base.update(fields)
        return lambda: control_pb2.StopEngineRequest(**base)

    ok = gpu(1, 1200, 1200)
    return [
        ("apply-generation-0", apply, a(ok, generation=0), "generation"),
        ("apply-lease-0", apply, a(ok, lease_s=0.0), "lease_s"),
        ("apply-lease-negative", apply, a(ok, lease_s=-1.0), "lease_s"),
        ("apply-lease-nan", apply, a(ok, lease_s=math.nan), "lease_s"),
        ("apply-lease-inf", apply, a(ok, lease_s=math.inf), "lease_s"),
        ("apply-lease-too-long", apply, a(ok, lease_s=MAX_LEASE_S + 1), "lease_s"),
        ("apply-no-gpus", apply, a(), "gpus"),
        ("apply-unknown-gpu", apply, a(ok, gpu(GPUS, 1200, 1200)), "gpus[1].gpu_index"),
        ("apply-repeated-gpu", apply, a(ok, gpu(1, 1400, 1400)), "gpus[1].gpu_index"),
        ("apply-min-clock", apply, a(gpu(1, 1201, 1400)), "gpus[0].min_clock_mhz"),
        ("apply-max-clock", apply, a(ok, gpu(2, 1200, 1990)), "gpus[1].max_clock_mhz"),
        ("apply-zero-clock", apply, a(gpu(1, 0, 1200)), "gpus[0].min_clock_mhz"),
        ("apply-min-above-max", apply, a(gpu(1, 1400, 1200)), "gpus[0].min_clock_mhz"),
        ("apply-power-low", apply, a(gpu(1, 1200, 1200, 199.0)), "gpus[0].power_limit_w"),
        ("apply-power-high", apply, a(gpu(1, 1200, 1200, 701.0)), "gpus[0].power_limit_w"),
        ("apply-power-nan", apply, a(gpu(1, 1200, 1200, math.nan)), "gpus[0].power_limit_w"),
        ("renew-generation-0", "RenewLease", lambda: control_pb2.RenewLeaseRequest(lease_s=5), "generation"),
        ("renew-lease-0", "RenewLease", lambda: control_pb2.RenewLeaseRequest(generation=5), "lease_s"),
        (
            "renew-lease-nan",
            "RenewLease",
            lambda: control_pb2.RenewLeaseRequest(generation=5, lease_s=math.nan),
            "lease_s",
        ),
        (
            "renew-lease-too-long",
            "RenewLease",
            lambda: control_pb2.RenewLeaseRequest(generation=5, lease_s=MAX_LEASE_S * 2),
            "lease_s",
        ),
        (
            "restore-generation-0",
            "RestoreDefaults",
            lambda: control_pb2.RestoreDefaultsRequest(generation=0),
            "generation",
        ),
        (
            "restore-unknown-gpu",
            "RestoreDefaults",
            lambda: control_pb2.RestoreDefaultsRequest(generation=10, gpu_indices=[0, GPUS]),
            "gpu_indices[1]",
        ),
        (
            "restore-repeated-gpu",
            "RestoreDefaults",
            lambda: control_pb2.RestoreDefaultsRequest(generation=10, gpu_indices=[1, 1]),
            "gpu_indices[1]",
        ),
        ("reconf-generation-0", "ReconfigureEngine", reconf(generation=0), "generation"),
        ("reconf-id-empty", "ReconfigureEngine", reconf(engine_id=""), "engine_id"),
        ("reconf-id-upper", "ReconfigureEngine", reconf(engine_id="E1"), "engine_id"),
        ("reconf-id-digit", "ReconfigureEngine", reconf(engine_id="1e"), "engine_id"),
        ("reconf-id-long", "ReconfigureEngine", reconf(engine_id="e" * 64), "engine_id"),
        ("reconf-model", "ReconfigureEngine", reconf(model="gpt-9"), "model"),
        ("reconf-no-gpus", "ReconfigureEngine", reconf(gpu_indices=[], tp_degree=1), "gpu_indices"),
        ("reconf-unknown-gpu", "ReconfigureEngine", reconf(gpu_indices=[0, GPUS]), "gpu_indices[1]"),
        ("reconf-repeated-gpu", "ReconfigureEngine", reconf(gpu_indices=[1, 1]), "gpu_indices[1]"),
        ("reconf-tp-0", "ReconfigureEngine", reconf(tp_degree=0), "tp_degree"),
        ("reconf-tp-mismatch", "ReconfigureEngine", reconf(tp_degree=1), "tp_degree"),
        (
            "reconf-tp-unsupported",
            "ReconfigureEngine",
            reconf(gpu_indices=[0, 1, 2], tp_degree=3),
            "tp_degree",
        ),
        (
            "reconf-option",
            "ReconfigureEngine",
            reconf(engine_options={"enforce-eager": ""}),
            "engine_options",
        ),
        ("reconf-drain-negative", "ReconfigureEngine", reconf(drain_timeout_s=-1.0), "drain_timeout_s"),
        ("reconf-drain-nan", "ReconfigureEngine", reconf(drain_timeout_s=math.nan), "drain_timeout_s"),
        ("reconf-ready-negative", "ReconfigureEngine", reconf(ready_timeout_s=-1.0), "ready_timeout_s"),
        ("reconf-ready-inf", "ReconfigureEngine", reconf(ready_timeout_s=math.inf), "ready_timeout_s"),
        ("stop-generation-0", "StopEngine", stop(generation=0), "generation"),
        ("stop-id", "StopEngine", stop(engine_id="-e"), "engine_id"),
        ("stop-drain-negative", "StopEngine", stop(drain_timeout_s=-0.5), "drain_timeout_s"),
        ("stop-drain-inf", "StopEngine", stop(drain_timeout_s=math.inf), "drain_timeout_s"),
    ]


BAD = _bad_requests()


@pytest.mark.parametrize(("rpc", "request_factory", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_input_names_field_and_changes_nothing(
    node: Node, rpc: str, request_factory: Callable[[], Any], field: str
) -> None:
    await node.ctl.ApplyGpuConfig(apply_request(5, gpu(0, 1000, 1000, 400.0)))
    before = stable(await node.inventory())
    state_before = node.settings.state_file.read_bytes()
    details = await expect_error(getattr(node.ctl, rpc)(request_factory()), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith(f"{field}") and "got" in details and "allowed" in details, details
    assert stable(await node.inventory()) == before
    assert node.settings.state_file.read_bytes() == state_before


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (telemetry_pb2.StreamTelemetryRequest(period_s=0.01), "period_s"),
        (telemetry_pb2.StreamTelemetryRequest(period_s=0.07), "period_s"),
        (telemetry_pb2.StreamTelemetryRequest(period_s=61.0), "period_s"),
        (telemetry_pb2.StreamTelemetryRequest(period_s=math.nan), "period_s"),
        (telemetry_pb2.StreamTelemetryRequest(gpu_indices=[GPUS]), "gpu_indices[0]"),
        (telemetry_pb2.StreamTelemetryRequest(gpu_indices=[2, 2]), "gpu_indices[1]"),
    ],
)
async def test_bad_stream_requests(node: Node, request_: Any, field: str) -> None:
    stream = node.tel.StreamTelemetry(request_)
    details = await expect_error(stream.read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith(field)


async def test_renew_lease(node: Node) -> None:
    await expect_error(
        node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=1, lease_s=5)), grpc.StatusCode.ABORTED
    )
    await node.ctl.ApplyGpuConfig(apply_request(2, gpu(0, 1200, 1200), lease_s=0.4))
    details = await expect_error(
        node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=1, lease_s=5)), grpc.StatusCode.ABORTED
    )
    assert "generation 2" in details
    reply = await node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=2, lease_s=20))
    assert reply.lease.active and reply.lease.generation == 2 and 19 < reply.lease.remaining_s <= 20
    reply = await node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=2, lease_s=0.3))
    assert reply.lease.remaining_s <= 0.3  # set, not added
    await asyncio.sleep(0.6)
    details = await expect_error(
        node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=2, lease_s=5)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "apply" in details


async def test_lease_expiry_restores_defaults_engines_unaffected(node: Node) -> None:
    await node.ctl.ApplyGpuConfig(apply_request(1, gpu(0, 1200, 1200, 300.0), gpu(3, 800, 900), lease_s=0.3))
    inv = await node.inventory()
    assert inv.lease.active and inv.gpus[0].modified
    await asyncio.sleep(0.7)
    inv = await node.inventory()
    assert not inv.lease.active and inv.lease.generation == 1
    assert not any(g.modified for g in inv.gpus)
    assert inv.gpus[0].power_limit_w == 700.0 and not inv.gpus[0].HasField("sm_clock_lock")
    sample = await node.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(gpu_indices=[0, 3])).read()
    assert [g.sm_clock_mhz for g in sample.gpus] == [1980, 1980]  # what the backend reports: unlocked
    # a later apply with a new generation works again
    reply = await node.ctl.ApplyGpuConfig(apply_request(2, gpu(0, 1200, 1200)))
    assert reply.lease.active


async def test_restore_defaults(node: Node) -> None:
    await node.ctl.ApplyGpuConfig(apply_request(1, gpu(0, 1200, 1200, 300.0), gpu(1, 1000, 1000)))
    reply = await node.ctl.RestoreDefaults(control_pb2.RestoreDefaultsRequest(generation=2, gpu_indices=[1]))
    assert [r.gpu_index for r in reply.restored] == [1] and not reply.restored[0].HasField("sm_clock_lock")
    assert reply.lease.active and reply.lease.generation == 2  # GPU 0 is still held
    await expect_error(
        node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=1, lease_s=5)), grpc.StatusCode.ABORTED
    )
    await node.ctl.RenewLease(control_pb2.RenewLeaseRequest(generation=2, lease_s=5))
    replay = await node.ctl.RestoreDefaults(control_pb2.RestoreDefaultsRequest(generation=2, gpu_indices=[1]))
    assert replay.replayed
    reply = await node.ctl.RestoreDefaults(control_pb2.RestoreDefaultsRequest(generation=3))
    assert [r.gpu_index for r in reply.restored] == list(range(GPUS))
    assert reply.restored[0].power_limit_w == 700.0
    assert not reply.lease.active and reply.lease.generation == 3
    inv = await node.inventory()
    assert not any(g.modified for g in inv.gpus)
    await expect_error(
        node.ctl.ApplyGpuConfig(apply_request(2, gpu(0, 1200, 1200))), grpc.StatusCode.ABORTED
    )  # the GPU scope is shared by Apply and RestoreDefaults


# ------------------------------------------------------------------------------------- telemetry


async def test_stream_telemetry(node: Node) -> None:
    await node.ctl.ApplyGpuConfig(apply_request(1, gpu(2, 1200, 1200)))
    stream = node.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(period_s=0.1, gpu_indices=[2, 0]))
    samples = [await stream.read() for _ in range(4)]
    stream.cancel()
    assert all(s.period_s == pytest.approx(0.1) for s in samples)
    assert all([g.gpu_index for g in s.gpus] == [0, 2] for s in samples)
    gaps_s = [(b.ts_unix_ns - a.ts_unix_ns) / 1e9 for a, b in itertools.pairwise(samples)]
    assert all(0.05 < g < 0.2 for g in gaps_s), gaps_s
    g0, g2 = samples[-1].gpus
    assert g2.sm_clock_mhz == 1200 and g0.sm_clock_mhz == 1980
    assert g0.power_w > 0 and g0.enforced_power_limit_w == 700.0 and g0.mem_clock_mhz > 0
    assert samples[-1].gpus[0].energy_j > samples[0].gpus[0].energy_j  # idle power integrates
    assert not samples[-1].engines
    default = await node.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest()).read()
    assert default.period_s == pytest.approx(0.05) and len(default.gpus) == GPUS


async def test_slow_subscriber_drops_are_counted(tmp_path: Path) -> None:
    running = await start_agent(make_settings(tmp_path, telemetry={"period_s": 0.02, "min_period_s": 0.02}))
    # A tiny flow-control window, so the slow reader's backlog lands in the agent's bounded queue.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
            fast_stub = telemetry_pb2_grpc.NodeTelemetryStub(channel)
            slow = fast_stub.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest())
            fast = fast_stub.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(gpu_indices=[0]))
            first = await slow.read()
            assert first.dropped_samples_count == 0
            fast_seen = []
            for _ in range(60):  # ~1.2 s during which the slow stream is not read
                fast_seen.append(await fast.read())
            assert fast_seen[-1].dropped_samples_count == 0  # a slow subscriber does not slow the others
            gaps_s = [(b.ts_unix_ns - a.ts_unix_ns) / 1e9 for a, b in itertools.pairwise(fast_seen)]
            assert max(gaps_s) < 0.2
            dropped = 0
            for _ in range(200):
                sample = await slow.read()
                dropped = sample.dropped_samples_count
                if dropped:
                    break
            assert dropped > 0
            slow.cancel()
            fast.cancel()
    finally:
        await running.stop()


# ---------------------------------------------------------------------------- health, reflection


async def test_health_and_reflection(node: Node) -> None:
    health = health_pb2_grpc.HealthStub(node.channel)
    for service in ("", "dynamollm.agent.v1.NodeTelemetry", "dynamollm.agent.v1.NodeControl"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(node.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        assert {
            "dynamollm.agent.v1.NodeTelemetry",
            "dynamollm.agent.v1.NodeControl",
            "grpc.health.v1.Health",
        } <= names
        break


async def test_health_not_serving_during_stop_and_reflection_off(tmp_path: Path) -> None:
    running = await start_agent(make_settings(tmp_path, reflection=False))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ServerReflectionInfo(requests()):
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


# ------------------------------------------------------------------------------------------ auth


async def test_tokens_scopes(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[[tokens]]\nname = "controller"\ntoken = "control-token-0123456789"\nscopes = ["read", "control"]\n'
        '[[tokens]]\nname = "grafana"\ntoken = "read-token-0123456789"\nscopes = ["read"]\n'
    )
    tokens.chmod(0o600)
    running = await start_agent(make_settings(tmp_path, auth={"tokens_file": str(tokens)}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            tel, ctl = (
                telemetry_pb2_grpc.NodeTelemetryStub(channel),
                control_pb2_grpc.NodeControlStub(channel),
            )
            read_md = (("authorization", "Bearer read-token-0123456789"),)
            ctl_md = (("authorization", "Bearer control-token-0123456789"),)
            await expect_error(
                tel.GetInventory(telemetry_pb2.GetInventoryRequest()), grpc.StatusCode.UNAUTHENTICATED
            )
            await tel.GetInventory(telemetry_pb2.GetInventoryRequest(), metadata=read_md)
            request = apply_request(1, gpu(0, 1200, 1200))
            await expect_error(ctl.ApplyGpuConfig(request), grpc.StatusCode.UNAUTHENTICATED)
            bad_md = (("authorization", "Bearer nope-nope-nope-nope"),)
            await expect_error(ctl.ApplyGpuConfig(request, metadata=bad_md), grpc.StatusCode.UNAUTHENTICATED)
            details = await expect_error(
                ctl.ApplyGpuConfig(request, metadata=read_md), grpc.StatusCode.PERMISSION_DENIED
            )
            assert "grafana" in details and "control" in details
            reply = await ctl.ApplyGpuConfig(request, metadata=ctl_md)
            assert reply.lease.holder == "controller"
        audit = [json.loads(line) for line in running.agent.settings.audit_log.read_text().splitlines()]
        assert [(a["who"], a["result"]) for a in audit] == [
            ("unauthenticated ipv4:127.0.0.1", "UNAUTHENTICATED"),
            ("unauthenticated ipv4:127.0.0.1", "UNAUTHENTICATED"),
            ("grafana", "PERMISSION_DENIED"),
            ("controller", "OK"),
        ]
        assert all(a["rpc"] == "ApplyGpuConfig" and a["generation"] == 1 for a in audit)
    finally:
        await running.stop()


# --------------------------------------------------------------------------------------- engines


def reconfigure(generation: int, engine_id: str, gpus: list[int], **extra: Any) -> Any:
    return control_pb2.ReconfigureEngineRequest(
        generation=generation,
        engine_id=engine_id,
        model="llama3.1-8b",
        gpu_indices=gpus,
        tp_degree=len(gpus),
        engine_options={"startup-s": "0.05"},
        drain_timeout_s=2.0,
        **extra,
    )


async def test_engine_lifecycle(node: Node) -> None:
    reply = await node.ctl.ReconfigureEngine(reconfigure(1, "e1", [0, 1]), timeout=60)
    assert reply.restarted and reply.start_s > 0 and reply.drain_s == 0 and reply.stop_s == 0
    e = reply.engine
    assert (e.engine_id, e.model, list(e.gpu_indices), e.tp_degree) == ("e1", "llama3.1-8b", [0, 1], 2)
    assert e.state == common_pb2.ENGINE_STATE_READY and e.kind == common_pb2.ENGINE_KIND_SIMULATED
    assert e.generation == 1 and e.http_port > 0 and e.engine_options["startup-s"] == "0.05"
    port = e.http_port

    assert (await node.ctl.ReconfigureEngine(reconfigure(1, "e1", [0, 1]))).replayed
    same = await node.ctl.ReconfigureEngine(reconfigure(2, "e1", [0, 1]))
    assert not same.restarted and not same.replayed  # READY with exactly this configuration
    await expect_error(node.ctl.ReconfigureEngine(reconfigure(1, "e1", [0, 1])), grpc.StatusCode.ABORTED)

    details = await expect_error(
        node.ctl.ReconfigureEngine(reconfigure(1, "e2", [1, 2])), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "'e1'" in details
    assert (
        await node.ctl.ReconfigureEngine(reconfigure(1, "e2", [2]))
    ).engine.state == common_pb2.ENGINE_STATE_READY

    stream = node.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(include_engines=True))
    for _ in range(40):
        sample = await stream.read()
        if len(sample.engines) == 2:
            break
    stream.cancel()
    assert [m.engine_id for m in sample.engines] == ["e1", "e2"]
    assert sample.engines[0].state == common_pb2.ENGINE_STATE_READY

    narrower = await node.ctl.ReconfigureEngine(reconfigure(3, "e1", [0]), timeout=60)
    assert narrower.restarted and narrower.stop_s > 0 and narrower.engine.tp_degree == 1
    assert narrower.engine.http_port == port  # an engine keeps its port across reconfigurations
    assert narrower.engine.generation == 3

    broken = reconfigure(4, "e1", [0, 1])
    # each value is valid, together they are not: the engine program refuses them and exits
    broken.engine_options.update({"max-num-seqs": "64", "max-num-batched-tokens": "8"})
    details = await expect_error(node.ctl.ReconfigureEngine(broken, timeout=60), grpc.StatusCode.UNAVAILABLE)
    assert "previous configuration restored" in details and "max-num-batched-tokens" in details
    (e1,) = [e for e in (await node.inventory()).engines if e.engine_id == "e1"]
    assert (e1.state, list(e1.gpu_indices), e1.generation) == (common_pb2.ENGINE_STATE_READY, [0], 3)

    stop = await node.ctl.StopEngine(
        control_pb2.StopEngineRequest(generation=5, engine_id="e1", drain_timeout_s=1)
    )
    assert (
        stop.engine.state == common_pb2.ENGINE_STATE_STOPPED
        and stop.stop_s > 0
        and stop.engine.generation == 5
    )
    again = await node.ctl.StopEngine(control_pb2.StopEngineRequest(generation=6, engine_id="e1"))
    assert again.engine.state == common_pb2.ENGINE_STATE_STOPPED and again.stop_s == 0 and again.drain_s == 0
    await expect_error(
        node.ctl.StopEngine(control_pb2.StopEngineRequest(generation=1, engine_id="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    inv = await node.inventory()
    assert [(e.engine_id, e.state) for e in inv.engines] == [
        ("e1", common_pb2.ENGINE_STATE_STOPPED),
        ("e2", common_pb2.ENGINE_STATE_READY),
    ]
    # GPUs of a STOPPED engine are free again
    assert (
        await node.ctl.ReconfigureEngine(reconfigure(1, "e3", [0]))
    ).engine.state == common_pb2.ENGINE_STATE_READY


async def test_energy_counter_agrees_with_integrated_power_under_load(node: Node) -> None:
    """A simulated engine under a mixed prefill/decode load: the GPU's energy counter and the integral of
    its sampled power (averaged over the last second, as NVML reports it) agree within the
    energy_counter_mismatch threshold at every cross-check, from the first one on."""
    reply = await node.ctl.ReconfigureEngine(reconfigure(1, "e1", [0]), timeout=60)
    url = f"http://127.0.0.1:{reply.engine.http_port}/v1/completions"
    sampler = node.running.agent.sampler
    ratios: list[float] = []

    async def watch() -> None:
        seen = None
        while True:
            check = sampler.last_energy_checks.get(0)
            if check is not None and check is not seen:
                seen = check
                ratios.append(check.discrepancy_ratio)
            await asyncio.sleep(0.05)

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        body = {"prompt_token_ids": [1] * (200 + 900 * (i % 3)), "max_tokens": 20 + 40 * (i % 4)}
        async with session.post(url, json=body) as r:
            assert r.status == 200
            await r.read()

    watcher = asyncio.create_task(watch())
    try:
        async with aiohttp.ClientSession() as session:
            tasks = []
            for i in range(60):
                tasks.append(asyncio.create_task(one(i, session)))
                await asyncio.sleep(0.04)
            await asyncio.gather(*tasks)
        await asyncio.sleep(1.5)  # a cross-check over a window that includes the end of the load
    finally:
        watcher.cancel()
    assert len(ratios) >= 3
    assert max(ratios) < node.settings.telemetry.energy_mismatch_ratio, ratios


async def test_engine_start_failure_is_recorded(node: Node) -> None:
    request = reconfigure(1, "bad", [0])
    # each value is valid, together they are not: the engine program refuses them and exits
    request.engine_options.update({"max-num-seqs": "64", "max-num-batched-tokens": "8"})
    details = await expect_error(node.ctl.ReconfigureEngine(request, timeout=60), grpc.StatusCode.UNAVAILABLE)
    assert "bad" in details
    again = await expect_error(node.ctl.ReconfigureEngine(request), grpc.StatusCode.UNAVAILABLE)
    assert again == details  # the recorded outcome, not a second attempt
    inv = await node.inventory()
    assert inv.engines[0].state == common_pb2.ENGINE_STATE_FAILED and inv.engines[0].failure_reason
