"""Reconfiguration planning: from observed instances and a desired `ClusterPlan` to costed actions.

Where it sits: every policy step (cluster, pool, instance period) returns the WHOLE desired state; this
module computes the difference with what is running and how to get there (docs/control.md, issue 3 item 6).
The simulator executes the actions with their delays; `reconfiguration_free` policies (the oracle)
apply them instantly. Pure: `now_s` is an argument, no clock, no I/O.

Matching, per pool (pools match by name; DRAINING instances are already leaving and are ignored):
1. same spec -> keep (ACTIVE instances before STARTING ones, then by id);
2. same TP, other clock -> `clock` (clocks paired in sorted order, so the total clock distance is least);
3. other TP -> `retp` (drain, restart with the new TP on the instance's GPUs; or the GPU-to-GPU re-shard
   when `costs.fast_reshard`). With the restart path, a spare GPU set turns it into make-before-break
   instead: `start` the new spec, `stop` the old one after the start completes (no capacity gap);
4. desired specs left -> `start` (warm start); instances left -> `stop` (drain, then release).
Instances of pools absent from the desired plan are stopped (their classes are routed elsewhere).

Costs: `duration_s` is the downtime (start: engine load; retp: restart or re-shard; clock: the
engine stall of the clock change; stop: 0, draining serves its requests to completion).
`energy_j` is the GPUs' idle draw over the downtime (they hold power but serve nothing).

Capacity: `InstanceModel.capacity_rps(pool, spec)` (SLO-meeting load of one instance for the pool's
mix). A pool's need is its desired instances' summed capacity. Ordering keeps every pool's serving
capacity at or above min(need, capacity now):
- wave A at `now_s`: starts and capacity-non-decreasing clock changes (scale out first);
- wave B, once the pool's starts are up (`now_s + start time`): capacity-reducing changes (stops,
  clock-downs, every TP change: its downtime removes capacity), largest saving first. Stops and TP
  changes are staggered `costs.stagger_s` apart, cluster-wide; a TP change waits for earlier ones
  in its pool to come back while the margin is too thin. Only a restart-path TP change with no spare
  GPUs and no margin (e.g. a one-instance pool changing TP) dips below; it then runs alone.
- starts that find no free GPUs (`gpu_budget`) are released after wave B; the executor starts them
  when the drained instances free their GPUs.

Hysteresis (no thrashing): changes that add capacity always go through (the SLO comes first). Any
other change is skipped, to be reconsidered at the next step, when its instance was started or
changed less than `min_dwell_s` ago, or when its power saving over `epoch_s` is below
`saving_ratio` x its energy cost. Idempotent: desired == current gives no actions.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from agent.api.errors import InvalidArgumentError
from controller.model.cluster import ClusterPlan, InstanceSpec
from controller.model.state import InstanceObs, Phase

ActionKind = Literal["start", "stop", "retp", "clock"]
ACTION_KINDS: tuple[ActionKind, ...] = ("start", "stop", "retp", "clock")

# Capacity comparisons are between sums of floats; a change that leaves capacity exactly at the need
# must not be refused for a rounding error.
_CAPACITY_RTOL = 1e-9


@dataclass(frozen=True, slots=True)
class ReconfigCosts:
    """Reconfiguration overheads (docs/control.md simulator defaults, Llama-2-70B on DGX H100)."""

    warm_start_s: float = 60.0  # weights local, engine pre-created
    cold_start_s: float = 420.0  # weights fetched: 6-8 min
    restart_reshard_s: float = 90.0  # drain done, engine restarted with the new TP: 1-2 min
    fast_reshard_s: float = 0.05  # the paper's GPU-to-GPU weight transfer
    clock_change_s: float = 0.065  # engine stall while nvidia-smi locks the clocks: 50-80 ms
    fast_reshard: bool = False  # TP changes use the fast path (a simulator option)
    cold_starts: bool = False  # starts are cold (no local weights) instead of warm
    idle_power_w_per_gpu: float = (
        75.0  # draw of a GPU holding an engine that serves nothing (docs/physics.md)
    )
    stagger_s: float = 10.0  # gap between successive disruptive actions (stops, TP changes)

    def __post_init__(self) -> None:
        for field in (
            "warm_start_s",
            "cold_start_s",
            "restart_reshard_s",
            "fast_reshard_s",
            "clock_change_s",
            "idle_power_w_per_gpu",
            "stagger_s",
        ):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0.0):
                raise InvalidArgumentError(f"costs.{field}", value, "a finite number >= 0")

    @property
    def start_s(self) -> float:
        return self.cold_start_s if self.cold_starts else self.warm_start_s

    @property
    def reshard_s(self) -> float:
        return self.fast_reshard_s if self.fast_reshard else self.restart_reshard_s


@dataclass(frozen=True, slots=True)
class Hysteresis:
    """Anti-thrashing rules for changes that do not add capacity (see the module docstring)."""

    min_dwell_s: float = 60.0
    epoch_s: float = 300.0  # how long a change is expected to pay off (the pool period)
    saving_ratio: float = 1.0

    def __post_init__(self) -> None:
        for field in ("min_dwell_s", "epoch_s", "saving_ratio"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0.0):
                raise InvalidArgumentError(f"hysteresis.{field}", value, "a finite number >= 0")


class InstanceModel(Protocol):
    """What the planner needs to know about an instance configuration serving a pool."""

    def capacity_rps(self, pool: str, spec: InstanceSpec) -> float:
        """SLO-meeting load of one instance of `spec` with the pool's class mix (0 if it cannot serve)."""
        ...

    def power_w(self, pool: str, spec: InstanceSpec) -> float:
        """Expected power of one instance (all its GPUs) at the load it will carry in the pool."""
        ...


