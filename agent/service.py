"""The agent's gRPC servicers: NodeTelemetry (scope read) and NodeControl (scopes control and admin), thin.

Flow of a call: the request bytes are decoded leniently (`decode_as`: a payload that does not parse is
answered INVALID_ARGUMENT, not gRPC's UNKNOWN); the servicer identifies the caller and checks the scope
the call needs (`agent.api.auth`; `control_scope` decides control or admin from the request and the lease),
checks the generation's static range (`agent.api.generations.check_generation_value`), hands the
request to the node's `agent.node.NodeAgent` (generation rule, validation, action, recorded outcome,
reply), counts a control call by its result (`agent.metrics`) and writes its audit line (`agent.audit`:
accepted, refused, failed or cancelled; the operation of a cancelled call runs on, and its outcome gets a
second, `detached` line), and turns an error into a gRPC status through `agent.api.status`, the one table
shared with the client; a replayed failure keeps the status it was recorded with
(`agent.scopes.RecordedStatus`). Nothing else: no state, no validation of fields here. `add_services`
registers both services on a server.

Scopes (docs/agent.md, *Access*, has the table and the reasons):

| RPC | scope |
|---|---|
| GetInventory, StreamTelemetry | read |
| ApplyGpuConfig, RenewLease | control; admin to take over an active lease another caller holds |
| RestoreDefaults | control for some GPUs under the caller's own (or no) lease; admin for every GPU or
                    another caller's lease |
| ReconfigureEngine, StopEngine | admin |
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from agent.api.auth import Authorizer, Caller, peer_host
from agent.api.clock import Clock
from agent.api.errors import clip
from agent.api.generations import check_generation_value
from agent.api.serving import MAX_STATUS_CHARS, Context, Undecodable, abort_with, decode_as, decoded, identify
from agent.api.status import status_for
from agent.api.v1 import control_pb2, telemetry_pb2
from agent.audit import AuditEntry, AuditLog, request_summary
from agent.control import validate_stream
from agent.lease import LeaseView
from agent.metrics import AgentMetrics
from agent.node import NodeAgent
from agent.scopes import FinishedOperation, RecordedStatus

log = structlog.get_logger("agent.service")

M = TypeVar("M", bound=Message)
TELEMETRY_SERVICE: Final = telemetry_pb2.DESCRIPTOR.services_by_name["NodeTelemetry"].full_name
CONTROL_SERVICE: Final = control_pb2.DESCRIPTOR.services_by_name["NodeControl"].full_name


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    """A replayed failure keeps the status it was recorded with; the rest go through the shared table."""
    if isinstance(exc, RecordedStatus):
        await context.abort(exc.code, clip(str(exc), MAX_STATUS_CHARS))
    await abort_with(context, exc)


def _caller(auth: Authorizer, context: Context) -> Caller:
    return identify(auth, context)


def control_scope(
    rpc: str, request: Message, caller: Caller, lease: LeaseView, gpu_count: int
) -> tuple[str, str]:
    """The scope a control call needs, and why when it is admin (pure; the table in the module docstring).

    Takeover: an active lease held by someone else. A dry run changes nothing, so it never takes over.
    """
    takeover = lease.active and lease.holder != caller.name
    taking = f"taking over the lease held by {lease.holder!r}"
    if rpc in ("ReconfigureEngine", "StopEngine"):
        return "admin", "engine lifecycle"
    if isinstance(request, control_pb2.RestoreDefaultsRequest):
        indices = set(request.gpu_indices)
        if not indices or indices >= set(range(gpu_count)):
            return "admin", "RestoreDefaults of every GPU"
        return ("admin", taking) if takeover else ("control", "")
    if isinstance(request, control_pb2.ApplyGpuConfigRequest) and request.dry_run:
        return "control", ""
    return ("admin", taking) if takeover else ("control", "")


# ------------------------------------------------------------------------------------------ services


class TelemetryServicer:
    """NodeTelemetry: GetInventory and StreamTelemetry, scope read."""

    def __init__(self, agent: NodeAgent, auth: Authorizer) -> None:
        self._agent = agent
        self._auth = auth

    async def GetInventory(
        self, request: telemetry_pb2.GetInventoryRequest | Undecodable, context: Context
    ) -> telemetry_pb2.GetInventoryResponse:
        try:
            self._auth.require(_caller(self._auth, context), "read")
            decoded(request)
            return await self._agent.inventory()
        except Exception as exc:
            await _abort(context, exc)

    async def StreamTelemetry(
        self, request: telemetry_pb2.StreamTelemetryRequest | Undecodable, context: Context
    ) -> AsyncIterator[telemetry_pb2.TelemetrySample]:
        """Initial metadata goes out as soon as the request is accepted, before the first sample."""
        agent = self._agent
        tel = agent.settings.telemetry
        try:
            self._auth.require(_caller(self._auth, context), "read")
            plan = validate_stream(
                decoded(request),
                gpu_count=agent.workers.count,
                sampler_period_s=agent.sampler.period_s,
                min_period_s=tel.min_period_s,
                max_period_s=tel.max_period_s,
            )
        except Exception as exc:
            await _abort(context, exc)
        sub = agent.sampler.subscribe(plan)
        try:
            await context.send_initial_metadata(())
            while True:
                sample = await sub.next()
                yield sub.to_pb(sample)
        finally:
            agent.sampler.unsubscribe(sub)


class ControlServicer:
    """NodeControl: the five control calls, each audited (module docstring)."""

    def __init__(
        self, agent: NodeAgent, auth: Authorizer, audit: AuditLog, clock: Clock, metrics: AgentMetrics
    ) -> None:
        self._agent = agent
        self._auth = auth
        self._audit = audit
        self._clock = clock
        self._metrics = metrics

    async def _call(
        self,
        rpc: str,
        request: M | Undecodable,
        context: Context,
        act: Callable[..., Awaitable[Message]],
    ) -> Any:
        t0 = self._clock.monotonic_s()
        peer = context.peer() or ""
        who, via, scope = "unauthenticated " + peer_host(peer), "none", ""
        if isinstance(request, Undecodable):
            generation: int | None = None
            summary: dict[str, Any] = {"undecodable_bytes": request.size_bytes}
        else:
            generation = int(getattr(request, "generation", 0))
            summary = request_summary(request)

        def audit(
            result: str,
            *,
            replayed: bool = False,
            error: str = "",
            detached: bool = False,
            duration_s: float | None = None,
        ) -> None:
            if not detached:  # a detached outcome's call was counted when its caller went (CANCELLED)
                self._metrics.count_call(rpc, result)
            self._audit.record(
                AuditEntry(
                    rpc=rpc,
                    who=who,
                    auth=via,
                    peer=peer,
                    scope=scope,
                    generation=generation,
                    request=summary,
                    result=result,
                    duration_s=self._clock.monotonic_s() - t0 if duration_s is None else duration_s,
                    replayed=replayed,
                    error=error,
                    detached=detached,
                )
            )

        def finished(done: FinishedOperation) -> None:
            """The operation of a call whose caller went away has ended (agent.scopes)."""
            audit(done.code, error=done.message, detached=True, duration_s=done.duration_s)

        try:
            caller = _caller(self._auth, context)
            who, via = caller.name, caller.via
            if isinstance(request, Undecodable):
                scope = "control"  # what the request would have needed cannot be known
                self._auth.require(caller, scope)
                raise request.error()
            agent = self._agent
            scope, why = control_scope(rpc, request, caller, agent.lease_view(), agent.workers.count)
            self._auth.require(caller, scope, why=why)
            check_generation_value(generation or 0)
            reply = await act(request, caller.name, on_detached=finished, may_take_over=scope == "admin")
        except asyncio.CancelledError:
            audit("CANCELLED", error="the caller cancelled the call or its deadline passed")
            raise
        except Exception as exc:
            code = exc.code if isinstance(exc, RecordedStatus) else status_for(exc)
            audit(code.name, error=str(exc), replayed=isinstance(exc, RecordedStatus) and exc.replayed)
            await _abort(context, exc)
        audit("OK", replayed=bool(getattr(reply, "replayed", False)))
        return reply

    async def ApplyGpuConfig(
        self, request: control_pb2.ApplyGpuConfigRequest | Undecodable, context: Context
    ) -> control_pb2.ApplyGpuConfigResponse:
        reply: control_pb2.ApplyGpuConfigResponse = await self._call(
            "ApplyGpuConfig", request, context, self._agent.apply_gpu_config
        )
        return reply

    async def ReconfigureEngine(
        self, request: control_pb2.ReconfigureEngineRequest | Undecodable, context: Context
    ) -> control_pb2.ReconfigureEngineResponse:
        reply: control_pb2.ReconfigureEngineResponse = await self._call(
            "ReconfigureEngine", request, context, self._agent.reconfigure_engine
        )
        return reply

    async def StopEngine(
        self, request: control_pb2.StopEngineRequest | Undecodable, context: Context
    ) -> control_pb2.StopEngineResponse:
        reply: control_pb2.StopEngineResponse = await self._call(
            "StopEngine", request, context, self._agent.stop_engine
        )
        return reply

    async def RenewLease(
        self, request: control_pb2.RenewLeaseRequest | Undecodable, context: Context
    ) -> control_pb2.RenewLeaseResponse:
        reply: control_pb2.RenewLeaseResponse = await self._call(
            "RenewLease", request, context, self._agent.renew_lease
        )
        return reply

    async def RestoreDefaults(
        self, request: control_pb2.RestoreDefaultsRequest | Undecodable, context: Context
    ) -> control_pb2.RestoreDefaultsResponse:
        reply: control_pb2.RestoreDefaultsResponse = await self._call(
            "RestoreDefaults", request, context, self._agent.restore_defaults
        )
        return reply


# ------------------------------------------------------------------------------------- registration


def _unary(behavior: Any, request: type[Message], response: type[Message]) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=decode_as(request), response_serializer=response.SerializeToString
    )


def add_services(server: grpc.aio.Server, telemetry: TelemetryServicer, control: ControlServicer) -> None:
    """Both services on `server`, every method with the lenient request decoder (`decode_as`)."""
    c, t = control_pb2, telemetry_pb2
    services: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {
        TELEMETRY_SERVICE: {
            "GetInventory": _unary(telemetry.GetInventory, t.GetInventoryRequest, t.GetInventoryResponse),
            "StreamTelemetry": grpc.unary_stream_rpc_method_handler(
                telemetry.StreamTelemetry,
                request_deserializer=decode_as(t.StreamTelemetryRequest),
                response_serializer=t.TelemetrySample.SerializeToString,
            ),
        },
        CONTROL_SERVICE: {
            "ApplyGpuConfig": _unary(
                control.ApplyGpuConfig, c.ApplyGpuConfigRequest, c.ApplyGpuConfigResponse
            ),
            "ReconfigureEngine": _unary(
                control.ReconfigureEngine, c.ReconfigureEngineRequest, c.ReconfigureEngineResponse
            ),
            "StopEngine": _unary(control.StopEngine, c.StopEngineRequest, c.StopEngineResponse),
            "RenewLease": _unary(control.RenewLease, c.RenewLeaseRequest, c.RenewLeaseResponse),
            "RestoreDefaults": _unary(
                control.RestoreDefaults, c.RestoreDefaultsRequest, c.RestoreDefaultsResponse
            ),
        },
    }
    for name, handlers in services.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
