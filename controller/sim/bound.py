"""`bound`: a fluid lower bound on a trace's GPU energy, the energy no policy can beat (docs/evaluation.md).

Where it sits: computed analytically from the trace and the profile, not simulated. `run_compare`
(`controller.sim.compare`) computes it for every comparison and gives every simulated report its
ratio to it (`energy_x_bound`) and the bound itself (`bound`, `dynamollm.simbound/v1`); the compare
table shows it as a reference row and an `x bound` column. It lives in `controller.sim` because it
reads the whole trace ahead (like the oracle) and the simulator's admission rule (`beyond_context`);
it uses the pure core (`controller.policy.capacity`), which never imports it.

The problem. Each period p of `period_s` (default: the pool period, 300 s) and each request class c
has its TRUE mean arrival rate L_pc = (admitted arrivals of class c in p) / (length of p). Choose, per
class, FRACTIONAL instance counts n_ck >= 0 of any profiled configuration k = (TP, clock) and their
loads x_ck:

    minimise   sum_c sum_k  idle_ck n_ck + slope_ck x_ck        (fitted instance power, W)
    s.t.       sum_k x_ck >= L_pc,   0 <= x_ck <= cap_ck n_ck    (every request served within its SLO)

with cap_ck = `Profile.max_load_rps(c, tp, clock)` and the fitted power line of class c alone on k
(`controller.policy.capacity.ConfigCapacity` of the single-class mix: idle + slope x load). The
period's energy is the optimum x the period's length; the bound is the sum over periods.

Closed form (so no LP is solved; tests/sim/test_bound.py checks it against CVXPY/HiGHS). The classes
do not interact (no budget, no pooling constraint), so the LP splits per class. For one class, at an
optimum x_ck = cap_ck n_ck: if x_ck < cap_ck n_ck, lowering n_ck to x_ck / cap_ck keeps every
constraint and does not raise the cost (idle_ck >= 0). The cost is then sum_k e_ck x_ck with
e_ck = idle_ck / cap_ck + slope_ck, the energy per request at full load (`energy_per_request_j`),
subject only to sum_k x_ck >= L_pc, x >= 0: a linear objective over a simplex-like set, minimised by
putting all load on the k with the least e_ck. Optimum: L_pc x min_k e_ck (W), so the period's energy
is (arrivals of c in p) x min_k e_ck and the bound is sum_c N_c min_k e_ck, whatever the period length:
the per-period decomposition is exact, and the period only shapes the per-period series.

A second power model, whichever is lower per configuration. The fitted line is a least-squares line
through the measured levels; at the capacity it lies up to ~9% above the measured points on the default
profile (the measured power curve bends down at high load). So that the bound stays below what a
perfect allocation would draw under the measurements too, e_ck is the LOWER of the line's value and the
least measured energy per request over the SLO-meeting levels (every level up to cap_ck and the point at
cap_ck interpolated; each as mean power x TP / load and as the stored energy per request). Between
measured levels power is linear in load, so P(l) / l is monotone on each segment and these points hold
its minimum over (0, cap_ck]. In the LP's terms each such point is one more configuration (an instance
of k held at load l: idle P(l), slope 0, capacity l), so the closed form still solves it. The report
also gives the fitted-line value alone (`energy_line_model_j`).

Assumptions, each of which can only LOWER the bound below what any policy achieves in the model:
- fluid: fractional instances; each period's load is its mean rate (bursts within a period ignored:
  serving a burst within the SLO needs capacity that is idle otherwise, never less energy);
- no reconfiguration cost, no loading engines, no minimum instance per pool, no GPU budget, no
  server packing (GPUs not rounded to 8-GPU servers; unused GPUs of a server cost nothing);
- no pooling: each class has its own instances. Pooling is a restriction of this: under the profile's
  mix model (`capacity.py`) an instance at k serving a mix at full load draws, per request of class c,
  exactly e_ck (the mix's energy per request is the share-weighted mean of its classes' e_ck), and
  less than full load only adds idle power per request; so any pooled allocation costs at least
  sum_c (its class-c load) x min_k e_ck;
- TRUE classes (the trace's own lengths, `ClassBins` of the simulation): the bound does not suffer
  mispredictions. Valid for policies that route by PREDICTED class: a request's cost on a
  configuration is set by its true lengths wherever it is routed, so a misrouted request still costs
  at least its true class's min_k e_ck (and usually more: a pool sized for other classes);
- every admitted request served within its SLO; requests refused at admission (beyond the model's
  context, `controller.sim.cluster.beyond_context`) are excluded, as from every policy's load. A class
  with admitted requests that no configuration serves within its SLO adds 0 (energy >= 0 still holds)
  and is listed in `unservable_classes`.

What it is a bound OF: the energy of serving the trace within the SLO under the profile's model (its
capacities and power). The simulator's energy comes from the physics model the profile was measured
on, so the bound is below simulated runs in practice, not by theorem: a policy that rejects requests
or runs instances beyond their SLO capacity (its requests missing the SLO) could in principle go below
it. The simulated energy also counts what the bound leaves out (idle GPUs of allocated servers,
loading engines, the drain). docs/evaluation.md gives the measured margins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES, REQUEST_CLASSES, ClassBins
from controller.model.profile import Profile
from controller.model.state import Periods
from controller.policy.capacity import ConfigCapacity, pool_capacities
from controller.sim.cluster import beyond_context
from controller.sim.traces import Trace

BOUND_NAME = "bound"
BOUND_SCHEMA = "dynamollm.simbound/v1"
DEFAULT_BOUND_PERIOD_S = Periods().pool_s
JOULES_PER_KWH = 3.6e6

PowerModel = Literal["line", "measured"]


def line_energy_per_request_j(config: ConfigCapacity) -> float:
    """Energy per request of one instance at its SLO capacity under its fitted power line (J): idle / cap
    + slope; infinite when the configuration cannot serve (cap 0)."""
    if config.max_load_rps <= 0.0:
        return math.inf
    return config.power_idle_w / config.max_load_rps + config.power_slope_w_per_rps


def cheapest_config(capacities: Sequence[ConfigCapacity]) -> ConfigCapacity | None:
    """The configuration with the least energy per request at full load under the fitted line (ties:
    fewer GPUs, then the lower clock); None when none can serve. The per-class LP's optimal choice."""
    usable = [c for c in capacities if c.max_load_rps > 0.0]
    if not usable:
        return None
    return min(usable, key=lambda c: (line_energy_per_request_j(c), c.tp, c.clock_mhz))


