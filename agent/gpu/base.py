"""The GPU backend seam: what the agent needs from a GPU, as a `typing.Protocol`, and the values it trades.

Backends (`agent.gpu.nvml.NvmlBackend`, `agent.sim.gpu.SimulatedGpuBackend`) implement it with
blocking calls; the agent calls them from one serial worker per GPU (`agent.gpu.worker`), never from the
event loop. All quantities in SI units with the unit in the name; conversions (NVML's mW, mJ) happen
inside the backend. Errors are raised from `agent.api.errors` (PermissionDeniedError, UnsupportedError,
NotFoundError, UnavailableError, ...), never backend-specific exceptions.

Besides readings and settings, a backend lists the compute processes on each GPU (`compute_processes`):
the engine driver (`agent.engine.driver`) refuses to start an engine on a GPU that a process it does not
own holds, and GetInventory reports those processes. Where the backend can read a GPU's locked clock
range back (`GpuInfo.sm_clock_lock_readable`; the simulated backend can, NVML offers no getter), every
`GpuReading` carries it, so that the agent reports target (what it applied) beside effective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Static facts of one GPU, read once at start-up."""

    index: int
    uuid: str
    name: str
    supported_sm_clocks_mhz: tuple[int, ...]  # ascending; the values a locked clock range may use
    min_power_limit_w: float
    max_power_limit_w: float
    default_power_limit_w: float
    mem_total_bytes: int
    pci_bus_id: str  # domain:bus:device.function, e.g. "00000000:18:00.0" (nvidia-smi's form)
    # `GpuReading.power_w` is the average over this many seconds before the read (0: instantaneous). NVML
    # averages over 1 s on Ampere (except GA100) and newer GPUs; the NVML backend does not tell the
    # generations apart and leaves 0. The simulated backend averages over 1 s.
    power_average_s: float = 0.0
    # Whether `GpuReading.sm_clock_lock_mhz` is read back from the GPU (True) or always None because the
    # backend has no way to read a lock (NVML: there is a setter, nvmlDeviceSetGpuLockedClocks, but no
    # getter; see docs/nvml.md).
    sm_clock_lock_readable: bool = False


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One sample of a GPU's dynamic state."""

    power_w: float
    energy_j: float  # counter since driver load (or backend start); differences are meaningful
    sm_clock_mhz: int
    mem_clock_mhz: int
    util_gpu_ratio: float
    util_mem_ratio: float
    mem_used_bytes: int
    temperature_c: float
    enforced_power_limit_w: float
    clock_event_reasons_mask: int
    # The locked SM clock range (min, max) read back from the GPU at this instant; None when the GPU is
    # unlocked or when the backend cannot read locks (GpuInfo.sm_clock_lock_readable False).
    sm_clock_lock_mhz: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding a compute context on a GPU (nvmlDeviceGetComputeRunningProcesses)."""

    pid: int  # in the PID namespace of the driver (the host's): the agent must run in it to match pids
    used_memory_bytes: int | None  # GPU memory the process holds; None where the driver does not say


class GpuBackend(Protocol):
    """Blocking access to the GPUs of one node. Index = the backend's device index (0..count-1)."""

    @property
    def kind(self) -> str:
        """ "nvml" or "simulated" (GpuBackendKind of the wire contract)."""
        ...

    def device_count(self) -> int: ...

    def info(self, index: int) -> GpuInfo: ...

    def read(self, index: int) -> GpuReading: ...

    def power_limit_w(self, index: int) -> float:
        """The power limit currently set (not the enforced one)."""
        ...

    def set_locked_clocks(self, index: int, min_clock_mhz: int, max_clock_mhz: int) -> None:
        """Lock the SM clock into [min, max] (nvmlDeviceSetGpuLockedClocks)."""
        ...

    def reset_locked_clocks(self, index: int) -> None:
        """Remove any SM clock lock (nvmlDeviceResetGpuLockedClocks)."""
        ...

    def set_power_limit(self, index: int, power_limit_w: float) -> None:
        """Set the power limit; the caller validates it against the GPU's [min, max] first."""
        ...

    def compute_processes(self, index: int) -> tuple[GpuProcess, ...]:
        """Processes with a compute context on GPU `index`, ascending pid (UnsupportedError where the
        driver cannot list them)."""
        ...

    def close(self) -> None:
        """Release the backend (nvmlShutdown); no call after it."""
        ...
