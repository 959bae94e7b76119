"""ControllerAdmin servicer: `dctl cluster`, routers and dashboards talk to the controller through it.

Flow of a call, as on the agent: the request is decoded leniently (a payload that does not parse is
INVALID_ARGUMENT, not UNKNOWN), the caller is identified and its scope checked (`agent.api.auth`: read
for the views and WatchEvents, control for ReportTraffic and DrainNode, admin for SetMode), the fields
are validated (INVALID_ARGUMENT naming the field and the allowed values; nothing changes), then the
running controller (`controller.app.ControllerCore`) answers. Calls needing control or admin are audited
in the store, accepted or refused. Errors map to statuses through the shared table (`agent.api.status`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from agent.api.auth import Authorizer, Caller
from agent.api.errors import InvalidArgumentError, clip
from agent.api.serving import Context, Undecodable, abort_with, decode_as, decoded, identify
from agent.api.status import status_for
from controller.api.v1 import admin_pb2

SERVICE: Final = admin_pb2.DESCRIPTOR.services_by_name["ControllerAdmin"].full_name
MAX_REPORT_ITEMS: Final = 100_000
MAX_REASON_CHARS: Final = 500
MAX_PAGE_SIZE: Final = 1000
MAX_AUDIT_CHARS: Final = 2000  # a request kept in the audit whole up to this size
MODE_NAMES: Final = {
    admin_pb2.MODE_OBSERVE: "observe",
    admin_pb2.MODE_APPLY: "apply",
    admin_pb2.MODE_PAUSED: "paused",
}


class AdminCore(Protocol):
    """What the servicer needs of the running controller (`controller.app.ControllerCore`)."""

    def cluster_status(self) -> admin_pb2.ClusterStatusResponse: ...

    def list_nodes(self) -> admin_pb2.ListNodesResponse: ...

    def list_pools(self) -> admin_pb2.ListPoolsResponse: ...

    def get_plan(self, explain: bool) -> admin_pb2.GetPlanResponse: ...

    def list_decisions(
        self, since_unix_ns: int, after_id: int, level: str, limit: int
    ) -> tuple[list[admin_pb2.DecisionRecord], bool]: ...

    def set_mode(self, mode: str, caller: str, reason: str) -> str: ...

    def drain_node(self, node: str, undrain: bool) -> bool: ...

    def watch(self, kinds: frozenset[str]) -> AsyncIterator[admin_pb2.Event]: ...

    def report_traffic(self, request: admin_pb2.ReportTrafficRequest) -> tuple[int, int]: ...

    def audit(self, caller: str, action: str, request: dict[str, Any], result: str) -> None: ...


EVENT_KINDS: Final = ("decision", "command", "routes", "mode", "node")
LEVELS: Final = ("initial", "cluster", "pool", "guard", "instance")


class AdminServicer:
    def __init__(self, core: AdminCore, auth: Authorizer) -> None:
        self._core = core
        self._auth = auth

    def _read(self, context: Context, request: Message | Undecodable) -> Any:
        self._auth.require(identify(self._auth, context), "read")
        return decoded(request)

    async def ClusterStatus(self, request: Any, context: Context) -> admin_pb2.ClusterStatusResponse:
        try:
            self._read(context, request)
            return self._core.cluster_status()
        except Exception as exc:
            await abort_with(context, exc)

    async def ListNodes(self, request: Any, context: Context) -> admin_pb2.ListNodesResponse:
        try:
            self._read(context, request)
            return self._core.list_nodes()
        except Exception as exc:
            await abort_with(context, exc)

    async def ListPools(self, request: Any, context: Context) -> admin_pb2.ListPoolsResponse:
        try:
            self._read(context, request)
            return self._core.list_pools()
        except Exception as exc:
            await abort_with(context, exc)

    async def GetPlan(self, request: Any, context: Context) -> admin_pb2.GetPlanResponse:
        try:
            req: admin_pb2.GetPlanRequest = self._read(context, request)
            return self._core.get_plan(req.explain)
        except Exception as exc:
            await abort_with(context, exc)

    async def ListDecisions(self, request: Any, context: Context) -> admin_pb2.ListDecisionsResponse:
        try:
            req: admin_pb2.ListDecisionsRequest = self._read(context, request)
            size = req.page_size or 100
            if not 1 <= size <= MAX_PAGE_SIZE:
                raise InvalidArgumentError("page_size", req.page_size, f"0 (100) or 1..{MAX_PAGE_SIZE}")
            if req.since_unix_ns < 0:
                raise InvalidArgumentError("since_unix_ns", req.since_unix_ns, ">= 0")
            if req.level and req.level not in LEVELS:
                raise InvalidArgumentError("level", req.level, ("", *LEVELS))
            after_id = _page_token(req.page_token)
            records, more = self._core.list_decisions(req.since_unix_ns, after_id, req.level, size)
            token = str(records[-1].id) if more and records else ""
            return admin_pb2.ListDecisionsResponse(decisions=records, next_page_token=token)
        except Exception as exc:
            await abort_with(context, exc)

    async def WatchEvents(self, request: Any, context: Context) -> AsyncIterator[admin_pb2.Event]:
        try:
            req: admin_pb2.WatchEventsRequest = self._read(context, request)
            bad = [k for k in req.kinds if k not in EVENT_KINDS]
            if bad:
                raise InvalidArgumentError("kinds", bad[0], EVENT_KINDS)
        except Exception as exc:
            await abort_with(context, exc)
        await context.send_initial_metadata(())
        async for event in self._core.watch(frozenset(req.kinds)):
            yield event

    async def _audited(
        self,
        rpc: str,
        scope: str,
        request: Message | Undecodable,
        context: Context,
        act: Callable[[Any, Caller], Awaitable[Message]],
    ) -> Any:
        caller: Caller | None = None
        summary: dict[str, Any] = {}
        try:
            caller = identify(self._auth, context)
            self._auth.require(caller, scope)
            req = decoded(request)
            summary = _summary(req)
            reply = await act(req, caller)
        except Exception as exc:
            who = caller.name if caller is not None else "unauthenticated"
            self._core.audit(who, rpc, summary, f"{status_for(exc).name}: {clip(str(exc), 300)}")
            await abort_with(context, exc)
        self._core.audit(caller.name, rpc, summary, "OK")
        return reply

    async def SetMode(self, request: Any, context: Context) -> admin_pb2.SetModeResponse:
        async def act(req: admin_pb2.SetModeRequest, caller: Caller) -> admin_pb2.SetModeResponse:
            mode = MODE_NAMES.get(req.mode)
            if mode is None:
                raise InvalidArgumentError("mode", req.mode, ("MODE_OBSERVE", "MODE_APPLY", "MODE_PAUSED"))
            previous = self._core.set_mode(mode, caller.name, clip(req.reason, MAX_REASON_CHARS))
            by_name = {v: k for k, v in MODE_NAMES.items()}
            return admin_pb2.SetModeResponse(previous_mode=by_name[previous], mode=req.mode)

        reply: admin_pb2.SetModeResponse = await self._audited("SetMode", "admin", request, context, act)
        return reply

    async def DrainNode(self, request: Any, context: Context) -> admin_pb2.DrainNodeResponse:
        async def act(req: admin_pb2.DrainNodeRequest, caller: Caller) -> admin_pb2.DrainNodeResponse:
            if not req.node:
                raise InvalidArgumentError("node", req.node, "a configured node name")
            draining = self._core.drain_node(req.node, req.undrain)
            return admin_pb2.DrainNodeResponse(node=req.node, draining=draining)

        reply: admin_pb2.DrainNodeResponse = await self._audited(
            "DrainNode", "control", request, context, act
        )
        return reply

    async def ReportTraffic(self, request: Any, context: Context) -> admin_pb2.ReportTrafficResponse:
        try:
            caller = identify(self._auth, context)
            self._auth.require(caller, "control")
            req: admin_pb2.ReportTrafficRequest = decoded(request)
            for name, items in (("arrivals", req.arrivals), ("completions", req.completions)):
                if len(items) > MAX_REPORT_ITEMS:
                    raise InvalidArgumentError(
                        name, f"{len(items)} items", f"at most {MAX_REPORT_ITEMS} per call"
                    )
            arrivals, completions = self._core.report_traffic(req)
            return admin_pb2.ReportTrafficResponse(arrivals_count=arrivals, completions_count=completions)
        except Exception as exc:
            await abort_with(context, exc)


def _page_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 19:
        raise InvalidArgumentError("page_token", token, "empty, or the next_page_token of the previous page")
    return int(token)


def _summary(request: Message) -> dict[str, Any]:
    """The request as the audit keeps it: its fields, or only its size when they are long."""
    out: dict[str, Any] = MessageToDict(request, preserving_proto_field_name=True)
    size = len(json.dumps(out))
    return out if size <= MAX_AUDIT_CHARS else {"request_chars": size}


def _unary(behavior: Any, request: type[Message], response: type[Message]) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=decode_as(request), response_serializer=response.SerializeToString
    )


def add_admin_service(server: grpc.aio.Server, servicer: AdminServicer) -> None:
    """The service on `server`, every method with the lenient request decoder."""
    a = admin_pb2
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "ClusterStatus": _unary(servicer.ClusterStatus, a.ClusterStatusRequest, a.ClusterStatusResponse),
        "ListNodes": _unary(servicer.ListNodes, a.ListNodesRequest, a.ListNodesResponse),
        "ListPools": _unary(servicer.ListPools, a.ListPoolsRequest, a.ListPoolsResponse),
        "GetPlan": _unary(servicer.GetPlan, a.GetPlanRequest, a.GetPlanResponse),
        "ListDecisions": _unary(servicer.ListDecisions, a.ListDecisionsRequest, a.ListDecisionsResponse),
        "SetMode": _unary(servicer.SetMode, a.SetModeRequest, a.SetModeResponse),
        "DrainNode": _unary(servicer.DrainNode, a.DrainNodeRequest, a.DrainNodeResponse),
        "ReportTraffic": _unary(servicer.ReportTraffic, a.ReportTrafficRequest, a.ReportTrafficResponse),
        "WatchEvents": grpc.unary_stream_rpc_method_handler(
            servicer.WatchEvents,
            request_deserializer=decode_as(a.WatchEventsRequest),
            response_serializer=a.Event.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
