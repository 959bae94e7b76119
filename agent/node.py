"""The node agent's state and actions: one `NodeAgent` per agent process, behind the gRPC servicers.

Flow of a control call: servicer (`agent.service`, after `agent.api.auth`) -> `NodeAgent` method ->
`agent.scopes.run_scoped`: generation check (`agent.api.generations`), validation into a plan
(`agent.control`), then an OPERATION the scope owns, shielded from the caller: the action (`agent.safety`
for GPUs, `agent.engine.driver` for engines), its outcome recorded under the generation and persisted
with the rest of the state (`agent.safety.StateStore`), and the reply, built by `agent.convert`. Reads
(GetInventory, the telemetry sampler's engine scrape) come here too; the lease timer
(`agent.lease.LeaseWatcher`) calls back into `_on_lease_expiry`.

Invariants (docs/agent.md, *Safety model*):
- Lease first, write-ahead: an ApplyGpuConfig arms its lease, then saves the state file naming its
  generation, its target settings and every GPU it may modify, and only then writes the hardware.
  RestoreDefaults saves what it is about to write first, too; ReconfigureEngine and StopEngine save their
  pending record before the engine driver changes anything.
- An operation, once started, completes or rolls back whatever its caller does; a caller that goes away
  is told nothing more, but the `on_detached` hook of the control methods receives the final outcome.
- At start-up (`recover`), the state of a dead agent is restored, never completed: every GPU it may have
  modified goes back to its snapshot, its pending calls are recorded as interrupted (ABORTED).
- Shutdown waits for a GPU operation in progress (it is short), interrupts engine operations (a model
  load may take minutes; the engines are stopped anyway), then restores every GPU.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message

from agent.api.clock import Clock
from agent.api.errors import DynamoError, PermissionDeniedError, UnavailableError
from agent.api.generations import ScopeRecord, check_generation, check_generation_value, fingerprint
from agent.api.v1 import common_pb2, control_pb2, telemetry_pb2
from agent.control import (
    ApplyPlan,
    EnginePlan,
    EngineRequirements,
    validate_apply,
    validate_engine_id,
    validate_reconfigure,
    validate_renew,
    validate_restore,
    validate_stop,
)
from agent.convert import (
    applied_gpu_config_pb,
    engine_info_pb,
    engine_metrics_pb,
    gpu_backend_pb,
    gpu_info_pb,
    lease_pb,
)
from agent.engine.driver import LIVE_STATES, EngineDriver, EngineSpec, EngineStatus
from agent.gpu.worker import GpuWorkers
from agent.lease import LeaseBook, LeaseView, LeaseWatcher
from agent.safety import (
    ENGINE_SCOPE_PREFIX,
    GPU_SCOPE_KEY,
    AgentStateDoc,
    GpuSafety,
    PendingCall,
    StateStore,
    pending_gpu_writes,
    read_boot_id,
    settle_interrupted,
    state_for_boot,
)
from agent.scopes import DetachedHook, GenerationScope, retrieve_exception, run_scoped
from agent.settings import AgentSettings
from agent.telemetry import TelemetrySampler

log = structlog.get_logger("agent.node")

AGENT_VERSION = "0.1.0"
T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R", bound=Message)


def _own_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """`coro` in a task of its own: cancelling whoever awaits it (through `asyncio.shield`) leaves it
    running to its end."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(retrieve_exception)
    return task


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class NodeAgent:
    """Everything the services act on (see module docstring)."""

    def __init__(
        self,
        settings: AgentSettings,
        workers: GpuWorkers,
        driver: EngineDriver,
        clock: Clock,
        store: StateStore,
        doc: AgentStateDoc,
        *,
        boot_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.driver = driver
        self.clock = clock
        self._store = store
        self._persist_lock = asyncio.Lock()
        self._state_version = 0
        current = state_for_boot(doc, read_boot_id() if boot_id is None else boot_id)
        self._interrupted = dict(current.pending)  # calls a dead agent left pending: `recover` reports
        self._needs_save = bool(doc.applied or doc.pending) or (
            bool(doc.defaults) and current.boot_id != doc.boot_id
        )
        settled = settle_interrupted(current)
        self.safety = GpuSafety(
            workers,
            self.persist,
            defaults=current.defaults,
            applied={**pending_gpu_writes(current), **current.applied},  # restored by `recover`
            boot_id=current.boot_id,
        )
        self.lease = LeaseBook(holder=settled.lease_holder, generation=settled.lease_generation)
        self.watcher = LeaseWatcher(self.lease, clock, self._on_lease_expiry)
        self._gpu_scope = GenerationScope("GPU-scope", GPU_SCOPE_KEY, settled.gpu_scope)
        self._engine_scopes = {k: self._new_engine_scope(k, r) for k, r in settled.engine_scopes.items()}
        self._engine_generation: dict[str, int] = {}
        self._engine_intents: dict[str, str] = {}  # engine_id -> the configuration a pending call brings
        self.requirements = EngineRequirements(
            models=settings.engine.models,
            options_allowed=settings.engine.options_allowed,
            pipeline_parallel=settings.engine.kind == "vllm",
            tp_degrees=settings.engine.tp_degrees,
            default_ready_timeout_s=settings.engine.ready_timeout_s,
        )
        self.sampler = TelemetrySampler(
            workers,
            clock,
            period_s=settings.telemetry.period_s,
            buffer=settings.telemetry.buffer,
            subscriber_queue=settings.telemetry.subscriber_queue,
            mismatch_ratio=settings.telemetry.energy_mismatch_ratio,
            scrape_engines=self.scrape_engines,
            clock_targets=lambda index: self.safety.setting(index).sm_clock_lock,
        )

    @staticmethod
    def _new_engine_scope(engine_id: str, record: ScopeRecord | None) -> GenerationScope:
        return GenerationScope(f"engine {engine_id}", ENGINE_SCOPE_PREFIX + engine_id, record)

    # ---- persistence ---------------------------------------------------------------------------------

    def _pending(self) -> dict[str, PendingCall]:
        """The write-ahead records of the operations in progress."""
        pending: dict[str, PendingCall] = {}
        scopes = [(self._gpu_scope, ""), *((s, e) for e, s in self._engine_scopes.items())]
        for scope, engine_id in scopes:
            call = scope.running
            if call is None:
                continue
            pending[scope.key] = PendingCall(
                rpc=call.rpc,
                generation=call.generation,
                fingerprint=call.fingerprint,
                started_unix_ns=call.started_unix_ns,
                gpu_writes=self.safety.writing_by_uuid() if scope is self._gpu_scope else {},
                engine=self._engine_intents.get(engine_id, ""),
            )
        return pending

    def state_doc(self) -> AgentStateDoc:
        return AgentStateDoc(
            defaults=dict(self.safety.defaults),
            applied=self.safety.applied_by_uuid(),
            gpu_scope=self._gpu_scope.durable_record,
            engine_scopes={
                k: r for k, s in self._engine_scopes.items() if (r := s.durable_record) is not None
            },
            lease_holder=self.lease.holder,
            lease_generation=self.lease.generation,
            lease_expires_unix_ns=self.lease_view().expires_unix_ns,
            pending=self._pending(),
            boot_id=self.safety.boot_id,
        )

    async def persist(self) -> None:
        """Save the state file (fsync off the event loop). Documents are numbered as they are built and
        the store never lets an older one overwrite a newer one, even if a caller was cancelled while its
        save was still running in its thread. UnavailableError when the file cannot be written."""
        async with self._persist_lock:
            self._state_version += 1
            version, doc = self._state_version, self.state_doc()
            try:
                await asyncio.to_thread(self._store.save, doc, version=version)
            except OSError as exc:
                raise UnavailableError(f"cannot save the agent state to {self._store.path}: {exc}") from exc

    # ---- start-up and shut-down --------------------------------------------------------------------

    async def recover(self, doc: AgentStateDoc) -> None:
        """Start-up: restore the GPUs a previous run may have left modified (it died without restoring
        them, maybe in the middle of a call) to their snapshot, and record its interrupted calls.
        `doc` is the state the agent was built from (kept for the signature app.py calls)."""
        for key, call in sorted(self._interrupted.items()):
            log.warning(
                "control_call_interrupted_by_restart",
                scope=key,
                rpc=call.rpc,
                generation=call.generation,
                started_unix_ns=call.started_unix_ns,
            )
        if self.safety.applied:
            async with self._gpu_scope.lock:
                restored = await self.safety.restore(self.safety.modified_indices())
                self.lease.expire()
            log.warning(
                "gpu_defaults_restored_after_crash",
                gpu_indices=restored,
                power_limits_w=[self.safety.default_power_limit_w(i) for i in restored],
            )
        if self._needs_save:
            await self.persist()

    async def shutdown(self, *, drain_timeout_s: float) -> None:
        """Interrupt engine operations, wait for a GPU operation, restore every modified GPU, release the
        lease, drain and stop engines."""
        await asyncio.gather(*(s.interrupt() for s in self._engine_scopes.values()))
        async with self._gpu_scope.lock:
            try:
                restored = await self.safety.restore(self.safety.modified_indices())
                if restored:
                    log.info("gpu_defaults_restored_on_shutdown", gpu_indices=restored)
            except DynamoError as exc:
                log.error("gpu_restore_on_shutdown_failed", error=str(exc))
            if not self.safety.applied:
                self.lease.expire()
            try:
                await self.persist()
            except DynamoError as exc:
                log.error("state_save_failed", error=str(exc))
        live = [s.spec.engine_id for s in self.driver.engines() if s.state in LIVE_STATES]
        if live:
            await asyncio.gather(
                *(self.driver.drain(e, drain_timeout_s) for e in live), return_exceptions=True
            )
        await self.driver.stop_all()
        await self.driver.close()

    async def _on_lease_expiry(self) -> None:
        # The restore runs in its own task holding the GPU scope's lock: cancelling the watcher (agent
        # stop) cannot leave it half done while shutdown takes the lock.
        await asyncio.shield(_own_task(self._expire_lease()))

    async def _expire_lease(self) -> None:
        async with self._gpu_scope.lock:
            if not self.lease.is_expired(self.clock.monotonic_s()):
                return  # renewed or re-applied while the timer fired
            generation = self.lease.generation
            restored = await self.safety.restore(self.safety.modified_indices())
            self.lease.expire()
            await self.persist()
            log.warning("lease_expired_defaults_restored", generation=generation, gpu_indices=restored)

    # ---- views ---------------------------------------------------------------------------------------

    def lease_view(self) -> LeaseView:
        return self.lease.view(now_s=self.clock.monotonic_s(), now_unix_ns=self.clock.wall_ns())

    def engine_pb(self, status: EngineStatus) -> common_pb2.EngineInfo:
        return engine_info_pb(
            status,
            kind=self.settings.engine.kind,
            generation=self._engine_generation.get(status.spec.engine_id, 0),
        )

    async def applied_pb(self, indices: Sequence[int]) -> list[control_pb2.AppliedGpuConfig]:
        limits = await asyncio.gather(*(self.workers.power_limit_w(i) for i in indices))
        return [
            applied_gpu_config_pb(index, limit, self.safety.setting(index).sm_clock_lock)
            for index, limit in zip(indices, limits, strict=True)
        ]

    async def inventory(self) -> telemetry_pb2.GetInventoryResponse:
        ts_unix_ns = self.clock.wall_ns()
        infos = self.workers.infos
        indices = [info.index for info in infos]
        limits, readings, foreign = await asyncio.gather(
            asyncio.gather(*(self.workers.power_limit_w(i) for i in indices)),
            self.workers.read_many(indices),  # measured SM clock and the lock read back, beside the target
            self.driver.foreign_processes(indices),  # processes on the GPUs that are not our engines
        )
        return telemetry_pb2.GetInventoryResponse(
            node_id=self.settings.node_id,
            hostname=socket.gethostname(),
            agent_version=AGENT_VERSION,
            gpu_backend=gpu_backend_pb(self.workers.kind),
            gpus=[
                gpu_info_pb(
                    info,
                    self.safety.setting(info.index),
                    limit,
                    reading=None if isinstance(reading, BaseException) else reading,
                    foreign=foreign.get(info.index, ()),
                )
                for info, limit, reading in zip(infos, limits, readings, strict=True)
            ],
            engines=[self.engine_pb(s) for s in self.driver.engines()],
            lease=lease_pb(self.lease_view()),
            ts_unix_ns=ts_unix_ns,
        )

    async def scrape_engines(self) -> list[common_pb2.EngineMetrics]:
        """Metrics of every live engine; one that cannot be read is left out of this sample."""
        live = [s for s in self.driver.engines() if s.state in LIVE_STATES]
        results = await asyncio.gather(
            *(self.driver.metrics(s.spec.engine_id) for s in live), return_exceptions=True
        )
        return [
            engine_metrics_pb(status, m)
            for status, m in zip(live, results, strict=True)
            if not isinstance(m, BaseException)
        ]

    # ---- NodeControl: GPU scope --------------------------------------------------------------------
    # Each control method takes `on_detached`: called once, with the final outcome, if the caller goes
    # away (cancelled, deadline, dropped connection) while the operation it started still runs.

    async def apply_gpu_config(
        self,
        request: control_pb2.ApplyGpuConfigRequest,
        identity: str,
        *,
        on_detached: DetachedHook | None = None,
        may_take_over: bool = False,
    ) -> control_pb2.ApplyGpuConfigResponse:
        infos = self.workers.infos
        max_lease_s = self.settings.max_lease_s
        if request.dry_run:
            check_generation(
                self._gpu_scope.record,
                request.generation,
                fingerprint(request),
                scope=self._gpu_scope.name,
                now_unix_ns=self.clock.wall_ns(),
            )
            return self._dry_run(validate_apply(request, infos, max_lease_s=max_lease_s), identity)

        def prepare() -> ApplyPlan:
            self._check_lease_open(identity, may_take_over)
            return validate_apply(request, infos, max_lease_s=max_lease_s)

        async def act(plan: ApplyPlan) -> control_pb2.ApplyGpuConfigResponse:
            # Lease first: the GPUs are held by this generation's lease before any of them changes.
            replaced = self.lease.terms()
            self.lease.grant(
                holder=identity,
                generation=plan.generation,
                lease_s=plan.lease_s,
                now_s=self.clock.monotonic_s(),
            )
            self.watcher.poke()
            try:
                await self.safety.apply(plan.gpus)  # saves the intent, then writes; rolls back on failure
            except BaseException:
                self.lease.reinstate(replaced)
                if self.safety.applied and not self.lease_view().active:
                    # The rollback could not undo every write: a GPU stays modified with no lease in
                    # force. A lease that ends now makes the watcher restore it (and retry until it can).
                    self.lease.grant(
                        holder=identity,
                        generation=plan.generation,
                        lease_s=0.0,
                        now_s=self.clock.monotonic_s(),
                    )
                self.watcher.poke()
                raise
            return control_pb2.ApplyGpuConfigResponse(
                generation=plan.generation,
                applied=await self.applied_pb([p.index for p in plan.gpus]),
                lease=lease_pb(self.lease_view()),
            )

        return await run_scoped(
            self._gpu_scope,
            request,
            request.generation,
            rpc="ApplyGpuConfig",
            response_type=control_pb2.ApplyGpuConfigResponse,
            prepare=prepare,
            act=act,
            persist=self.persist,
            clock=self.clock,
            on_detached=on_detached,
        )

    def _dry_run(self, plan: ApplyPlan, identity: str) -> control_pb2.ApplyGpuConfigResponse:
        applied = [
            applied_gpu_config_pb(
                p.index,
                p.power_limit_w
                if p.power_limit_w is not None
                else self.safety.default_power_limit_w(p.index),
                (p.min_clock_mhz, p.max_clock_mhz),
            )
            for p in plan.gpus
        ]
        lease = LeaseView(
            active=True,
            holder=identity,
            expires_unix_ns=self.clock.wall_ns() + round(plan.lease_s * 1e9),
            remaining_s=plan.lease_s,
            generation=plan.generation,
        )
        return control_pb2.ApplyGpuConfigResponse(
            generation=plan.generation, applied=applied, lease=lease_pb(lease), dry_run=True
        )

    async def restore_defaults(
        self,
        request: control_pb2.RestoreDefaultsRequest,
        identity: str,
        *,
        on_detached: DetachedHook | None = None,
        may_take_over: bool = False,
    ) -> control_pb2.RestoreDefaultsResponse:
        count = self.workers.count

        def prepare() -> tuple[int, ...]:
            self._check_lease_open(identity, may_take_over)
            return validate_restore(request, count)

        async def act(indices: tuple[int, ...]) -> control_pb2.RestoreDefaultsResponse:
            await self.safety.restore(indices, write_ahead=True)
            if self.safety.applied:
                self.lease.generation = request.generation  # the rest stays held under the lease
            else:
                self.lease.release(generation=request.generation)
            self.watcher.poke()
            return control_pb2.RestoreDefaultsResponse(
                generation=request.generation,
                restored=await self.applied_pb(indices),
                lease=lease_pb(self.lease_view()),
            )

        return await run_scoped(
            self._gpu_scope,
            request,
            request.generation,
            rpc="RestoreDefaults",
            response_type=control_pb2.RestoreDefaultsResponse,
            prepare=prepare,
            act=act,
            persist=self.persist,
            clock=self.clock,
            on_detached=on_detached,
        )

    async def renew_lease(
        self,
        request: control_pb2.RenewLeaseRequest,
        identity: str,
        *,
        on_detached: DetachedHook | None = None,
        may_take_over: bool = False,
    ) -> control_pb2.RenewLeaseResponse:
        """Sets a new expiry; consumes no generation. The renewal and its save run in their own task, so
        a caller that goes away cannot cut them in half (`on_detached` is accepted for a uniform
        signature; a renewal is quick and is not reported)."""
        check_generation_value(request.generation)
        lease_s = validate_renew(request, max_lease_s=self.settings.max_lease_s)

        async def renew() -> control_pb2.RenewLeaseResponse:
            async with self._gpu_scope.lock:
                self._check_lease_open(identity, may_take_over)
                self.lease.renew(
                    holder=identity,
                    generation=request.generation,
                    lease_s=lease_s,
                    now_s=self.clock.monotonic_s(),
                )
                self.watcher.poke()
                await self.persist()
                return control_pb2.RenewLeaseResponse(lease=lease_pb(self.lease_view()))

        return await asyncio.shield(_own_task(renew()))

    def _check_lease_open(self, identity: str, may_take_over: bool) -> None:
        """Checked under the GPU-scope lock: an active lease held by another caller is taken over only
        with `may_take_over` (the admin scope). The servicer decides the scope from the lease it sees
        before the lock; this re-check closes the gap in which another call could take the lease."""
        view = self.lease_view()
        if view.active and view.holder != identity and not may_take_over:
            raise PermissionDeniedError(
                f"the GPUs are under {view.holder!r}'s active lease; taking it over needs the 'admin' scope"
            )

    # ---- NodeControl: engine scopes ----------------------------------------------------------------

    def _engine_scope(self, engine_id: str) -> GenerationScope:
        scope = self._engine_scopes.get(engine_id)
        if scope is None:
            scope = self._engine_scopes[engine_id] = self._new_engine_scope(engine_id, None)
        return scope

    async def _run_engine_call(
        self,
        engine_id: str,
        request: Message,
        generation: int,
        rpc: str,
        response_type: type[R],
        prepare: Callable[[], P],
        act: Callable[[P], Awaitable[R]],
        on_detached: DetachedHook | None,
    ) -> R:
        """`run_scoped` in the engine's scope (created on first use, dropped again if the call was
        refused before any change: refused requests naming ever new ids must not accumulate scopes)."""
        scope = self._engine_scope(engine_id)
        try:
            return await run_scoped(
                scope,
                request,
                generation,
                rpc=rpc,
                response_type=response_type,
                prepare=prepare,
                act=act,
                persist=self.persist,
                clock=self.clock,
                on_detached=on_detached,
            )
        finally:
            self._drop_if_unused(engine_id, scope)

    def _drop_if_unused(self, engine_id: str, scope: GenerationScope) -> None:
        """Forget a scope that holds no call (the request was refused before any change), so refused
        requests naming ever new engine ids do not accumulate scopes."""
        idle = not scope.lock.locked() and (scope.task is None or scope.task.done())
        if scope.record is None and idle and self._engine_scopes.get(engine_id) is scope:
            del self._engine_scopes[engine_id]

    def _port_for(self, engine_id: str) -> int:
        """The engine's port: kept across reconfigurations, else the first free one from engine.base_port."""
        known = {s.spec.engine_id: s.spec.http_port for s in self.driver.engines()}
        if engine_id in known:
            return known[engine_id]
        base = self.settings.engine.base_port
        if base == 0:
            return _free_port()
        taken = set(known.values())
        for port in range(base, 65536):
            if port not in taken and _port_bindable(port):
                return port
        raise UnavailableError(f"no free TCP port from engine.base_port {base}")

    async def _engine_write_ahead(self, engine_id: str, intent: str) -> None:
        """Save the pending record of an engine call before the driver changes anything."""
        self._engine_intents[engine_id] = intent
        await self.persist()

    async def reconfigure_engine(
        self,
        request: control_pb2.ReconfigureEngineRequest,
        identity: str,
        *,
        on_detached: DetachedHook | None = None,
        may_take_over: bool = False,
    ) -> control_pb2.ReconfigureEngineResponse:
        engine_id = validate_engine_id("engine_id", request.engine_id)

        def prepare() -> EnginePlan:
            holders = {
                i: s.spec.engine_id
                for s in self.driver.engines()
                if s.state in LIVE_STATES and s.spec.engine_id != engine_id
                for i in s.spec.gpu_indices
            }
            return validate_reconfigure(
                request, gpu_count=self.workers.count, requirements=self.requirements, gpu_holders=holders
            )

        async def act(plan: EnginePlan) -> control_pb2.ReconfigureEngineResponse:
            spec = EngineSpec(
                engine_id=plan.engine_id,
                model=plan.model,
                gpu_indices=plan.gpu_indices,
                tp_degree=plan.tp_degree,
                http_port=self._port_for(plan.engine_id),
                options=dict(plan.options),
            )
            intent = (
                f"{spec.model} on GPUs {list(spec.gpu_indices)}, tp {spec.tp_degree}, port {spec.http_port}"
            )
            try:
                await self._engine_write_ahead(engine_id, intent)
                timings = await self.driver.reconfigure(
                    spec, plan.drain_timeout_s, ready_timeout_s=plan.ready_timeout_s
                )
            finally:
                self._engine_intents.pop(engine_id, None)
            if timings.restarted or engine_id not in self._engine_generation:
                self._engine_generation[engine_id] = plan.generation
            return control_pb2.ReconfigureEngineResponse(
                generation=plan.generation,
                engine=self.engine_pb(self.driver.engine(engine_id)),
                restarted=timings.restarted,
                drain_s=timings.drain_s,
                stop_s=timings.stop_s,
                start_s=timings.start_s,
            )

        return await self._run_engine_call(
            engine_id,
            request,
            request.generation,
            "ReconfigureEngine",
            control_pb2.ReconfigureEngineResponse,
            prepare,
            act,
            on_detached,
        )

    async def stop_engine(
        self,
        request: control_pb2.StopEngineRequest,
        identity: str,
        *,
        on_detached: DetachedHook | None = None,
        may_take_over: bool = False,
    ) -> control_pb2.StopEngineResponse:
        engine_id, drain_timeout_s = validate_stop(request)

        def prepare() -> str:
            self.driver.engine(engine_id)  # NotFoundError when never known
            return engine_id

        async def act(_: str) -> control_pb2.StopEngineResponse:
            try:
                await self._engine_write_ahead(engine_id, "stopped")
                drain_s = await self.driver.drain(engine_id, drain_timeout_s)
                stop_s = await self.driver.stop(engine_id)
            finally:
                self._engine_intents.pop(engine_id, None)
            self._engine_generation[engine_id] = request.generation
            return control_pb2.StopEngineResponse(
                generation=request.generation,
                engine=self.engine_pb(self.driver.engine(engine_id)),
                drain_s=drain_s,
                stop_s=stop_s,
            )

        return await self._run_engine_call(
            engine_id,
            request,
            request.generation,
            "StopEngine",
            control_pb2.StopEngineResponse,
            prepare,
            act,
            on_detached,
        )
