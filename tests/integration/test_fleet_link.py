"""The fleet's node links against agents served on loopback (a fake NodeTelemetry on a real grpc.aio
server): a node whose GPUs are not of the profile's type is refused (never READY, a permanent error
naming profile.gpu), and a node that never answers is UNAVAILABLE once it has been silent long enough."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from agent.api.v1 import common_pb2, telemetry_pb2, telemetry_pb2_grpc
from controller.fleet.desired import DesiredState
from controller.fleet.grpc_fleet import FleetSettings, GrpcFleet, NodeConfig, State


class _Agent(telemetry_pb2_grpc.NodeTelemetryServicer):
    def __init__(self, gpu_name: str) -> None:
        self.gpu_name = gpu_name

    async def GetInventory(
        self, request: telemetry_pb2.GetInventoryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> telemetry_pb2.GetInventoryResponse:
        gpus = [common_pb2.GpuInfo(gpu_index=i, name=self.gpu_name) for i in range(2)]
        return telemetry_pb2.GetInventoryResponse(node_id="n", gpus=gpus)

    async def StreamTelemetry(
        self, request: telemetry_pb2.StreamTelemetryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[telemetry_pb2.TelemetrySample]:
        while True:
            yield telemetry_pb2.TelemetrySample(gpus=[common_pb2.GpuSample(gpu_index=0, power_w=100.0)])
            await asyncio.sleep(0.1)


class _Listener:
    def __init__(self) -> None:
        self.states: list[tuple[int, bool]] = []

    def instance_ready(self, instance_id: int) -> None: ...

    def instance_idle(self, node: int, engine_id: str, instance_id: int) -> None: ...

    def node_state(self, node: int, available: bool) -> None:
        self.states.append((node, available))

    def command_result(self, command_key: int, status: str, result: str) -> None: ...

    def command_attempt(self, command_key: int, result: str) -> None: ...

    def next_generation(self, at_least: int) -> int:
        return at_least + 1

    def energy(self, node: int, pool: str, energy_j: float) -> None: ...


@pytest.fixture
async def agents() -> AsyncIterator[list[str]]:
    servers = []
    addresses = []
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"):
        server = grpc.aio.server()
        telemetry_pb2_grpc.add_NodeTelemetryServicer_to_server(_Agent(name), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        await server.stop(0)


async def test_a_node_of_another_gpu_type_is_refused_and_a_silent_one_is_unavailable(
    agents: list[str],
) -> None:
    nodes = [NodeConfig("h100", agents[0]), NodeConfig("a100", agents[1]), NodeConfig("gone", "127.0.0.1:1")]
    settings = FleetSettings(
        model="llama2-70b", unavailable_after_s=1.0, gpu_names=("H100 80GB HBM3",), retry_initial_s=0.1
    )
    listener = _Listener()
    desired = DesiredState(3, drain_timeout_s=0.0)
    fleet = GrpcFleet(nodes, settings, lambda: desired, listener)
    fleet.start()
    try:
        await asyncio.sleep(2.0)
        h100, a100, gone = fleet.links
        assert h100.state == State.READY and h100.total_power_w() == 100.0
        assert a100.state == State.UNAVAILABLE and a100.inventory is None
        assert a100.last_error_permanent and "profile.gpu" in a100.last_error and "A100" in a100.last_error
        assert gone.state == State.UNAVAILABLE and not gone.last_error_permanent
        assert (
            (0, True) in listener.states and (1, False) in listener.states and (2, False) in listener.states
        )
        assert (1, True) not in listener.states
    finally:
        await fleet.close()
