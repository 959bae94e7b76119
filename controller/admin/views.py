"""`ControllerCore`: the running controller as the admin API sees it. Builds the replies of the read
calls from the control loop, the fleet and the store; forwards mode changes, drains and traffic reports
to the loop. Runs on the event loop (the servicer calls it between the loop's steps).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from agent.api.clock import Clock
from agent.api.errors import InvalidArgumentError
from agent.api.v1 import common_pb2
from controller.api.v1 import admin_pb2
from controller.fleet.desired import instance_of
from controller.fleet.grpc_fleet import GrpcFleet, NodeLink
from controller.loops.control import ControlLoop
from controller.loops.events import Event, EventBus
from controller.loops.traffic import CLASS_INDEX, Arrival, Completion
from controller.metrics import ControllerMetrics
from controller.model.classes import REQUEST_CLASSES
from controller.model.fleet import RoutingTable
from controller.model.profile import Profile
from controller.settings import ControllerSettings
from controller.store import DecisionRow, Store

MODE_ENUM = {
    "observe": admin_pb2.MODE_OBSERVE,
    "apply": admin_pb2.MODE_APPLY,
    "paused": admin_pb2.MODE_PAUSED,
}
NODE_ENUM = {
    "CONNECTING": admin_pb2.NODE_STATE_CONNECTING,
    "READY": admin_pb2.NODE_STATE_READY,
    "UNAVAILABLE": admin_pb2.NODE_STATE_UNAVAILABLE,
}
PLAN_LEVELS = ("initial", "cluster", "pool", "guard")


def decision_pb(row: DecisionRow) -> admin_pb2.DecisionRecord:
    return admin_pb2.DecisionRecord(
        id=row.id,
        ts_unix_ns=row.ts_unix_ns,
        cycle_time_s=row.cycle_time_s,
        level=row.level,
        summary=row.summary,
        detail_json=row.detail_json,
    )


class ControllerCore:
    def __init__(
        self,
        settings: ControllerSettings,
        store: Store,
        profile: Profile,
        loop: ControlLoop,
        fleet: GrpcFleet,
        events: EventBus,
        metrics: ControllerMetrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.profile = profile
        self.loop = loop
        self.fleet = fleet
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.started_unix_ns = clock.wall_ns()

    async def close(self) -> None:
        self.loop.flush_ledger()
        self.loop.snapshot()
        await self.fleet.close()
        self.store.close()

    # ------------------------------------------------------------------ reads
    def _observed_generation(self) -> int:
        pending = self.store.pending_commands()
        desired = self.store.current_generation()
        return min(c.generation for c in pending) - 1 if pending else desired

    def refresh_metrics(self) -> None:
        """The gauges read off the fleet and the store (node states, power, generation lag), as of now:
        `/metrics` calls it before every scrape, so they do not wait for an admin call to move."""
        self.metrics.set_nodes(link.state for link in self.fleet.links)
        self.metrics.power.set(sum(link.total_power_w() for link in self.fleet.links if link.available))
        self.metrics.generation_lag.set(self.store.current_generation() - self._observed_generation())

    def cluster_status(self) -> admin_pb2.ClusterStatusResponse:
        cycle = self.loop.cycle
        ready = [link for link in self.fleet.links if link.available]
        instances = cycle.executor.instances.values()
        desired, observed = self.store.current_generation(), self._observed_generation()
        power_w = sum(link.total_power_w() for link in ready)
        met, total = cycle.guard.windowed()
        return admin_pb2.ClusterStatusResponse(
            mode=MODE_ENUM[self.loop.mode],
            policy=self.settings.policy_name,
            objective=self.settings.policy.objective,
            model=self.profile.model,
            gpu=self.profile.gpu,
            nodes_count=len(self.fleet.links),
            nodes_ready_count=len(ready),
            gpus_count=sum(len(link.inventory.gpus) for link in ready if link.inventory is not None),
            gpus_held_count=sum(r.spec.tp for r in instances if r.gpus is not None),
            instances_count=len(cycle.executor.instances),
            pools_count=len(cycle.plan.pools),
            power_w=power_w,
            energy_j=self.store.energy_total_j(),
            desired_generation=desired,
            observed_generation=observed,
            cycle_time_s=self.loop.now_s(),
            started_unix_ns=self.started_unix_ns,
            last_decision_unix_ns=self.loop.last_decision_unix_ns,
            controller_version=self.loop.settings.code_version,
            routes_version=self.loop.routes.version if self.loop.routes is not None else 0,
            origin_unix_ns=round(self.loop.origin_unix_s * 1e9),
            time_scale_factor=self.loop.settings.time_scale,
            class_attainments=[
                admin_pb2.ClassAttainment(class_name=c.name, slo_met_count=m, completions_count=n)
                for c, m, n in zip(REQUEST_CLASSES, met, total, strict=True)
            ],
            slo_window_s=cycle.guard.config.window_s,
        )

    def list_nodes(self) -> admin_pb2.ListNodesResponse:
        energy = self.store.energy_by("node")
        return admin_pb2.ListNodesResponse(nodes=[self._node(link, energy) for link in self.fleet.links])

    def _node(self, link: NodeLink, energy: dict[str, float]) -> admin_pb2.NodeStatus:
        inv = link.inventory
        held = sum(
            r.spec.tp
            for r in self.loop.cycle.executor.instances.values()
            if r.gpus and r.gpus.node == link.index
        )
        status = admin_pb2.NodeStatus(
            name=link.config.name,
            address=link.config.address,
            state=NODE_ENUM[link.state],
            draining=self.loop.drained(link.index),
            node_id=inv.node_id if inv is not None else "",
            gpus_count=len(inv.gpus) if inv is not None else 0,
            gpus_held_count=held,
            power_w=link.total_power_w(),
            energy_j=energy.get(link.config.name, 0.0),
            lease_remaining_s=inv.lease.remaining_s if inv is not None else 0.0,
            lease_generation=inv.lease.generation if inv is not None else 0,
            last_seen_unix_ns=link.last_seen_unix_ns,
            last_error=link.last_error,
            last_error_permanent=link.last_error_permanent,
        )
        if inv is None:
            return status
        clocks = {g.gpu_index: g.sm_clock_lock.max_clock_mhz for g in inv.gpus if g.HasField("sm_clock_lock")}
        for e in inv.engines:
            instance = instance_of(e.engine_id)
            target = self.loop.desired.engine(instance) if instance is not None else None
            status.engines.append(
                admin_pb2.NodeEngine(
                    engine_id=e.engine_id,
                    instance_id=instance or 0,
                    pool=target.pool if target is not None else "",
                    gpu_indices=list(e.gpu_indices),
                    tp_degree=e.tp_degree,
                    state=common_pb2.EngineState.Name(e.state).removeprefix("ENGINE_STATE_"),
                    clock_mhz=clocks.get(e.gpu_indices[0], 0) if e.gpu_indices else 0,
                )
            )
        return status

    def list_pools(self) -> admin_pb2.ListPoolsResponse:
        cycle = self.loop.cycle
        energy = self.store.energy_by("pool")
        requests: dict[str, tuple[int, int]] = {}
        for c in self.store.class_energy():
            n, tokens = requests.get(c.pool, (0, 0))
            requests[c.pool] = (n + c.requests_count, tokens + c.output_tokens)
        out = admin_pb2.ListPoolsResponse()
        names = self.loop.settings.node_names
        for pool in cycle.plan.pools:
            guard = cycle.guard.state.get(pool.name)
            status = admin_pb2.PoolStatus(
                name=pool.name,
                class_names=list(pool.class_names),
                energy_j=energy.get(pool.name, 0.0),
                guard_factor=guard.factor if guard is not None else 1.0,
                clock_floor_mhz=guard.clock_floor_mhz if guard is not None else 0,
                slo_attainment_ratio=guard.attainment if guard is not None and guard.samples else -1.0,
            )
            n, tokens = requests.get(pool.name, (0, 0))
            if n:
                status.energy_per_request_j = status.energy_j / n
            if tokens:
                status.energy_per_output_token_j = status.energy_j / tokens
            for r in sorted(cycle.executor.instances.values(), key=lambda r: r.instance_id):
                if r.pool != pool.name:
                    continue
                gpus = list(range(r.gpus.first_gpu, r.gpus.first_gpu + r.gpus.count)) if r.gpus else []
                node = names[r.gpus.node] if r.gpus else ""
                status.instances.append(
                    admin_pb2.PoolInstance(
                        instance_id=r.instance_id,
                        node=node,
                        gpu_indices=gpus,
                        tp_degree=r.spec.tp,
                        clock_mhz=r.spec.clock_mhz,
                        phase=r.phase.name,
                    )
                )
                if r.gpus is not None:
                    link = self.fleet.links[r.gpus.node]
                    status.power_w += sum(link.power_w.get(g, 0.0) for g in gpus)
            out.pools.append(status)
        return out

    def get_plan(self, explain: bool) -> admin_pb2.GetPlanResponse:
        cycle = self.loop.cycle
        out = admin_pb2.GetPlanResponse(generation=cycle.executor.generation)
        for pool in cycle.plan.pools:
            planned = admin_pb2.PlannedPool(name=pool.name, class_names=list(pool.class_names))
            for spec, n in sorted(pool.instance_counts().items(), key=lambda kv: (kv[0].tp, kv[0].clock_mhz)):
                planned.instances.append(
                    admin_pb2.PlannedInstances(tp_degree=spec.tp, clock_mhz=spec.clock_mhz, instances_count=n)
                )
            out.pools.append(planned)
        # The plan in force: the last cluster step (or the initial plan) and the steps since.
        last = self.store.last_decision("cluster") or self.store.last_decision("initial")
        plan_rows = [r for r in self.store.decisions_from(last.id) if r.level in PLAN_LEVELS] if last else []
        if plan_rows:
            out.decided_unix_ns = plan_rows[-1].ts_unix_ns
        if not explain:
            return out
        out.records.extend(decision_pb(r) for r in plan_rows)
        for name, table in sorted(cycle.capacities().items()):
            cap = admin_pb2.PoolCapacity(pool=name)
            for spec, (rps, power_w) in sorted(table.items(), key=lambda kv: (kv[0].tp, kv[0].clock_mhz)):
                cap.configs.append(
                    admin_pb2.ConfigCapacity(
                        tp_degree=spec.tp, clock_mhz=spec.clock_mhz, max_load_rps=rps, power_w=power_w
                    )
                )
            out.capacities.append(cap)
        return out

    def list_decisions(
        self, since_unix_ns: int, after_id: int, level: str, limit: int
    ) -> tuple[list[admin_pb2.DecisionRecord], bool]:
        rows = self.store.list_decisions(
            since_unix_ns=since_unix_ns, after_id=after_id, level=level, limit=min(1000, limit + 1)
        )
        more = len(rows) > limit
        return [decision_pb(r) for r in rows[:limit]], more

    # ------------------------------------------------------------------ writes
    def set_mode(self, mode: str, caller: str, reason: str) -> str:
        return self.loop.set_mode(mode, caller=caller, reason=reason)

    def drain_node(self, node: str, undrain: bool) -> bool:
        names = self.loop.settings.node_names
        if node not in names:
            raise InvalidArgumentError("node", node, names)
        return self.loop.drain_node(names.index(node), undrain)

    def audit(self, caller: str, action: str, request: dict[str, Any], result: str) -> None:
        self.store.audit(caller=caller, action=action, request_json=json.dumps(request), result=result)

    def report_traffic(self, request: admin_pb2.ReportTrafficRequest) -> tuple[int, int]:
        """Validated as a whole first: a report with one bad item changes nothing."""
        arrivals = [self._arrival(i, a) for i, a in enumerate(request.arrivals)]
        completions = [self._completion(i, c) for i, c in enumerate(request.completions)]
        self.loop.traffic.add(arrivals, completions)
        return len(arrivals), len(completions)

    def _class(self, field: str, name: str, *, optional: bool = False) -> int:
        if optional and not name:
            return -1
        index = CLASS_INDEX.get(name)
        if index is None:
            raise InvalidArgumentError(field, name, tuple(CLASS_INDEX))
        return index

    def _time(self, field: str, unix_ns: int) -> float:
        if unix_ns <= 0:
            raise InvalidArgumentError(field, unix_ns, "nanoseconds since the Unix epoch, > 0")
        return self.loop.cycle_time_of(unix_ns / 1e9)

    def _arrival(self, i: int, a: admin_pb2.TrafficArrival) -> Arrival:
        return Arrival(
            self._time(f"arrivals[{i}].arrival_unix_ns", a.arrival_unix_ns),
            self._class(f"arrivals[{i}].class_name", a.class_name),
            a.input_tokens,
            a.instance_id if a.HasField("instance_id") else -1,
        )

    def _completion(self, i: int, c: admin_pb2.TrafficCompletion) -> Completion:
        if c.pool and c.pool not in {p.name for p in self.loop.cycle.plan.pools} and len(c.pool) > 64:
            raise InvalidArgumentError(
                f"completions[{i}].pool", c.pool, "a pool name of at most 64 characters"
            )
        return Completion(
            self._time(f"completions[{i}].finished_unix_ns", c.finished_unix_ns),
            self._class(f"completions[{i}].routed_class", c.routed_class),
            self._class(f"completions[{i}].true_class", c.true_class, optional=True),
            c.slo_met,
            c.output_tokens,
            c.pool,
        )

    # ------------------------------------------------------------------ events
    async def watch(self, kinds: frozenset[str]) -> AsyncIterator[admin_pb2.Event]:
        async for event in self.events.subscribe(kinds):
            yield self._event_pb(event)

    def _event_pb(self, event: Event) -> admin_pb2.Event:
        out = admin_pb2.Event(
            seq=event.seq,
            ts_unix_ns=event.ts_unix_ns,
            kind=event.kind,
            summary=event.summary,
            detail_json=event.detail_json,
        )
        if event.routes is not None:
            out.routes.CopyFrom(self.routes_pb(event.routes))
        return out

    def routes_pb(self, table: RoutingTable) -> admin_pb2.RoutingTable:
        out = admin_pb2.RoutingTable(version=table.version)
        pool_of = self.loop.cycle.plan.pool_of_class()
        for c, (primary, fallback) in enumerate(zip(table.primary, table.fallback, strict=True)):
            name = REQUEST_CLASSES[c].name
            route = admin_pb2.ClassRoute(class_name=name, pool=pool_of.get(name, ""))
            route.primary.extend(self._endpoint(i, w) for i, w in primary)
            route.fallback.extend(self._endpoint(i, w) for i, w in fallback)
            out.classes.append(route)
        return out

    def _endpoint(self, instance_id: int, weight: float) -> admin_pb2.RouteEndpoint:
        target = self.loop.desired.engine(instance_id)
        if target is None:
            return admin_pb2.RouteEndpoint(instance_id=instance_id, weight_s=weight)
        link = self.fleet.links[target.node]
        port = 0
        if link.inventory is not None:
            port = next((e.http_port for e in link.inventory.engines if e.engine_id == target.engine_id), 0)
        host = (
            link.config.address.rsplit(":", 1)[0].strip("[]")
            if not link.config.address.startswith("unix:")
            else ""
        )
        return admin_pb2.RouteEndpoint(
            instance_id=instance_id, node=link.config.name, host=host, http_port=port, weight_s=weight
        )
