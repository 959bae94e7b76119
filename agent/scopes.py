"""Generation-scoped execution of the agent's control calls: one lock per scope, replay of recorded outcomes.

Where it sits: `agent.node.NodeAgent` runs every ApplyGpuConfig / RestoreDefaults (GPU scope) and
ReconfigureEngine / StopEngine (one scope per engine) through `run_scoped`: the generation rule of
`agent.api.generations` decides NEW or REPLAY; a NEW call is validated (`prepare`) and carried out (`act`)
under the scope's lock, and its outcome is recorded under the generation and persisted (`persist`, the
agent's state file) before the reply goes out. A replay of a call still running waits for its outcome.

Outcomes recorded under a generation: replies, and errors raised while acting (an NVML error after
rollback, an engine that did not start). Not recorded (the generation stays free, nothing changed):
INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND and ABORTED, which refuse a request before any change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from agent.api.errors import (
    ConflictError,
    DynamoError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from agent.api.generations import Decision, Outcome, ScopeRecord, check_generation, fingerprint
from agent.api.status import status_for

M = TypeVar("M", bound=Message)
P = TypeVar("P")

# Refusals before any change: not recorded under the generation (see module docstring).
_NOT_RECORDED = (InvalidArgumentError, FailedPreconditionError, NotFoundError, ConflictError)


class RecordedStatus(Exception):
    """A recorded error outcome, returned again for a replayed generation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class GenerationScope:
    """One generation scope: its record, the lock serialising its calls, the running call's outcome."""

    record: ScopeRecord | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: asyncio.Future[Outcome] | None = None


async def _replay(scope: GenerationScope, response_type: type[M]) -> M:
    record = scope.record
    assert record is not None
    outcome = record.outcome
    if outcome is None:
        assert scope.inflight is not None
        outcome = await asyncio.shield(scope.inflight)
    if outcome.reply is None:
        raise RecordedStatus(grpc.StatusCode[outcome.code], outcome.message)
    reply = response_type.FromString(outcome.reply)
    reply.replayed = True  # type: ignore[attr-defined]
    return reply


async def run_scoped(
    scope: GenerationScope,
    request: Message,
    generation: int,
    *,
    scope_name: str,
    response_type: type[M],
    prepare: Callable[[], P],
    act: Callable[[P], Awaitable[M]],
    persist: Callable[[], Awaitable[None]],
) -> M:
    """Generation check, validation (`prepare`, under the lock), action, recorded and persisted outcome."""
    digest = fingerprint(request)
    if check_generation(scope.record, generation, digest, scope=scope_name) is Decision.REPLAY:
        return await _replay(scope, response_type)
    async with scope.lock:
        # Another call may have taken this or a newer generation while we waited for the lock.
        if check_generation(scope.record, generation, digest, scope=scope_name) is Decision.REPLAY:
            return await _replay(scope, response_type)
        plan = prepare()
        previous = scope.record
        inflight: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        scope.record, scope.inflight = ScopeRecord(generation, digest, None), inflight
        try:
            reply = await act(plan)
        except _NOT_RECORDED as exc:
            scope.record = previous
            inflight.set_result(Outcome(None, status_for(exc).name, str(exc)))
            raise
        except BaseException as exc:
            code = status_for(exc) if isinstance(exc, DynamoError) else grpc.StatusCode.INTERNAL
            outcome = Outcome(None, code.name, str(exc))
            scope.record = ScopeRecord(generation, digest, outcome)
            inflight.set_result(outcome)
            await persist()
            raise
        outcome = Outcome(reply.SerializeToString())
        scope.record = ScopeRecord(generation, digest, outcome)
        inflight.set_result(outcome)
        await persist()
        return reply
