"""Pure core of the agent's services: request validation into plans.

Where it sits: `agent.node.NodeAgent` checks a control request's generation (`agent.api.generations`),
then calls a `validate_*` function here before it touches anything, and acts on the returned plan.
Everything here is a function of the request and a snapshot of the node (GPU facts, engines, settings):
no I/O, no clock, no asyncio.
Validation errors are `InvalidArgumentError(field, value, allowed)` with the wire's field path
(`gpus[1].max_clock_mhz`), so the caller can fix the input; nothing has changed when they are raised.

Every field a caller controls is bounded, and the bound is stated in the message: strings (engine ids,
model names; engine option keys by the allow-list, their values by `agent.engine.options`), repeated
fields (at most one entry per GPU, one per allowed option), timeouts (at most `MAX_TIMEOUT_S`);
generations by `agent.api.generations` (1..2^63-1 and a bounded step). The received value is echoed cut
to 200 characters (`agent.api.errors.echo`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.api.errors import FailedPreconditionError, InvalidArgumentError
from agent.api.v1 import control_pb2, telemetry_pb2
from agent.engine.options import validate_engine_options
from agent.gpu.base import GpuInfo

ENGINE_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
ENGINE_ID_ALLOWED = "1-63 characters of [a-z0-9-], starting with a letter"
MAX_MODEL_CHARS = 256
# Drain and ready timeouts: a day is beyond any real drain or model load, and keeps every deadline the
# agent computes from them finite and representable.
MAX_TIMEOUT_S = 86400.0


# ---------------------------------------------------------------------------------- field checks


def _abbrev(values: Sequence[int]) -> str:
    if len(values) <= 6:
        return ", ".join(str(v) for v in values)
    return f"{values[0]}, {values[1]}, ..., {values[-1]}"


def _finite(field: str, value: float, allowed: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgumentError(field, value, allowed)


def _gpu_indices(field: str, indices: Sequence[int], gpu_count: int, *, allow_empty: bool) -> tuple[int, ...]:
    if not indices and not allow_empty:
        raise InvalidArgumentError(field, [], f"at least one GPU of 0..{gpu_count - 1}")
    if len(indices) > gpu_count:
        raise InvalidArgumentError(
            field,
            f"{len(indices)} entries",
            f"at most {gpu_count} entries, each GPU of 0..{gpu_count - 1} once",
        )
    seen: set[int] = set()
    for i, index in enumerate(indices):
        if not 0 <= index < gpu_count:
            raise InvalidArgumentError(f"{field}[{i}]", index, f"0..{gpu_count - 1}")
        if index in seen:
            raise InvalidArgumentError(f"{field}[{i}]", index, "each GPU once")
        seen.add(index)
    return tuple(indices)


def _lease_s(field: str, lease_s: float, max_lease_s: float) -> float:
    allowed = f"0 < lease_s <= {max_lease_s:g}"
    _finite(field, lease_s, allowed)
    if not 0 < lease_s <= max_lease_s:
        raise InvalidArgumentError(field, lease_s, allowed)
    return lease_s


# ------------------------------------------------------------------------------------------- GPU


@dataclass(frozen=True, slots=True)
class GpuPlan:
    """One GPU's wanted settings; power_limit_w None means its default (snapshot) limit."""

    index: int
    min_clock_mhz: int
    max_clock_mhz: int
    power_limit_w: float | None


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    generation: int
    lease_s: float
    gpus: tuple[GpuPlan, ...]  # ascending index