def fluid_power_w(load_rps: float, capacities: Sequence[ConfigCapacity]) -> float:
    """Optimum of the per-class LP (module docstring) under the fitted lines: the least power (W) of
    fractional instances of `capacities` serving `load_rps` within the SLO. Infinite when load > 0 and
    no configuration can serve."""
    if not (math.isfinite(load_rps) and load_rps >= 0.0):
        raise InvalidArgumentError("load_rps", load_rps, "a finite rate >= 0")
    if load_rps == 0.0:
        return 0.0
    best = cheapest_config(capacities)
    return math.inf if best is None else load_rps * line_energy_per_request_j(best)


@dataclass(frozen=True, slots=True)
class ClassOptimum:
    """The least energy per request at which class `class_name` can be served within its SLO, and how:
    TP degree and clock, the per-instance load it is attained at (`load_rps`, <= the capacity
    `max_load_rps`), and which power model gave it. `line_energy_per_request_j`: the fitted-line
    optimum alone (possibly at another configuration)."""

    class_name: str
    tp: int
    clock_mhz: int
    load_rps: float
    max_load_rps: float
    energy_per_request_j: float
    power_model: PowerModel
    line_energy_per_request_j: float

    def to_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "clock_mhz": self.clock_mhz,
            "load_rps": self.load_rps,
            "max_load_rps": self.max_load_rps,
            "energy_per_request_j": self.energy_per_request_j,
            "power_model": self.power_model,
            "line_energy_per_request_j": self.line_energy_per_request_j,
        }


def measured_energy_per_request_j(
    profile: Profile, class_name: str, tp: int, clock_mhz: int
) -> tuple[float, float]:
    """(least measured energy per request over the SLO-meeting loads, the load it is measured at) for one
    class on one configuration: over every level up to the capacity and the interpolated point at the
    capacity, each as mean power x TP / load and as the stored energy per request (J). (inf, 0) when the
    configuration cannot serve the class."""
    cfg = profile.config(class_name, tp, clock_mhz)
    cap = cfg.max_load_rps
    if cap <= 0.0:
        return math.inf, 0.0
    points = [(load, p) for load, p in zip(cfg.load_rps, cfg.points, strict=True) if 0.0 < load <= cap]
    points.append((cap, cfg.point(cap)))
    return min((min(p.power_w * tp / load, p.energy_per_request_j), load) for load, p in points)


def class_optimum(profile: Profile, class_name: str) -> ClassOptimum | None:
    """The class's least energy per request within its SLO over every profiled (TP, clock), the lower of
    the fitted line and the measured curve (module docstring); None when no configuration serves it."""
    capacities = pool_capacities(profile, {class_name: 1.0})
    line_best = cheapest_config(capacities)
    if line_best is None:
        return None
    best = ClassOptimum(
        class_name=class_name,
        tp=line_best.tp,
        clock_mhz=line_best.clock_mhz,
        load_rps=line_best.max_load_rps,
        max_load_rps=line_best.max_load_rps,
        energy_per_request_j=line_energy_per_request_j(line_best),
        power_model="line",
        line_energy_per_request_j=line_energy_per_request_j(line_best),
    )
    for c in sorted(capacities, key=lambda c: (c.tp, c.clock_mhz)):
        energy_j, load_rps = measured_energy_per_request_j(profile, class_name, c.tp, c.clock_mhz)
        if energy_j < best.energy_per_request_j:
            best = ClassOptimum(
                class_name=class_name,
                tp=c.tp,
                clock_mhz=c.clock_mhz,
                load_rps=load_rps,
                max_load_rps=c.max_load_rps,
                energy_per_request_j=energy_j,
                power_model="measured",
                line_energy_per_request_j=best.line_energy_per_request_j,
            )
    return best