@dataclass(frozen=True, slots=True)
class Action:
    """One reconfiguration step.

    `instance_id` is the instance acted on (None for a start: the executor assigns the id). `spec` is
    the spec the instance will have afterwards (for a stop: the one it has). Not before `not_before_s`;
    the executor may start it later (e.g. a start waiting for GPUs to be freed).
    """

    kind: ActionKind
    pool: str
    instance_id: int | None
    spec: InstanceSpec
    not_before_s: float
    duration_s: float
    energy_j: float


@dataclass(frozen=True, slots=True)
class _Change:
    """A candidate change before scheduling; `old` None = start, `new` None = stop."""

    kind: ActionKind
    pool: str
    instance: InstanceObs | None
    new: InstanceSpec | None
    capacity_delta_rps: float
    saving_w: float  # power saved once done (negative: costs power)
    duration_s: float
    energy_j: float

    @property
    def spec(self) -> InstanceSpec:
        if self.new is not None:
            return self.new
        assert self.instance is not None  # a stop always has its instance
        return self.instance.spec

    @property
    def capacity_loss_rps(self) -> float:
        """Capacity missing while the change runs (its downtime) or for good (a stop)."""
        if self.instance is None:
            return 0.0
        if self.kind in ("stop", "retp"):
            return self.capacity_old_rps
        return max(0.0, -self.capacity_delta_rps)

    capacity_old_rps: float = 0.0


def _pool_order(current: Sequence[InstanceObs], desired: ClusterPlan) -> list[str]:
    names = [p.name for p in desired.pools]
    extra = sorted({i.pool for i in current} - set(names))
    return names + extra