def validate_apply(
    request: control_pb2.ApplyGpuConfigRequest, infos: Sequence[GpuInfo], *, max_lease_s: float
) -> ApplyPlan:
    lease_s = _lease_s("lease_s", request.lease_s, max_lease_s)
    if not request.gpus:
        raise InvalidArgumentError("gpus", [], f"at least one GpuSetting for GPUs 0..{len(infos) - 1}")
    if len(request.gpus) > len(infos):
        raise InvalidArgumentError(
            "gpus", f"{len(request.gpus)} entries", f"at most {len(infos)} entries, one per GPU"
        )
    seen: set[int] = set()
    for i, setting in enumerate(request.gpus):
        if not 0 <= setting.gpu_index < len(infos):
            raise InvalidArgumentError(f"gpus[{i}].gpu_index", setting.gpu_index, f"0..{len(infos) - 1}")
        if setting.gpu_index in seen:
            raise InvalidArgumentError(f"gpus[{i}].gpu_index", setting.gpu_index, "each GPU once per request")
        seen.add(setting.gpu_index)
    plans: list[GpuPlan] = []
    for i, setting in enumerate(request.gpus):
        info = infos[setting.gpu_index]
        clocks = info.supported_sm_clocks_mhz
        for name in ("min_clock_mhz", "max_clock_mhz"):
            value = getattr(setting, name)
            if value not in clocks:
                raise InvalidArgumentError(f"gpus[{i}].{name}", value, _abbrev(clocks))
        if setting.min_clock_mhz > setting.max_clock_mhz:
            raise InvalidArgumentError(
                f"gpus[{i}].min_clock_mhz",
                setting.min_clock_mhz,
                f"<= max_clock_mhz ({setting.max_clock_mhz})",
            )
        power_limit_w: float | None = None
        if setting.HasField("power_limit_w"):
            allowed = f"{info.min_power_limit_w:g}..{info.max_power_limit_w:g} W"
            power_limit_w = setting.power_limit_w
            _finite(f"gpus[{i}].power_limit_w", power_limit_w, allowed)
            if not info.min_power_limit_w <= power_limit_w <= info.max_power_limit_w:
                raise InvalidArgumentError(f"gpus[{i}].power_limit_w", power_limit_w, allowed)
        plans.append(GpuPlan(setting.gpu_index, setting.min_clock_mhz, setting.max_clock_mhz, power_limit_w))
    return ApplyPlan(request.generation, lease_s, tuple(sorted(plans, key=lambda p: p.index)))


def validate_renew(request: control_pb2.RenewLeaseRequest, *, max_lease_s: float) -> float:
    if request.generation < 1:
        raise InvalidArgumentError("generation", request.generation, ">= 1")
    return _lease_s("lease_s", request.lease_s, max_lease_s)


def validate_restore(request: control_pb2.RestoreDefaultsRequest, gpu_count: int) -> tuple[int, ...]:
    """The GPUs to restore, ascending; all when none are listed."""
    indices = _gpu_indices("gpu_indices", list(request.gpu_indices), gpu_count, allow_empty=True)
    return tuple(sorted(indices)) if indices else tuple(range(gpu_count))


# --------------------------------------------------------------------------------------- engines


@dataclass(frozen=True, slots=True)
class EngineRequirements:
    """What the agent's configuration allows for engines."""

    models: tuple[str, ...]
    options_allowed: tuple[str, ...]
    pipeline_parallel: bool  # False: tp_degree must equal the number of GPUs (the simulated engine)
    tp_degrees: tuple[int, ...] | None  # the TP degrees the engine supports; None: any
    default_ready_timeout_s: float


@dataclass(frozen=True, slots=True)
class EnginePlan:
    generation: int
    engine_id: str
    model: str
    gpu_indices: tuple[int, ...]
    tp_degree: int
    options: tuple[tuple[str, str], ...]  # sorted by key
    drain_timeout_s: float
    ready_timeout_s: float


def validate_engine_id(field: str, engine_id: str) -> str:
    if not ENGINE_ID_PATTERN.fullmatch(engine_id):
        raise InvalidArgumentError(field, engine_id, ENGINE_ID_ALLOWED)
    return engine_id


def _timeout_s(field: str, value: float, allowed: str) -> float:
    _finite(field, value, allowed)
    if not 0 <= value <= MAX_TIMEOUT_S:
        raise InvalidArgumentError(field, value, allowed)
    return value


def _drain_timeout_s(value: float) -> float:
    return _timeout_s("drain_timeout_s", value, f"0..{MAX_TIMEOUT_S:g} seconds")


def _model(model: str, allowed: tuple[str, ...]) -> str:
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidArgumentError(
            "model", model, f"at most {MAX_MODEL_CHARS} characters, one of: " + (", ".join(allowed) or "none")
        )
    if model not in allowed:
        raise InvalidArgumentError("model", model, allowed or "none (engine.models is empty)")
    return model


