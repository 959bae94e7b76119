"""Typed asyncio client of the node agent: both services of `dynamollm.agent.v1` behind one object.

Where it sits: the controller and `dctl node` talk to an agent only through this module (and the
generated messages it returns); it is the caller-side mirror of `agent.service`. gRPC status codes
come back as our error tree through the table shared with the agent (`agent.api.status`), so
callers catch `ConflictError` for a stale generation, `UnavailableError` for an unreachable node, and
so on, never `grpc.aio.AioRpcError`. Replies are the generated protobuf messages (typed by their .pyi).

Security: `token` is sent as a bearer token on every call; `tls` (`ClientTls`, e.g. from PEM files with
`ClientTls.from_files`) makes the channel TLS, with a client certificate for agents that require mTLS.

Generations: `GenerationSource` hands out increasing generations for one process (wall-clock
nanoseconds, bumped to stay strictly increasing), so that separate `dctl` runs against one node keep
increasing too. The controller uses its own persisted counter instead.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

import grpc
from grpc import aio

from agent.api.errors import (
    DynamoError,
    InternalError,
    InvalidArgumentError,
    clip,
)
from agent.api.status import ERROR_FOR_STATUS
from agent.api.v1 import control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

# How InvalidArgumentError renders itself on the agent ("FIELD: got VALUE; allowed: ALLOWED").
_INVALID_ARGUMENT_RE: Final = re.compile(
    r"^(?P<field>[^\s:][^:]*): got (?P<value>.*?); allowed: (?P<allowed>.*)$", re.S
)

DEFAULT_TIMEOUT_S: Final = 10.0
# A foreign or broken server's status message is shown at most this long.
MAX_DETAILS_CHARS: Final = 2000


def error_from_status(code: grpc.StatusCode, details: str, *, target: str, rpc: str) -> DynamoError:
    """The DynamoError for a failed call. INVALID_ARGUMENT keeps the agent's message word for word
    (field, value and allowed values are parsed back into the error's attributes when it has that form);
    other errors name the RPC and the node so that a one-line report is enough to act on."""
    cls = ERROR_FOR_STATUS.get(code, InternalError)
    details = clip(details, MAX_DETAILS_CHARS)
    if issubclass(cls, InvalidArgumentError):
        match = _INVALID_ARGUMENT_RE.match(details)
        if match is None:
            err = cls("request", details, "see the agent's message")
        else:
            err = cls(match["field"], match["value"], match["allowed"])
        err.args = (details,)  # the agent's wording, not a re-rendering with quotes around the value
        return err
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return cls(f"{rpc} to agent {target}: no reply before the deadline ({details})")
    return cls(f"{rpc} to agent {target} failed: {code.name}: {details}")


@dataclass(frozen=True, slots=True)
class GpuClockSetting:
    """Desired settings of one GPU for `AgentClient.apply_gpu_config` (control.proto GpuSetting)."""

    gpu_index: int
    min_clock_mhz: int
    max_clock_mhz: int
    power_limit_w: float | None = None  # None: the GPU's default power limit


def _read_pem(name: str, path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(name, str(path), f"a readable PEM file ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(name, str(path), "a PEM file (-----BEGIN ...)")
    return data


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS for the channel to an agent: the CA that signed the agent's certificate (None: the system's
    roots), and the client certificate chain and key an agent with `tls.client_ca` requires (mTLS).
    `server_name` overrides the name checked against the agent's certificate (connecting by IP address
    to a certificate issued for a host name)."""

    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise InvalidArgumentError(
                "certificate_chain" if self.certificate_chain is None else "private_key",
                None,
                "a client certificate and its key go together",
            )

    @classmethod
    def from_files(
        cls,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        names: tuple[str, str, str] = ("ca_file", "cert_file", "key_file"),
    ) -> ClientTls:
        """Read the PEM files; InvalidArgumentError names the option (`names`: how the caller calls them,
        e.g. dctl's flags) of a missing, unreadable or non-PEM file, or a certificate without its key."""
        ca_name, cert_name, key_name = names
        if (cert_file is None) != (key_file is None):
            missing, given = (cert_name, key_name) if cert_file is None else (key_name, cert_name)
            raise InvalidArgumentError(missing, None, f"a PEM file path, required with {given}")
        return cls(
            root_certificates=None if ca_file is None else _read_pem(ca_name, ca_file),
            certificate_chain=None if cert_file is None else _read_pem(cert_name, cert_file),
            private_key=None if key_file is None else _read_pem(key_name, key_file),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


class GenerationSource:
    """Strictly increasing generations for one process, anchored on the wall clock (nanoseconds since the
    epoch) so that a later process starts above an earlier one on the same host."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._last = 0

    def next(self) -> int:
        self._last = max(self._clock_ns(), self._last + 1)
        return self._last


class AgentClient:
    """One channel to one agent; every method is one RPC (stream_telemetry: one stream).

    `target` is a gRPC target, "HOST:PORT" or "unix:/path". `token` is sent as
    "authorization: Bearer TOKEN" on every call; `tls` (or ready-made `credentials`) switches to a TLS
    channel.
    `timeout_s` is the deadline of each unary call unless the method is given its own.
    Use as `async with AgentClient(...) as client:` or call `close()`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        if not target:
            raise InvalidArgumentError("target", target, "HOST:PORT or unix:/path")
        _check_positive("timeout_s", timeout_s)
        options: list[tuple[str, str]] = []
        if tls is not None:
            if credentials is not None:
                raise InvalidArgumentError("tls", "with credentials", "one of tls and credentials")
            credentials = tls.credentials()
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
        self.target = target
        self.timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (
            () if token is None else (("authorization", f"Bearer {token}"),)
        )
        self._channel = (
            aio.insecure_channel(target)
            if credentials is None
            else aio.secure_channel(target, credentials, options=options)
        )
        self._telemetry = telemetry_pb2_grpc.NodeTelemetryStub(self._channel)
        self._control = control_pb2_grpc.NodeControlStub(self._channel)

    async def __aenter__(self) -> AgentClient:
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
        return error_from_status(err.code(), err.details() or "", target=self.target, rpc=rpc)

    # --- NodeTelemetry (scope read) ---

    async def inventory(self, *, timeout_s: float | None = None) -> telemetry_pb2.GetInventoryResponse:
        try:
            return await self._telemetry.GetInventory(
                telemetry_pb2.GetInventoryRequest(),
                timeout=self._deadline_s(timeout_s),
                metadata=self._metadata,
            )
        except aio.AioRpcError as err:
            raise self._error(err, "GetInventory") from None

    async def stream_telemetry(
        self, *, period_s: float = 0.0, gpu_indices: Iterable[int] = (), include_engines: bool = False
    ) -> AsyncGenerator[telemetry_pb2.TelemetrySample, None]:
        """Samples until the caller stops; `aclose()` the generator (e.g. `contextlib.aclosing`) to cancel
        the stream at once rather than when it is collected. period_s 0: the agent's default period."""
        call = self._telemetry.StreamTelemetry(
            telemetry_pb2.StreamTelemetryRequest(
                period_s=period_s, gpu_indices=list(gpu_indices), include_engines=include_engines
            ),
            metadata=self._metadata,
        )
        try:
            async for sample in call:
                yield sample
        except aio.AioRpcError as err:
            raise self._error(err, "StreamTelemetry") from None
        finally:
            call.cancel()

    # --- NodeControl (scope control) ---

    async def apply_gpu_config(
        self,
        generation: int,
        gpus: Sequence[GpuClockSetting],
        *,
        lease_s: float,
        dry_run: bool = False,
        timeout_s: float | None = None,
    ) -> control_pb2.ApplyGpuConfigResponse:
        request = control_pb2.ApplyGpuConfigRequest(
            generation=generation,
            lease_s=lease_s,
            dry_run=dry_run,
            gpus=[
                control_pb2.GpuSetting(
                    gpu_index=g.gpu_index,
                    min_clock_mhz=g.min_clock_mhz,
                    max_clock_mhz=g.max_clock_mhz,
                    power_limit_w=g.power_limit_w,
                )
                for g in gpus
            ],
        )
        try:
            return await self._control.ApplyGpuConfig(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ApplyGpuConfig") from None

    async def reconfigure_engine(
        self,
        generation: int,
        engine_id: str,
        *,
        model: str,
        gpu_indices: Sequence[int],
        tp_degree: int,
        engine_options: Mapping[str, str] | None = None,
        drain_timeout_s: float = 0.0,
        ready_timeout_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> control_pb2.ReconfigureEngineResponse:
        """Set `timeout_s` above drain_timeout_s + the engine's ready time: the reply comes at READY."""
        request = control_pb2.ReconfigureEngineRequest(
            generation=generation,
            engine_id=engine_id,
            model=model,
            gpu_indices=list(gpu_indices),
            tp_degree=tp_degree,
            engine_options=dict(engine_options or {}),
            drain_timeout_s=drain_timeout_s,
            ready_timeout_s=ready_timeout_s,
        )
        try:
            return await self._control.ReconfigureEngine(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "ReconfigureEngine") from None

    async def stop_engine(
        self, generation: int, engine_id: str, *, drain_timeout_s: float = 0.0, timeout_s: float | None = None
    ) -> control_pb2.StopEngineResponse:
        request = control_pb2.StopEngineRequest(
            generation=generation, engine_id=engine_id, drain_timeout_s=drain_timeout_s
        )
        try:
            return await self._control.StopEngine(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "StopEngine") from None

    async def renew_lease(
        self, generation: int, *, lease_s: float, timeout_s: float | None = None
    ) -> control_pb2.RenewLeaseResponse:
        request = control_pb2.RenewLeaseRequest(generation=generation, lease_s=lease_s)
        try:
            return await self._control.RenewLease(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "RenewLease") from None

    async def restore_defaults(
        self, generation: int, gpu_indices: Iterable[int] = (), *, timeout_s: float | None = None
    ) -> control_pb2.RestoreDefaultsResponse:
        """Empty `gpu_indices`: every GPU."""
        request = control_pb2.RestoreDefaultsRequest(generation=generation, gpu_indices=list(gpu_indices))
        try:
            return await self._control.RestoreDefaults(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise self._error(err, "RestoreDefaults") from None


def _check_positive(field: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(field, value, "a finite number of seconds > 0")
