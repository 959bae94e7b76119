"""Typed asyncio client of the controller's admin API (`dynamollm.controller.v1.ControllerAdmin`).

Where it sits: `dctl cluster` (and later dashboards and the router) talk to `dynamollm-controller` only
through this module and the generated messages it returns; it mirrors `agent.api.client.AgentClient`,
whose TLS settings (`ClientTls`) and status table it reuses, so that gRPC failures come back as the one
error tree (`agent.api.errors`): `InvalidArgumentError` with the controller's "FIELD: got VALUE; allowed:
..." message, `UnavailableError` for an unreachable controller, and so on, never `grpc.aio.AioRpcError`.

Security: `token` is sent as a bearer token on every call; `tls` makes the channel TLS (mTLS with a
client certificate), exactly as towards an agent.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Iterable, Mapping
from types import TracebackType
from typing import Final

import grpc
from grpc import aio

from agent.api.client import DEFAULT_TIMEOUT_S, MAX_DETAILS_CHARS, ClientTls, error_from_status
from agent.api.errors import DynamoError, InvalidArgumentError, clip
from controller.api.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["DEFAULT_TIMEOUT_S", "MODE_BY_NAME", "AdminClient", "ClientTls", "mode_name"]

# How operators name the modes (dctl, config); the wire carries the enum.
MODE_BY_NAME: Final[Mapping[str, admin_pb2.Mode.ValueType]] = {
    "observe": admin_pb2.MODE_OBSERVE,
    "apply": admin_pb2.MODE_APPLY,
    "paused": admin_pb2.MODE_PAUSED,
}
_NAME_BY_MODE: Final = {mode: name for name, mode in MODE_BY_NAME.items()}


def mode_name(mode: admin_pb2.Mode.ValueType | int) -> str:
    """The operator's name of a mode (observe, apply, paused); anything else (UNSPECIFIED, a newer
    controller's mode) by number, so that printing a reply never fails."""
    name = _NAME_BY_MODE.get(admin_pb2.Mode.ValueType(mode))
    return name if name is not None else f"unknown ({int(mode)})"


def controller_error(code: grpc.StatusCode, details: str, *, target: str, rpc: str) -> DynamoError:
    """The DynamoError for a failed call to the controller: the agent client's mapping (INVALID_ARGUMENT
    keeps the server's wording and its field), with the other messages naming the controller rather than
    an agent, so that the one line dctl prints says which daemon failed."""
    err = error_from_status(code, details, target=target, rpc=rpc)
    if isinstance(err, InvalidArgumentError):
        return err
    details = clip(details, MAX_DETAILS_CHARS)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return type(err)(f"{rpc} to controller {target}: no reply before the deadline ({details})")
    return type(err)(f"{rpc} to controller {target} failed: {code.name}: {details}")


