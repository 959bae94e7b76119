"""Generations: the idempotency rule of every desired-state call, shared by the agent and the controller.

Where it sits: a control call carries a `generation` per scope (the agent's GPU scope, one scope per
engine; the controller's admin scopes follow the same convention). Before acting, the server asks
`check_generation` what the call means against the scope's `ScopeRecord`: NEW (act, then record the
`Outcome` under the generation), REPLAY (the same request again: return the recorded outcome instead of
acting twice), or an error for an older generation (ABORTED) or a reused one carrying another request
(INVALID_ARGUMENT). Requests are compared by `fingerprint`. Pure: no I/O, no clock, no asyncio, so any
layer may use it; the agent's asynchronous runner over it is `agent.scopes`.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from google.protobuf.message import Message

from agent.api.errors import ConflictError, InvalidArgumentError


class Decision(enum.Enum):
    """What a request's generation means for its scope (control.proto, top of file)."""

    NEW = "new"  # g > c: validate and act
    REPLAY = "replay"  # g == c, same request: return the recorded outcome


@dataclass(frozen=True, slots=True)
class Outcome:
    """The recorded result of a call: the serialized reply, or the status it failed with."""

    reply: bytes | None
    code: str = ""  # grpc.StatusCode name when reply is None
    message: str = ""


@dataclass(frozen=True, slots=True)
class ScopeRecord:
    """The highest generation a scope accepted, the request's fingerprint and its outcome (None while the
    call is still running)."""

    generation: int
    fingerprint: str
    outcome: Outcome | None


def fingerprint(request: Message) -> str:
    """Stable digest of a request; equal requests (same fields, same map contents) give equal digests."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def check_generation(record: ScopeRecord | None, generation: int, digest: str, *, scope: str) -> Decision:
    """NEW or REPLAY; raises for a stale generation (ABORTED) or a reused one with a new request."""
    if generation < 1:
        raise InvalidArgumentError("generation", generation, ">= 1")
    current = record.generation if record is not None else 0
    if generation > current:
        return Decision.NEW
    if generation < current:
        raise ConflictError(
            f"generation: {generation} is older than the {scope} generation in force, {current}; "
            "re-read GetInventory and plan again"
        )
    assert record is not None  # generation == current >= 1
    if record.fingerprint != digest:
        raise InvalidArgumentError(
            "generation",
            generation,
            f"a new generation (> {current}): {generation} was used by a different request",
        )
    return Decision.REPLAY
