"""`GrpcFleet`: the only code of the controller that talks to agents (through `agent.api.client`).

Where it sits: the loops (`controller.loops`) own the control cycle and the desired state
(`controller.fleet.desired`); this module keeps, per configured node, one `NodeLink`:

- a supervisor reads the agent's inventory and keeps one telemetry stream open (GPU power and energy
  counters, engine queues), reconnecting with backoff; a node that has not answered for
  `unavailable_after_s` is UNAVAILABLE (the listener takes its capacity out of the cycle), and its GPUs
  return to their defaults by the agent's own lease;
- a lease keeper renews the lease of the GPU configuration in force every `lease_s x renew_fraction`
  (in every mode, so a paused controller keeps the clocks it applied);
- a reconciler (apply mode only) compares the node's target with a fresh inventory and calls the agent
  until they agree: ReconfigureEngine for engines that should run, StopEngine for engines that should
  not (and for engines the controller does not know: no GPU is left unmanaged), ApplyGpuConfig when a
  GPU's locked clock differs from its target. Every call carries a generation from the store's one
  counter; a call repeated after a lost reply or a restart carries the same generation and the agent
  answers it as a replay, so no action is ever done twice.

Errors are split as controller-runtime does: temporary (UNAVAILABLE, DEADLINE_EXCEEDED, an engine that
failed to start, a GPU still held by a draining engine) are retried with exponential backoff; permanent
(INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, NOT_FOUND, UNSUPPORTED) are recorded and shown
(`dctl cluster nodes`) and not retried until the target changes. A stale generation (ABORTED) makes the
link raise the counter above what the agent holds and call again with a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from agent.api.client import AgentClient, ClientTls, GpuClockSetting
from agent.api.errors import (
    ConflictError,
    DynamoError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnsupportedError,
)
from agent.api.v1 import common_pb2, telemetry_pb2
from controller.fleet.desired import DesiredState, EngineTarget, NodeTarget, instance_of
from controller.model.fleet import FleetView, InstanceView

log = structlog.get_logger("controller.fleet")

PERMANENT_ERRORS: tuple[type[DynamoError], ...] = (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    NotFoundError,
    UnsupportedError,
)
_READY = common_pb2.ENGINE_STATE_READY
_GONE = (common_pb2.ENGINE_STATE_STOPPED, common_pb2.ENGINE_STATE_FAILED)
# The simulated engine's option for its start-up time (docs/simulated-node.md).
STARTUP_OPTION = "startup-s"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One configured node: its name, gRPC address and credentials."""

    name: str
    address: str
    token: str | None = field(default=None, repr=False)
    tls: ClientTls | None = None


@dataclass(frozen=True, slots=True)
class FleetSettings:
    model: str  # the model engines serve (the profile's)
    lease_s: float = 60.0
    renew_fraction: float = 1.0 / 3.0
    telemetry_period_s: float = 1.0
    call_timeout_s: float = 10.0
    unavailable_after_s: float = 10.0
    reconcile_period_s: float = 0.5
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    engine_options: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 0.0  # 0: the agent's default
    time_scale: float = 1.0  # simulated engines start load_s / time_scale after the call
    # How the profile's GPU type reads in NVML's GPU names (empty: not checked): a node whose GPUs are of
    # another type is refused (never READY, a permanent error naming both).
    gpu_names: tuple[str, ...] = ()


class FleetListener(Protocol):
    """What the loops hear from the fleet (called on the event loop)."""

    def instance_ready(self, instance_id: int) -> None: ...

    def instance_idle(self, node: int, engine_id: str, instance_id: int) -> None: ...

    def node_state(self, node: int, available: bool) -> None: ...

    def command_result(self, command_id: int, status: str, result: str) -> None: ...

    def command_attempt(self, command_id: int, result: str) -> None: ...

    def next_generation(self, at_least: int) -> int: ...

    def energy(self, node: int, pool: str, energy_j: float) -> None: ...


