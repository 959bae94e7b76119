"""Mapping from the agent's domain objects to the wire's protobuf messages (`agent.api.v1`).

Where it sits: `agent.node.NodeAgent` builds its replies (GetInventory, the NodeControl responses) and
`agent.telemetry` its TelemetrySample messages with these functions, so the rest of the agent works with
its own types (GpuInfo, GpuReading, GpuApplied, GpuProcess, EngineStatus, EngineMetrics, LeaseView) and
one module knows the wire's enums and field names. Target and effective clocks travel side by side: the
lock the agent applied (GpuInfo.sm_clock_lock, GpuSample.target_sm_clock_lock), the lock read back where
the backend can (effective_sm_clock_lock) and the measured SM clock with its event reasons, from which
`sm_clock_below_target` says whether a busy GPU holds its lock. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.api.v1 import common_pb2, control_pb2
from agent.engine.driver import EngineState, EngineStatus
from agent.engine.metrics import EngineMetrics
from agent.gpu.base import GpuInfo, GpuProcess, GpuReading
from agent.lease import LeaseView
from agent.safety import GpuApplied

_GPU_BACKEND_PB = {
    "nvml": common_pb2.GPU_BACKEND_KIND_NVML,
    "simulated": common_pb2.GPU_BACKEND_KIND_SIMULATED,
}
_ENGINE_KIND_PB = {"vllm": common_pb2.ENGINE_KIND_VLLM, "simulated": common_pb2.ENGINE_KIND_SIMULATED}
# nvmlClocksEventReasonGpuIdle: the GPU has nothing to run, so a clock below the lock says nothing.
CLOCK_EVENT_REASON_GPU_IDLE = 0x1
_ENGINE_STATE_PB = {
    EngineState.STARTING: common_pb2.ENGINE_STATE_STARTING,
    EngineState.READY: common_pb2.ENGINE_STATE_READY,
    EngineState.DRAINING: common_pb2.ENGINE_STATE_DRAINING,
    EngineState.STOPPED: common_pb2.ENGINE_STATE_STOPPED,
    EngineState.FAILED: common_pb2.ENGINE_STATE_FAILED,
}


def gpu_backend_pb(kind: str) -> common_pb2.GpuBackendKind.ValueType:
    """The wire's backend kind of `GpuBackend.kind` ("nvml", "simulated"); UNSPECIFIED for others."""
    return _GPU_BACKEND_PB.get(kind, common_pb2.GPU_BACKEND_KIND_UNSPECIFIED)


def clock_range_pb(lock: tuple[int, int]) -> common_pb2.SmClockRange:
    return common_pb2.SmClockRange(min_clock_mhz=lock[0], max_clock_mhz=lock[1])


def lease_pb(view: LeaseView) -> common_pb2.LeaseState:
    return common_pb2.LeaseState(
        active=view.active,
        holder=view.holder,
        expires_unix_ns=view.expires_unix_ns,
        remaining_s=view.remaining_s,
        generation=view.generation,
    )


def sm_clock_below_target(reading: GpuReading, target: tuple[int, int] | None) -> bool:
    """Whether a busy GPU runs below the minimum of the lock it was given (power cap, thermal slowdown)."""
    if target is None or reading.clock_event_reasons_mask & CLOCK_EVENT_REASON_GPU_IDLE:
        return False
    return reading.sm_clock_mhz < target[0]


