"""Authorization of the agent's gRPC calls: bearer tokens with scopes, or the caller's address.

Where it sits: every servicer method (`agent.service`) first turns the call's metadata and peer into a
`Caller` (`Authorizer.identify`) and checks the scope its service needs (`Authorizer.require`: `read` for
NodeTelemetry, `control` for NodeControl) before anything else runs. The caller's name is the lease
holder and the identity in the audit log. With tokens configured (`auth.tokens_file`, agent.settings)
every call needs a valid token; without, reads are open and control is accepted only from a loopback
address or a Unix socket (secure by default: a node reachable on another interface cannot be clocked
down by anyone who can reach its port).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from agent.api.errors import PermissionDeniedError, UnauthenticatedError
from agent.settings import BearerToken


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
    """Who called: a token's name, or `peer:<host>` when no tokens are configured."""

    name: str
    scopes: frozenset[str]


class Authorizer:
    """Bearer tokens with scopes when configured; otherwise read from anywhere, control from loopback only."""

    def __init__(self, tokens: Sequence[BearerToken]) -> None:
        self._tokens = tuple(tokens)

    def identify(self, metadata: Sequence[tuple[str, str | bytes]], peer: str) -> Caller:
        """UnauthenticatedError when tokens are configured and none valid is presented."""
        if not self._tokens:
            scopes = {"read", "control"} if is_loopback_peer(peer) else {"read"}
            return Caller("peer:" + peer_host(peer), frozenset(scopes))
        presented = ""
        for key, value in metadata:
            if key.lower() == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                if text.lower().startswith("bearer "):
                    presented = text[len("bearer ") :].strip()
        if not presented:
            raise UnauthenticatedError("missing 'authorization: Bearer <token>' metadata")
        found: BearerToken | None = None
        for token in self._tokens:  # compare with every token in constant time
            if hmac.compare_digest(token.token.encode(), presented.encode()):
                found = token
        if found is None:
            raise UnauthenticatedError("unknown bearer token")
        return Caller(found.name, found.scopes)

    def require(self, caller: Caller, scope: str) -> None:
        """PermissionDeniedError (a token without the scope) or UnauthenticatedError (no tokens configured
        and a caller that is not local asking for control)."""
        if scope in caller.scopes:
            return
        if not self._tokens:
            raise UnauthenticatedError(
                "control calls need a bearer token (auth.tokens_file) or a loopback/Unix-socket peer"
            )
        raise PermissionDeniedError(f"token {caller.name!r} lacks the {scope!r} scope")