class AdminClient:
    """One channel to one controller; every method is one RPC (watch_events: one stream).

    `target` is a gRPC target, "HOST:PORT" or "unix:/path"; `token` is sent as "authorization: Bearer
    TOKEN"; `tls` switches to a TLS channel. `timeout_s` is the deadline of each unary call unless the
    method is given its own. Use as `async with AdminClient(...) as client:` or call `close()`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: ClientTls | None = None,
    ) -> None:
        if not target:
            raise InvalidArgumentError("target", target, "HOST:PORT or unix:/path")
        _check_positive("timeout_s", timeout_s)
        self.target = target
        self.timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (
            () if token is None else (("authorization", f"Bearer {token}"),)
        )
        if tls is None:
            self._channel = aio.insecure_channel(target)
        else:
            options = [] if not tls.server_name else [("grpc.ssl_target_name_override", tls.server_name)]
            self._channel = aio.secure_channel(target, tls.credentials(), options=options)
        self._stub = admin_pb2_grpc.ControllerAdminStub(self._channel)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    def _deadline_s(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            return self.timeout_s
        _check_positive("timeout_s", timeout_s)
        return timeout_s

    def _error(self, err: aio.AioRpcError, rpc: str) -> DynamoError:
        return controller_error(err.code(), err.details() or "", target=self.target, rpc=rpc)

    # --- scope read ---

    async def cluster_status(self, *, timeout_s: float | None = None) -> admin_pb2.ClusterStatusResponse:
        try:
            return await self._stub.ClusterStatus(
                admin_pb2.ClusterStatusRequest(), timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ClusterStatus") from None

    async def list_nodes(self, *, timeout_s: float | None = None) -> admin_pb2.ListNodesResponse:
        try:
            return await self._stub.ListNodes(
                admin_pb2.ListNodesRequest(), timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ListNodes") from None

    async def list_pools(self, *, timeout_s: float | None = None) -> admin_pb2.ListPoolsResponse:
        try:
            return await self._stub.ListPools(
                admin_pb2.ListPoolsRequest(), timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ListPools") from None

    async def get_plan(
        self, explain: bool = False, *, timeout_s: float | None = None
    ) -> admin_pb2.GetPlanResponse:
        """`explain`: with the decision records behind the plan and the pools' capacity tables."""
        try:
            return await self._stub.GetPlan(
                admin_pb2.GetPlanRequest(explain=explain),
                timeout=self._deadline_s(timeout_s),
                metadata=self._metadata,
            )
        except aio.AioRpcError as err:
            raise self._error(err, "GetPlan") from None

    async def list_decisions(
        self,
        since_unix_ns: int = 0,
        page_size: int = 0,
        page_token: str = "",
        level: str = "",
        *,
        timeout_s: float | None = None,
    ) -> admin_pb2.ListDecisionsResponse:
        """One page, oldest first; pass the reply's `next_page_token` for the next (empty: no more).
        page_size 0: the controller's default (100); at most 1000."""
        request = admin_pb2.ListDecisionsRequest(
            since_unix_ns=since_unix_ns, page_size=page_size, page_token=page_token, level=level
        )
        try:
            return await self._stub.ListDecisions(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ListDecisions") from None

    async def watch_events(self, kinds: Iterable[str] = ()) -> AsyncGenerator[admin_pb2.Event, None]:
        """Events until the caller stops (no deadline: a watch is open-ended); `aclose()` the generator
        (e.g. `contextlib.aclosing`) to cancel the stream at once. Empty `kinds`: all."""
        request = admin_pb2.WatchEventsRequest(kinds=list(kinds))
        call = self._stub.WatchEvents(request, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except aio.AioRpcError as err:
            raise self._error(err, "WatchEvents") from None
        finally:
            call.cancel()

    # --- scope admin / control (audited by the controller) ---

    async def set_mode(
        self, mode: str, reason: str = "", *, timeout_s: float | None = None
    ) -> admin_pb2.SetModeResponse:
        """`mode`: "observe", "apply" or "paused" (MODE_BY_NAME); refused here, before any RPC, otherwise."""
        value = MODE_BY_NAME.get(mode)
        if value is None:
            raise InvalidArgumentError("mode", mode, list(MODE_BY_NAME))
        try:
            return await self._stub.SetMode(
                admin_pb2.SetModeRequest(mode=value, reason=reason),
                timeout=self._deadline_s(timeout_s),
                metadata=self._metadata,
            )
        except aio.AioRpcError as err:
            raise self._error(err, "SetMode") from None

    async def drain_node(
        self, node: str, undrain: bool = False, reason: str = "", *, timeout_s: float | None = None
    ) -> admin_pb2.DrainNodeResponse:
        """Cordon `node` (a configured node name); `undrain` puts it back."""
        try:
            return await self._stub.DrainNode(
                admin_pb2.DrainNodeRequest(node=node, undrain=undrain, reason=reason),
                timeout=self._deadline_s(timeout_s),
                metadata=self._metadata,
            )
        except aio.AioRpcError as err:
            raise self._error(err, "DrainNode") from None

    async def report_traffic(
        self,
        arrivals: Iterable[admin_pb2.TrafficArrival],
        completions: Iterable[admin_pb2.TrafficCompletion],
        *,
        timeout_s: float | None = None,
    ) -> admin_pb2.ReportTrafficResponse:
        """At most 100,000 of each per call (the controller refuses more)."""
        request = admin_pb2.ReportTrafficRequest(arrivals=list(arrivals), completions=list(completions))
        try:
            return await self._stub.ReportTraffic(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ReportTraffic") from None


def _check_positive(field: str, value: float) -> None:
    # agent.api.client has the same check, private there.
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(field, value, "a finite number of seconds > 0")
