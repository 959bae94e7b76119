"""Authentication and authorization of a daemon's gRPC calls: who is calling, and may they do this.
Shared by both daemons: the agent's servicers (NodeTelemetry, NodeControl) and the controller's admin
servicers check callers with the same rules, tokens and scopes.

Where it sits, the agent's flow as an example: every servicer method (`agent.service`) first turns the
call's metadata, peer and TLS auth context into a `Caller` (`Authorizer.identify`), then checks the scope
the call needs (`Authorizer.require`) before anything else runs; the scope of a control call depends on
the request and the lease (`agent.service.control_scope`). The caller's name is the lease holder and the
identity in the audit log.

How a caller is established, first match wins (docs/agent.md, *Access*):

1. an `authorization: Bearer TOKEN` header, when tokens are configured (`auth.tokens_file`): the
   token's name and scopes; a token that matches none is refused (UNAUTHENTICATED), never ignored;
2. a client certificate verified against `tls.client_ca`: `cert:<CN>` with `tls.client_scopes`;
3. a loopback or Unix-socket peer with `auth.allow_unauthenticated_loopback`: `peer:<address>` with
   every scope (local demos and tests);
4. a loopback or Unix-socket peer while no tokens are configured: `peer:<address>`, read only;
5. anyone else: no scope at all.

Secure by default: without tokens, certificates or the explicit loopback opt-in, nothing can change a
node, and nothing but a local peer can read it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from agent.api.errors import PermissionDeniedError, UnauthenticatedError, clip

# Scopes of bearer tokens and client certificates (docs/agent.md, *Access*): read = NodeTelemetry;
# control = GPU clocks and power under the caller's own lease; admin = what preempts others or starts and
# stops processes: engine lifecycle, RestoreDefaults of every GPU, taking over another holder's lease.
TOKEN_SCOPES = ("read", "control", "admin")
ALL_SCOPES: Final = frozenset(TOKEN_SCOPES)
MAX_NAME_CHARS: Final = 128


@dataclass(frozen=True, slots=True)
class BearerToken:
    """One accepted bearer token: who presents it (`name`: lease holder, audit identity) and its scopes."""

    name: str
    token: str
    scopes: frozenset[str]


def is_loopback_peer(peer: str) -> bool:
    """grpc peer strings: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/run/x.sock"."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if peer.startswith("ipv4:"):
        return peer[len("ipv4:") :].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[len("ipv6:") :].rsplit(":", 1)[0].strip("[]")
        return host in ("::1", "0:0:0:0:0:0:0:1") or host.startswith("::ffff:127.")
    return False


def peer_host(peer: str) -> str:
    """The peer without its port ("ipv4:10.0.0.7"), for names and audit lines."""
    return peer if peer.startswith("unix") else peer.rsplit(":", 1)[0]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: a token's name, `cert:<CN>`, or `peer:<host>`; how that was established (`via`:
    token, certificate, loopback, none) and the scopes it holds."""

    name: str
    scopes: frozenset[str]
    via: str
    peer: str


def _first(auth_context: Mapping[str, Iterable[bytes]], key: str) -> str:
    values = auth_context.get(key) or ()
    for value in values:
        return clip(value.decode(errors="replace"), MAX_NAME_CHARS)
    return ""


class Authorizer:
    """The rules of the module docstring over the configured tokens, certificate scopes and opt-in."""

    def __init__(
        self,
        tokens: Sequence[BearerToken],
        *,
        allow_unauthenticated_loopback: bool = False,
        client_cert_scopes: frozenset[str] | None = None,
    ) -> None:
        """`client_cert_scopes`: what a verified client certificate grants; None when the server does
        not ask for client certificates (no tls.client_ca), so none is ever trusted."""
        self._tokens = tuple(tokens)
        self._allow_loopback = allow_unauthenticated_loopback
        self._cert_scopes = client_cert_scopes

    def identify(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        peer: str,
        auth_context: Mapping[str, Iterable[bytes]] | None = None,
    ) -> Caller:
        """The caller; UnauthenticatedError for a presented bearer token that is malformed or unknown."""
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if header is not None and self._tokens:
            return self._token_caller(header, peer)
        ctx = auth_context or {}
        if self._cert_scopes is not None and ctx.get("x509_pem_cert"):
            name = _first(ctx, "x509_common_name") or _first(ctx, "x509_subject") or "unnamed"
            return Caller(f"cert:{name}", self._cert_scopes, "certificate", peer)
        local = is_loopback_peer(peer)
        if local and self._allow_loopback:
            return Caller("peer:" + peer_host(peer), ALL_SCOPES, "loopback", peer)
        if local and not self._tokens:
            return Caller("peer:" + peer_host(peer), frozenset({"read"}), "none", peer)
        return Caller("unauthenticated " + peer_host(peer), frozenset(), "none", peer)

    def _token_caller(self, header: str | bytes, peer: str) -> Caller:
        text = header.decode(errors="replace") if isinstance(header, bytes) else header
        if not text[:7].lower() == "bearer ":
            raise UnauthenticatedError("the authorization metadata must read 'Bearer <token>'")
        presented = text[7:].strip().encode(errors="replace")
        found: BearerToken | None = None
        for token in self._tokens:  # compare with every token in constant time
            if hmac.compare_digest(token.token.encode(), presented):
                found = token
        if found is None:
            raise UnauthenticatedError("unknown bearer token")
        return Caller(found.name, found.scopes, "token", peer)

    def require(self, caller: Caller, scope: str, *, why: str = "") -> None:
        """PermissionDeniedError for an identified caller (token, certificate) without the scope;
        UnauthenticatedError for a caller nobody vouches for, naming the ways to authenticate."""
        if scope in caller.scopes:
            return
        because = f" ({why})" if why else ""
        if caller.via in ("token", "certificate"):
            raise PermissionDeniedError(f"{caller.name!r} lacks the {scope!r} scope{because}")
        if not self._tokens and is_loopback_peer(caller.peer):
            raise UnauthenticatedError(
                f"the {scope!r} scope{because} needs a bearer token (auth.tokens_file), a client certificate "
                "(tls.client_ca, tls.client_scopes), or auth.allow_unauthenticated_loopback = true for "
                "loopback and Unix-socket callers"
            )
        if self._tokens:
            raise UnauthenticatedError(
                f"the {scope!r} scope{because} needs 'authorization: Bearer <token>' metadata"
            )
        raise UnauthenticatedError(
            f"the {scope!r} scope{because} needs a bearer token (auth.tokens_file) or a client certificate "
            "(tls.client_ca); without either the agent serves loopback and Unix-socket callers only"
        )
