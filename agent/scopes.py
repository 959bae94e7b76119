"""Generation-scoped execution of the agent's control calls: one operation at a time per scope, run to its
end whatever its caller does, its outcome recorded and replayed.

Where it sits: `agent.node.NodeAgent` runs every ApplyGpuConfig / RestoreDefaults (GPU scope) and
ReconfigureEngine / StopEngine (one scope per engine) through `run_scoped`. The generation rule of
`agent.api.generations` decides NEW or REPLAY (or refuses: stale, reused, out of range); for a NEW call
the request is validated (`prepare`) under the scope's lock, then carried out (`act`) by an OPERATION: an
asyncio task the scope owns, not the caller's task. The operation holds the scope's lock until its
outcome is recorded under the generation and persisted (`persist`, the agent's state file); only then is
the reply handed out. A replay of a running call waits for the operation's outcome.

Invariants:
- Once `act` has started, it runs to completion (or to its own rollback) whatever the caller does: a
  cancelled call, a passed deadline or a dropped connection cancels the caller's wait (shielded), never
  the operation. Only the scope's owner cancels an operation (`GenerationScope.interrupt`, at agent
  shutdown), and the outcome then says so (UNAVAILABLE, "interrupted by the agent's shutdown").
- While an operation runs, `GenerationScope.running` describes it; the node agent writes it to disk as
  the call's write-ahead record (`agent.safety.PendingCall`) before the first change the call makes.
- Every outcome carries a message: an unexpected exception is INTERNAL naming its type, never "".
- A caller that went away can still learn the outcome: `on_detached` is called once, with a
  `FinishedOperation`, when the operation it started ends (the servicer writes the audit line of the
  cancelled call from it).

Outcomes recorded under a generation: replies, and errors raised while acting (an NVML error after
rollback, an engine that did not start). Not recorded (the generation stays free, nothing changed):
INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND and ABORTED, which refuse a request before any change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from agent.api.clock import Clock
from agent.api.errors import (
    ConflictError,
    DynamoError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from agent.api.generations import Decision, Outcome, ScopeRecord, check_generation, fingerprint
from agent.api.status import status_for

log = structlog.get_logger("agent.scopes")

M = TypeVar("M", bound=Message)
P = TypeVar("P")

# Refusals before any change: not recorded under the generation (see module docstring).
_NOT_RECORDED = (
    InvalidArgumentError,
    FailedPreconditionError,
    NotFoundError,
    ConflictError,
    PermissionDeniedError,
)


class RecordedStatus(Exception):
    """A recorded error outcome, returned again for a replayed generation."""

    def __init__(self, code: grpc.StatusCode, message: str, *, replayed: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.replayed = replayed  # the outcome of an earlier call with this generation, returned again


@dataclass(frozen=True, slots=True)
class FinishedOperation:
    """How an operation ended, for a caller that was no longer waiting (the audit of cancelled calls)."""

    rpc: str
    scope: str  # "GPU-scope", "engine e1"
    generation: int
    code: str  # "OK" or a grpc.StatusCode name
    message: str  # the error message; "" for OK
    duration_s: float  # from the start of the operation to its recorded outcome
    recorded: bool  # the outcome is recorded under the generation (False: a refusal left it free)


DetachedHook = Callable[[FinishedOperation], None]


@dataclass(frozen=True, slots=True)
class RunningCall:
    """The call a scope's operation is carrying out (its write-ahead record is built from this)."""

    rpc: str
    generation: int
    fingerprint: str
    started_unix_ns: int
    previous: ScopeRecord | None  # the scope's record before this call: what is durable until it ends


@dataclass
class GenerationScope:
    """One generation scope: its record, the lock its operations hold, the operation in progress."""

    name: str  # in messages: "GPU-scope", "engine e1"
    key: str  # in the state file's pending map: "gpu", "engine:e1"
    record: ScopeRecord | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: asyncio.Future[Outcome] | None = None  # the latest operation's outcome, once persisted
    inflight_generation: int = 0  # the generation of that operation
    running: RunningCall | None = None
    task: asyncio.Future[Any] | None = None

    @property
    def durable_record(self) -> ScopeRecord | None:
        """The record to persist: the finished one (a running call's record has no outcome yet)."""
        return self.running.previous if self.running is not None else self.record

    async def interrupt(self) -> None:
        """Cancel the operation in progress, if any, and wait until its outcome is recorded (shutdown)."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _replay(scope: GenerationScope, response_type: type[M]) -> M:
    """The recorded outcome of the scope's generation; while its operation has not yet persisted it,
    wait: no reply (first or replayed) goes out before its outcome is on disk."""
    record = scope.record
    assert record is not None
    inflight = scope.inflight
    if inflight is not None and not inflight.done() and scope.inflight_generation == record.generation:
        outcome = await asyncio.shield(inflight)
    else:
        assert record.outcome is not None
        outcome = record.outcome
    if outcome.reply is None:
        raise RecordedStatus(grpc.StatusCode[outcome.code], outcome.message, replayed=True)
    reply = response_type.FromString(outcome.reply)
    reply.replayed = True  # type: ignore[attr-defined]
    return reply


def _failure(exc: BaseException, scope: GenerationScope, generation: int) -> Outcome:
    if isinstance(exc, asyncio.CancelledError):
        return Outcome(
            None,
            grpc.StatusCode.UNAVAILABLE.name,
            f"{scope.name}: generation {generation} was interrupted by the agent's shutdown before it "
            "finished; re-read GetInventory after the restart",
        )
    if isinstance(exc, DynamoError):
        return Outcome(None, status_for(exc).name, str(exc))
    return Outcome(None, grpc.StatusCode.INTERNAL.name, f"internal error: {type(exc).__name__}: {exc}")


@dataclass
class _Operation:
    """One operation's bookkeeping, shared by its task and its caller."""

    running: RunningCall
    inflight: asyncio.Future[Outcome]  # its outcome, once recorded and persisted
    t0_s: float  # monotonic start
    recorded: bool = False  # the outcome is recorded under the generation


