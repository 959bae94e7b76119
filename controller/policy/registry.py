"""The policies by `--policy` name, built from typed settings (`PolicySettings`, loadable from a TOML
table) instead of being patched field by field. Pure: `policy_settings_from_doc` validates a parsed
document; reading the file is the caller's job (`dctl`, later the controller daemon's config).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar

from agent.api.errors import InvalidArgumentError
from controller.model.state import Periods
from controller.orchestrator.plan import ReconfigCosts
from controller.policy.base import SimPolicy
from controller.policy.baselines import MultiPool, ScaleFreq, ScaleInst, ScaleShard
from controller.policy.cluster_manager import (
    DEFAULT_LARGEST_HEADROOM,
    DEFAULT_MERGE_FILL,
    DEFAULT_MERGE_TTFT_RATIO,
)
from controller.policy.dynamollm import (
    DEFAULT_BURST_MISS_SHARE,
    DEFAULT_COSTS,
    DEFAULT_MIX_WINDOW_S,
    DEFAULT_PERIODS,
    DEFAULT_SUSTAINED_WINDOW_S,
    DynamoLLM,
)
from controller.policy.frequency import DEFAULT_CLOCK_HEADROOM
from controller.policy.objective import (
    DEFAULT_ENERGY_USD_PER_KWH,
    DEFAULT_GPU_USD_PER_SERVER_HOUR,
    OBJECTIVES,
    gpu_hold_j_per_gpu_s,
)
from controller.policy.pool import DEFAULT_MIP_REL_GAP, DEFAULT_TIME_LIMIT_S
from controller.policy.singlepool import SinglePool


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Every policy's tunables in one place: the control periods and reconfiguration costs (shared by
    deciding and acting), and DynamoLLM's knobs (the baselines use those they have)."""

    periods: Periods = DEFAULT_PERIODS
    costs: ReconfigCosts = DEFAULT_COSTS
    merge_fill: float = DEFAULT_MERGE_FILL
    largest_headroom: float = DEFAULT_LARGEST_HEADROOM
    clock_headroom: float = DEFAULT_CLOCK_HEADROOM
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    mix_window_s: float = DEFAULT_MIX_WINDOW_S
    sustained_window_s: float = DEFAULT_SUSTAINED_WINDOW_S
    burst_miss_share: float = DEFAULT_BURST_MISS_SHARE
    merge_ttft_ratio: float = DEFAULT_MERGE_TTFT_RATIO
    objective: str = "energy"
    gpu_usd_per_server_hour: float = DEFAULT_GPU_USD_PER_SERVER_HOUR
    energy_usd_per_kwh: float = DEFAULT_ENERGY_USD_PER_KWH

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InvalidArgumentError("policy.objective", self.objective, OBJECTIVES)
        if not (math.isfinite(self.merge_ttft_ratio) and self.merge_ttft_ratio >= 1.0):
            raise InvalidArgumentError("policy.merge_ttft_ratio", self.merge_ttft_ratio, "a ratio >= 1")
        gpu_hold_j_per_gpu_s(self.objective, self.gpu_usd_per_server_hour, self.energy_usd_per_kwh)
        if not (math.isfinite(self.merge_fill) and self.merge_fill >= 0.0):
            raise InvalidArgumentError("policy.merge_fill", self.merge_fill, "instances >= 0")
        for name in ("largest_headroom", "clock_headroom", "mip_rel_gap", "burst_miss_share"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise InvalidArgumentError(f"policy.{name}", value, "a share in [0, 1)")
        for name in ("time_limit_s", "mix_window_s", "sustained_window_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise InvalidArgumentError(f"policy.{name}", value, "a positive number of seconds")


D = TypeVar("D", bound=DynamoLLM)


def dynamollm_family(cls: type[D], s: PolicySettings) -> D:
    """`cls` (DynamoLLM, or a variant of it such as the simulator's oracle) with the settings `s`."""
    return cls(
        periods=s.periods,
        costs=s.costs,
        merge_fill=s.merge_fill,
        largest_headroom=s.largest_headroom,
        clock_headroom=s.clock_headroom,
        mip_rel_gap=s.mip_rel_gap,
        time_limit_s=s.time_limit_s,
        mix_window_s=s.mix_window_s,
        sustained_window_s=s.sustained_window_s,
        burst_miss_share=s.burst_miss_share,
        merge_ttft_ratio=s.merge_ttft_ratio,
        objective=s.objective,
        gpu_usd_per_server_hour=s.gpu_usd_per_server_hour,
        energy_usd_per_kwh=s.energy_usd_per_kwh,
    )


PolicyFactory = Callable[[PolicySettings], SimPolicy]

POLICIES: Mapping[str, PolicyFactory] = MappingProxyType(
    {
        "singlepool": lambda s: SinglePool(),
        "multipool": lambda s: MultiPool(),
        "scaleinst": lambda s: ScaleInst(
            periods=s.periods, costs=s.costs, mix_window_s=s.mix_window_s, time_limit_s=s.time_limit_s
        ),
        "scaleshard": lambda s: ScaleShard(periods=s.periods, costs=s.costs, mix_window_s=s.mix_window_s),
        "scalefreq": lambda s: ScaleFreq(
            periods=s.periods,
            costs=s.costs,
            clock_headroom=s.clock_headroom,
            mix_window_s=s.mix_window_s,
            sustained_window_s=s.sustained_window_s,
        ),
        "dynamollm": partial(dynamollm_family, DynamoLLM),
    }
)


def make_policy(
    name: str, settings: PolicySettings | None = None, factories: Mapping[str, PolicyFactory] = POLICIES
) -> SimPolicy:
    """The policy called `name` with `settings` (defaults: `PolicySettings()`). Errors name `--policy`."""
    factory = factories.get(name)
    if factory is None:
        raise InvalidArgumentError("--policy", name, tuple(factories))
    return factory(settings or PolicySettings())


def _section(doc: Mapping[str, Any], cls: type[Any], where: str) -> dict[str, Any]:
    """The keys of `doc` that are scalar fields of `cls` (bool, number or string, as the field is), checked;
    any other key is refused by name with the allowed ones."""
    kinds = {f.name: f.type for f in fields(cls) if f.type in ("bool", "float", "int", "str")}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        kind = kinds.get(key)
        if kind is None:
            raise InvalidArgumentError(f"{where}.{key}", value, tuple(kinds))
        if kind == "bool" and not isinstance(value, bool):
            raise InvalidArgumentError(f"{where}.{key}", value, "true or false")
        if kind == "str" and not isinstance(value, str):
            raise InvalidArgumentError(f"{where}.{key}", value, "a string")
        if kind in ("float", "int") and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidArgumentError(f"{where}.{key}", value, "a number")
        out[key] = float(value) if kind in ("float", "int") else value
    return out


def policy_settings_from_doc(doc: Mapping[str, Any], base: PolicySettings | None = None) -> PolicySettings:
    """Settings from a parsed TOML document: top-level knobs of `PolicySettings`, and the tables
    `[periods]` (cluster_s, pool_s, instance_s) and `[costs]` (the `ReconfigCosts` fields). Keys not
    given keep `base`'s values. InvalidArgumentError names the offending key."""
    start = base or PolicySettings()
    top = {k: v for k, v in doc.items() if k not in ("periods", "costs")}
    for key in ("periods", "costs"):
        if key in doc and not isinstance(doc[key], Mapping):
            raise InvalidArgumentError(key, doc[key], "a table")
    periods = replace(start.periods, **_section(doc.get("periods", {}), Periods, "periods"))
    costs = replace(start.costs, **_section(doc.get("costs", {}), ReconfigCosts, "costs"))
    return replace(start, periods=periods, costs=costs, **_section(top, PolicySettings, "policy"))
