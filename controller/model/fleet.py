"""What the control cycle sees of the fleet and what it asks the fleet to do: pure values.

Flow: a fleet (the simulator's `SimFleet`, later the daemon's gRPC fleet) reports a `FleetView` (per
instance its queue, batch and the requests routed to it since the last tick) and the `FleetEvent`s that
happened (an instance became ready, a draining instance went idle); the caller classifies the arrivals
(`Arrivals`). `controller.control.ControlCycle` answers with `Command`s, a routing table and decisions.
The fleet executes the commands in order and reports their effects back as events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.cluster import InstanceSpec


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as its fleet reports it at a tick."""

    instance_id: int
    waiting: int  # requests queued, not yet started
    running: int  # requests in its batch
    earliest_deadline_s: float  # TTFT deadline of the most urgent waiting request (inf: none waits)
    routed: int  # requests routed to it since the previous tick


@dataclass(frozen=True, slots=True)
class FleetView:
    """Per instance id, what its fleet measured. Instances the cycle started but the fleet does not list
    (still starting) count as empty."""

    instances: Mapping[int, InstanceView] = field(default_factory=dict)

    def of(self, instance_id: int) -> InstanceView:
        view = self.instances.get(instance_id)
        return view if view is not None else InstanceView(instance_id, 0, 0, float("inf"), 0)


@dataclass(frozen=True, slots=True)
class InstanceReady:
    """A started instance finished loading at `at_s` and serves from then on."""

    instance_id: int
    at_s: float


@dataclass(frozen=True, slots=True)
class InstanceIdle:
    """A draining instance finished its last request at `at_s`; its GPUs are free from then on."""

    instance_id: int
    at_s: float


FleetEvent = InstanceReady | InstanceIdle


@dataclass(frozen=True, slots=True)
class Arrivals:
    """Requests admitted since the previous tick: arrival times (s, sorted), the class index
    (`controller.model.classes.REQUEST_CLASSES` order) the router classified each into, and their prompt
    lengths in tokens (None: not reported)."""

    arrival_s: npt.NDArray[np.float64]
    class_index: npt.NDArray[np.int64]
    input_tokens: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        if self.arrival_s.shape != self.class_index.shape:
            raise InvalidArgumentError(
                "class_index", self.class_index.shape, f"the shape of arrival_s {self.arrival_s.shape}"
            )
        if self.input_tokens is not None and self.input_tokens.shape != self.arrival_s.shape:
            raise InvalidArgumentError(
                "input_tokens", self.input_tokens.shape, f"the shape of arrival_s {self.arrival_s.shape}"
            )

    @staticmethod
    def none() -> Arrivals:
        return Arrivals(np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64))


@dataclass(frozen=True, slots=True)
class Completions:
    """Requests finished since the previous tick, per routed class (index order of
    `controller.model.classes.REQUEST_CLASSES`): how many met their SLO (TTFT and mean TBT within the
    targets of their class) and how many finished in all (a request rejected past its deadline, or that
    no instance could take, counts as finished and missed). Empty tuples: nothing finished.

    `served[r][t]`: of the requests routed as class r, how many turned out to be of class t (their true
    output length is known once they finish): what a pool planned for class r really served. Empty:
    not reported (the routed class is then taken as the true one)."""

    met: tuple[int, ...] = ()
    total: tuple[int, ...] = ()
    served: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.met) != len(self.total) or any(
            not 0 <= m <= t for m, t in zip(self.met, self.total, strict=True)
        ):
            raise InvalidArgumentError("met", (self.met, self.total), "0 <= met <= total, per class")
        if self.served and (
            len(self.served) != len(self.total)
            or any(len(row) != len(self.total) or min(row) < 0 for row in self.served)
        ):
            raise InvalidArgumentError(
                "served", len(self.served), "a square table of counts >= 0, one row per class"
            )

    def any(self) -> bool:
        return sum(self.total) > 0


@dataclass(frozen=True, slots=True)
class GpuSet:
    """`count` consecutive GPUs of one node starting at `first_gpu` (tensor parallelism never spans
    nodes)."""

    node: int
    first_gpu: int
    count: int


# ---------------------------------------------------------------------------------------------- commands
# Each command carries `at_s`: when it takes effect (the tick's time, or the earlier moment an event
# made it possible, e.g. the instant a drained instance freed the GPUs a start waits for).


@dataclass(frozen=True, slots=True)
class StartInstance:
    """Load an engine of `spec` on `gpus`; it serves once ready, `load_s` after `at_s` (0: at once)."""

    instance_id: int
    pool: str
    spec: InstanceSpec
    gpus: GpuSet
    at_s: float
    load_s: float


@dataclass(frozen=True, slots=True)
class DrainInstance:
    """Admit nothing more; hand the not-yet-started requests back to the router; release the GPUs when
    the running ones are done (the fleet reports `InstanceIdle`)."""

    instance_id: int
    at_s: float


@dataclass(frozen=True, slots=True)
class AbortStart:
    """Stop an instance that is still loading; its GPUs are free at once."""

    instance_id: int
    at_s: float


@dataclass(frozen=True, slots=True)
class SetClock:
    """Lock the instance's SM clock; the engine stalls `stall_s` while the change is made."""

    instance_id: int
    clock_mhz: int
    at_s: float
    stall_s: float


@dataclass(frozen=True, slots=True)
class RejectPastDeadline:
    """Refuse the instance's waiting requests whose TTFT deadline is before `at_s` (escalation's last
    resort: they would miss anyway and delay everyone behind them)."""

    instance_id: int
    at_s: float


@dataclass(frozen=True, slots=True)
class MoveWaiting:
    """Take the instance's waiting requests with a deadline before `deadline_before_s` and route each
    again to the least loaded instance of its pool or a larger one (this one included)."""

    instance_id: int
    at_s: float
    deadline_before_s: float


Command = StartInstance | DrainInstance | AbortStart | SetClock | RejectPastDeadline | MoveWaiting


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Where the router sends each class (index order of REQUEST_CLASSES): `primary[c]` the ACTIVE
    instances of the class's pool, `fallback[c]` those of larger pools (tried when no primary instance
    can take the request), each as (instance id, routing weight). The weight is 1 / the instance's
    SLO-meeting capacity for its pool's mix, so least `outstanding tokens x weight` loads instances in
    proportion to their capacity. `version` grows with every change."""

    version: int
    primary: tuple[tuple[tuple[int, float], ...], ...]
    fallback: tuple[tuple[tuple[int, float], ...], ...]
