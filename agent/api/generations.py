"""Generations: the idempotency rule of every desired-state call, shared by the agent and the controller.

Where it sits: a control call carries a `generation` per scope (the agent's GPU scope, one scope per
engine; the controller's admin scopes follow the same convention). Before acting, the server asks
`check_generation` what the call means against the scope's `ScopeRecord`: NEW (act, then record the
`Outcome` under the generation), REPLAY (the same request again: return the recorded outcome instead of
acting twice), or an error for an older generation (ABORTED), a reused one carrying another request, or
one outside the allowed range (both INVALID_ARGUMENT). Requests are compared by `fingerprint`. Pure: no
I/O, no clock reading (the caller passes the time), no asyncio, so any layer may use it; the agent's
asynchronous runner over it is `agent.scopes`.

The generation space is bounded so that no call can use it up (control.proto, top of file). With c the
scope's generation and `now_unix_ns` the server's wall clock, a NEW generation g must satisfy

    c < g <= min(MAX_GENERATION, max(c + MAX_STEP_OVER_CURRENT, now_unix_ns + MAX_STEP_OVER_CLOCK_NS))

- MAX_GENERATION = 2^63 - 1: generations are int64 wherever they are stored (the agent's JSON state,
  the controller's SQLite);
- c + 2^32: a counter (the controller's) may skip ahead, but a scope's generation can only climb 2^32 at
  a time above the clock, so reaching 2^63 - 1 from today's clock takes over 1.7e9 accepted calls (and
  as many audit lines) instead of one: a mistaken or hostile 2^64 - 1 no longer freezes a scope;
- now_unix_ns + 2^40 (about 18 minutes of nanoseconds): generations drawn from a wall clock (dctl,
  `agent.api.client.GenerationSource`, ~1.8e18) are accepted from a client whose clock runs up to ~18
  minutes ahead of the server's, even on a scope whose c is still a small counter value.

A replay (g == c) is answered whatever the bound says now. The bound is stated in the error's message.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from google.protobuf.message import Message

from agent.api.errors import ConflictError, InvalidArgumentError

MAX_GENERATION = 2**63 - 1
MAX_STEP_OVER_CURRENT = 2**32
MAX_STEP_OVER_CLOCK_NS = 2**40


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


def generation_limit(current: int, now_unix_ns: int) -> int:
    """The highest generation a scope at generation `current` accepts at wall-clock time `now_unix_ns`."""
    return min(MAX_GENERATION, max(current + MAX_STEP_OVER_CURRENT, now_unix_ns + MAX_STEP_OVER_CLOCK_NS))


def _allowed(current: int, now_unix_ns: int, scope: str) -> str:
    return (
        f"1..{generation_limit(current, now_unix_ns)} for a new {scope} generation (above {current}, the "
        f"generation in force; at most {current} + 2^32 or the agent's clock in ns since the epoch + 2^40, "
        f"whichever is higher, and never above 2^63-1)"
    )


def check_generation_value(generation: int) -> int:
    """The static part of the bound, 1..MAX_GENERATION (RenewLease names a generation but opens none)."""
    if not 1 <= generation <= MAX_GENERATION:
        raise InvalidArgumentError("generation", generation, f"1..{MAX_GENERATION} (2^63-1)")
    return generation


def check_generation(
    record: ScopeRecord | None, generation: int, digest: str, *, scope: str, now_unix_ns: int
) -> Decision:
    """NEW or REPLAY; raises for a stale generation (ABORTED), a reused one with a new request, or a new
    one out of bounds (INVALID_ARGUMENT naming `generation` and the allowed range)."""
    current = record.generation if record is not None else 0
    if generation == current and record is not None:
        if record.fingerprint != digest:
            raise InvalidArgumentError(
                "generation",
                generation,
                f"a new generation (> {current}): {generation} was used by a different request",
            )
        return Decision.REPLAY
    if generation < 1 or generation > generation_limit(current, now_unix_ns):
        raise InvalidArgumentError("generation", generation, _allowed(current, now_unix_ns, scope))
    if generation < current:
        raise ConflictError(
            f"generation: {generation} is older than the {scope} generation in force, {current}; "
            "re-read GetInventory and plan again"
        )
    return Decision.NEW
