"""Per-GPU serial workers: the agent's only way to call the blocking `GpuBackend` from the event loop.

Each GPU gets a single-thread executor, so calls to one GPU run one at a time and in the order they were
made (a clock lock is never overtaken by the read meant to confirm it), while different GPUs proceed in
parallel and a slow NVML call on one GPU never blocks the event loop or the other GPUs.

A call handed to a worker always runs to its end: cancelling the coroutine that awaits it stops the
wait, not the driver call. That is why the node agent runs every control operation in a task its caller
cannot cancel (`agent.scopes`): a write must never reach the hardware without its outcome being
recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent.api.errors import NotFoundError
from agent.gpu.base import GpuBackend, GpuInfo, GpuReading

T = TypeVar("T")


class GpuWorkers:
    """Async facade over a `GpuBackend`; `infos` is read once at creation (static facts)."""

    def __init__(self, backend: GpuBackend, infos: Sequence[GpuInfo]) -> None:
        self.backend = backend
        self.infos: tuple[GpuInfo, ...] = tuple(infos)
        self._executors = tuple(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gpu{info.index}") for info in self.infos
        )
        self._closed = False

    @classmethod
    async def create(cls, backend: GpuBackend) -> GpuWorkers:
        """Count the GPUs and read their static facts, off the event loop."""

        def inventory() -> list[GpuInfo]:
            return [backend.info(i) for i in range(backend.device_count())]

        return cls(backend, await asyncio.to_thread(inventory))

    @property
    def count(self) -> int:
        return len(self.infos)

    @property
    def kind(self) -> str:
        return self.backend.kind

    async def run(self, index: int, call: Callable[[], T]) -> T:
        """Run `call` on GPU `index`'s worker thread and await its result (or its exception)."""
        if not 0 <= index < len(self._executors):
            raise NotFoundError(f"GPU {index} does not exist (node has {len(self._executors)})")
        return await asyncio.get_running_loop().run_in_executor(self._executors[index], call)

    async def read(self, index: int) -> GpuReading:
        return await self.run(index, lambda: self.backend.read(index))

    async def power_limit_w(self, index: int) -> float:
        return await self.run(index, lambda: self.backend.power_limit_w(index))

    async def set_locked_clocks(self, index: int, min_clock_mhz: int, max_clock_mhz: int) -> None:
        await self.run(index, lambda: self.backend.set_locked_clocks(index, min_clock_mhz, max_clock_mhz))

    async def reset_locked_clocks(self, index: int) -> None:
        await self.run(index, lambda: self.backend.reset_locked_clocks(index))

    async def set_power_limit(self, index: int, power_limit_w: float) -> None:
        await self.run(index, lambda: self.backend.set_power_limit(index, power_limit_w))

    async def read_many(self, indices: Sequence[int]) -> list[GpuReading | BaseException]:
        """Read several GPUs in parallel; a failed read is returned in place of its reading."""
        return await asyncio.gather(*(self.read(i) for i in indices), return_exceptions=True)

    def close(self) -> None:
        """Finish queued calls, stop the threads, then close the backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for executor in self._executors:
            executor.shutdown(wait=True)
        self.backend.close()
