"""The agent's gRPC servicers: NodeTelemetry (scope read) and NodeControl (scope control), thin.

Flow of a call: the servicer identifies the caller and checks its scope (`agent.auth`), hands the request
to the node's `agent.node.NodeAgent` (generation, validation, action, recorded outcome, reply), writes
the audit line for a control call (accepted, refused or failed), and turns an error into a gRPC status
through `agent.api.status`, the one table shared with the client; a replayed failure keeps the status
it was recorded with (`agent.scopes.RecordedStatus`). Nothing else: no state, no validation here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from agent.api.errors import DynamoError
from agent.api.status import status_for
from agent.api.v1 import control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.auth import Authorizer, Caller, peer_host
from agent.control import validate_stream
from agent.node import NodeAgent
from agent.scopes import RecordedStatus

log = structlog.get_logger("agent.service")

M = TypeVar("M", bound=Message)


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: BaseException) -> NoReturn:
    if isinstance(exc, RecordedStatus):
        await context.abort(exc.code, str(exc))
    if isinstance(exc, DynamoError):
        await context.abort(status_for(exc), str(exc))
    log.exception("rpc_internal_error", error=repr(exc))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _caller(auth: Authorizer, context: grpc.aio.ServicerContext[object, object]) -> Caller:
    return auth.identify(tuple(context.invocation_metadata() or ()), context.peer())


class TelemetryServicer(telemetry_pb2_grpc.NodeTelemetryServicer):
    def __init__(self, agent: NodeAgent, auth: Authorizer) -> None:
        self._agent = agent
        self._auth = auth

    async def GetInventory(
        self,
        request: telemetry_pb2.GetInventoryRequest,
        context: grpc.aio.ServicerContext[
            telemetry_pb2.GetInventoryRequest, telemetry_pb2.GetInventoryResponse
        ],
    ) -> telemetry_pb2.GetInventoryResponse:
        try:
            self._auth.require(_caller(self._auth, context), "read")  # type: ignore[arg-type]
            return await self._agent.inventory()
        except Exception as exc:
            await _abort(context, exc)  # type: ignore[arg-type]

    async def StreamTelemetry(
        self,
        request: telemetry_pb2.StreamTelemetryRequest,
        context: grpc.aio.ServicerContext[
            telemetry_pb2.StreamTelemetryRequest, telemetry_pb2.TelemetrySample
        ],
    ) -> AsyncIterator[telemetry_pb2.TelemetrySample]:
        agent = self._agent
        tel = agent.settings.telemetry
        try:
            self._auth.require(_caller(self._auth, context), "read")  # type: ignore[arg-type]
            plan = validate_stream(
                request,
                gpu_count=agent.workers.count,
                sampler_period_s=agent.sampler.period_s,
                min_period_s=tel.min_period_s,
                max_period_s=tel.max_period_s,
            )
        except Exception as exc:
            await _abort(context, exc)  # type: ignore[arg-type]
        sub = agent.sampler.subscribe(plan)
        try:
            while True:
                sample = await sub.next()
                yield sub.to_pb(sample)
        finally:
            agent.sampler.unsubscribe(sub)


class ControlServicer(control_pb2_grpc.NodeControlServicer):
    def __init__(self, agent: NodeAgent, auth: Authorizer) -> None:
        self._agent = agent
        self._auth = auth

    async def _call(
        self,
        rpc: str,
        generation: int,
        context: grpc.aio.ServicerContext[object, object],
        handler: Callable[[str], Awaitable[M]],
    ) -> M:
        who = "unauthenticated " + peer_host(context.peer())
        try:
            caller = _caller(self._auth, context)
            who = caller.name
            self._auth.require(caller, "control")
            reply = await handler(who)
        except Exception as exc:
            code = exc.code if isinstance(exc, RecordedStatus) else status_for(exc)
            self._agent.audit(who, rpc, generation, code.name, error=str(exc))
            await _abort(context, exc)
        self._agent.audit(who, rpc, generation, "OK", replayed=bool(getattr(reply, "replayed", False)))
        return reply

    async def ApplyGpuConfig(
        self,
        request: control_pb2.ApplyGpuConfigRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ApplyGpuConfigRequest, control_pb2.ApplyGpuConfigResponse
        ],
    ) -> control_pb2.ApplyGpuConfigResponse:
        return await self._call(
            "ApplyGpuConfig",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.apply_gpu_config(request, who),
        )

    async def ReconfigureEngine(
        self,
        request: control_pb2.ReconfigureEngineRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ReconfigureEngineRequest, control_pb2.ReconfigureEngineResponse
        ],
    ) -> control_pb2.ReconfigureEngineResponse:
        return await self._call(
            "ReconfigureEngine",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.reconfigure_engine(request, who),
        )

    async def StopEngine(
        self,
        request: control_pb2.StopEngineRequest,
        context: grpc.aio.ServicerContext[control_pb2.StopEngineRequest, control_pb2.StopEngineResponse],
    ) -> control_pb2.StopEngineResponse:
        return await self._call(
            "StopEngine",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.stop_engine(request, who),
        )

    async def RenewLease(
        self,
        request: control_pb2.RenewLeaseRequest,
        context: grpc.aio.ServicerContext[control_pb2.RenewLeaseRequest, control_pb2.RenewLeaseResponse],
    ) -> control_pb2.RenewLeaseResponse:
        return await self._call(
            "RenewLease",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.renew_lease(request, who),
        )

    async def RestoreDefaults(
        self,
        request: control_pb2.RestoreDefaultsRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.RestoreDefaultsRequest, control_pb2.RestoreDefaultsResponse
        ],
    ) -> control_pb2.RestoreDefaultsResponse:
        return await self._call(
            "RestoreDefaults",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.restore_defaults(request, who),
        )
