"""agent.lease: the lease state model on a hand-advanced clock, and the watcher task firing on expiry."""

from __future__ import annotations

import asyncio

import pytest

from agent.api.errors import ConflictError, FailedPreconditionError
from agent.lease import LeaseBook, LeaseWatcher


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def monotonic_s(self) -> float:
        return self.now_s

    def wall_ns(self) -> int:
        return 1_700_000_000_000_000_000 + round(self.now_s * 1e9)


def test_grant_view_and_expiry() -> None:
    book = LeaseBook()
    view = book.view(now_s=0.0, now_unix_ns=5)
    assert (view.active, view.holder, view.generation, view.expires_unix_ns) == (False, "", 0, 0)
    book.grant(holder="ctl", generation=7, lease_s=10.0, now_s=100.0)
    view = book.view(now_s=104.0, now_unix_ns=1_000_000_000)
    assert view.active and view.holder == "ctl" and view.generation == 7
    assert view.remaining_s == pytest.approx(6.0)
    assert view.expires_unix_ns == 1_000_000_000 + 6_000_000_000
    assert not book.is_expired(109.999)
    assert book.is_expired(110.0)
    assert not book.view(now_s=110.0, now_unix_ns=0).active
    book.expire()
    assert not book.is_expired(200.0)
    assert book.view(now_s=200.0, now_unix_ns=0).generation == 7  # the generation stays in force


def test_a_grant_taken_back_reinstates_the_earlier_terms() -> None:
    """ApplyGpuConfig grants before its first write; a failed, rolled-back apply puts the lease back."""
    book = LeaseBook()
    book.grant(holder="a", generation=3, lease_s=10.0, now_s=0.0)
    earlier = book.terms()
    book.grant(holder="b", generation=4, lease_s=60.0, now_s=1.0)
    assert (book.holder, book.generation, book.expires_s) == ("b", 4, 61.0)
    book.reinstate(earlier)
    assert (book.holder, book.generation, book.expires_s) == ("a", 3, 10.0)
    assert book.is_expired(10.0)  # an expiry that passed meanwhile fires at once
    fresh = LeaseBook()
    before = fresh.terms()
    fresh.grant(holder="b", generation=1, lease_s=5.0, now_s=0.0)
    fresh.reinstate(before)
    assert not fresh.is_active(1.0) and fresh.generation == 0


def test_renew_sets_rather_than_adds() -> None:
    book = LeaseBook()
    book.grant(holder="a", generation=3, lease_s=10.0, now_s=0.0)
    book.renew(holder="b", generation=3, lease_s=5.0, now_s=8.0)
    assert book.expires_s == 13.0 and book.holder == "b"
    book.renew(holder="b", generation=3, lease_s=5.0, now_s=8.0)  # repeating is harmless
    assert book.expires_s == 13.0


def test_renew_refusals() -> None:
    book = LeaseBook()
    with pytest.raises(ConflictError, match="generation 0"):
        book.renew(holder="a", generation=1, lease_s=5.0, now_s=0.0)
    book.grant(holder="a", generation=3, lease_s=10.0, now_s=0.0)
    with pytest.raises(ConflictError, match="holds GPU-scope generation 3, not 2"):
        book.renew(holder="a", generation=2, lease_s=5.0, now_s=1.0)
    with pytest.raises(FailedPreconditionError, match="not active"):
        book.renew(holder="a", generation=3, lease_s=5.0, now_s=10.0)  # expired, even before the watcher ran
    book.grant(holder="a", generation=4, lease_s=10.0, now_s=20.0)
    book.release(generation=5)
    assert book.generation == 5 and book.expires_s is None
    with pytest.raises(FailedPreconditionError):
        book.renew(holder="a", generation=5, lease_s=5.0, now_s=21.0)


async def test_watcher_fires_once_per_expiry_and_follows_renewals() -> None:
    book = LeaseBook()
    clock = ManualClock()
    fired: list[float] = []

    async def on_expiry() -> None:
        fired.append(clock.now_s)
        book.expire()

    # Real asyncio timeouts with a clock the test advances: the watcher's wait is only a hint, the expiry
    # decision reads the clock.
    watcher = LeaseWatcher(book, clock, on_expiry)
    task = asyncio.create_task(watcher.run())
    try:
        book.grant(holder="a", generation=1, lease_s=0.05, now_s=clock.now_s)
        watcher.poke()
        await asyncio.sleep(0.1)
        assert fired == []  # the clock has not moved: not expired
        book.renew(holder="a", generation=1, lease_s=0.05, now_s=clock.now_s)
        watcher.poke()
        clock.now_s += 0.06
        await asyncio.sleep(0.15)
        assert fired == [pytest.approx(100.06)]
        await asyncio.sleep(0.1)
        assert len(fired) == 1  # once per expiry
        book.grant(holder="a", generation=2, lease_s=0.02, now_s=clock.now_s)
        watcher.poke()
        clock.now_s += 1.0
        await asyncio.sleep(0.1)
        assert len(fired) == 2
    finally:
        task.cancel()


async def test_watcher_retries_a_failing_handler() -> None:
    book = LeaseBook()
    clock = ManualClock()
    calls = 0

    async def on_expiry() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("nvml down")

    watcher = LeaseWatcher(book, clock, on_expiry)
    task = asyncio.create_task(watcher.run())
    try:
        book.grant(holder="a", generation=1, lease_s=0.01, now_s=clock.now_s - 1.0)
        watcher.poke()
        await asyncio.sleep(0.1)
        assert calls == 1 and not task.done()  # survived; retries after its back-off
    finally:
        task.cancel()
