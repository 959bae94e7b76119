"""Stopping an agent at a chosen NVML call: the fake library's hold (FAKE_NVML_BLOCK_ON/_PATH).

Where it sits: fault tests (tests/integration/test_agent_faults.py) arm a hold in the environment of an
agent that loads the fake libnvidia-ml.so.1 (a subprocess through `env()`, or this process through
monkeypatch before the agent starts), wait until a worker thread is parked in it (`wait_held`), then
kill -9 the agent there, or cancel the caller and `release` the thread. The spec is
`[after:]<nvml function>[@<n>]` (see fake_nvml.c): without `after:` the n-th call of the function waits
before it acts; with it, the next call on the same thread after the n-th successful call waits. Nothing
in the agent knows about holds: the agent under test is the production code, unchanged.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK_ON_ENV = "FAKE_NVML_BLOCK_ON"
BLOCK_PATH_ENV = "FAKE_NVML_BLOCK_PATH"


@dataclass(frozen=True, slots=True)
class NvmlHold:
    """One hold: `spec` says where, `path` is created by the held call and `path`.release frees it."""

    spec: str
    path: Path

    def env(self) -> dict[str, str]:
        return {BLOCK_ON_ENV: self.spec, BLOCK_PATH_ENV: str(self.path)}

    @property
    def held(self) -> bool:
        return self.path.exists()

    async def wait_held(self, timeout_s: float = 15.0, *, request: Any = None) -> str:
        """Wait until a call is parked in the hold; returns the NVML function it parked in. `request`
        (anything with `done()`: a task, a gRPC call) is what should reach the hold: if it ends first,
        the wait fails at once with what it ended with."""
        deadline_s = time.monotonic() + timeout_s
        while not self.path.exists():
            if request is not None and request.done():
                outcome = await asyncio.gather(request, return_exceptions=True)
                raise AssertionError(f"the request ended before the hold {self.spec!r}: {outcome[0]!r}")
            if time.monotonic() > deadline_s:
                raise AssertionError(f"no NVML call reached the hold {self.spec!r} within {timeout_s:g} s")
            await asyncio.sleep(0.005)
        for _ in range(200):  # the file is created, then its one line written
            text = self.path.read_text().strip()
            if text:
                return text
            await asyncio.sleep(0.005)
        return ""

    def release(self) -> None:
        self.path.with_name(self.path.name + ".release").touch()