def _match_pool(
    live: list[InstanceObs], desired_specs: Sequence[InstanceSpec]
) -> tuple[
    list[tuple[InstanceObs, InstanceSpec]],
    list[tuple[InstanceObs, InstanceSpec]],
    list[InstanceSpec],
    list[InstanceObs],
]:
    """(clock pairs, other-TP pairs, specs to start, instances to stop) of one pool; kept ones dropped."""
    wanted = Counter(desired_specs)
    left: list[InstanceObs] = []
    for inst in sorted(live, key=lambda i: (i.phase is not Phase.ACTIVE, i.instance_id)):
        if wanted[inst.spec] > 0:
            wanted[inst.spec] -= 1
        else:
            left.append(inst)
    want_left = sorted(wanted.elements(), key=lambda s: (s.tp, s.clock_mhz))

    clock_pairs: list[tuple[InstanceObs, InstanceSpec]] = []
    unmatched_specs: list[InstanceSpec] = []
    unmatched_insts: list[InstanceObs] = []
    for tp in sorted({s.tp for s in want_left} | {i.spec.tp for i in left}):
        specs = [s for s in want_left if s.tp == tp]
        insts = sorted((i for i in left if i.spec.tp == tp), key=lambda i: (i.spec.clock_mhz, i.instance_id))
        # Pair the longer list's run of consecutive clocks nearest to the shorter one; the rest of the
        # longer list is started or stopped.
        k = min(len(specs), len(insts))
        inst_at = _closest([i.spec.clock_mhz for i in insts], [s.clock_mhz for s in specs])
        spec_at = _closest([s.clock_mhz for s in specs], [i.spec.clock_mhz for i in insts])
        clock_pairs += list(zip(insts[inst_at : inst_at + k], specs[spec_at : spec_at + k], strict=True))
        unmatched_specs += specs[:spec_at] + specs[spec_at + k :]
        unmatched_insts += insts[:inst_at] + insts[inst_at + k :]
    unmatched_insts.sort(key=lambda i: (-i.spec.tp, i.instance_id))
    unmatched_specs.sort(key=lambda s: (-s.tp, -s.clock_mhz))
    k = min(len(unmatched_specs), len(unmatched_insts))
    tp_pairs = list(zip(unmatched_insts[:k], unmatched_specs[:k], strict=True))
    return clock_pairs, tp_pairs, unmatched_specs[k:], unmatched_insts[k:]


def _closest(longer: Sequence[int], shorter: Sequence[int]) -> int:
    """Start of the run of len(shorter) consecutive clocks in sorted `longer` nearest to sorted `shorter`.

    0 when `longer` is not the longer one (then all of it pairs up).
    """
    k = len(shorter)
    if len(longer) <= k:
        return 0
    costs = [
        sum(abs(a - b) for a, b in zip(longer[start : start + k], shorter, strict=True))
        for start in range(len(longer) - k + 1)
    ]
    return costs.index(min(costs))


