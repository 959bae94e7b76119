"""The controller's Prometheus metrics (prometheus-client), served at `/metrics` by `controller.app`.

The control loop (`controller.loops.control`) counts into them as it runs; `attribute_energy` is the
rule by which a ledger interval's pool energy is shared out to request classes. Names follow
`dynamollm_<subsystem>_<quantity>_<unit>`; every metric lives in the controller's own registry (several
controllers in one test process never collide). docs/metrics.md, *Controller*, lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from controller.model.state import GuardState

MODES = ("observe", "apply", "paused")
NODE_STATES = ("CONNECTING", "READY", "UNAVAILABLE")
RECONFIGURATION_KINDS = ("start", "drain", "abort", "set_clock")  # the commands that change the fleet
PoolClass = tuple[str, str]


def attribute_energy(
    pool_energy_j: Mapping[str, float],
    requests: Mapping[PoolClass, int],
    output_tokens: Mapping[PoolClass, int],
) -> dict[PoolClass, float]:
    """One ledger interval's GPU energy per (pool, class), by the rule of the store's `class_energy`:
    each pool's energy shared over its classes in proportion to the output tokens they finished in it (by
    requests when it finished no token). A pool that finished nothing keeps its energy unattributed, as
    do idle GPUs (pool "")."""
    keys = [k for k in sorted(set(requests) | set(output_tokens)) if k[0]]
    shares = {k: (output_tokens.get(k, 0), requests.get(k, 0)) for k in keys}
    totals: dict[str, tuple[int, int]] = {}
    for (pool, _), (tok, n) in shares.items():
        t = totals.get(pool, (0, 0))
        totals[pool] = (t[0] + tok, t[1] + n)
    out: dict[PoolClass, float] = {}
    for (pool, cls), (tok, n) in shares.items():
        pool_tok, pool_n = totals[pool]
        if pool_tok or pool_n:
            out[(pool, cls)] = pool_energy_j.get(pool, 0.0) * (tok / pool_tok if pool_tok else n / pool_n)
    return out


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
        self._ledger_metrics(r)
        self._control_metrics(r)

    def _ledger_metrics(self, r: CollectorRegistry) -> None:
        by_class = ["pool", "cls"]
        self.class_energy = Counter(
            "dynamollm_class_energy_joules_total",
            "Pool GPU energy attributed to request classes by their share of the pool's output tokens",
            by_class,
            registry=r,
        )
        self.class_requests = Counter(
            "dynamollm_class_requests_total", "Requests finished, by pool and class", by_class, registry=r
        )
        self.class_tokens = Counter(
            "dynamollm_class_output_tokens_total",
            "Output tokens of the requests finished, by pool and class",
            by_class,
            registry=r,
        )
        self.energy_per_request = Gauge(
            "dynamollm_class_energy_per_request_joules",
            "Attributed energy per finished request over the last ledger interval with requests finished",
            by_class,
            registry=r,
        )
        self.energy_per_token = Gauge(
            "dynamollm_class_energy_per_output_token_joules",
            "Attributed energy per output token over the last ledger interval with tokens finished",
            by_class,
            registry=r,
        )

    def _control_metrics(self, r: CollectorRegistry) -> None:
        self.reconfigurations = Counter(
            "dynamollm_reconfigurations_total",
            "Reconfiguration commands the control cycle issued, by kind (in every mode)",
            ["kind"],
            registry=r,
        )
        self.reconfiguration_duration = Histogram(
            "dynamollm_reconfiguration_duration_seconds",
            "From a reconfiguration command's issue to the agents confirming it done (apply mode)",
            ["kind"],
            registry=r,
            buckets=(0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
        )
        for kind in RECONFIGURATION_KINDS:
            self.reconfigurations.labels(kind)
        self.guard_factor = Gauge(
            "dynamollm_guard_factor",
            "The SLO guard's planned-load factor per pool (1: no capacity added)",
            ["pool"],
            registry=r,
        )
        self.guard_active = Gauge(
            "dynamollm_guard_active",
            "1 while the SLO guard holds extra capacity for the pool (a factor above 1 or a clock floor)",
            ["pool"],
            registry=r,
        )
        self.guard_attainment = Gauge(
            "dynamollm_guard_attainment_ratio",
            "The windowed SLO attainment the guard last judged the pool on",
            ["pool"],
            registry=r,
        )

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

    def ledger_interval(
        self,
        pool_energy_j: Mapping[str, float],
        requests: Mapping[PoolClass, int],
        output_tokens: Mapping[PoolClass, int],
    ) -> None:
        """One energy-ledger interval: the counters advance by it; the per-request and per-token gauges of
        each pool and class that finished requests in it show it (the others keep their last figure)."""
        attributed = attribute_energy(pool_energy_j, requests, output_tokens)
        for key in sorted(set(requests) | set(output_tokens)):
            energy_j, n_requests, n_tokens = (
                attributed.get(key, 0.0),
                requests.get(key, 0),
                output_tokens.get(key, 0),
            )
            self.class_energy.labels(*key).inc(energy_j)
            self.class_requests.labels(*key).inc(n_requests)
            self.class_tokens.labels(*key).inc(n_tokens)
            if key in attributed and n_requests:
                self.energy_per_request.labels(*key).set(energy_j / n_requests)
            if key in attributed and n_tokens:
                self.energy_per_token.labels(*key).set(energy_j / n_tokens)

    def set_guard(self, state: Mapping[str, GuardState], pools: Iterable[str]) -> None:
        """The guard's state of the plan's pools (a pool without a guard state yet: factor 1, inactive)."""
        for gauge in (self.guard_factor, self.guard_active, self.guard_attainment):
            gauge.clear()
        for pool in pools:
            g = state.get(pool, GuardState())
            self.guard_factor.labels(pool).set(g.factor)
            self.guard_active.labels(pool).set(1.0 if g.factor > 1.0 or g.clock_floor_mhz > 0 else 0.0)
            if g.samples:
                self.guard_attainment.labels(pool).set(g.attainment)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