class State:
    CONNECTING = "CONNECTING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class _Backoff:
    """Per key, when the next try is allowed (exponential, reset on success)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self._next: dict[str, tuple[float, float]] = {}

    def due(self, key: str, now_s: float) -> bool:
        entry = self._next.get(key)
        return entry is None or now_s >= entry[0]

    def fail(self, key: str, now_s: float) -> float:
        delay = self.initial_s if key not in self._next else min(self.max_s, 2 * self._next[key][1])
        self._next[key] = (now_s + delay, delay)
        return delay

    def block(self, key: str) -> None:
        """A permanent error: no retry until `reset` (the target changed)."""
        self._next[key] = (math.inf, self.max_s)

    def reset(self, key: str) -> None:
        self._next.pop(key, None)


class NodeLink:
    """One node (module docstring). `desired` is shared with the loops and read at every pass."""

    def __init__(
        self,
        index: int,
        config: NodeConfig,
        settings: FleetSettings,
        desired: Callable[[], DesiredState],
        listener: FleetListener,
        *,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.config = config
        self.settings = settings
        self._desired = desired
        self._listener = listener
        self._now = monotonic_s
        self.client = AgentClient(
            config.address, token=config.token, tls=config.tls, timeout_s=settings.call_timeout_s
        )
        self.state = State.CONNECTING
        self.inventory: telemetry_pb2.GetInventoryResponse | None = None
        # A node that never answers is as silent as one that stopped: counted from the link's creation.
        self.last_seen_s = monotonic_s()
        self.last_seen_unix_ns = 0
        self.last_error = ""
        self.last_error_permanent = False
        self.power_w: dict[int, float] = {}
        self.engine_metrics: dict[str, common_pb2.EngineMetrics] = {}
        self._energy_j: dict[int, float] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._backoff = _Backoff(settings.retry_initial_s, settings.retry_max_s)
        self._wake = asyncio.Event()
        self.apply_enabled = False
        self._reported: set[tuple[str, int, bool]] = set()  # (engine, generation, running) told to the cycle
        self._highest_seen = 0  # the highest generation the agent was seen holding

    # ------------------------------------------------------------------ life cycle
    def tasks(self) -> list[asyncio.Task[None]]:
        name = self.config.name
        return [
            asyncio.create_task(self._supervise(), name=f"node-{name}-telemetry"),
            asyncio.create_task(self._keep_lease(), name=f"node-{name}-lease"),
            asyncio.create_task(self._reconcile_loop(), name=f"node-{name}-reconcile"),
            asyncio.create_task(self._watch_silence(), name=f"node-{name}-silence"),
        ]

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        for task in list(self._inflight.values()):
            with contextlib.suppress(asyncio.CancelledError, DynamoError):
                await task
        await self.client.close()

    def wake(self) -> None:
        self._wake.set()

    @property
    def available(self) -> bool:
        return self.state == State.READY

    # ------------------------------------------------------------------ reading
    def _seen(self) -> None:
        self.last_seen_s = self._now()
        self.last_seen_unix_ns = time.time_ns()
        if self.state != State.READY:
            self.state = State.READY
            log.info("node_ready", node=self.config.name, address=self.config.address)
            self._listener.node_state(self.index, True)

    def _failed(self, exc: DynamoError, what: str) -> None:
        self.last_error = f"{what}: {exc}"
        self.last_error_permanent = isinstance(exc, PERMANENT_ERRORS)

    async def _read_inventory(self) -> telemetry_pb2.GetInventoryResponse:
        inventory = await self.client.inventory()
        self._check_gpus(inventory)
        self.inventory = inventory
        self._seen()
        # Agents are the truth: the controller's counter never trails a generation an agent holds.
        self._highest_seen = max(
            [self._highest_seen, inventory.lease.generation, *(e.generation for e in inventory.engines)]
        )
        return inventory

    def _check_gpus(self, inventory: telemetry_pb2.GetInventoryResponse) -> None:
        if self.settings.gpu_names:
            check_gpu_type(self.config.name, inventory, self.settings.gpu_names)

    def _generation(self) -> int:
        return self._listener.next_generation(self._highest_seen)

    async def _supervise(self) -> None:
        backoff = _Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while True:
            try:
                await self._read_inventory()
                backoff.reset("stream")
                stream = self.client.stream_telemetry(
                    period_s=self.settings.telemetry_period_s, include_engines=True
                )
                async with contextlib.aclosing(stream):
                    async for sample in stream:
                        self._on_sample(sample)
            except DynamoError as exc:
                self._failed(exc, "telemetry")
            await asyncio.sleep(backoff.fail("stream", self._now()))

    def _on_sample(self, sample: telemetry_pb2.TelemetrySample) -> None:
        self._seen()
        desired = self._desired()
        for gpu in sample.gpus:
            self.power_w[gpu.gpu_index] = gpu.power_w
            before = self._energy_j.get(gpu.gpu_index)
            self._energy_j[gpu.gpu_index] = gpu.energy_j
            if before is not None and gpu.energy_j >= before:
                pool = desired.pool_of_gpu(self.index, gpu.gpu_index)
                self._listener.energy(self.index, pool, gpu.energy_j - before)
        self.engine_metrics = {e.engine_id: e for e in sample.engines}

    async def _watch_silence(self) -> None:
        period_s = min(1.0, self.settings.unavailable_after_s / 4)
        while True:
            await asyncio.sleep(period_s)
            silent_s = self._now() - self.last_seen_s
            if self.state != State.UNAVAILABLE and silent_s > self.settings.unavailable_after_s:
                self.state = State.UNAVAILABLE
                log.warning("node_unavailable", node=self.config.name, silent_s=round(silent_s, 1))
                self._listener.node_state(self.index, False)

    # ------------------------------------------------------------------ lease
    async def _keep_lease(self) -> None:
        period_s = self.settings.lease_s * self.settings.renew_fraction
        while True:
            await asyncio.sleep(period_s)
            lease = self.inventory.lease if self.inventory is not None else None
            if lease is None or not lease.active or not self.available:
                continue
            try:
                reply = await self.client.renew_lease(lease.generation, lease_s=self.settings.lease_s)
                self.inventory.lease.CopyFrom(reply.lease)  # type: ignore[union-attr]
            except (ConflictError, FailedPreconditionError):
                # Someone applied since (or the lease ran out): the reconciler re-reads and re-applies.
                self.wake()
            except DynamoError as exc:
                self._failed(exc, "RenewLease")

    # ------------------------------------------------------------------ reconciling
    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_period_s)
            self._wake.clear()
            if not (self.available and self.apply_enabled):
                continue
            try:
                inventory = await self._read_inventory()
            except DynamoError as exc:
                self._failed(exc, "GetInventory")
                continue
            self.reconcile(self._desired().nodes[self.index], inventory)

    def reconcile(self, target: NodeTarget, inventory: telemetry_pb2.GetInventoryResponse) -> None:
        """One pass: report what is done, start the calls still needed (none while one for the same
        engine or for the clocks is in flight)."""
        actual = {e.engine_id: e for e in inventory.engines}
        for eid, want in list(target.engines.items()):
            self._reconcile_engine(want, actual.get(eid))
        for eid, engine in actual.items():
            if eid not in target.engines and engine.state not in _GONE:
                self._launch(eid, lambda eid=eid: self._stop_unknown(eid))  # type: ignore[misc]
        self._reconcile_clocks(target, inventory)

    def _reconcile_engine(self, want: EngineTarget, engine: common_pb2.EngineInfo | None) -> None:
        if want.running:
            if engine is not None and engine.state == _READY and engine.generation == want.generation:
                self._report(want, True)
            elif engine is not None and engine.state in _GONE and engine.generation >= want.generation:
                # The agent acted on this generation and the engine has stopped or failed since (the
                # agent restarted, the engine crashed): the same generation would only be answered as a
                # replay of that earlier outcome, starting nothing. A new one starts it again.
                self._launch(want.engine_id, lambda: self._start_again(want))
            else:
                self._launch(want.engine_id, lambda: self._start(want))
            return
        if engine is None or engine.state in _GONE:
            self._report(want, False)
        else:
            self._launch(want.engine_id, lambda: self._stop(want))

    def _report(self, want: EngineTarget, running: bool) -> None:
        key = (want.engine_id, want.generation, running)
        if key in self._reported:
            return
        self._reported.add(key)
        if want.command_id:
            self._listener.command_result(want.command_id, "done", "")
        if running:
            self._listener.instance_ready(want.instance_id)
        else:
            self._listener.instance_idle(self.index, want.engine_id, want.instance_id)

    def _launch(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work()` as the one call in flight for `key`, unless one is or its backoff is not over."""
        if key in self._inflight or not self._backoff.due(key, self._now()):
            return
        self._inflight[key] = asyncio.create_task(self._guarded(key, work), name=f"{self.config.name}-{key}")

    async def _guarded(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
            self._backoff.reset(key)
        except ConflictError as exc:
            self._failed(exc, key)
            self._backoff.fail(key, self._now())
        except PERMANENT_ERRORS as exc:
            self._failed(exc, key)
            self._backoff.block(key)
            log.error("agent_call_refused", node=self.config.name, key=key, error=str(exc))
        except DynamoError as exc:
            self._failed(exc, key)
            delay_s = self._backoff.fail(key, self._now())
            log.warning("agent_call_failed", node=self.config.name, key=key, error=str(exc), retry_s=delay_s)
        finally:
            self._inflight.pop(key, None)
            self.wake()

    def _engine_options(self, want: EngineTarget) -> dict[str, str]:
        options = dict(self.settings.engine_options)
        if want.load_s > 0 and STARTUP_OPTION not in options and self._simulated():
            options[STARTUP_OPTION] = f"{want.load_s / self.settings.time_scale:.3f}"
        return options

    def _simulated(self) -> bool:
        return (
            self.inventory is not None and self.inventory.gpu_backend == common_pb2.GPU_BACKEND_KIND_SIMULATED
        )

    async def _start(self, want: EngineTarget) -> None:
        desired = self._desired()
        try:
            reply = await self.client.reconfigure_engine(
                want.generation,
                want.engine_id,
                model=self.settings.model,
                gpu_indices=want.gpu_indices,
                tp_degree=want.tp,
                engine_options=self._engine_options(want),
                ready_timeout_s=self.settings.ready_timeout_s,
                timeout_s=self.settings.call_timeout_s + 660.0,
            )
        except ConflictError:
            desired.regenerate(self.index, want.engine_id, self._generation())
            raise
        except DynamoError as exc:
            if want.command_id:
                self._listener.command_attempt(want.command_id, str(exc))
            if not isinstance(exc, PERMANENT_ERRORS):
                # The agent recorded the failure under this generation: a retry needs a new one.
                desired.regenerate(self.index, want.engine_id, self._generation())
            elif want.command_id:
                self._listener.command_result(want.command_id, "failed", str(exc))
            raise
        log.info(
            "engine_started",
            node=self.config.name,
            engine_id=want.engine_id,
            tp=want.tp,
            restarted=reply.restarted,
            replayed=reply.replayed,
            start_s=round(reply.start_s, 3),
        )

    async def _start_again(self, want: EngineTarget) -> None:
        desired = self._desired()
        desired.regenerate(self.index, want.engine_id, self._generation())
        target = desired.nodes[self.index].engines.get(want.engine_id)
        if target is not None:
            await self._start(target)

    async def _stop(self, want: EngineTarget) -> None:
        desired = self._desired()
        try:
            await self.client.stop_engine(
                want.generation,
                want.engine_id,
                drain_timeout_s=want.drain_timeout_s,
                timeout_s=self.settings.call_timeout_s + want.drain_timeout_s + 60.0,
            )
        except NotFoundError:
            return  # never started on the agent: nothing to stop
        except ConflictError:
            desired.regenerate(self.index, want.engine_id, self._generation())
            raise

    async def _stop_unknown(self, engine_id: str) -> None:
        log.warning("engine_not_desired", node=self.config.name, engine_id=engine_id)
        await self.client.stop_engine(
            self._generation(), engine_id, drain_timeout_s=0.0, timeout_s=self.settings.call_timeout_s + 60.0
        )

    def _reconcile_clocks(self, target: NodeTarget, inventory: telemetry_pb2.GetInventoryResponse) -> None:
        gpus = {g.gpu_index: g for g in inventory.gpus}
        want = {
            gpu: _snap(clock, gpus[gpu].supported_sm_clocks_mhz)
            for gpu, clock in target.clocks_mhz.items()
            if gpu in gpus
        }
        locked = {
            g.gpu_index: g.sm_clock_lock.max_clock_mhz for g in inventory.gpus if g.HasField("sm_clock_lock")
        }
        if all(locked.get(gpu) == clock for gpu, clock in want.items()) and (
            not want or inventory.lease.active
        ):
            for command_id in target.clock_command_ids:
                self._listener.command_result(command_id, "done", "")
            target.clock_command_ids.clear()
            return
        self._launch("clocks", lambda: self._apply_clocks(want))

    async def _apply_clocks(self, want: Mapping[int, int]) -> None:
        settings = [GpuClockSetting(gpu, clock, clock) for gpu, clock in sorted(want.items())]
        reply = await self.client.apply_gpu_config(
            self._generation(), settings, lease_s=self.settings.lease_s
        )
        if self.inventory is not None:
            self.inventory.lease.CopyFrom(reply.lease)
        log.info("clocks_applied", node=self.config.name, clocks_mhz=dict(sorted(want.items())))

    # ------------------------------------------------------------------ views
    def instance_views(self) -> dict[int, InstanceView]:
        views: dict[int, InstanceView] = {}
        for eid, metrics in self.engine_metrics.items():
            instance = instance_of(eid)
            if instance is not None:
                views[instance] = InstanceView(
                    instance, metrics.waiting_requests_count, metrics.running_requests_count, math.inf, 0
                )
        return views

    def total_power_w(self) -> float:
        return sum(self.power_w.values())


def check_gpu_type(node: str, inventory: telemetry_pb2.GetInventoryResponse, names: Sequence[str]) -> None:
    """InvalidArgumentError naming `profile.gpu` when a GPU of `node` is not of the profile's type (its
    NVML name contains none of `names`)."""
    wrong = [g for g in inventory.gpus if not any(n in g.name for n in names)]
    if wrong:
        raise InvalidArgumentError(
            "profile.gpu",
            " or ".join(names),
            f"the GPU type of node {node!r}: its GPU {wrong[0].gpu_index} is a {wrong[0].name!r}",
        )


def _snap(clock_mhz: int, supported: Sequence[int]) -> int:
    """The lowest supported clock at or above the target (the fastest when none is): a GPU whose grid
    lacks the profile's clock (real H100s step by 15 MHz) runs no slower than planned."""
    above = [c for c in supported if c >= clock_mhz]
    if above:
        return min(above)
    return max(supported) if supported else clock_mhz


class GrpcFleet:
    """Every configured node's link; the fleet view the cycle sees."""

    def __init__(
        self,
        nodes: Sequence[NodeConfig],
        settings: FleetSettings,
        desired: Callable[[], DesiredState],
        listener: FleetListener,
    ) -> None:
        self.links = [NodeLink(i, n, settings, desired, listener) for i, n in enumerate(nodes)]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for link in self.links:
            self._tasks += link.tasks()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for link in self.links:
            await link.close()

    def set_apply(self, enabled: bool) -> None:
        for link in self.links:
            link.apply_enabled = enabled
            link.wake()

    def wake(self) -> None:
        for link in self.links:
            link.wake()

    def view(self, routed: Mapping[int, int]) -> FleetView:
        views: dict[int, InstanceView] = {}
        for link in self.links:
            views.update(link.instance_views())
        for instance, count in routed.items():
            v = views.get(instance) or InstanceView(instance, 0, 0, math.inf, 0)
            views[instance] = InstanceView(instance, v.waiting, v.running, v.earliest_deadline_s, count)
        return FleetView(views)
