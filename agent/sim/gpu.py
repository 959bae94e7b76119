"""The simulated GPU backend: `GpuBackend` over a simulated node directory (`agent.sim.node`).

Where it sits: the agent uses it instead of `agent.gpu.nvml.NvmlBackend` when configured with
`gpu.backend = "simulated"`; only the composition root (`agent.app.make_backend`) constructs it, so the
agent's production modules never import `agent.sim`. Settings (locked clocks, power limit) are written to
the node directory, where the simulated engines (`python -m agent.sim.engine`) pick them up within an
iteration, so a clock lock changes their speed and power. Readings combine the GPU's idle power (from the
fitted physics parameters) with what the engine on the GPU reports:

    power_w  = idle_w + the engine's power above idle averaged over the last second (0 without a live
               engine), as NVML reports power on Ampere and newer GPUs
    energy_j = idle_w x time since this backend started + the engine's cumulative energy above idle

The energy counter is exact rather than sampled: the engine adds each iteration's energy above idle.
Because power is the one-second average of that same energy, the agent's cross-check of the counter
against integrated power (agent.telemetry) agrees on a simulated node, up to the edges of its window.
Time comes from an injected `agent.api.clock.Clock`, so unit tests are deterministic.

Time compression (`time_scale` X, the agent's `simulated.time_scale`; the engines get the same X as
`--time-scale`): a simulated node runs X simulated seconds per wall second. The energy counter is in
simulated joules: idle energy accrues idle_w x X per wall second, and the engines write the energy over
simulated time, so the counter advances X times faster per wall second than at X = 1 for the same load.
Power stays physical (energy per simulated second), averaged by the engines over the last wall second
(X simulated seconds; `GpuInfo.power_average_s` stays 1 wall second); utilisation is simulated busy time
over simulated time. The backend declares X (`time_scale`), and the agent's cross-check multiplies the
integral of power over wall time by it (agent.telemetry). Leases and the agent's timers are wall time.

Unlike NVML, a simulated GPU's lock can be read back: every reading carries the range in the GPU's
control file (`GpuReading.sm_clock_lock_mhz`), beside the clock the engine actually runs at (below the
lock when the power limit caps it). `compute_processes` lists the engine process registered in the GPU's
activity file while it lives (the simulated engine registers once its model is "loaded", as a CUDA
context appears once a real engine initialises); a test can register any other live process there to
stand for a process the agent does not know.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

from agent.api.clock import Clock, SystemClock
from agent.api.errors import FailedPreconditionError, InvalidArgumentError
from agent.gpu.base import GpuInfo, GpuProcess, GpuReading
from agent.sim.node import GpuActivity, GpuControl, NodeDir, NodeSpec, process_alive
from agent.sim.physics.params import load_params_file, params_path
from agent.sim.physics.specs import GpuSpec, arch_for, gpu_for

# Supported SM clocks are NVIDIA's 15 MHz grid (H100 SXM: ..., 1950, 1965, 1980), from the lowest clock the
# physics model is stated for, plus the profile clocks: every clock the agent accepts can be priced.
CLOCK_STEP_MHZ = 15

# Data-sheet power-limit floors (nvidia-smi -q "Min Power Limit"); the ceiling and default are the TDP.
_MIN_POWER_LIMIT_W = {"h100-sxm": 200.0}
_MEM_CLOCK_MHZ = {"h100-sxm": 2619}  # HBM3 clock nvidia-smi reports on H100 SXM
_GPU_NAME = {"h100-sxm": "NVIDIA H100 80GB HBM3"}

# Steady-state temperature: ambient plus a thermal resistance, so 700 W reads about 72 C and idle ~35 C,
# the range an air-cooled H100 SXM shows. Nothing depends on it beyond being plausible telemetry.
_AMBIENT_C = 30.0
_THERMAL_RESISTANCE_C_PER_W = 0.06

# Power readings are averages over this long before the read, like NVML's on Ampere and newer GPUs; the
# engine computes the average (agent.sim.realtime), the backend declares it (GpuInfo.power_average_s).
POWER_AVERAGE_S = 1.0

# NVML clock event reason bits (nvmlClocksEventReason*).
REASON_GPU_IDLE = 0x1
REASON_CLOCKS_SETTING = 0x2  # locked clocks / application clocks hold the clock down
REASON_SW_POWER_CAP = 0x4


def supported_clocks_mhz(spec: GpuSpec) -> tuple[int, ...]:
    """Ascending SM clocks a lock may use on a simulated GPU of this type."""
    grid = range(spec.max_clock_mhz, spec.min_clock_mhz - 1, -CLOCK_STEP_MHZ)
    return tuple(sorted(set(grid) | set(spec.profile_clocks_mhz)))


def idle_power_w(model: str, gpu: str) -> float:
    """Per-GPU idle power of the fitted parameters of (model, gpu): the floor of every reading."""
    arch_for(model)  # InvalidArgumentError naming "model" before any file is read
    gpu_for(gpu)
    return load_params_file(params_path(model, gpu)).power.idle_w


class SimulatedGpuBackend:
    """`GpuBackend` of a simulated node kept in `node_dir` (created if absent)."""

    def __init__(
        self,
        node_dir: Path | str,
        gpus: int = 1,
        gpu: str = "h100-sxm",
        model: str = "llama2-70b",
        clock: Clock | None = None,
        time_scale: float = 1.0,
    ) -> None:
        if (
            isinstance(time_scale, bool)
            or not isinstance(time_scale, int | float)
            or not math.isfinite(time_scale)
            or time_scale <= 0.0
        ):
            raise InvalidArgumentError("time_scale", time_scale, "a finite number > 0")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= 64:
            raise InvalidArgumentError("gpus", gpus, "1..64")
        self._spec = gpu_for(gpu)
        if gpu not in _MIN_POWER_LIMIT_W:
            raise InvalidArgumentError("gpu", gpu, sorted(_MIN_POWER_LIMIT_W))
        self._idle_w = idle_power_w(model, gpu)
        self._node = NodeDir(node_dir)
        wanted = NodeSpec(gpu=gpu, model=model, gpus=gpus)
        found = self._node.read_spec()
        if found is None:
            self._node.write_spec(wanted)
        elif found != wanted:
            raise FailedPreconditionError(
                f"simulated node {self._node.path} was created as {found}; asked for {wanted}: "
                "use another node_dir or the same settings"
            )
        self._clock = clock if clock is not None else SystemClock()
        self._time_scale = float(time_scale)
        self._count = gpus
        self._supported = supported_clocks_mhz(self._spec)
        self._min_limit_w = _MIN_POWER_LIMIT_W[gpu]
        self._max_limit_w = self._spec.tdp_w
        self._default_control = GpuControl(None, None, self._spec.tdp_w)
        # The backend is the only writer of the control files: read them once (settings left by a
        # previous agent survive, as on a real GPU) and keep them in memory.
        self._controls = [self._node.read_control(i) or self._default_control for i in range(gpus)]
        node_id = uuid.uuid5(uuid.NAMESPACE_URL, f"dynamollm-sim:{self._node.path.resolve()}")
        self._uuids = [f"GPU-{uuid.uuid5(node_id, str(i))}" for i in range(gpus)]
        self._start_s = self._clock.monotonic_s()
        # per GPU: (time, busy_s) of the previous read, for utilisation over the interval between reads
        self._last_busy: list[tuple[float, float] | None] = [None] * gpus
        self._closed = False

    @property
    def kind(self) -> str:
        return "simulated"

    @property
    def time_scale(self) -> float:
        """Simulated seconds per wall second: the energy counter is in simulated joules, power in watts
        (joules per simulated second), so power integrated over wall time must be multiplied by this to
        match the counter (agent.telemetry's cross-check reads it)."""
        return self._time_scale

    @property
    def node_dir(self) -> Path:
        return self._node.path

    def device_count(self) -> int:
        return self._count

    def _check(self, index: int) -> None:
        if self._closed:
            raise FailedPreconditionError("the simulated GPU backend is closed")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self._count:
            raise InvalidArgumentError("index", index, f"0..{self._count - 1}")

    def info(self, index: int) -> GpuInfo:
        self._check(index)
        return GpuInfo(
            index=index,
            uuid=self._uuids[index],
            name=_GPU_NAME[self._spec.name],
            supported_sm_clocks_mhz=self._supported,
            min_power_limit_w=self._min_limit_w,
            max_power_limit_w=self._max_limit_w,
            default_power_limit_w=self._spec.tdp_w,
            mem_total_bytes=self._spec.memory_bytes,
            pci_bus_id=f"00000000:{0x18 + index:02X}:00.0",
            power_average_s=POWER_AVERAGE_S,
            sm_clock_lock_readable=True,
        )

    def control(self, index: int) -> GpuControl:
        """The settings in force on GPU `index` (simulation-only; NVML reads them through `read`)."""
        self._check(index)
        return self._controls[index]

    def read(self, index: int) -> GpuReading:
        self._check(index)
        control = self._controls[index]
        found = self._node.read_activity(index)
        live = process_alive(found.pid)
        now_s = self._clock.monotonic_s()
        extra_power_w = found.extra_power_w if live else 0.0
        power_w = self._idle_w + extra_power_w
        locked_max = control.locked_max_clock_mhz
        sm_clock_mhz = locked_max if locked_max is not None else self._spec.max_clock_mhz
        if live and extra_power_w > 0.0 and found.clock_mhz > 0:
            # a running engine may sit below the lock (power cap); an idle one's record is stale
            sm_clock_mhz = min(sm_clock_mhz, found.clock_mhz)
        mask = 0
        if extra_power_w <= 0.0:
            mask |= REASON_GPU_IDLE
        if locked_max is not None and locked_max < self._spec.max_clock_mhz:
            mask |= REASON_CLOCKS_SETTING
        if live and found.power_capped:
            mask |= REASON_SW_POWER_CAP
        util = self._utilisation(index, now_s, found)
        # Read back from the GPU's control file (the simulated hardware), not from the backend's memory.
        applied = self._node.read_control(index) or self._default_control
        lock_mhz = (
            (applied.locked_min_clock_mhz, applied.locked_max_clock_mhz)
            if applied.locked_min_clock_mhz is not None and applied.locked_max_clock_mhz is not None
            else None
        )
        return GpuReading(
            power_w=power_w,
            energy_j=self._idle_w * self._time_scale * (now_s - self._start_s) + found.extra_energy_j,
            sm_clock_mhz=sm_clock_mhz,
            mem_clock_mhz=_MEM_CLOCK_MHZ[self._spec.name],
            # decode, the bulk of inference, is memory-bound: HBM is busy whenever kernels run
            util_gpu_ratio=util,
            util_mem_ratio=util,
            mem_used_bytes=found.mem_used_bytes if live else 0,
            temperature_c=_AMBIENT_C + _THERMAL_RESISTANCE_C_PER_W * power_w,
            enforced_power_limit_w=control.power_limit_w,
            clock_event_reasons_mask=mask,
            sm_clock_lock_mhz=lock_mhz,
        )

    def _utilisation(self, index: int, now_s: float, found: GpuActivity) -> float:
        """Share of the time since the previous read that the engine spent in iterations (NVML's
        'percent of time a kernel was executing' over the sample period)."""
        previous = self._last_busy[index]
        self._last_busy[index] = (now_s, found.busy_s)
        if previous is None or now_s <= previous[0]:
            return 0.0
        # busy_s is simulated time: the interval in simulated seconds is X times the wall interval
        ratio = (found.busy_s - previous[1]) / (self._time_scale * (now_s - previous[0]))
        return min(1.0, max(0.0, ratio))

    def power_limit_w(self, index: int) -> float:
        self._check(index)
        return self._controls[index].power_limit_w

    def _write(self, index: int, control: GpuControl) -> None:
        self._node.write_control(index, control)
        self._controls[index] = control

    def set_locked_clocks(self, index: int, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self._check(index)
        allowed = f"{self._supported[0]}..{self._supported[-1]} MHz in the GPU's supported clocks"
        for name, value in (("min_clock_mhz", min_clock_mhz), ("max_clock_mhz", max_clock_mhz)):
            if isinstance(value, bool) or not isinstance(value, int) or value not in self._supported:
                raise InvalidArgumentError(name, value, allowed)
        if min_clock_mhz > max_clock_mhz:
            raise InvalidArgumentError("min_clock_mhz", min_clock_mhz, f"<= max_clock_mhz ({max_clock_mhz})")
        current = self._controls[index]
        self._write(index, GpuControl(min_clock_mhz, max_clock_mhz, current.power_limit_w))

    def reset_locked_clocks(self, index: int) -> None:
        self._check(index)
        self._write(index, GpuControl(None, None, self._controls[index].power_limit_w))

    def set_power_limit(self, index: int, power_limit_w: float) -> None:
        self._check(index)
        lo, hi = self._min_limit_w, self._max_limit_w
        if (
            isinstance(power_limit_w, bool)
            or not isinstance(power_limit_w, int | float)
            or not math.isfinite(power_limit_w)
            or not lo <= power_limit_w <= hi
        ):
            raise InvalidArgumentError("power_limit_w", power_limit_w, f"{lo:g}..{hi:g} W")
        current = self._controls[index]
        self._write(
            index,
            GpuControl(current.locked_min_clock_mhz, current.locked_max_clock_mhz, float(power_limit_w)),
        )

    def compute_processes(self, index: int) -> tuple[GpuProcess, ...]:
        """The live process registered in the GPU's activity file (the simulated engine), if any."""
        self._check(index)
        found = self._node.read_activity(index)
        if not process_alive(found.pid):
            return ()
        return (GpuProcess(pid=found.pid, used_memory_bytes=found.mem_used_bytes),)

    def close(self) -> None:
        self._closed = True
