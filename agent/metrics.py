"""The agent's Prometheus metrics (prometheus-client), served at `/metrics` on `metrics_listen` by
`agent.app` through `agent.api.metrics_http`; docs/metrics.md, *Agent*, lists them.

Flow of a scrape: `AgentMetrics.exposition` takes the GPU readings of the telemetry sampler's latest
sample (`agent.telemetry` reads every GPU each `telemetry.period_s` through the per-GPU workers; only
before its first sample does a scrape read the GPUs itself, through the same workers, so a scrape never
blocks the event loop on a GPU), then renders the registry. `NodeCollector` reads everything else from
the node's state as of the scrape: the clock locks `agent.safety` applied, the lease, the engine driver's
engines, the sampler's count of dropped samples. Only control calls are counted as they end
(`agent.service.ControlServicer` calls `count_call`): no state of the agent keeps them. Every metric lives
in the agent's own registry (several agents in one test process never collide).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.api.v1 import control_pb2
from agent.engine.driver import EngineState
from agent.gpu.base import GpuReading
from agent.node import NodeAgent

CONTROL_RPCS = tuple(m.name for m in control_pb2.DESCRIPTOR.services_by_name["NodeControl"].methods)
HZ_PER_MHZ = 1e6
F = TypeVar("F", GaugeMetricFamily, CounterMetricFamily)


class NodeCollector(Collector):
    """The node's gauges and counters, read at scrape time (module docstring); `readings` are the GPU
    readings of this scrape, set by `AgentMetrics.exposition` just before it renders."""

    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent
        self.readings: Mapping[int, GpuReading] = {}

    def collect(self) -> Iterator[Metric]:
        yield from self._measured()
        yield self._clock_targets()
        lease = GaugeMetricFamily(
            "dynamollm_agent_lease_remaining_seconds",
            "Seconds until the lease on the node's GPU configuration runs out (0: no lease in force)",
        )
        lease.add_metric([], self._agent.lease_view().remaining_s)
        yield lease
        yield CounterMetricFamily(
            "dynamollm_agent_telemetry_samples_dropped",
            "Telemetry samples dropped from a slow StreamTelemetry subscriber's full queue",
            value=self._agent.sampler.dropped_count,
        )
        yield self._engine_states()

    def _measured(self) -> Iterator[Metric]:
        """What the GPUs report, per GPU with a reading."""
        gpu = ["gpu"]
        yield self._per_gpu(
            GaugeMetricFamily("dynamollm_gpu_power_watts", "GPU power draw", labels=gpu), lambda r: r.power_w
        )
        yield self._per_gpu(
            CounterMetricFamily(
                "dynamollm_gpu_energy_joules",
                "GPU energy counter (since driver load or backend start)",
                labels=gpu,
            ),
            lambda r: r.energy_j,
        )
        yield self._per_gpu(
            GaugeMetricFamily(
                "dynamollm_gpu_sm_clock_effective_hertz", "SM clock the GPU reports", labels=gpu
            ),
            lambda r: r.sm_clock_mhz * HZ_PER_MHZ,
        )
        yield self._per_gpu(
            GaugeMetricFamily("dynamollm_gpu_power_limit_watts", "Power limit the GPU enforces", labels=gpu),
            lambda r: r.enforced_power_limit_w,
        )

    def _per_gpu(self, family: F, value: Callable[[GpuReading], float]) -> F:
        for index, reading in sorted(self.readings.items()):
            family.add_metric([str(index)], value(reading))
        return family

    def _clock_targets(self) -> Metric:
        """The upper end of the clock range the agent locked; unlocked, the GPU's highest supported clock
        (the ceiling it may boost to)."""
        family = GaugeMetricFamily(
            "dynamollm_gpu_sm_clock_target_hertz",
            "Upper end of the SM clock range the agent locked (unlocked: the highest supported SM clock)",
            labels=["gpu"],
        )
        for info in self._agent.workers.infos:
            lock = self._agent.safety.setting(info.index).sm_clock_lock
            target_mhz = lock[1] if lock is not None else max(info.supported_sm_clocks_mhz, default=None)
            if target_mhz is not None:
                family.add_metric([str(info.index)], target_mhz * HZ_PER_MHZ)
        return family

    def _engine_states(self) -> Metric:
        family = GaugeMetricFamily(
            "dynamollm_engine_state",
            "1 for the state each engine the agent started is in, 0 for the other states",
            labels=["engine", "state"],
        )
        for status in self._agent.driver.engines():
            for state in EngineState:
                family.add_metric([status.spec.engine_id, state.value], 1.0 if status.state is state else 0.0)
        return family


class AgentMetrics:
    """The agent's registry: the node collector and the control-call counter."""

    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent
        self.registry = CollectorRegistry()
        self._collector = NodeCollector(agent)
        self.registry.register(self._collector)
        self._calls = Counter(
            "dynamollm_agent_control_calls",
            "Control calls by RPC and result (the gRPC status code's name; OK for success)",
            ["rpc", "result"],
            registry=self.registry,
        )
        for rpc in CONTROL_RPCS:  # every RPC's success series exists from the start (rate() sees the first)
            self._calls.labels(rpc, "OK")

    def count_call(self, rpc: str, result: str) -> None:
        self._calls.labels(rpc, result).inc()

    async def exposition(self) -> bytes:
        """The text exposition as of now (module docstring: where the GPU readings come from)."""
        self._collector.readings = await self._latest_readings()
        return generate_latest(self.registry)

    async def _latest_readings(self) -> dict[int, GpuReading]:
        ring = self._agent.sampler.ring
        if ring:
            return dict(ring[-1].readings)
        workers = self._agent.workers
        indices = [info.index for info in workers.infos]
        results = await workers.read_many(indices)
        return {i: r for i, r in zip(indices, results, strict=True) if not isinstance(r, BaseException)}
