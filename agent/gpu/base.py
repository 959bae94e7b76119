"""The GPU backend seam: what the agent needs from a GPU, as a `typing.Protocol`, and the values it trades.

Backends (`agent.gpu.nvml.NvmlBackend`, `agent.sim.gpu.SimulatedGpuBackend`) implement it with
blocking calls; the agent calls them from one serial worker per GPU (`agent.gpu.worker`), never from the
event loop. All quantities in SI units with the unit in the name; conversions (NVML's mW, mJ) happen
inside the backend. Errors are raised from `agent.api.errors` (PermissionDeniedError, UnsupportedError,
NotFoundError, UnavailableError, ...), never backend-specific exceptions.
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

    def close(self) -> None:
        """Release the backend (nvmlShutdown); no call after it."""
        ...
