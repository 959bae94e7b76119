"""The NVML GPU backend: real GPUs through nvidia-ml-py (`pynvml`), the only module that imports it.

Where it sits: the agent's per-GPU serial workers (`agent.gpu.worker`) call `NvmlBackend` with blocking
calls; the control service validates requests against `info()` before it calls the setters, and the
telemetry sampler calls `read()`. NVML's units (mW, mJ, percent) become SI here, and every NVML return
code becomes an error of `agent.api.errors` through ONE table, `NVML_ERROR_TABLE`; nothing above this
module sees a pynvml type or exception.

Locked clocks cannot be read back through NVML: it offers `nvmlDeviceSetGpuLockedClocks` and
`nvmlDeviceResetGpuLockedClocks` but no getter (`nvmlDeviceGetClock`'s ids are the current clock, the
deprecated application clocks and the customer boost maximum; `nvmlDeviceGetMinMaxClockOfPState` is a
performance state's range, not the lock). So `GpuInfo.sm_clock_lock_readable` is False here and readings
carry the measured SM clock and the clock event reasons; the agent reports them beside the lock it applied
(docs/nvml.md, *Target and effective clocks*).

Privileges: reads need none; `nvmlDeviceSetGpuLockedClocks`, `nvmlDeviceResetGpuLockedClocks` and
`nvmlDeviceSetPowerManagementLimit` need root or CAP_SYS_ADMIN (NVML_ERROR_NO_PERMISSION ->
PermissionDeniedError otherwise). Tests run this module unchanged over the fake library in tests/fakenvml.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import pynvml

from agent.api.errors import (
    DynamoError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    UnsupportedError,
)
from agent.gpu.base import GpuInfo, GpuProcess, GpuReading

_T = TypeVar("_T")

_MILLI = 1000.0  # NVML reports power in mW and energy in mJ
_PERCENT = 100.0

# NVML return code -> (our error, what it means for the operator). INVALID_ARGUMENT and
# FREQ_NOT_SUPPORTED become InvalidArgumentError naming the caller's field when the call carried one
# (a setter), and InternalError otherwise: a read with a bad argument is a bug of ours, not of the input.
NVML_ERROR_TABLE: Mapping[int, tuple[type[DynamoError], str]] = MappingProxyType(
    {
        pynvml.NVML_ERROR_UNINITIALIZED: (InternalError, "NVML used before nvmlInit or after nvmlShutdown"),
        pynvml.NVML_ERROR_INVALID_ARGUMENT: (InvalidArgumentError, "NVML rejected an argument"),
        pynvml.NVML_ERROR_NOT_SUPPORTED: (UnsupportedError, "this GPU does not support the operation"),
        pynvml.NVML_ERROR_NO_PERMISSION: (
            PermissionDeniedError,
            "the agent needs root or CAP_SYS_ADMIN to change clocks and power limits",
        ),
        pynvml.NVML_ERROR_ALREADY_INITIALIZED: (InternalError, "NVML initialised twice"),
        pynvml.NVML_ERROR_NOT_FOUND: (NotFoundError, "no such GPU or object"),
        pynvml.NVML_ERROR_INSUFFICIENT_SIZE: (InternalError, "buffer too small for an NVML answer"),
        pynvml.NVML_ERROR_INSUFFICIENT_POWER: (
            FailedPreconditionError,
            "the GPU's external power cables are not connected properly",
        ),
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED: (UnavailableError, "the NVIDIA driver is not loaded"),
        pynvml.NVML_ERROR_TIMEOUT: (UnavailableError, "the driver timed out"),
        pynvml.NVML_ERROR_IRQ_ISSUE: (UnavailableError, "the driver saw an interrupt problem with the GPU"),
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (UnavailableError, "libnvidia-ml.so.1 was not found"),
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND: (
            UnsupportedError,
            "the installed driver lacks this NVML function (driver too old)",
        ),
        pynvml.NVML_ERROR_CORRUPTED_INFOROM: (FailedPreconditionError, "the GPU's infoROM is corrupted"),
        pynvml.NVML_ERROR_GPU_IS_LOST: (
            UnavailableError,
            "the GPU fell off the bus or is otherwise inaccessible; it needs a reset",
        ),
        pynvml.NVML_ERROR_RESET_REQUIRED: (FailedPreconditionError, "the GPU needs a reset"),
        pynvml.NVML_ERROR_OPERATING_SYSTEM: (
            PermissionDeniedError,
            "the operating system (e.g. a cgroup device rule) blocked the request",
        ),
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
            FailedPreconditionError,
            "libnvidia-ml and the kernel driver differ in version (reload the driver or reboot)",
        ),
        pynvml.NVML_ERROR_IN_USE: (UnavailableError, "the GPU is in use by another client"),
        pynvml.NVML_ERROR_MEMORY: (UnavailableError, "the driver is out of memory"),
        pynvml.NVML_ERROR_NO_DATA: (UnavailableError, "no data yet"),
        pynvml.NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: (UnsupportedError, "not available while ECC is enabled"),
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES: (UnavailableError, "the driver ran out of resources"),
        pynvml.NVML_ERROR_FREQ_NOT_SUPPORTED: (InvalidArgumentError, "the frequency is not supported"),
        pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH: (
            UnsupportedError,
            "the driver does not know this structure version (driver too old)",
        ),
        pynvml.NVML_ERROR_DEPRECATED: (UnsupportedError, "the driver no longer offers this function"),
        pynvml.NVML_ERROR_NOT_READY: (UnavailableError, "the system is not ready for the request"),
        pynvml.NVML_ERROR_GPU_NOT_FOUND: (NotFoundError, "no GPU found"),
        pynvml.NVML_ERROR_INVALID_STATE: (FailedPreconditionError, "the GPU is not in a state to do this"),
        pynvml.NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: (UnsupportedError, "this reset type is not supported"),
        pynvml.NVML_ERROR_UNKNOWN: (UnavailableError, "unknown NVML error"),
    }
)
_UNLISTED_CODE: tuple[type[DynamoError], str] = (UnavailableError, "NVML return code unknown to the agent")

_CODE_NAMES: Mapping[int, str] = MappingProxyType(
    {getattr(pynvml, name): name for name in dir(pynvml) if name.startswith("NVML_ERROR_")}
)


@dataclass(frozen=True, slots=True)
class NvmlArgument:
    """The caller's input behind an NVML setter, named for an InvalidArgumentError if NVML rejects it."""

    field: str
    value: object
    allowed: str


