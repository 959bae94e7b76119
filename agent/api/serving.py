"""Serving gRPC in both daemons (`dynamollm-agent` and `dynamollm-controller`): their servicers' shared
steps (a request decoder that never raises, the caller from the call's metadata, peer and TLS context,
errors turned into statuses through the one table `agent.api.status`), and binding a daemon's grpc.aio
server to its `listen` address, shared by both daemons' entry points
(`dynamollm-agent`, and the controller's daemon): TLS / mTLS credentials from `TlsSettings`
(`agent.api.config`), a Unix socket that is refused while another process listens on it and is never
more open than its configured file mode, and bind failures reported as `InvalidArgumentError` naming
the key (the entry point prints one line and exits 2).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from agent.api.auth import Authorizer, Caller
from agent.api.config import TlsSettings
from agent.api.errors import DynamoError, InvalidArgumentError, clip
from agent.api.status import status_for

log = structlog.get_logger("agent.api.serving")

M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]
# A status message is at most this long (client metadata limits are 8-16 kB); values in it are already
# cut to 200 characters each (agent.api.errors.echo), this bounds the rest.
MAX_STATUS_CHARS: Final = 2000


# ------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request payload that did not parse as its message type; the servicer answers INVALID_ARGUMENT."""

    size_bytes: int
    message_type: str
    reason: str

    def error(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            "request",
            f"{self.size_bytes} bytes that do not parse",
            f"a serialized {self.message_type} ({self.reason})",
        )


def decode_as(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer that never raises: gRPC answers UNKNOWN when a deserializer raises."""
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, and whatever else the parser may raise on garbage
            reason = str(exc).rsplit("': ", 1)[-1] or type(exc).__name__  # without "... with type 'X'"
            return Undecodable(len(data), name, clip(reason, 120))

    return decode


def decoded(request: M | Undecodable) -> M:
    """The request, or the INVALID_ARGUMENT error of one that did not parse."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


# ------------------------------------------------------------------------------------ status, caller


async def abort_with(context: Context, exc: BaseException) -> NoReturn:
    """End the call with the status of `exc` (our error tree), INTERNAL with a log line for anything else."""
    if isinstance(exc, DynamoError):
        await context.abort(status_for(exc), clip(str(exc), MAX_STATUS_CHARS))
    log.exception("rpc_internal_error", error=clip(repr(exc), MAX_STATUS_CHARS))
    await context.abort(
        grpc.StatusCode.INTERNAL, clip(f"internal error: {type(exc).__name__}: {exc}", MAX_STATUS_CHARS)
    )


def _auth_context(context: Context) -> Mapping[str, Iterable[bytes]]:
    try:
        return context.auth_context() or {}
    except Exception:  # an insecure channel may have none to give
        return {}


def identify(auth: Authorizer, context: Context) -> Caller:
    """Who is calling (`Authorizer.identify` over the call's metadata, peer and TLS context)."""
    return auth.identify(
        tuple(context.invocation_metadata() or ()), context.peer() or "", _auth_context(context)
    )


# ------------------------------------------------------------------------------------------ binding


def server_credentials(tls: TlsSettings | None) -> grpc.ServerCredentials | None:
    """TLS credentials from `[tls]`; client certificates are required and verified when a client CA is
    configured (mTLS). None: plaintext."""
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.client_ca is not None,
    )


def unix_path(listen: str) -> Path | None:
    """The socket path of `listen = unix:/path`; None for a TCP address."""
    if not listen.startswith("unix:"):
        return None
    return Path(listen[len("unix:") :].removeprefix("//"))


def _check_socket_free(path: Path) -> None:
    """gRPC replaces a socket file at the path: refuse one another process still listens on."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgumentError("listen", f"unix:{path}", "a path that is free or a stale socket file")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # stale: nobody answers
    raise InvalidArgumentError("listen", f"unix:{path}", "a socket path no other process listens on")


def bind(server: grpc.aio.Server, listen: str, tls: TlsSettings | None, unix_socket_mode: int) -> int:
    """Add the listening port (TLS when configured); a Unix socket is created owner-only and then given
    `unix_socket_mode`, so it is never more open than configured. Returns the bound TCP port (0: Unix)."""
    credentials = server_credentials(tls)
    unix = unix_path(listen)
    if unix is not None:
        _check_socket_free(unix)
    old_umask = os.umask(0o177) if unix is not None else None
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise InvalidArgumentError("listen", listen, f"an address this host can bind ({exc})") from None
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    if unix is not None:
        try:
            os.chmod(unix, unix_socket_mode)
        except OSError as exc:
            raise InvalidArgumentError(
                "unix_socket_mode", f"{unix_socket_mode:04o}", f"a mode the agent can set ({exc})"
            ) from None
    return port
