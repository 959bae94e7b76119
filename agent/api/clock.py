"""The time seam of the agent: a `Clock` protocol (monotonic seconds for timers and intervals, wall-clock
nanoseconds for the `*_unix_ns` fields of the wire contract) and the system implementation.

Cores take a `Clock` (or plain numbers read from one) instead of calling `time`, so that tests drive them
with a hand-advanced fake; only entry points construct `SystemClock`.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where timing logic reads the time."""

    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes back (intervals, timers, lease expiry)."""
        ...

    def wall_ns(self) -> int:
        """Nanoseconds since the Unix epoch (UTC): timestamps shown to callers."""
        ...


class SystemClock:
    """The host's clocks (`time.monotonic`, `time.time_ns`)."""

    def monotonic_s(self) -> float:
        return time.monotonic()

    def wall_ns(self) -> int:
        return time.time_ns()
