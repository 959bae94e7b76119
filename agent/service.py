"""The agent's gRPC shell: NodeTelemetry and NodeControl servicers over one `NodeAgent` (the node's state:
GPU safety, lease, generation records, engines, telemetry), the error-to-status table, and authorization.

Flow of a control call: servicer -> `Authorizer.check` (token scope or loopback peer) -> `NodeAgent`
method: generation check (agent.control.check_generation), validation into a plan (agent.control), then,
under the scope's lock, the action (agent.safety for GPUs, agent.engine.driver for engines), the outcome
recorded under the generation and persisted with the rest of the state (agent.safety.StateStore), an
audit line, and the reply. Errors from our tree become gRPC statuses through `agent.api.status`, the one
table shared with the client.

Outcomes recorded under a generation: replies, and errors raised while acting (an NVML error after
rollback, an engine that did not start). Not recorded (the generation stays free, nothing changed):
INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND and ABORTED, which refuse a request before any change.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from agent.api.clock import Clock
from agent.api.errors import (
    ConflictError,
    DynamoError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from agent.api.status import status_for
from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.control import (
    ApplyPlan,
    Decision,
    EnginePlan,
    EngineRequirements,
    Outcome,
    ScopeRecord,
    check_generation,
    fingerprint,
    validate_apply,
    validate_engine_id,
    validate_reconfigure,
    validate_renew,
    validate_restore,
    validate_stop,
    validate_stream,
)
from agent.engine.driver import LIVE_STATES, EngineDriver, EngineSpec, EngineState, EngineStatus
from agent.gpu.worker import GpuWorkers
from agent.lease import LeaseBook, LeaseView, LeaseWatcher
from agent.safety import AgentStateDoc, GpuSafety, StateStore
from agent.settings import AgentSettings, BearerToken
from agent.sim.physics.specs import TP_DEGREES as SIM_TP_DEGREES
from agent.telemetry import TelemetrySampler

log = structlog.get_logger("agent.service")

AGENT_VERSION = "0.1.0"
M = TypeVar("M", bound=Message)
P = TypeVar("P")

# Refusals before any change: not recorded under the generation (see module docstring).
_NOT_RECORDED = (InvalidArgumentError, FailedPreconditionError, NotFoundError, ConflictError)

_GPU_BACKEND_PB = {
    "nvml": common_pb2.GPU_BACKEND_KIND_NVML,
    "simulated": common_pb2.GPU_BACKEND_KIND_SIMULATED,
}
_ENGINE_KIND_PB = {"vllm": common_pb2.ENGINE_KIND_VLLM, "simulated": common_pb2.ENGINE_KIND_SIMULATED}
_ENGINE_STATE_PB = {
    EngineState.STARTING: common_pb2.ENGINE_STATE_STARTING,
    EngineState.READY: common_pb2.ENGINE_STATE_READY,
    EngineState.DRAINING: common_pb2.ENGINE_STATE_DRAINING,
    EngineState.STOPPED: common_pb2.ENGINE_STATE_STOPPED,
    EngineState.FAILED: common_pb2.ENGINE_STATE_FAILED,
}


class RecordedStatus(Exception):
    """A recorded error outcome, returned again for a replayed generation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ auth


def is_loopback_peer(peer: str) -> bool:
    """grpc peer strings: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/run/x.sock"."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if peer.startswith("ipv4:"):
        return peer[len("ipv4:") :].startswith("127.")
    if peer.startswith("ipv6:"):
        host = peer[len("ipv6:") :].rsplit(":", 1)[0].strip("[]")
        return host in ("::1", "0:0:0:0:0:0:0:1") or host.startswith("::ffff:127.")
    return False


def _peer_host(peer: str) -> str:
    return peer if peer.startswith("unix") else peer.rsplit(":", 1)[0]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: a token's name, or `peer:<host>` when no tokens are configured."""

    name: str
    scopes: frozenset[str]


