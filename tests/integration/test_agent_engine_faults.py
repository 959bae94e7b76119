"""Fault tests of ReconfigureEngine and StreamTelemetry through the in-process agent (simulated backend,
the real simulated engine program, real gRPC on loopback).

- A 0.05 s ready timeout fails the new configuration; the rollback to the previous one must not inherit
  that timeout (it used to, and left a READY engine FAILED).
- An engine option with a bad value is refused with INVALID_ARGUMENT naming the option and the allowed
  values before anything stops (it used to drain and stop the engine, fail to start the new one, and
  roll back).
- StreamTelemetry with a huge period_s under a sampler faster than 1 s is INVALID_ARGUMENT naming
  period_s (it used to be INTERNAL: OverflowError in the stride arithmetic).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import start_agent
from agent.settings import merge_settings
from agent.sim.node import NodeDir


class Node:
    def __init__(self, channel: grpc.aio.Channel, node_dir: Path) -> None:
        self.ctl = control_pb2_grpc.NodeControlStub(channel)
        self.tel = telemetry_pb2_grpc.NodeTelemetryStub(channel)
        self.node_dir = NodeDir(node_dir)

    async def engine(self, engine_id: str) -> common_pb2.EngineInfo:
        inv = await self.tel.GetInventory(telemetry_pb2.GetInventoryRequest())
        (found,) = [e for e in inv.engines if e.engine_id == engine_id]
        return found


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(tmp_path / "run"),
        "gpu": {"backend": "simulated"},
        "auth": {"allow_unauthenticated_loopback": True},
        "simulated": {"gpus": 2},
        "telemetry": {"period_s": 0.05, "min_period_s": 0.05},
        "engine": {"base_port": 0, "ready_timeout_s": 20.0, "stop_grace_s": 5.0, "drain_timeout_s": 1.0},
    }
    settings = merge_settings(values, {}, {}, hostname="faults")
    running = await start_agent(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield Node(channel, settings.simulated.node_dir)
    finally:
        await running.stop()


def reconfigure(generation: int, **options: str) -> control_pb2.ReconfigureEngineRequest:
    return control_pb2.ReconfigureEngineRequest(
        generation=generation,
        engine_id="e1",
        model="llama3.1-8b",
        gpu_indices=[0],
        tp_degree=1,
        engine_options={"startup-s": "0.05", **options},
        drain_timeout_s=1.0,
    )


async def test_rollback_does_not_inherit_the_callers_ready_timeout(node: Node) -> None:
    ready = await node.ctl.ReconfigureEngine(reconfigure(1), timeout=60)
    assert ready.engine.state == common_pb2.ENGINE_STATE_READY
    hurried = reconfigure(2, **{"max-num-seqs": "8"})
    hurried.ready_timeout_s = 0.05  # no engine starts that fast: the new configuration fails
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.ctl.ReconfigureEngine(hurried, timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "previous configuration restored" in (info.value.details() or ""), info.value.details()
    engine = await node.engine("e1")
    assert engine.state == common_pb2.ENGINE_STATE_READY, engine.failure_reason
    assert dict(engine.engine_options) == {"startup-s": "0.05"}


@pytest.mark.parametrize(
    ("key", "value", "allowed", "fixed"),
    [
        ("max-num-seqs", "-5", "integer", "16"),
        ("max-num-seqs", "lots", "integer", "16"),
        ("startup-s", "nan", "seconds", "0.1"),
        ("max-num-batched-tokens", "9" * 300, "integer", "512"),
    ],
)
async def test_bad_option_value_is_refused_before_anything_stops(
    node: Node, key: str, value: str, allowed: str, fixed: str
) -> None:
    await node.ctl.ReconfigureEngine(reconfigure(1), timeout=60)
    before = await node.engine("e1")
    pid = node.node_dir.read_activity(0).pid
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await node.ctl.ReconfigureEngine(reconfigure(2, **{key: value}), timeout=60)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"engine_options[{key!r}]" in details and allowed in details
    after = await node.engine("e1")
    assert after == before  # same state, same state_since: nothing was drained or stopped
    assert node.node_dir.read_activity(0).pid == pid
    # The generation stays free: nothing changed, so the caller may send a corrected request under it.
    corrected = await node.ctl.ReconfigureEngine(reconfigure(2, **{key: fixed}), timeout=60)
    assert corrected.engine.state == common_pb2.ENGINE_STATE_READY and corrected.generation == 2


@pytest.mark.parametrize("period_s", [1e308, 1.7e308, 1e300, -1e308])
async def test_huge_stream_period_is_invalid_argument_not_internal(node: Node, period_s: float) -> None:
    stream = node.tel.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(period_s=period_s))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "period_s" in (info.value.details() or "")
