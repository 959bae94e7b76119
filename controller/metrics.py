"""The controller's Prometheus metrics (prometheus-client), served at `/metrics` by `controller.app`.

Names follow `dynamollm_<subsystem>_<quantity>_<unit>`; every metric lives in the controller's own
registry (several controllers in one test process never collide). docs/controller.md lists them.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MODES = ("observe", "apply", "paused")
NODE_STATES = ("CONNECTING", "READY", "UNAVAILABLE")


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decision_duration = Histogram(
            "dynamollm_decision_duration_seconds",
            "Wall time of one control step, by the highest level it ran (instance, pool, cluster, guard)",
            ["level"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.solver_status = Counter(
            "dynamollm_solver_status_total",
            "Pool decisions by how their mix was found",
            ["status"],
            registry=r,
        )
        self.pool_instances = Gauge(
            "dynamollm_pool_instances",
            "Instances per pool by TP degree, SM clock and phase",
            ["pool", "tp", "clock_mhz", "phase"],
            registry=r,
        )
        self.generation_lag = Gauge(
            "dynamollm_generation_lag",
            "Generations handed out but not yet confirmed by the agents (desired minus observed)",
            registry=r,
        )
        self.commands = Counter(
            "dynamollm_commands_total", "Commands by kind and result", ["kind", "result"], registry=r
        )
        self.pool_energy = Counter(
            "dynamollm_pool_energy_joules_total",
            "GPU energy from the agents' counters, by the pool whose instance held the GPU (idle: none)",
            ["pool"],
            registry=r,
        )
        self.mode = Gauge("dynamollm_controller_mode", "1 for the mode in force", ["mode"], registry=r)
        self.nodes = Gauge("dynamollm_nodes", "Configured nodes by connection state", ["state"], registry=r)
        self.power = Gauge("dynamollm_cluster_power_watts", "Sum of the ready nodes' GPU power", registry=r)

    def set_mode(self, mode: str) -> None:
        for m in MODES:
            self.mode.labels(m).set(1.0 if m == mode else 0.0)

    def set_nodes(self, states: Iterable[str]) -> None:
        counts = dict.fromkeys(NODE_STATES, 0)
        for s in states:
            counts[s] = counts.get(s, 0) + 1
        for s, n in counts.items():
            self.nodes.labels(s).set(n)

    def set_instances(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        self.pool_instances.clear()
        counts: dict[tuple[str, str, str, str], int] = {}
        for pool, tp, clock, phase in rows:
            key = (pool, str(tp), str(clock), phase)
            counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            self.pool_instances.labels(*key).set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