def validate_reconfigure(
    request: control_pb2.ReconfigureEngineRequest,
    *,
    gpu_count: int,
    requirements: EngineRequirements,
    gpu_holders: Mapping[int, str],
) -> EnginePlan:
    """`gpu_holders`: GPU index -> engine_id of every engine that is not STOPPED or FAILED."""
    engine_id = validate_engine_id("engine_id", request.engine_id)
    model = _model(request.model, requirements.models)
    indices = _gpu_indices("gpu_indices", list(request.gpu_indices), gpu_count, allow_empty=False)
    tp = request.tp_degree
    if requirements.pipeline_parallel:
        divisors = [d for d in range(1, len(indices) + 1) if len(indices) % d == 0]
        if tp not in divisors:
            raise InvalidArgumentError(
                "tp_degree", tp, f"a divisor of the {len(indices)} GPUs: {_abbrev(divisors)}"
            )
    elif tp != len(indices):
        raise InvalidArgumentError(
            "tp_degree",
            tp,
            f"{len(indices)} (the number of gpu_indices; this engine has no pipeline parallelism)",
        )
    if requirements.tp_degrees is not None and tp not in requirements.tp_degrees:
        raise InvalidArgumentError("tp_degree", tp, _abbrev(requirements.tp_degrees))
    options = request.engine_options
    if len(options) > len(requirements.options_allowed):
        raise InvalidArgumentError(
            "engine_options",
            f"{len(options)} entries",
            f"at most {len(requirements.options_allowed)} entries, keys of: "
            + (", ".join(requirements.options_allowed) or "none (engine.options_allowed)"),
        )
    for key in sorted(options):
        if key not in requirements.options_allowed:
            raise InvalidArgumentError(
                f"engine_options[{key!r}]",
                key,
                requirements.options_allowed or "none (engine.options_allowed)",
            )
    validate_engine_options(options)  # the values, typed where the engine's flag is known
    drain_timeout_s = _drain_timeout_s(request.drain_timeout_s)
    ready_timeout_s = _timeout_s(
        "ready_timeout_s", request.ready_timeout_s, f"0..{MAX_TIMEOUT_S:g} seconds (0: agent default)"
    )
    ready_timeout_s = ready_timeout_s or requirements.default_ready_timeout_s
    for i, index in enumerate(indices):
        holder = gpu_holders.get(index)
        if holder is not None and holder != engine_id:
            raise FailedPreconditionError(f"gpu_indices[{i}]: GPU {index} belongs to live engine {holder!r}")
    return EnginePlan(
        generation=request.generation,
        engine_id=engine_id,
        model=model,
        gpu_indices=indices,
        tp_degree=tp,
        options=tuple(sorted(request.engine_options.items())),
        drain_timeout_s=drain_timeout_s,
        ready_timeout_s=ready_timeout_s,
    )


def validate_stop(request: control_pb2.StopEngineRequest) -> tuple[str, float]:
    return validate_engine_id("engine_id", request.engine_id), _drain_timeout_s(request.drain_timeout_s)


# ------------------------------------------------------------------------------------- telemetry


@dataclass(frozen=True, slots=True)
class StreamPlan:
    period_s: float
    stride: int  # deliver every stride-th sample of the sampler
    gpu_indices: tuple[int, ...]  # ascending
    include_engines: bool


def validate_stream(
    request: telemetry_pb2.StreamTelemetryRequest,
    *,
    gpu_count: int,
    sampler_period_s: float,
    min_period_s: float,
    max_period_s: float,
) -> StreamPlan:
    """A stream period is a whole multiple of the sampler's period within [min, max]: every subscriber
    sees samples of the one sampler, at exact spacing, and no request can make the node sample faster."""
    period_s = request.period_s
    low = max(min_period_s, sampler_period_s)
    allowed = (
        f"0 (default {sampler_period_s:g} s) or a multiple of {sampler_period_s:g} s "
        f"within [{low:g}, {max_period_s:g}]"
    )
    _finite("period_s", period_s, allowed)
    if period_s == 0:
        period_s = sampler_period_s
    if not low - 1e-9 <= period_s <= max_period_s + 1e-9:  # before dividing: 1e308 / 0.05 is inf
        raise InvalidArgumentError("period_s", request.period_s, allowed)
    stride = round(period_s / sampler_period_s)
    if stride < 1 or not math.isclose(stride * sampler_period_s, period_s, rel_tol=1e-6):
        raise InvalidArgumentError("period_s", request.period_s, allowed)
    indices = _gpu_indices("gpu_indices", list(request.gpu_indices), gpu_count, allow_empty=True)
    return StreamPlan(
        period_s=stride * sampler_period_s,
        stride=stride,
        gpu_indices=tuple(sorted(indices)) if indices else tuple(range(gpu_count)),
        include_engines=request.include_engines,
    )
