"""The desired state of the fleet: what every node should run, from the control cycle's commands. Pure.

Where it sits: the loops (`controller.loops`) hand each command of a `TickResult` to
`DesiredState.apply` with the generation the store issued for it; the gRPC fleet
(`controller.fleet.grpc_fleet`) compares each node's target with the agent's inventory and calls the
agent until they agree (level-based: a lost reply, a restarted agent or a restarted controller all end in
the same comparison, never in a repeated edge). The desired state is persisted with the cycle (the
store's snapshot), so a controller killed at any moment resumes with the very targets and generations it
had handed out: a repeated call carries the same generation and the agent answers it as a replay.

Engines are named `i<instance id>` (ids are never reused by the cycle). A start sets the engine's target
to running on its GPU set, with its GPUs' clock; a drain or an aborted start sets it to stopped (the agent
drains in-flight requests first); a clock change sets the clock of the instance's GPUs. Clocks are kept
per GPU: a GPU whose instance left keeps its last clock until the next instance on it sets its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from agent.api.errors import InvalidArgumentError
from controller.model.fleet import AbortStart, Command, DrainInstance, SetClock, StartInstance

ENGINE_PREFIX = "i"


def engine_id(instance_id: int) -> str:
    return f"{ENGINE_PREFIX}{instance_id}"


def instance_of(engine: str) -> int | None:
    """The instance id of one of the controller's engine ids; None for any other name."""
    digits = engine[len(ENGINE_PREFIX) :]
    if not engine.startswith(ENGINE_PREFIX) or not digits.isdigit():
        return None
    return int(digits)


@dataclass(frozen=True, slots=True)
class EngineTarget:
    """One engine as it should be: running on its GPUs with its TP degree, or stopped. `generation` is
    the engine-scope generation of the command that set this target; `command_id` the store row that is
    done when the agent confirms it; `load_s` the modelled start time (a simulated engine is told to take
    it); `drain_timeout_s` how long in-flight requests get when it stops; `ready_not_before_s` when the
    cycle modelled the start to end."""

    engine_id: str
    instance_id: int
    pool: str
    node: int
    gpu_indices: tuple[int, ...]
    tp: int
    running: bool
    generation: int
    command_id: int = 0
    load_s: float = 0.0
    drain_timeout_s: float = 0.0
    ready_not_before_s: float = 0.0  # the cycle's time its start was modelled to end (at_s + load_s)


@dataclass(slots=True)
class NodeTarget:
    """What one node should run: its engines by id, and the locked SM clock of each GPU that has one.
    `clock_command_ids`: the clock commands done once the node's clocks are as targeted."""

    engines: dict[str, EngineTarget] = field(default_factory=dict)
    clocks_mhz: dict[int, int] = field(default_factory=dict)
    clock_command_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Addressed:
    """Where a command goes: the node index (-1: no node, e.g. a queue command for the router) and the
    engine id on it ("" for none)."""

    node: int
    target: str


class DesiredState:
    """Per node index, its `NodeTarget` (see the module docstring)."""

    def __init__(self, nodes: int, *, drain_timeout_s: float) -> None:
        if nodes < 1:
            raise InvalidArgumentError("nodes", nodes, ">= 1")
        self.nodes = [NodeTarget() for _ in range(nodes)]
        self.drain_timeout_s = drain_timeout_s

    def engine(self, instance_id: int) -> EngineTarget | None:
        eid = engine_id(instance_id)
        for node in self.nodes:
            target = node.engines.get(eid)
            if target is not None:
                return target
        return None

    def address(self, command: Command) -> Addressed:
        """Where `command` acts; a command for an instance the state does not know addresses no node."""
        if isinstance(command, StartInstance):
            return Addressed(command.gpus.node, engine_id(command.instance_id))
        target = self.engine(command.instance_id)
        if target is None or not isinstance(command, DrainInstance | AbortStart | SetClock):
            return Addressed(-1, "")
        return Addressed(target.node, target.engine_id)

    def apply(self, command: Command, generation: int, command_id: int = 0) -> bool:
        """Fold `command` into the targets; False when it addresses no node (nothing to do here)."""
        if isinstance(command, StartInstance):
            gpus = command.gpus
            if not 0 <= gpus.node < len(self.nodes):
                raise InvalidArgumentError("gpus.node", gpus.node, f"0..{len(self.nodes) - 1}")
            indices = tuple(range(gpus.first_gpu, gpus.first_gpu + gpus.count))
            node = self.nodes[gpus.node]
            eid = engine_id(command.instance_id)
            node.engines[eid] = EngineTarget(
                eid,
                command.instance_id,
                command.pool,
                gpus.node,
                indices,
                command.spec.tp,
                True,
                generation,
                command_id,
                command.load_s,
                self.drain_timeout_s,
                command.at_s + command.load_s,
            )
            for gpu in indices:
                node.clocks_mhz[gpu] = command.spec.clock_mhz
            return True
        target = (
            self.engine(command.instance_id)
            if isinstance(command, DrainInstance | AbortStart | SetClock)
            else None
        )
        if target is None:
            return False
        node = self.nodes[target.node]
        if isinstance(command, SetClock):
            for gpu in target.gpu_indices:
                node.clocks_mhz[gpu] = command.clock_mhz
            if command_id:
                node.clock_command_ids.append(command_id)
            return True
        drain_s = 0.0 if isinstance(command, AbortStart) else self.drain_timeout_s
        node.engines[target.engine_id] = replace(
            target, running=False, generation=generation, command_id=command_id, drain_timeout_s=drain_s
        )
        return True

    def regenerate(self, node: int, engine: str, generation: int) -> None:
        """A target's generation was refused as stale by the agent: it carries `generation` from now on."""
        target = self.nodes[node].engines.get(engine)
        if target is not None:
            self.nodes[node].engines[engine] = replace(target, generation=generation)

    def forget(self, node: int, engine: str) -> None:
        """A stopped engine whose stop the cycle has heard of: nothing more to do for it."""
        self.nodes[node].engines.pop(engine, None)

    def pool_of_gpu(self, node: int, gpu: int) -> str:
        """The pool of the running engine target holding `gpu` ("" when none), for the energy ledger."""
        for target in self.nodes[node].engines.values():
            if target.running and gpu in target.gpu_indices:
                return target.pool
        return ""