class Authorizer:
    """Bearer tokens with scopes when configured; otherwise read from anywhere, control from loopback only."""

    def __init__(self, tokens: Sequence[BearerToken]) -> None:
        self._tokens = tuple(tokens)

    def identify(self, metadata: Sequence[tuple[str, str | bytes]], peer: str) -> Caller:
        """UnauthenticatedError when tokens are configured and none valid is presented."""
        if not self._tokens:
            scopes = {"read", "control"} if is_loopback_peer(peer) else {"read"}
            return Caller("peer:" + _peer_host(peer), frozenset(scopes))
        presented = ""
        for key, value in metadata:
            if key.lower() == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                if text.lower().startswith("bearer "):
                    presented = text[len("bearer ") :].strip()
        if not presented:
            raise UnauthenticatedError("missing 'authorization: Bearer <token>' metadata")
        found: BearerToken | None = None
        for token in self._tokens:  # compare with every token in constant time
            if hmac.compare_digest(token.token.encode(), presented.encode()):
                found = token
        if found is None:
            raise UnauthenticatedError("unknown bearer token")
        return Caller(found.name, found.scopes)

    def require(self, caller: Caller, scope: str) -> None:
        if scope in caller.scopes:
            return
        if not self._tokens:
            raise UnauthenticatedError(
                "control calls need a bearer token (auth.tokens_file) or a loopback/Unix-socket peer"
            )
        raise PermissionDeniedError(f"token {caller.name!r} lacks the {scope!r} scope")


# ------------------------------------------------------------------------------------ node state


