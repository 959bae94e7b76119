"""The lease on the node's GPU configuration: a pure state model (`LeaseBook`) and the timer task that
fires when it runs out (`LeaseWatcher`).

Flow: ApplyGpuConfig grants a lease (`grant`) BEFORE its first hardware write (lease first: at no
moment is a GPU modified without a lease that will restore it), and takes the grant back (`reinstate`
the `terms` it replaced) if the apply fails and is rolled back. RenewLease sets a new expiry (`renew`,
which checks the generation and refuses an expired lease), RestoreDefaults releases it once no GPU is
left modified (`release`). The watcher sleeps until the expiry on the agent's monotonic clock and calls
back; the node agent then restores every GPU's defaults (engines keep running) and calls `expire`.
Expiry is judged on the monotonic clock, so wall-clock steps never extend or cut a lease; `*_unix_ns`
values are only shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agent.api.clock import Clock
from agent.api.errors import ConflictError, FailedPreconditionError

log = structlog.get_logger("agent.lease")


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The lease as the wire shows it (LeaseState)."""

    active: bool
    holder: str
    expires_unix_ns: int
    remaining_s: float
    generation: int


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """The whole state of a `LeaseBook`, to put back after a grant that did not take effect."""

    holder: str
    generation: int
    expires_s: float | None


class LeaseBook:
    """Who holds the GPU configuration of which generation, until when (monotonic seconds)."""

    def __init__(self, *, holder: str = "", generation: int = 0) -> None:
        self.holder = holder
        self.generation = generation  # GPU-scope generation in force (last accepted Apply/RestoreDefaults)
        self.expires_s: float | None = None  # None: not active

    def grant(self, *, holder: str, generation: int, lease_s: float, now_s: float) -> None:
        """An accepted ApplyGpuConfig: its generation is now the one in force, held for lease_s."""
        self.holder = holder
        self.generation = generation
        self.expires_s = now_s + lease_s

    def terms(self) -> LeaseTerms:
        return LeaseTerms(self.holder, self.generation, self.expires_s)

    def reinstate(self, terms: LeaseTerms) -> None:
        """Undo a `grant` whose apply failed and was rolled back: the earlier terms are in force again
        (an expiry that passed meanwhile fires at once)."""
        self.holder = terms.holder
        self.generation = terms.generation
        self.expires_s = terms.expires_s

    def renew(self, *, holder: str, generation: int, lease_s: float, now_s: float) -> None:
        """RenewLease: ConflictError (ABORTED) if `generation` is not the one in force, FailedPrecondition
        if the lease is no longer active (expired, or released by RestoreDefaults)."""
        if generation != self.generation:
            raise ConflictError(
                f"generation: lease holds GPU-scope generation {self.generation}, not {generation}; "
                "re-read GetInventory"
            )
        if not self.is_active(now_s):
            raise FailedPreconditionError(
                f"the lease of generation {generation} is not active (expired or released; defaults are "
                "restored): apply the configuration again with a new generation"
            )
        self.holder = holder
        self.expires_s = now_s + lease_s

    def release(self, *, generation: int) -> None:
        """RestoreDefaults left no GPU modified: nothing is held any more; `generation` is in force."""
        self.generation = generation
        self.expires_s = None

    def expire(self) -> None:
        """The watcher restored defaults after the expiry."""
        self.expires_s = None

    def is_active(self, now_s: float) -> bool:
        return self.expires_s is not None and now_s < self.expires_s

    def is_expired(self, now_s: float) -> bool:
        """Held, but past its expiry: defaults must come back."""
        return self.expires_s is not None and now_s >= self.expires_s

    def view(self, *, now_s: float, now_unix_ns: int) -> LeaseView:
        if self.expires_s is None or not self.is_active(now_s):
            return LeaseView(False, self.holder, 0, 0.0, self.generation)
        remaining_s = self.expires_s - now_s
        return LeaseView(
            True, self.holder, now_unix_ns + round(remaining_s * 1e9), remaining_s, self.generation
        )


class LeaseWatcher:
    """Task that waits for the lease's expiry and awaits `on_expiry` once per expiry.

    `poke()` after every change of the book (grant, renew, release) so the wait is recomputed.
    `on_expiry` must re-check `book.is_expired` under the lock that serialises GPU-scope calls: a grant
    may have raced the timer.
    """

    def __init__(self, book: LeaseBook, clock: Clock, on_expiry: Callable[[], Awaitable[None]]) -> None:
        self._book = book
        self._clock = clock
        self._on_expiry = on_expiry
        self._changed = asyncio.Event()

    def poke(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed.clear()
            expires_s = self._book.expires_s
            if expires_s is None:
                await self._changed.wait()
                continue
            wait_s = expires_s - self._clock.monotonic_s()
            if wait_s > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=wait_s)
                    continue  # the book changed: recompute
                except TimeoutError:
                    pass
            if self._book.is_expired(self._clock.monotonic_s()):
                try:
                    await self._on_expiry()
                except Exception:
                    # The callback logs its own failures; the watcher must survive to guard the next lease.
                    log.exception("lease_expiry_handler_failed")
                    await asyncio.sleep(1.0)