async def _operate(
    scope: GenerationScope,
    op: _Operation,
    plan: P,
    act: Callable[[P], Awaitable[M]],
    persist: Callable[[], Awaitable[None]],
) -> M:
    """The operation: act, record, persist, release the scope. Runs in its own task (see module doc)."""
    running = op.running
    generation, digest = running.generation, running.fingerprint
    outcome = Outcome(None, grpc.StatusCode.INTERNAL.name, "internal error: no outcome")
    try:
        try:
            reply = await act(plan)
        except _NOT_RECORDED as exc:
            scope.record = running.previous
            outcome = Outcome(None, status_for(exc).name, str(exc))
            raise
        except BaseException as exc:
            outcome = _failure(exc, scope, generation)
            scope.record = ScopeRecord(generation, digest, outcome)
            op.recorded = True
            if not isinstance(exc, DynamoError | asyncio.CancelledError):
                log.error(
                    "operation_failed_unexpectedly", scope=scope.name, generation=generation, exc_info=exc
                )
            raise
        outcome = Outcome(reply.SerializeToString())
        scope.record = ScopeRecord(generation, digest, outcome)
        op.recorded = True
        return reply
    finally:
        scope.running = None
        try:
            await persist()  # the outcome replaces the write-ahead record on disk
        except (DynamoError, OSError) as exc:
            # Still covered: the write-ahead record on disk names every GPU this call may have changed.
            log.error("state_save_failed", scope=scope.name, generation=generation, error=str(exc))
        finally:
            op.inflight.set_result(outcome)
            scope.task = None
            scope.lock.release()


def retrieve_exception(task: asyncio.Future[Any]) -> None:
    """Done-callback: retrieve the exception of a task nobody awaits any more (its caller went away),
    so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _finished(op: _Operation, scope: GenerationScope, clock: Clock) -> FinishedOperation:
    outcome = op.inflight.result()
    return FinishedOperation(
        rpc=op.running.rpc,
        scope=scope.name,
        generation=op.running.generation,
        code="OK" if outcome.reply is not None else outcome.code,
        message=outcome.message,
        duration_s=clock.monotonic_s() - op.t0_s,
        recorded=op.recorded,
    )


async def run_scoped(
    scope: GenerationScope,
    request: Message,
    generation: int,
    *,
    rpc: str,
    response_type: type[M],
    prepare: Callable[[], P],
    act: Callable[[P], Awaitable[M]],
    persist: Callable[[], Awaitable[None]],
    clock: Clock,
    on_detached: DetachedHook | None = None,
) -> M:
    """Generation check, validation (`prepare`, under the lock), then the operation (see module doc)."""
    digest = fingerprint(request)
    if (
        check_generation(scope.record, generation, digest, scope=scope.name, now_unix_ns=clock.wall_ns())
        is Decision.REPLAY
    ):
        return await _replay(scope, response_type)
    await scope.lock.acquire()
    op: _Operation | None = None
    task: asyncio.Task[M] | None = None
    try:
        # Another call may have taken this or a newer generation while we waited for the lock.
        decision = check_generation(
            scope.record, generation, digest, scope=scope.name, now_unix_ns=clock.wall_ns()
        )
        if decision is Decision.NEW:
            plan = prepare()
            # From here to the task's creation nothing awaits: the operation takes over the lock.
            running = RunningCall(rpc, generation, digest, clock.wall_ns(), scope.record)
            op = _Operation(running, asyncio.get_running_loop().create_future(), clock.monotonic_s())
            scope.record = ScopeRecord(generation, digest, None)
            scope.running, scope.inflight, scope.inflight_generation = running, op.inflight, generation
            task = asyncio.create_task(
                _operate(scope, op, plan, act, persist), name=f"{scope.key}@{generation}"
            )
            task.add_done_callback(retrieve_exception)
            scope.task = task
    finally:
        if task is None:
            scope.lock.release()
    if task is None or op is None:
        return await _replay(scope, response_type)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        caller = asyncio.current_task()
        if task.cancelled() and (caller is None or not caller.cancelling()):
            # The operation itself was interrupted (shutdown): answer its recorded outcome.
            outcome = op.inflight.result()
            raise RecordedStatus(grpc.StatusCode[outcome.code], outcome.message) from None
        log.info("operation_continues_without_caller", rpc=rpc, scope=scope.name, generation=generation)
        finished_op = op

        def detached(_: asyncio.Future[Outcome]) -> None:
            done = _finished(finished_op, scope, clock)
            log.info(
                "detached_operation_finished",
                rpc=rpc,
                scope=scope.name,
                generation=generation,
                code=done.code,
                duration_s=round(done.duration_s, 6),
            )
            if on_detached is not None:
                try:
                    on_detached(done)
                except Exception:
                    log.exception("detached_hook_failed", rpc=rpc, scope=scope.name, generation=generation)

        op.inflight.add_done_callback(detached)
        raise