def gpu_info_pb(
    info: GpuInfo,
    applied: GpuApplied,
    power_limit_w: float,
    *,
    reading: GpuReading | None = None,
    foreign: Sequence[GpuProcess] = (),
) -> common_pb2.GpuInfo:
    """A GPU's static facts, what the agent set on it and the power limit in force; with `reading` the
    measured SM clock and the lock read back beside it, with `foreign` the processes holding the GPU that
    are not the agent's engines."""
    msg = common_pb2.GpuInfo(
        gpu_index=info.index,
        uuid=info.uuid,
        name=info.name,
        pci_bus_id=info.pci_bus_id,
        supported_sm_clocks_mhz=list(info.supported_sm_clocks_mhz),
        min_power_limit_w=info.min_power_limit_w,
        max_power_limit_w=info.max_power_limit_w,
        default_power_limit_w=info.default_power_limit_w,
        power_limit_w=power_limit_w,
        mem_total_bytes=info.mem_total_bytes,
        modified=applied.modified,
        sm_clock_lock_readable=info.sm_clock_lock_readable,
    )
    if applied.sm_clock_lock is not None:
        msg.sm_clock_lock.CopyFrom(clock_range_pb(applied.sm_clock_lock))
    if reading is not None:
        msg.sm_clock_mhz = reading.sm_clock_mhz
        msg.clock_event_reasons_mask = reading.clock_event_reasons_mask
        if reading.sm_clock_lock_mhz is not None:
            msg.effective_sm_clock_lock.CopyFrom(clock_range_pb(reading.sm_clock_lock_mhz))
    for proc in foreign:
        msg.foreign_process_mem_used_bytes[proc.pid] = proc.used_memory_bytes or 0
    return msg


def applied_gpu_config_pb(
    index: int, power_limit_w: float, sm_clock_lock: tuple[int, int] | None
) -> control_pb2.AppliedGpuConfig:
    msg = control_pb2.AppliedGpuConfig(gpu_index=index, power_limit_w=power_limit_w)
    if sm_clock_lock is not None:
        msg.sm_clock_lock.CopyFrom(clock_range_pb(sm_clock_lock))
    return msg


def gpu_sample_pb(index: int, r: GpuReading, target: tuple[int, int] | None = None) -> common_pb2.GpuSample:
    """One GPU's reading; `target` is the lock the agent applied (None: default clocks)."""
    msg = common_pb2.GpuSample(
        gpu_index=index,
        power_w=r.power_w,
        energy_j=r.energy_j,
        sm_clock_mhz=r.sm_clock_mhz,
        mem_clock_mhz=r.mem_clock_mhz,
        util_gpu_ratio=r.util_gpu_ratio,
        util_mem_ratio=r.util_mem_ratio,
        mem_used_bytes=r.mem_used_bytes,
        temperature_c=r.temperature_c,
        enforced_power_limit_w=r.enforced_power_limit_w,
        clock_event_reasons_mask=r.clock_event_reasons_mask,
        sm_clock_below_target=sm_clock_below_target(r, target),
    )
    if target is not None:
        msg.target_sm_clock_lock.CopyFrom(clock_range_pb(target))
    if r.sm_clock_lock_mhz is not None:
        msg.effective_sm_clock_lock.CopyFrom(clock_range_pb(r.sm_clock_lock_mhz))
    return msg


def engine_info_pb(status: EngineStatus, *, kind: str, generation: int) -> common_pb2.EngineInfo:
    """An engine as GetInventory and the engine replies show it; `kind` is the agent's engine.kind and
    `generation` the last generation that (re)started or stopped it (0: none)."""
    spec = status.spec
    return common_pb2.EngineInfo(
        engine_id=spec.engine_id,
        model=spec.model,
        kind=_ENGINE_KIND_PB[kind],
        gpu_indices=list(spec.gpu_indices),
        tp_degree=spec.tp_degree,
        state=_ENGINE_STATE_PB[status.state],
        state_since_unix_ns=status.state_since_unix_ns,
        http_port=spec.http_port,
        generation=generation,
        engine_options=dict(spec.options),
        failure_reason=status.failure_reason,
    )


def engine_metrics_pb(status: EngineStatus, m: EngineMetrics) -> common_pb2.EngineMetrics:
    return common_pb2.EngineMetrics(
        engine_id=status.spec.engine_id,
        state=_ENGINE_STATE_PB[status.state],
        running_requests_count=m.running_requests_count,
        waiting_requests_count=m.waiting_requests_count,
        kv_cache_usage_ratio=m.kv_cache_usage_ratio,
        prompt_tokens=m.prompt_tokens,
        generation_tokens=m.generation_tokens,
        finished_requests_count=m.finished_requests_count,
        preemptions_count=m.preemptions_count,
        prompt_tokens_per_s=m.prompt_tokens_per_s,
        generation_tokens_per_s=m.generation_tokens_per_s,
    )
