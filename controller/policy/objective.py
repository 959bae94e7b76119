"""What the pool MILP minimises: `--objective energy | cost | carbon`. Pure arithmetic.

Where it sits: `DynamoLLM` (and the oracle) hand `solve_pool` the price of holding a GPU, expressed in
joules of energy so the MILP keeps one objective unit (`gpu_hold_j_per_gpu_s`):

- energy (default): GPU energy only; holding a GPU costs nothing beyond its idle power.
- cost: rental plus energy, in USD: `gpu_usd_per_server_hour` per 8-GPU server-hour plus the energy at
  `energy_usd_per_kwh`. Divided by the energy price, a GPU-second of rental is worth
  (rental USD per GPU-s) / (USD per J) joules: at the defaults (88.5 USD per server-hour, 0.0407
  USD/kWh) about 272 kJ per GPU-second, some 400x a GPU's full power. The cost objective therefore
  holds the fewest GPUs that serve the load within the SLO and uses energy to break ties.
- carbon: operational carbon, energy weighted by the grid's intensity. Within one pool epoch (5 min)
  the intensity is one number, and inference load cannot be moved in time, so weighting every term of
  the MILP by it changes no decision: the carbon objective chooses what the energy objective chooses
  (the report's carbon differs between policies only through their energy and when it was spent).
  Embodied carbon of held servers, the term that would make it differ, is not modelled (no public
  per-GPU-hour figure we could validate).
"""

from __future__ import annotations

import math
from typing import Literal

from agent.api.errors import InvalidArgumentError
from controller.model.cluster import GPUS_PER_SERVER

Objective = Literal["energy", "cost", "carbon"]
OBJECTIVES: tuple[Objective, ...] = ("energy", "cost", "carbon")

# Rental of one 8x H100 SXM server (on-demand list price, USD per hour) and the mean CAISO 2024
# wholesale energy price: the report's defaults, so the cost objective prices what the report counts.
DEFAULT_GPU_USD_PER_SERVER_HOUR = 88.5
DEFAULT_ENERGY_USD_PER_KWH = 0.0407
_J_PER_KWH = 3.6e6
_S_PER_HOUR = 3600.0


def check_objective(objective: str) -> Objective:
    for name in OBJECTIVES:
        if objective == name:
            return name
    raise InvalidArgumentError("objective", objective, OBJECTIVES)


def gpu_hold_j_per_gpu_s(objective: str, gpu_usd_per_server_hour: float, energy_usd_per_kwh: float) -> float:
    """What holding one GPU for one second costs under `objective`, in joules (module docstring)."""
    if not (math.isfinite(gpu_usd_per_server_hour) and gpu_usd_per_server_hour >= 0.0):
        raise InvalidArgumentError("gpu_usd_per_server_hour", gpu_usd_per_server_hour, "a price >= 0")
    if check_objective(objective) != "cost":
        return 0.0
    if not (math.isfinite(energy_usd_per_kwh) and energy_usd_per_kwh > 0.0):
        raise InvalidArgumentError("energy_usd_per_kwh", energy_usd_per_kwh, "a price > 0 (objective cost)")
    usd_per_gpu_s = gpu_usd_per_server_hour / GPUS_PER_SERVER / _S_PER_HOUR
    return usd_per_gpu_s / (energy_usd_per_kwh / _J_PER_KWH)
