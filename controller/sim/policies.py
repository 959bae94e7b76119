"""The policies the simulator can run: the registry of `controller.policy.registry` plus the oracle
(which needs the trace's future, so it exists only here), and the settings a simulation builds them
with, so that the policy prices reconfigurations with the very costs the executor times them with.

`bound` (`controller.sim.bound`, the fluid lower bound on energy) is a name of `dctl simulate
--compare` but not a simulated policy: it is computed from the trace, so it has no factory here and
`sim_policy("bound")` says where to find it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from types import MappingProxyType

from agent.api.errors import InvalidArgumentError
from agent.sim.physics import load_perf_model
from controller.model.cluster import GPUS_PER_SERVER
from controller.model.state import Periods
from controller.policy.base import SimPolicy
from controller.policy.registry import POLICIES, PolicyFactory, PolicySettings, dynamollm_family, make_policy
from controller.sim.bound import BOUND_NAME
from controller.sim.oracle import Oracle

SIM_POLICIES: Mapping[str, PolicyFactory] = MappingProxyType(
    {**POLICIES, "oracle": partial(dynamollm_family, Oracle)}
)


def sim_settings(
    model: str,
    gpu: str,
    *,
    periods: Periods | None = None,
    fast_reshard: bool | None = None,
    base: PolicySettings | None = None,
) -> PolicySettings:
    """Settings for a simulated cluster: `base` (default `PolicySettings()`) with the control periods
    and the re-shard path where given (None keeps `base`'s), and the GPUs' idle power of the simulated
    hardware (what a loading or draining GPU draws, in both the policy's prices and the executor's
    energy)."""
    start = base or PolicySettings()
    idle_w = load_perf_model(model=model, gpu=gpu, tp=GPUS_PER_SERVER).idle_power_w
    reshard = start.costs.fast_reshard if fast_reshard is None else fast_reshard
    costs = replace(start.costs, fast_reshard=reshard, idle_power_w_per_gpu=idle_w)
    return replace(start, periods=periods or start.periods, costs=costs)


def sim_policy(name: str, settings: PolicySettings | None = None) -> SimPolicy:
    """The simulator's policy called `name` (errors name `--policy`)."""
    if name == BOUND_NAME:
        raise InvalidArgumentError(
            "--policy",
            name,
            "a simulated policy: the fluid lower bound is computed from the trace, not simulated; "
            "every --compare reports it (its table row, each report's energy_x_bound)",
        )
    return make_policy(name, settings, SIM_POLICIES)
