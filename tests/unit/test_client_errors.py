"""AgentClient against a small in-test gRPC servicer on loopback: status codes come back as our error tree
(one table), INVALID_ARGUMENT keeps the agent's wording, the bearer token travels, deadlines and an
unreachable node become UnavailableError, streams map errors and cancel, generations only increase."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from agent.api.client import (
    ERROR_FOR_STATUS,
    AgentClient,
    ClientTls,
    GenerationSource,
    GpuClockSetting,
    error_from_status,
)
from agent.api.errors import (
    ConflictError,
    DynamoError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedError,
)
from agent.api.v1 import (
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)

BAD_CLOCK_MESSAGE = "gpus[0].max_clock_mhz: got 1990; allowed: 210, 225, ..., 1980"
SLOW_GENERATION = 10_000  # ApplyGpuConfig with this generation answers after SLOW_REPLY_S
SLOW_REPLY_S = 2.0


class _Servicer(telemetry_pb2_grpc.NodeTelemetryServicer, control_pb2_grpc.NodeControlServicer):
    """ApplyGpuConfig fails with the status code whose number is the request's generation (0: success);
    the other RPCs echo their request; metadata of every call is kept for inspection."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.stream_cancelled = asyncio.Event()

    def _seen(self, context: aio.ServicerContext) -> None:  # type: ignore[type-arg]
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})

    async def GetInventory(
        self,
        request: telemetry_pb2.GetInventoryRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> telemetry_pb2.GetInventoryResponse:
        self._seen(context)
        return telemetry_pb2.GetInventoryResponse(node_id="node-a", gpus=[common_pb2.GpuInfo(gpu_index=0)])

    async def StreamTelemetry(
        self,
        request: telemetry_pb2.StreamTelemetryRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[telemetry_pb2.TelemetrySample]:
        self._seen(context)
        if request.period_s < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "period_s: got -1.0; allowed: 0 or 0.1 .. 60"
            )
        try:
            for n in range(1_000_000):
                yield telemetry_pb2.TelemetrySample(ts_unix_ns=n, period_s=request.period_s)
                await asyncio.sleep(0.001)
                if request.include_engines and n == 2:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "sampler stopped")
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    async def ApplyGpuConfig(
        self,
        request: control_pb2.ApplyGpuConfigRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> control_pb2.ApplyGpuConfigResponse:
        self._seen(context)
        if request.generation == SLOW_GENERATION:
            await asyncio.sleep(SLOW_REPLY_S)
        elif request.generation:
            code = next(c for c in grpc.StatusCode if c.value[0] == request.generation)
            details = (
                BAD_CLOCK_MESSAGE if code is grpc.StatusCode.INVALID_ARGUMENT else f"refused: {code.name}"
            )
            await context.abort(code, details)
        return control_pb2.ApplyGpuConfigResponse(
            generation=request.generation,
            applied=[
                control_pb2.AppliedGpuConfig(
                    gpu_index=g.gpu_index,
                    sm_clock_lock=common_pb2.SmClockRange(
                        min_clock_mhz=g.min_clock_mhz, max_clock_mhz=g.max_clock_mhz
                    ),
                    power_limit_w=g.power_limit_w if g.HasField("power_limit_w") else 700.0,
                )
                for g in request.gpus
            ],
            dry_run=request.dry_run,
        )

    async def ReconfigureEngine(
        self,
        request: control_pb2.ReconfigureEngineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> control_pb2.ReconfigureEngineResponse:
        self._seen(context)
        engine = common_pb2.EngineInfo(
            engine_id=request.engine_id,
            model=request.model,
            gpu_indices=request.gpu_indices,
            tp_degree=request.tp_degree,
            engine_options=request.engine_options,
            generation=request.generation,
            state=common_pb2.ENGINE_STATE_READY,
        )
        return control_pb2.ReconfigureEngineResponse(
            generation=request.generation,
            engine=engine,
            restarted=True,
            drain_s=request.drain_timeout_s,
            start_s=request.ready_timeout_s,
        )

    async def StopEngine(
        self,
        request: control_pb2.StopEngineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> control_pb2.StopEngineResponse:
        self._seen(context)
        engine = common_pb2.EngineInfo(engine_id=request.engine_id, state=common_pb2.ENGINE_STATE_STOPPED)
        return control_pb2.StopEngineResponse(
            generation=request.generation, engine=engine, drain_s=request.drain_timeout_s
        )

    async def RenewLease(
        self,
        request: control_pb2.RenewLeaseRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> control_pb2.RenewLeaseResponse:
        self._seen(context)
        lease = common_pb2.LeaseState(active=True, generation=request.generation, remaining_s=request.lease_s)
        return control_pb2.RenewLeaseResponse(lease=lease)

    async def RestoreDefaults(
        self,
        request: control_pb2.RestoreDefaultsRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> control_pb2.RestoreDefaultsResponse:
        self._seen(context)
        return control_pb2.RestoreDefaultsResponse(
            generation=request.generation,
            restored=[control_pb2.AppliedGpuConfig(gpu_index=i) for i in request.gpu_indices],
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, _Servicer]]:
    servicer = _Servicer()
    server = aio.server()
    telemetry_pb2_grpc.add_NodeTelemetryServicer_to_server(servicer, server)
    control_pb2_grpc.add_NodeControlServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(None)


# Codes a server cannot send as its own status (gRPC reserves them to the transport or rewrites them).
_NOT_SENDABLE = {grpc.StatusCode.OK}


@pytest.mark.parametrize(
    "code", [c for c in ERROR_FOR_STATUS if c not in _NOT_SENDABLE], ids=lambda c: c.name
)
async def test_every_status_code_comes_back_as_its_error(
    served: tuple[str, _Servicer], code: grpc.StatusCode
) -> None:
    target, _ = served
    async with AgentClient(target, timeout_s=5.0) as client:
        with pytest.raises(DynamoError) as caught:
            await client.apply_gpu_config(code.value[0], [GpuClockSetting(0, 1980, 1980)], lease_s=1.0)
    assert type(caught.value) is ERROR_FOR_STATUS[code]
    if not issubclass(ERROR_FOR_STATUS[code], InvalidArgumentError):  # those keep the agent's words
        assert "ApplyGpuConfig" in str(caught.value) and target in str(caught.value)


def test_the_table_covers_the_agent_error_tree() -> None:
    mapped = set(ERROR_FOR_STATUS.values())
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnsupportedError,
        ConflictError,
        FailedPreconditionError,
        UnavailableError,
        InternalError,
    ):
        assert cls in mapped, cls.__name__
    assert ERROR_FOR_STATUS[grpc.StatusCode.ABORTED] is ConflictError  # stale generation
    assert ERROR_FOR_STATUS[grpc.StatusCode.UNAVAILABLE].temporary


def test_the_table_inverts_the_agent_service_table() -> None:
    from agent.api.errors import DataFileError
    from agent.api.status import STATUS_BY_ERROR

    for error_type, code in STATUS_BY_ERROR:
        if error_type is DataFileError:  # a broken file on the node: the caller sees a failed precondition
            assert ERROR_FOR_STATUS[code] is FailedPreconditionError
        else:
            assert ERROR_FOR_STATUS[code] is error_type, (error_type.__name__, code.name)


async def test_invalid_argument_keeps_the_agent_message_and_parses_its_parts(
    served: tuple[str, _Servicer],
) -> None:
    target, _ = served
    async with AgentClient(target) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.apply_gpu_config(
                grpc.StatusCode.INVALID_ARGUMENT.value[0], [GpuClockSetting(0, 1990, 1990)], lease_s=1.0
            )
    err = caught.value
    assert str(err) == BAD_CLOCK_MESSAGE
    assert (err.field, err.value, err.allowed) == ("gpus[0].max_clock_mhz", "1990", "210, 225, ..., 1980")


def test_an_invalid_argument_message_of_another_form_is_kept_whole() -> None:
    err = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "something odd", target="t", rpc="X")
    assert isinstance(err, InvalidArgumentError) and str(err) == "something odd"


def test_a_huge_status_message_is_cut() -> None:
    err = error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "x" * 100_000, target="t", rpc="X")
    assert isinstance(err, FailedPreconditionError)
    assert len(str(err)) < 2100 and str(err).endswith("(100000 characters)")
    invalid = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "engine_id: got '" + "e" * 50_000, target="t", rpc="X"
    )
    assert len(str(invalid)) < 2100