def nvml_error(code: int, function: str, gpu_index: int | None, argument: NvmlArgument | None) -> DynamoError:
    """Map one NVML return code to our error, through `NVML_ERROR_TABLE`."""
    error_type, meaning = NVML_ERROR_TABLE.get(code, _UNLISTED_CODE)
    where = function if gpu_index is None else f"{function} on GPU {gpu_index}"
    what = f"{where}: {_CODE_NAMES.get(code, 'NVML return code')} ({code}): {meaning}"
    if error_type is InvalidArgumentError:
        if argument is None:
            return InternalError(what)
        return InvalidArgumentError(argument.field, argument.value, f"{argument.allowed} ({what})")
    return error_type(what)


def _nvml_call(
    function: str, call: Callable[[], _T], gpu_index: int | None = None, argument: NvmlArgument | None = None
) -> _T:
    try:
        return call()
    except pynvml.NVMLError as exc:
        raise nvml_error(int(exc.value), function, gpu_index, argument) from exc


def _text(value: object) -> str:
    """NVML strings: pynvml returns str or, for struct fields with some versions, bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """`GpuBackend` over the node's NVIDIA driver. Index = NVML index (the order nvidia-smi lists)."""

    def __init__(self) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            cause = nvml_error(int(exc.value), "nvmlInit", None, None)
            raise UnavailableError(f"NVML is not usable on this node: {cause}") from exc
        try:
            count = int(_nvml_call("nvmlDeviceGetCount", pynvml.nvmlDeviceGetCount))
            self._handles: tuple[object, ...] = tuple(self._open_handle(i) for i in range(count))
        except DynamoError:
            pynvml.nvmlShutdown()
            raise
        self._infos: dict[int, GpuInfo] = {}
        self._closed = False

    @staticmethod
    def _open_handle(index: int) -> object:
        return _nvml_call(
            "nvmlDeviceGetHandleByIndex", lambda: pynvml.nvmlDeviceGetHandleByIndex(index), index
        )

    @property
    def kind(self) -> str:
        return "nvml"

    def device_count(self) -> int:
        return len(self._handles)

    def _handle(self, index: int) -> object:
        if not 0 <= index < len(self._handles):
            allowed = f"0..{len(self._handles) - 1}" if self._handles else "none (no GPU on this node)"
            raise InvalidArgumentError("gpu_index", index, allowed)
        return self._handles[index]

    def info(self, index: int) -> GpuInfo:
        """Static facts of GPU `index`, read from NVML on first use and kept."""
        known = self._infos.get(index)
        if known is not None:
            return known
        handle = self._handle(index)
        min_mw, max_mw = _nvml_call(
            "nvmlDeviceGetPowerManagementLimitConstraints",
            lambda: pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle),
            index,
        )
        default_mw = _nvml_call(
            "nvmlDeviceGetPowerManagementDefaultLimit",
            lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle),
            index,
        )
        memory = _nvml_call("nvmlDeviceGetMemoryInfo", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle), index)
        info = GpuInfo(
            index=index,
            uuid=_text(_nvml_call("nvmlDeviceGetUUID", lambda: pynvml.nvmlDeviceGetUUID(handle), index)),
            name=_text(_nvml_call("nvmlDeviceGetName", lambda: pynvml.nvmlDeviceGetName(handle), index)),
            supported_sm_clocks_mhz=self._supported_sm_clocks_mhz(index, handle),
            min_power_limit_w=int(min_mw) / _MILLI,
            max_power_limit_w=int(max_mw) / _MILLI,
            default_power_limit_w=int(default_mw) / _MILLI,
            mem_total_bytes=int(memory.total),
            pci_bus_id=_text(
                _nvml_call("nvmlDeviceGetPciInfo", lambda: pynvml.nvmlDeviceGetPciInfo(handle), index).busId
            ),
        )
        self._infos[index] = info
        return info

    @staticmethod
    def _supported_sm_clocks_mhz(index: int, handle: object) -> tuple[int, ...]:
        """SM clocks offered at the highest memory clock, ascending; () where the GPU cannot lock clocks."""
        try:
            mem_clocks_mhz = _nvml_call(
                "nvmlDeviceGetSupportedMemoryClocks",
                lambda: pynvml.nvmlDeviceGetSupportedMemoryClocks(handle),
                index,
            )
        except UnsupportedError:
            return ()
        if not mem_clocks_mhz:
            return ()
        top_mem_mhz = max(int(c) for c in mem_clocks_mhz)
        sm_clocks_mhz = _nvml_call(
            "nvmlDeviceGetSupportedGraphicsClocks",
            lambda: pynvml.nvmlDeviceGetSupportedGraphicsClocks(handle, top_mem_mhz),
            index,
        )
        return tuple(sorted({int(c) for c in sm_clocks_mhz}))

    def read(self, index: int) -> GpuReading:
        handle = self._handle(index)
        power_mw = _nvml_call(
            "nvmlDeviceGetPowerUsage", lambda: pynvml.nvmlDeviceGetPowerUsage(handle), index
        )
        energy_mj = _nvml_call(
            "nvmlDeviceGetTotalEnergyConsumption",
            lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
            index,
        )
        sm_mhz = _nvml_call(
            "nvmlDeviceGetClockInfo",
            lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            index,
        )
        mem_mhz = _nvml_call(
            "nvmlDeviceGetClockInfo",
            lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            index,
        )
        util = _nvml_call(
            "nvmlDeviceGetUtilizationRates", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle), index
        )
        memory = _nvml_call("nvmlDeviceGetMemoryInfo", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle), index)
        temperature_c = _nvml_call(
            "nvmlDeviceGetTemperature",
            lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            index,
        )
        enforced_mw = _nvml_call(
            "nvmlDeviceGetEnforcedPowerLimit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle), index
        )
        reasons = _nvml_call(
            "nvmlDeviceGetCurrentClocksEventReasons",
            lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
            index,
        )
        return GpuReading(
            power_w=int(power_mw) / _MILLI,
            energy_j=int(energy_mj) / _MILLI,
            sm_clock_mhz=int(sm_mhz),
            mem_clock_mhz=int(mem_mhz),
            util_gpu_ratio=int(util.gpu) / _PERCENT,
            util_mem_ratio=int(util.memory) / _PERCENT,
            mem_used_bytes=int(memory.used),
            temperature_c=float(temperature_c),
            enforced_power_limit_w=int(enforced_mw) / _MILLI,
            clock_event_reasons_mask=int(reasons),
        )

    def power_limit_w(self, index: int) -> float:
        handle = self._handle(index)
        limit_mw = _nvml_call(
            "nvmlDeviceGetPowerManagementLimit",
            lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle),
            index,
        )
        return int(limit_mw) / _MILLI

    def set_locked_clocks(self, index: int, min_clock_mhz: int, max_clock_mhz: int) -> None:
        handle = self._handle(index)
        # NVML takes unsigned ints and reads values near 2**32 as special limit ids: a negative number
        # must never reach it.
        if not 0 < min_clock_mhz <= max_clock_mhz:
            raise InvalidArgumentError(
                "locked_clocks_mhz", (min_clock_mhz, max_clock_mhz), "positive MHz with min <= max"
            )
        supported = self.info(index).supported_sm_clocks_mhz
        allowed = f"{supported[0]}..{supported[-1]} MHz with min <= max" if supported else "none on this GPU"
        _nvml_call(
            "nvmlDeviceSetGpuLockedClocks",
            lambda: pynvml.nvmlDeviceSetGpuLockedClocks(handle, min_clock_mhz, max_clock_mhz),
            index,
            NvmlArgument("locked_clocks_mhz", (min_clock_mhz, max_clock_mhz), allowed),
        )

    def reset_locked_clocks(self, index: int) -> None:
        handle = self._handle(index)
        _nvml_call(
            "nvmlDeviceResetGpuLockedClocks", lambda: pynvml.nvmlDeviceResetGpuLockedClocks(handle), index
        )

    def set_power_limit(self, index: int, power_limit_w: float) -> None:
        handle = self._handle(index)
        info = self.info(index)
        allowed = f"{info.min_power_limit_w:g}..{info.max_power_limit_w:g} W"
        if not (math.isfinite(power_limit_w) and power_limit_w > 0):
            raise InvalidArgumentError("power_limit_w", power_limit_w, allowed)
        limit_mw = round(power_limit_w * _MILLI)
        _nvml_call(
            "nvmlDeviceSetPowerManagementLimit",
            lambda: pynvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw),
            index,
            NvmlArgument("power_limit_w", power_limit_w, allowed),
        )

    def compute_processes(self, index: int) -> tuple[GpuProcess, ...]:
        """nvmlDeviceGetComputeRunningProcesses (v3): pids in the host's PID namespace, ascending."""
        handle = self._handle(index)
        found = _nvml_call(
            "nvmlDeviceGetComputeRunningProcesses",
            lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle),
            index,
        )
        by_pid: dict[int, GpuProcess] = {}
        for proc in found:
            used = getattr(proc, "usedGpuMemory", None)  # None: the driver does not say (e.g. WDDM)
            pid = int(proc.pid)
            earlier = by_pid.get(pid)  # MIG: one entry per compute instance; their memory adds up
            before = earlier.used_memory_bytes if earlier is not None else 0
            total = None if used is None or before is None else int(used) + before
            by_pid[pid] = GpuProcess(pid=pid, used_memory_bytes=total)
        return tuple(by_pid[pid] for pid in sorted(by_pid))

    def close(self) -> None:
        """nvmlShutdown once; a second close is a no-op."""
        if self._closed:
            return
        self._closed = True
        _nvml_call("nvmlShutdown", pynvml.nvmlShutdown)