def plan_reconfiguration(
    current: Sequence[InstanceObs],
    desired: ClusterPlan,
    *,
    costs: ReconfigCosts,
    model: InstanceModel,
    now_s: float,
    hysteresis: Hysteresis = Hysteresis(),
    changed_at_s: Mapping[int, float] | None = None,
    gpu_budget: int | None = None,
) -> tuple[Action, ...]:
    """Actions that take `current` to `desired`, ordered by `not_before_s` (module docstring).

    `changed_at_s`: instance id -> when it was last started or reconfigured (for the dwell time;
    missing ids count as long settled). `gpu_budget`: GPUs the cluster may hold at once (None: no
    limit); all current instances, draining ones included, hold their GPUs until they are gone.
    """
    if not math.isfinite(now_s):
        raise InvalidArgumentError("now_s", now_s, "a finite time in seconds")
    if gpu_budget is not None and gpu_budget < 0:
        raise InvalidArgumentError("gpu_budget", gpu_budget, "an integer >= 0 or None")
    ids = [i.instance_id for i in current]
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError("current", sorted(ids), "unique instance ids")
    changed = changed_at_s or {}
    desired_pools = {p.name: p for p in desired.pools}
    spare_gpus = math.inf if gpu_budget is None else gpu_budget - sum(i.spec.tp for i in current)

    live_by_pool: dict[str, list[InstanceObs]] = defaultdict(list)
    for inst in current:
        if inst.phase is not Phase.DRAINING:
            live_by_pool[inst.pool].append(inst)

    def settled(inst: InstanceObs) -> bool:
        return now_s - changed.get(inst.instance_id, -math.inf) >= hysteresis.min_dwell_s

    def worth_it(saving_w: float, energy_j: float) -> bool:
        return saving_w * hysteresis.epoch_s >= hysteresis.saving_ratio * energy_j and saving_w > 0.0

    def stop(pool: str, inst: InstanceObs) -> _Change:
        cap = model.capacity_rps(pool, inst.spec)
        return _Change(
            kind="stop",
            pool=pool,
            instance=inst,
            new=None,
            capacity_delta_rps=-cap,
            saving_w=model.power_w(pool, inst.spec),
            duration_s=0.0,
            energy_j=0.0,
            capacity_old_rps=cap,
        )

    def start(pool: str, spec: InstanceSpec) -> _Change:
        return _Change(
            kind="start",
            pool=pool,
            instance=None,
            new=spec,
            capacity_delta_rps=model.capacity_rps(pool, spec),
            saving_w=-model.power_w(pool, spec),
            duration_s=costs.start_s,
            energy_j=spec.tp * costs.idle_power_w_per_gpu * costs.start_s,
        )

    def change(kind: ActionKind, pool: str, inst: InstanceObs, new: InstanceSpec) -> _Change:
        duration_s = costs.clock_change_s if kind == "clock" else costs.reshard_s
        gpus = inst.spec.tp if kind == "clock" else max(inst.spec.tp, new.tp)
        old_cap = model.capacity_rps(pool, inst.spec)
        return _Change(
            kind=kind,
            pool=pool,
            instance=inst,
            new=new,
            capacity_delta_rps=model.capacity_rps(pool, new) - old_cap,
            saving_w=model.power_w(pool, inst.spec) - model.power_w(pool, new),
            duration_s=duration_s,
            energy_j=gpus * costs.idle_power_w_per_gpu * duration_s,
            capacity_old_rps=old_cap,
        )

    changes: list[_Change] = []
    deferred_starts: list[_Change] = []
    need: dict[str, float] = {}
    capacity_now: dict[str, float] = {}
    for pool in _pool_order(current, desired):
        live = live_by_pool.get(pool, [])
        capacity_now[pool] = sum(model.capacity_rps(pool, i.spec) for i in live)
        plan = desired_pools.get(pool)
        if plan is None:
            # Its classes are served elsewhere now: nothing routes here, stop without dwell.
            need[pool] = 0.0
            changes += [stop(pool, i) for i in sorted(live, key=lambda i: i.instance_id)]
            continue
        need[pool] = sum(model.capacity_rps(pool, s) for s in plan.instances)
        clock_pairs, tp_pairs, to_start, to_stop = _match_pool(live, plan.instances)

        for spec in to_start:
            c = start(pool, spec)
            if spare_gpus >= spec.tp:
                spare_gpus -= spec.tp
                changes.append(c)
            else:
                deferred_starts.append(c)
        for inst in to_stop:
            if settled(inst):
                changes.append(stop(pool, inst))
        for inst, spec in clock_pairs:
            c = change("clock", pool, inst, spec)
            if c.capacity_delta_rps > 0.0 or (settled(inst) and worth_it(c.saving_w, c.energy_j)):
                changes.append(c)
        for inst, spec in tp_pairs:
            c = change("retp", pool, inst, spec)
            adds = c.capacity_delta_rps > 0.0
            if not adds and not (settled(inst) and worth_it(c.saving_w, c.energy_j)):
                continue
            if not costs.fast_reshard and spare_gpus >= spec.tp:
                # Make before break: the old instance serves until the new one is up.
                spare_gpus -= spec.tp
                changes += [start(pool, spec), stop(pool, inst)]
            else:
                changes.append(c)

    return _schedule(changes, deferred_starts, need, capacity_now, costs, now_s)