def test_tls_options_are_checked_before_any_channel() -> None:
    with pytest.raises(InvalidArgumentError, match="private_key"):
        ClientTls(certificate_chain=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(InvalidArgumentError, match="one of tls and credentials"):
        AgentClient("127.0.0.1:1", tls=ClientTls(), credentials=grpc.ssl_channel_credentials())
    assert "BEGIN" not in repr(ClientTls(root_certificates=b"-----BEGIN CERTIFICATE-----"))


def test_an_unknown_code_is_an_internal_error() -> None:
    err = error_from_status(grpc.StatusCode.OK, "no status", target="t", rpc="X")
    assert isinstance(err, InternalError)


async def test_success_returns_the_reply_and_sends_the_bearer_token(served: tuple[str, _Servicer]) -> None:
    target, servicer = served
    async with AgentClient(target, token="s3cret") as client:
        inventory = await client.inventory()
        reply = await client.apply_gpu_config(
            0, [GpuClockSetting(1, 1200, 1410, power_limit_w=450.0), GpuClockSetting(0, 990, 990)], lease_s=3
        )
        restored = await client.restore_defaults(7, [0, 1])
    assert inventory.node_id == "node-a" and [g.gpu_index for g in inventory.gpus] == [0]
    by_gpu = {a.gpu_index: a for a in reply.applied}
    assert (by_gpu[1].sm_clock_lock.min_clock_mhz, by_gpu[1].sm_clock_lock.max_clock_mhz) == (1200, 1410)
    assert by_gpu[1].power_limit_w == 450.0 and by_gpu[0].power_limit_w == 700.0  # absent -> default
    assert [r.gpu_index for r in restored.restored] == [0, 1] and restored.generation == 7
    assert all(m.get("authorization") == "Bearer s3cret" for m in servicer.metadata)
    assert len(servicer.metadata) == 3


async def test_engine_and_lease_calls_carry_every_field(served: tuple[str, _Servicer]) -> None:
    target, _ = served
    async with AgentClient(target) as client:
        started = await client.reconfigure_engine(
            11,
            "llama-a",
            model="llama2-70b",
            gpu_indices=[4, 5, 6, 7],
            tp_degree=4,
            engine_options={"max-num-seqs": "64"},
            drain_timeout_s=2.5,
            ready_timeout_s=30.0,
        )
        stopped = await client.stop_engine(12, "llama-a", drain_timeout_s=1.5)
        renewed = await client.renew_lease(9, lease_s=42.0)
    engine = started.engine
    assert (engine.engine_id, engine.model, list(engine.gpu_indices), engine.tp_degree) == (
        "llama-a",
        "llama2-70b",
        [4, 5, 6, 7],
        4,
    )
    assert dict(engine.engine_options) == {"max-num-seqs": "64"} and started.generation == 11
    assert (started.drain_s, started.start_s) == (2.5, 30.0)
    assert stopped.generation == 12 and stopped.drain_s == 1.5
    assert stopped.engine.state == common_pb2.ENGINE_STATE_STOPPED
    assert (renewed.lease.generation, renewed.lease.remaining_s) == (9, 42.0)


async def test_no_token_sends_no_authorization(served: tuple[str, _Servicer]) -> None:
    target, servicer = served
    async with AgentClient(target) as client:
        await client.inventory()
    assert "authorization" not in servicer.metadata[0]


async def test_an_unreachable_node_is_unavailable_naming_it() -> None:
    async with AgentClient("127.0.0.1:1", timeout_s=5.0) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.inventory()
    assert "127.0.0.1:1" in str(caught.value) and "GetInventory" in str(caught.value)


async def test_a_reply_after_the_deadline_is_unavailable(served: tuple[str, _Servicer]) -> None:
    target, _ = served
    async with AgentClient(target, timeout_s=5.0) as client:
        with pytest.raises(UnavailableError, match="deadline"):
            await client.apply_gpu_config(
                SLOW_GENERATION, [GpuClockSetting(0, 1980, 1980)], lease_s=1.0, timeout_s=0.2
            )


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timeouts_are_refused(timeout_s: float) -> None:
    with pytest.raises(InvalidArgumentError, match="timeout_s"):
        AgentClient("127.0.0.1:1", timeout_s=timeout_s)


async def test_stream_yields_samples_and_cancels_when_the_caller_stops(served: tuple[str, _Servicer]) -> None:
    target, servicer = served
    async with AgentClient(target) as client:
        stamps = []
        stream = client.stream_telemetry(period_s=0.5, gpu_indices=[0])
        async with contextlib.aclosing(stream):
            async for sample in stream:
                stamps.append(sample.ts_unix_ns)
                if len(stamps) == 5:
                    break
        # the channel is still open: the server saw the cancel of this one stream
        await asyncio.wait_for(servicer.stream_cancelled.wait(), 5.0)
    assert stamps == [0, 1, 2, 3, 4]


async def test_stream_errors_map_to_the_error_tree(served: tuple[str, _Servicer]) -> None:
    target, _ = served
    async with AgentClient(target) as client:
        with pytest.raises(InvalidArgumentError, match="period_s"):
            async for _ in client.stream_telemetry(period_s=-1.0):
                pass
        received = 0
        with pytest.raises(UnavailableError, match="sampler stopped"):
            async for _ in client.stream_telemetry(include_engines=True):
                received += 1
        assert received == 3


def test_generations_increase_strictly_even_when_the_clock_stalls_or_steps_back() -> None:
    readings = iter([1_000, 1_000, 900, 5_000, 5_000])
    source = GenerationSource(clock_ns=lambda: next(readings))
    assert [source.next() for _ in range(5)] == [1_000, 1_001, 1_002, 5_000, 5_001]


def test_a_later_process_starts_above_an_earlier_one() -> None:
    first = GenerationSource().next()
    assert GenerationSource().next() > first
