"""The node agent's state and actions: one `NodeAgent` per agent process, behind the gRPC servicers.

Flow of a control call: servicer (`agent.service`, after `agent.auth`) -> `NodeAgent` method ->
`agent.scopes.run_scoped`: generation check (`agent.api.generations`), validation into a plan
(`agent.control`), then, under the scope's lock, the action (`agent.safety` for GPUs,
`agent.engine.driver` for engines), the outcome recorded under the generation and persisted with the
rest of the state (`agent.safety.StateStore`), and the reply, built by `agent.convert`. The servicer
writes the audit line (`NodeAgent.audit`). Reads (GetInventory, the telemetry sampler's engine scrape)
come here too; the lease timer (`agent.lease.LeaseWatcher`) calls back into `_on_lease_expiry`.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Sequence

import structlog

from agent.api.clock import Clock
from agent.api.errors import DynamoError, UnavailableError
from agent.api.generations import check_generation, fingerprint
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
from agent.safety import AgentStateDoc, GpuSafety, StateStore
from agent.scopes import GenerationScope, run_scoped
from agent.settings import AgentSettings
from agent.telemetry import TelemetrySampler

log = structlog.get_logger("agent.node")

AGENT_VERSION = "0.1.0"


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
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.driver = driver
        self.clock = clock
        self._store = store
        self._persist_lock = asyncio.Lock()
        self.safety = GpuSafety(workers, self.persist, defaults=doc.defaults, applied=doc.applied)
        self.lease = LeaseBook(holder=doc.lease_holder, generation=doc.lease_generation)
        self.watcher = LeaseWatcher(self.lease, clock, self._on_lease_expiry)
        self._gpu_scope = GenerationScope(doc.gpu_scope)
        self._engine_scopes = {k: GenerationScope(r) for k, r in doc.engine_scopes.items()}
        self._engine_generation: dict[str, int] = {}
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
        )
        self._audit_path = settings.audit_log

    # ---- persistence and audit ---------------------------------------------------------------------

    def state_doc(self) -> AgentStateDoc:
        return AgentStateDoc(
            defaults=dict(self.safety.defaults),
            applied=dict(self.safety.applied),
            gpu_scope=self._gpu_scope.record,
            engine_scopes={k: s.record for k, s in self._engine_scopes.items() if s.record is not None},
            lease_holder=self.lease.holder,
            lease_generation=self.lease.generation,
            lease_expires_unix_ns=self.lease_view().expires_unix_ns,
        )

    async def persist(self) -> None:
        """Save the state file (fsync off the event loop); saves never interleave."""
        async with self._persist_lock:
            await asyncio.to_thread(self._store.save, self.state_doc())

    def audit(self, identity: str, rpc: str, generation: int, result: str, **detail: object) -> None:
        entry = {
            "ts_unix_ns": self.clock.wall_ns(),
            "who": identity,
            "rpc": rpc,
            "generation": generation,
            "result": result,
            **detail,
        }
        log.info("control_call", **entry)
        try:
            self._audit_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._audit_path, "a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
        except OSError as exc:
            log.error("audit_log_write_failed", path=str(self._audit_path), error=str(exc))

    # ---- start-up and shut-down --------------------------------------------------------------------

    async def recover(self, doc: AgentStateDoc) -> None:
        """Put back GPUs a previous run left modified (it died without restoring them)."""
        if doc.applied:
            await self.safety.recover(doc)
            self.lease.expire()
            await self.persist()

    async def shutdown(self, *, drain_timeout_s: float) -> None:
        """Restore every modified GPU, release the lease, drain and stop engines."""
        async with self._gpu_scope.lock:
            try:
                restored = await self.safety.restore(self.safety.modified_indices())
                if restored:
                    log.info("gpu_defaults_restored_on_shutdown", gpu_indices=restored)
            except DynamoError as exc:
                log.error("gpu_restore_on_shutdown_failed", error=str(exc))
            if not self.safety.applied:
                self.lease.expire()
                self.safety.defaults = {}
            await self.persist()
        live = [s.spec.engine_id for s in self.driver.engines() if s.state in LIVE_STATES]
        if live:
            await asyncio.gather(
                *(self.driver.drain(e, drain_timeout_s) for e in live), return_exceptions=True
            )
        await self.driver.stop_all()
        await self.driver.close()

    async def _on_lease_expiry(self) -> None:
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
        limits = await asyncio.gather(*(self.workers.power_limit_w(i.index) for i in infos))
        return telemetry_pb2.GetInventoryResponse(
            node_id=self.settings.node_id,
            hostname=socket.gethostname(),
            agent_version=AGENT_VERSION,
            gpu_backend=gpu_backend_pb(self.workers.kind),
            gpus=[
                gpu_info_pb(info, self.safety.setting(info.index), limit)
                for info, limit in zip(infos, limits, strict=True)
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

    async def apply_gpu_config(
        self, request: control_pb2.ApplyGpuConfigRequest, identity: str
    ) -> control_pb2.ApplyGpuConfigResponse:
        infos = self.workers.infos
        max_lease_s = self.settings.max_lease_s
        if request.dry_run:
            check_generation(
                self._gpu_scope.record, request.generation, fingerprint(request), scope="GPU-scope"
            )
            return self._dry_run(validate_apply(request, infos, max_lease_s=max_lease_s), identity)

        async def act(plan: ApplyPlan) -> control_pb2.ApplyGpuConfigResponse:
            await self.safety.apply(plan.gpus)
            self.lease.grant(
                holder=identity,
                generation=plan.generation,
                lease_s=plan.lease_s,
                now_s=self.clock.monotonic_s(),
            )
            self.watcher.poke()
            return control_pb2.ApplyGpuConfigResponse(
                generation=plan.generation,
                applied=await self.applied_pb([p.index for p in plan.gpus]),
                lease=lease_pb(self.lease_view()),
            )

        return await run_scoped(
            self._gpu_scope,
            request,
            request.generation,
            scope_name="GPU-scope",
            response_type=control_pb2.ApplyGpuConfigResponse,
            prepare=lambda: validate_apply(request, infos, max_lease_s=max_lease_s),
            act=act,
            persist=self.persist,
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
        self, request: control_pb2.RestoreDefaultsRequest, identity: str
    ) -> control_pb2.RestoreDefaultsResponse:
        count = self.workers.count

        async def act(indices: tuple[int, ...]) -> control_pb2.RestoreDefaultsResponse:
            await self.safety.restore(indices)
            if self.safety.applied:
                self.lease.generation = request.generation  # the rest stays held under the lease
            else:
                self.lease.release(generation=request.generation)
                self.safety.defaults = {}  # nothing modified: the next first write snapshots afresh
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
            scope_name="GPU-scope",
            response_type=control_pb2.RestoreDefaultsResponse,
            prepare=lambda: validate_restore(request, count),
            act=act,
            persist=self.persist,
        )

    async def renew_lease(
        self, request: control_pb2.RenewLeaseRequest, identity: str
    ) -> control_pb2.RenewLeaseResponse:
        lease_s = validate_renew(request, max_lease_s=self.settings.max_lease_s)
        async with self._gpu_scope.lock:
            self.lease.renew(
                holder=identity,
                generation=request.generation,
                lease_s=lease_s,
                now_s=self.clock.monotonic_s(),
            )
            self.watcher.poke()
            await self.persist()
            return control_pb2.RenewLeaseResponse(lease=lease_pb(self.lease_view()))

    # ---- NodeControl: engine scopes ----------------------------------------------------------------

    def _engine_scope(self, engine_id: str) -> GenerationScope:
        scope = self._engine_scopes.get(engine_id)
        if scope is None:
            scope = self._engine_scopes[engine_id] = GenerationScope(None)
        return scope

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

    async def reconfigure_engine(
        self, request: control_pb2.ReconfigureEngineRequest, identity: str
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
            timings = await self.driver.reconfigure(
                spec, plan.drain_timeout_s, ready_timeout_s=plan.ready_timeout_s
            )
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

        return await run_scoped(
            self._engine_scope(engine_id),
            request,
            request.generation,
            scope_name=f"engine {engine_id}",
            response_type=control_pb2.ReconfigureEngineResponse,
            prepare=prepare,
            act=act,
            persist=self.persist,
        )

    async def stop_engine(
        self, request: control_pb2.StopEngineRequest, identity: str
    ) -> control_pb2.StopEngineResponse:
        engine_id, drain_timeout_s = validate_stop(request)

        def prepare() -> str:
            self.driver.engine(engine_id)  # NotFoundError when never known
            return engine_id

        async def act(_: str) -> control_pb2.StopEngineResponse:
            drain_s = await self.driver.drain(engine_id, drain_timeout_s)
            stop_s = await self.driver.stop(engine_id)
            self._engine_generation[engine_id] = request.generation
            return control_pb2.StopEngineResponse(
                generation=request.generation,
                engine=self.engine_pb(self.driver.engine(engine_id)),
                drain_s=drain_s,
                stop_s=stop_s,
            )

        return await run_scoped(
            self._engine_scope(engine_id),
            request,
            request.generation,
            scope_name=f"engine {engine_id}",
            response_type=control_pb2.StopEngineResponse,
            prepare=prepare,
            act=act,
            persist=self.persist,
        )