def _schedule(
    changes: list[_Change],
    deferred_starts: list[_Change],
    need: Mapping[str, float],
    capacity_now: Mapping[str, float],
    costs: ReconfigCosts,
    now_s: float,
) -> tuple[Action, ...]:
    actions: list[Action] = []

    def emit(c: _Change, at_s: float) -> None:
        instance_id = None if c.instance is None else c.instance.instance_id
        actions.append(Action(c.kind, c.pool, instance_id, c.spec, at_s, c.duration_s, c.energy_j))

    # Wave A: everything that adds (or keeps) capacity without downtime, at once.
    ready_s: dict[str, float] = defaultdict(lambda: now_s)
    level: dict[str, float] = dict(capacity_now)
    wave_b: list[_Change] = []
    for c in changes:
        if c.kind == "start":
            emit(c, now_s)
            ready_s[c.pool] = now_s + c.duration_s
            level[c.pool] += c.capacity_delta_rps
        elif c.kind == "clock" and c.capacity_delta_rps >= 0.0:
            emit(c, now_s)
            level[c.pool] += c.capacity_delta_rps
        else:
            wave_b.append(c)

    # Wave B: largest power saving first; each pool's serving level kept >= its floor.
    wave_b.sort(key=lambda c: (-c.saving_w, -c.energy_j, c.instance.instance_id if c.instance else -1))
    floor = {p: min(need[p], capacity_now[p]) for p in need}
    returns: dict[str, list[tuple[float, float]]] = defaultdict(list)  # pool -> (time back, capacity)
    cursor_s = now_s
    last_disruptive_s = -math.inf

    def fits(c: _Change, at_s: float) -> bool:
        # `level` already counts committed TP changes at their new capacity; those still down are not
        # serving. Later returns only add capacity, so checking at `at_s` covers the whole future.
        in_flight = sum(cap for t, cap in returns[c.pool] if t > at_s)
        serving = level[c.pool] - in_flight
        tolerance = _CAPACITY_RTOL * max(1.0, floor[c.pool])
        return serving - c.capacity_loss_rps >= floor[c.pool] - tolerance

    def commit(c: _Change, at_s: float) -> None:
        nonlocal cursor_s, last_disruptive_s
        emit(c, at_s)
        cursor_s = max(cursor_s, at_s)
        if c.kind == "clock":
            level[c.pool] += c.capacity_delta_rps
            return
        last_disruptive_s = at_s
        if c.kind == "stop":
            level[c.pool] -= c.capacity_old_rps
        else:
            level[c.pool] += c.capacity_delta_rps
            returns[c.pool].append((at_s + c.duration_s, c.capacity_old_rps + c.capacity_delta_rps))

    def earliest(c: _Change) -> float:
        t = max(cursor_s, ready_s[c.pool])
        if c.kind != "clock":
            t = max(t, last_disruptive_s + costs.stagger_s)
        return t

    pending = wave_b
    while pending:
        progressed = False
        still: list[_Change] = []
        for c in pending:
            t = earliest(c)
            candidates = [t, *sorted(tb for tb, _ in returns[c.pool] if tb > t)]
            at = next((x for x in candidates if fits(c, x)), None)
            if at is None:
                still.append(c)
            else:
                commit(c, at)
                progressed = True
        if not progressed:
            # No order keeps the floor (a restart TP change without spare GPUs or margin): run the
            # change that adds most first, alone, after everything in flight is back.
            still.sort(key=lambda c: -c.capacity_delta_rps)
            c = still.pop(0)
            back_s = max([earliest(c), *(tb for tb, _ in returns[c.pool])])
            commit(c, back_s)
        pending = still

    release_s = max([now_s, *(a.not_before_s for a in actions)])
    for c in deferred_starts:
        emit(c, release_s)

    order = {k: i for i, k in enumerate(ACTION_KINDS)}
    actions.sort(key=lambda a: (a.not_before_s, order[a.kind]))
    return tuple(actions)