@dataclass(frozen=True, slots=True)
class FluidBound:
    """The bound of one trace (module docstring). Per-class tuples follow CLASS_NAMES; per-period ones
    the periods [k period_s, (k + 1) period_s) from t = 0, the last cut at the trace's end."""

    trace: str
    model: str
    gpu: str
    period_s: float
    duration_s: float
    requests: int
    refused_context: int
    requests_by_class: tuple[int, ...]
    optima: Mapping[str, ClassOptimum]
    unservable_classes: tuple[str, ...]
    energy_by_period_j: tuple[float, ...]
    energy_line_model_j: float
    gpu_s: float

    @property
    def admitted(self) -> int:
        return self.requests - self.refused_context

    @property
    def energy_j(self) -> float:
        return float(sum(self.energy_by_period_j))

    @property
    def avg_gpus(self) -> float:
        """Time-averaged (fractional) GPUs of the fluid allocation over the trace's span."""
        return self.gpu_s / self.duration_s if self.duration_s > 0.0 else 0.0

    def to_json(self, *, seed: int, wall_s: float) -> dict[str, Any]:
        """The `dynamollm.simbound/v1` object (strict JSON)."""
        per_class: dict[str, Any] = {}
        for name, n in zip(CLASS_NAMES, self.requests_by_class, strict=True):
            opt = self.optima.get(name)
            entry: dict[str, Any] = {"requests": n, "servable": opt is not None}
            if opt is not None:
                entry.update(opt.to_json(), energy_j=n * opt.energy_per_request_j)
            per_class[name] = entry
        return {
            "schema": BOUND_SCHEMA,
            "kind": "bound",
            "policy": BOUND_NAME,
            "trace": self.trace,
            "seed": seed,
            "model": self.model,
            "gpu": self.gpu,
            "trace_duration_s": self.duration_s,
            "requests": self.requests,
            "admitted": self.admitted,
            "refused": {"context_length": self.refused_context},
            "period_s": self.period_s,
            "energy_j": self.energy_j,
            "energy_kwh": self.energy_j / JOULES_PER_KWH,
            "energy_line_model_j": self.energy_line_model_j,
            "avg_gpus": self.avg_gpus,
            "energy_by_period_j": list(self.energy_by_period_j),
            "per_class": per_class,
            "unservable_classes": list(self.unservable_classes),
            "wall_s": wall_s,
        }


def fluid_bound(
    trace: Trace,
    profile: Profile,
    *,
    period_s: float = DEFAULT_BOUND_PERIOD_S,
    bins: ClassBins | None = None,
) -> FluidBound:
    """The fluid lower bound on `trace`'s energy with `profile` (module docstring): admitted requests by
    true class (`bins`, default `ClassBins()`: use the simulation's), per period of `period_s`."""
    if not (math.isfinite(period_s) and period_s > 0.0):
        raise InvalidArgumentError("period_s", period_s, "a positive number of seconds")
    served = ~beyond_context(trace, profile.model)
    arrival_s = trace.arrival_s[served]
    classes = (bins or ClassBins()).class_indices(trace.input_tokens[served], trace.output_tokens[served])
    n_periods = max(1, math.ceil(trace.duration_s / period_s))
    period_index = np.minimum((arrival_s // period_s).astype(np.int64), n_periods - 1)
    n_classes = len(REQUEST_CLASSES)
    cells = period_index * n_classes + classes.astype(np.int64)
    counts = np.bincount(cells, minlength=n_periods * n_classes).reshape(n_periods, n_classes)
    by_class = counts.sum(axis=0)

    optima: dict[str, ClassOptimum] = {}
    for name in CLASS_NAMES:
        opt = class_optimum(profile, name) if name in profile.classes else None
        if opt is not None:
            optima[name] = opt
    unservable = tuple(n for n, k in zip(CLASS_NAMES, by_class, strict=True) if k > 0 and n not in optima)
    energy_j = np.array([optima[n].energy_per_request_j if n in optima else 0.0 for n in CLASS_NAMES])
    line_j = np.array([optima[n].line_energy_per_request_j if n in optima else 0.0 for n in CLASS_NAMES])
    gpu_s_per_request = np.array(
        [optima[n].tp / optima[n].load_rps if n in optima else 0.0 for n in CLASS_NAMES]
    )
    return FluidBound(
        trace=trace.name,
        model=profile.model,
        gpu=profile.gpu,
        period_s=period_s,
        duration_s=trace.duration_s,
        requests=len(trace),
        refused_context=int((~served).sum()),
        requests_by_class=tuple(int(k) for k in by_class),
        optima=optima,
        unservable_classes=unservable,
        energy_by_period_j=tuple(float(e) for e in counts @ energy_j),
        energy_line_model_j=float(by_class @ line_j),
        gpu_s=float(by_class @ gpu_s_per_request),
    )