@dataclass
class _Scope:
    """One generation scope: its record, the lock serialising its calls, the running call's outcome."""

    record: ScopeRecord | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: asyncio.Future[Outcome] | None = None


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
    """Everything the services act on; one per agent process (see module docstring)."""

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
        self._gpu_scope = _Scope(doc.gpu_scope)
        self._engine_scopes = {k: _Scope(r) for k, r in doc.engine_scopes.items()}
        self._engine_generation: dict[str, int] = {}
        self.requirements = EngineRequirements(
            models=settings.engine.models,
            options_allowed=settings.engine.options_allowed,
            pipeline_parallel=settings.engine.kind == "vllm",
            tp_degrees=SIM_TP_DEGREES if settings.engine.kind == "simulated" else None,
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

    def lease_pb(self) -> common_pb2.LeaseState:
        v = self.lease_view()
        return common_pb2.LeaseState(
            active=v.active,
            holder=v.holder,
            expires_unix_ns=v.expires_unix_ns,
            remaining_s=v.remaining_s,
            generation=v.generation,
        )

    def engine_pb(self, status: EngineStatus) -> common_pb2.EngineInfo:
        spec = status.spec
        return common_pb2.EngineInfo(
            engine_id=spec.engine_id,
            model=spec.model,
            kind=_ENGINE_KIND_PB[self.settings.engine.kind],
            gpu_indices=list(spec.gpu_indices),
            tp_degree=spec.tp_degree,
            state=_ENGINE_STATE_PB[status.state],
            state_since_unix_ns=status.state_since_unix_ns,
            http_port=spec.http_port,
            generation=self._engine_generation.get(spec.engine_id, 0),
            engine_options=dict(spec.options),
            failure_reason=status.failure_reason,
        )

    async def applied_pb(self, indices: Sequence[int]) -> list[control_pb2.AppliedGpuConfig]:
        limits = await asyncio.gather(*(self.workers.power_limit_w(i) for i in indices))
        out = []
        for index, limit in zip(indices, limits, strict=True):
            lock = self.safety.setting(index).sm_clock_lock
            msg = control_pb2.AppliedGpuConfig(gpu_index=index, power_limit_w=limit)
            if lock is not None:
                msg.sm_clock_lock.CopyFrom(
                    common_pb2.SmClockRange(min_clock_mhz=lock[0], max_clock_mhz=lock[1])
                )
            out.append(msg)
        return out

    async def inventory(self) -> telemetry_pb2.GetInventoryResponse:
        ts_unix_ns = self.clock.wall_ns()
        infos = self.workers.infos
        limits = await asyncio.gather(*(self.workers.power_limit_w(i.index) for i in infos))
        gpus = []
        for info, limit in zip(infos, limits, strict=True):
            applied = self.safety.setting(info.index)
            msg = common_pb2.GpuInfo(
                gpu_index=info.index,
                uuid=info.uuid,
                name=info.name,
                pci_bus_id=info.pci_bus_id,
                supported_sm_clocks_mhz=list(info.supported_sm_clocks_mhz),
                min_power_limit_w=info.min_power_limit_w,
                max_power_limit_w=info.max_power_limit_w,
                default_power_limit_w=info.default_power_limit_w,
                power_limit_w=limit,
                mem_total_bytes=info.mem_total_bytes,
                modified=applied.modified,
            )
            if applied.sm_clock_lock is not None:
                lo, hi = applied.sm_clock_lock
                msg.sm_clock_lock.CopyFrom(common_pb2.SmClockRange(min_clock_mhz=lo, max_clock_mhz=hi))
            gpus.append(msg)
        return telemetry_pb2.GetInventoryResponse(
            node_id=self.settings.node_id,
            hostname=socket.gethostname(),
            agent_version=AGENT_VERSION,
            gpu_backend=_GPU_BACKEND_PB.get(self.workers.kind, common_pb2.GPU_BACKEND_KIND_UNSPECIFIED),
            gpus=gpus,
            engines=[self.engine_pb(s) for s in self.driver.engines()],
            lease=self.lease_pb(),
            ts_unix_ns=ts_unix_ns,
        )

    async def scrape_engines(self) -> list[common_pb2.EngineMetrics]:
        """Metrics of every live engine; one that cannot be read is left out of this sample."""
        live = [s for s in self.driver.engines() if s.state in LIVE_STATES]
        results = await asyncio.gather(
            *(self.driver.metrics(s.spec.engine_id) for s in live), return_exceptions=True
        )
        out = []
        for status, m in zip(live, results, strict=True):
            if isinstance(m, BaseException):
                continue
            out.append(
                common_pb2.EngineMetrics(
                    engine_id=status.spec.engine_id,
                    state=_ENGINE_STATE_PB[status.state],
                    running_requests_count=m.running_requests_count,
                    waiting_requests_count=m.waiting_requests_count,
                    kv_cache_usage_ratio=m.kv_cache_usage_ratio,
                    prompt_tokens=m.prompt_tokens,
                    generation_tokens=m.generation_tokens,
                    finished_requests_count=m.finished_requests_count,
                    preemptions_count=m.preemptions_count,
                    prompt_tokens_per_s=m.prompt_tokens_per_s,
                    generation_tokens_per_s=m.generation_tokens_per_s,
                )
            )
        return out

    # ---- generation-scoped execution ---------------------------------------------------------------

    @staticmethod
    async def _replay(scope: _Scope, response_type: type[M]) -> M:
        record = scope.record
        assert record is not None
        outcome = record.outcome
        if outcome is None:
            assert scope.inflight is not None
            outcome = await asyncio.shield(scope.inflight)
        if outcome.reply is None:
            raise RecordedStatus(grpc.StatusCode[outcome.code], outcome.message)
        reply = response_type.FromString(outcome.reply)
        reply.replayed = True  # type: ignore[attr-defined]
        return reply

    async def _scoped(
        self,
        scope: _Scope,
        request: Message,
        generation: int,
        *,
        scope_name: str,
        response_type: type[M],
        prepare: Callable[[], P],
        act: Callable[[P], Awaitable[M]],
    ) -> M:
        """Generation check, validation (`prepare`, under the lock), action, recorded outcome."""
        digest = fingerprint(request)
        if check_generation(scope.record, generation, digest, scope=scope_name) is Decision.REPLAY:
            return await self._replay(scope, response_type)
        async with scope.lock:
            # Another call may have taken this or a newer generation while we waited for the lock.
            if check_generation(scope.record, generation, digest, scope=scope_name) is Decision.REPLAY:
                return await self._replay(scope, response_type)
            plan = prepare()
            previous = scope.record
            inflight: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            scope.record, scope.inflight = ScopeRecord(generation, digest, None), inflight
            try:
                reply = await act(plan)
            except _NOT_RECORDED as exc:
                scope.record = previous
                inflight.set_result(Outcome(None, status_for(exc).name, str(exc)))
                raise
            except BaseException as exc:
                code = status_for(exc) if isinstance(exc, DynamoError) else grpc.StatusCode.INTERNAL
                outcome = Outcome(None, code.name, str(exc))
                scope.record = ScopeRecord(generation, digest, outcome)
                inflight.set_result(outcome)
                await self.persist()
                raise
            outcome = Outcome(reply.SerializeToString())
            scope.record = ScopeRecord(generation, digest, outcome)
            inflight.set_result(outcome)
            await self.persist()
            return reply

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
                lease=self.lease_pb(),
            )

        return await self._scoped(
            self._gpu_scope,
            request,
            request.generation,
            scope_name="GPU-scope",
            response_type=control_pb2.ApplyGpuConfigResponse,
            prepare=lambda: validate_apply(request, infos, max_lease_s=max_lease_s),
            act=act,
        )

    def _dry_run(self, plan: ApplyPlan, identity: str) -> control_pb2.ApplyGpuConfigResponse:
        applied = []
        for p in plan.gpus:
            limit = (
                p.power_limit_w if p.power_limit_w is not None else self.safety.default_power_limit_w(p.index)
            )
            msg = control_pb2.AppliedGpuConfig(gpu_index=p.index, power_limit_w=limit)
            msg.sm_clock_lock.CopyFrom(
                common_pb2.SmClockRange(min_clock_mhz=p.min_clock_mhz, max_clock_mhz=p.max_clock_mhz)
            )
            applied.append(msg)
        now_unix_ns = self.clock.wall_ns()
        lease = common_pb2.LeaseState(
            active=True,
            holder=identity,
            expires_unix_ns=now_unix_ns + round(plan.lease_s * 1e9),
            remaining_s=plan.lease_s,
            generation=plan.generation,
        )
        return control_pb2.ApplyGpuConfigResponse(
            generation=plan.generation, applied=applied, lease=lease, dry_run=True
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
                lease=self.lease_pb(),
            )

        return await self._scoped(
            self._gpu_scope,
            request,
            request.generation,
            scope_name="GPU-scope",
            response_type=control_pb2.RestoreDefaultsResponse,
            prepare=lambda: validate_restore(request, count),
            act=act,
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
            return control_pb2.RenewLeaseResponse(lease=self.lease_pb())

    # ---- NodeControl: engine scopes ----------------------------------------------------------------

    def _engine_scope(self, engine_id: str) -> _Scope:
        scope = self._engine_scopes.get(engine_id)
        if scope is None:
            scope = self._engine_scopes[engine_id] = _Scope(None)
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

        return await self._scoped(
            self._engine_scope(engine_id),
            request,
            request.generation,
            scope_name=f"engine {engine_id}",
            response_type=control_pb2.ReconfigureEngineResponse,
            prepare=prepare,
            act=act,
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

        return await self._scoped(
            self._engine_scope(engine_id),
            request,
            request.generation,
            scope_name=f"engine {engine_id}",
            response_type=control_pb2.StopEngineResponse,
            prepare=prepare,
            act=act,
        )


# ------------------------------------------------------------------------------------- servicers


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: BaseException) -> NoReturn:
    if isinstance(exc, RecordedStatus):
        await context.abort(exc.code, str(exc))
    if isinstance(exc, DynamoError):
        await context.abort(status_for(exc), str(exc))
    log.exception("rpc_internal_error", error=repr(exc))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _caller(auth: Authorizer, context: grpc.aio.ServicerContext[object, object]) -> Caller:
    return auth.identify(tuple(context.invocation_metadata() or ()), context.peer())


class TelemetryServicer(telemetry_pb2_grpc.NodeTelemetryServicer):
    def __init__(self, agent: NodeAgent, auth: Authorizer) -> None:
        self._agent = agent
        self._auth = auth

    async def GetInventory(
        self,
        request: telemetry_pb2.GetInventoryRequest,
        context: grpc.aio.ServicerContext[
            telemetry_pb2.GetInventoryRequest, telemetry_pb2.GetInventoryResponse
        ],
    ) -> telemetry_pb2.GetInventoryResponse:
        try:
            self._auth.require(_caller(self._auth, context), "read")  # type: ignore[arg-type]
            return await self._agent.inventory()
        except Exception as exc:
            await _abort(context, exc)  # type: ignore[arg-type]

    async def StreamTelemetry(
        self,
        request: telemetry_pb2.StreamTelemetryRequest,
        context: grpc.aio.ServicerContext[
            telemetry_pb2.StreamTelemetryRequest, telemetry_pb2.TelemetrySample
        ],
    ) -> AsyncIterator[telemetry_pb2.TelemetrySample]:
        agent = self._agent
        tel = agent.settings.telemetry
        try:
            self._auth.require(_caller(self._auth, context), "read")  # type: ignore[arg-type]
            plan = validate_stream(
                request,
                gpu_count=agent.workers.count,
                sampler_period_s=agent.sampler.period_s,
                min_period_s=tel.min_period_s,
                max_period_s=tel.max_period_s,
            )
        except Exception as exc:
            await _abort(context, exc)  # type: ignore[arg-type]
        sub = agent.sampler.subscribe(plan)
        try:
            while True:
                sample = await sub.next()
                yield sub.to_pb(sample)
        finally:
            agent.sampler.unsubscribe(sub)


class ControlServicer(control_pb2_grpc.NodeControlServicer):
    def __init__(self, agent: NodeAgent, auth: Authorizer) -> None:
        self._agent = agent
        self._auth = auth

    async def _call(
        self,
        rpc: str,
        generation: int,
        context: grpc.aio.ServicerContext[object, object],
        handler: Callable[[str], Awaitable[M]],
    ) -> M:
        who = "unauthenticated " + _peer_host(context.peer())
        try:
            caller = _caller(self._auth, context)
            who = caller.name
            self._auth.require(caller, "control")
            reply = await handler(who)
        except Exception as exc:
            code = exc.code if isinstance(exc, RecordedStatus) else status_for(exc)
            self._agent.audit(who, rpc, generation, code.name, error=str(exc))
            await _abort(context, exc)
        self._agent.audit(who, rpc, generation, "OK", replayed=bool(getattr(reply, "replayed", False)))
        return reply

    async def ApplyGpuConfig(
        self,
        request: control_pb2.ApplyGpuConfigRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ApplyGpuConfigRequest, control_pb2.ApplyGpuConfigResponse
        ],
    ) -> control_pb2.ApplyGpuConfigResponse:
        return await self._call(
            "ApplyGpuConfig",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.apply_gpu_config(request, who),
        )

    async def ReconfigureEngine(
        self,
        request: control_pb2.ReconfigureEngineRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.ReconfigureEngineRequest, control_pb2.ReconfigureEngineResponse
        ],
    ) -> control_pb2.ReconfigureEngineResponse:
        return await self._call(
            "ReconfigureEngine",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.reconfigure_engine(request, who),
        )

    async def StopEngine(
        self,
        request: control_pb2.StopEngineRequest,
        context: grpc.aio.ServicerContext[control_pb2.StopEngineRequest, control_pb2.StopEngineResponse],
    ) -> control_pb2.StopEngineResponse:
        return await self._call(
            "StopEngine",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.stop_engine(request, who),
        )

    async def RenewLease(
        self,
        request: control_pb2.RenewLeaseRequest,
        context: grpc.aio.ServicerContext[control_pb2.RenewLeaseRequest, control_pb2.RenewLeaseResponse],
    ) -> control_pb2.RenewLeaseResponse:
        return await self._call(
            "RenewLease",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.renew_lease(request, who),
        )

    async def RestoreDefaults(
        self,
        request: control_pb2.RestoreDefaultsRequest,
        context: grpc.aio.ServicerContext[
            control_pb2.RestoreDefaultsRequest, control_pb2.RestoreDefaultsResponse
        ],
    ) -> control_pb2.RestoreDefaultsResponse:
        return await self._call(
            "RestoreDefaults",
            request.generation,
            context,  # type: ignore[arg-type]
            lambda who: self._agent.restore_defaults(request, who),
        )
