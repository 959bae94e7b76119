"""Telemetry of the node: one fixed-period sampler over every GPU (and the engines, when a subscriber asks),
a ring buffer of recent samples, per-subscriber bounded queues, and the energy cross-check.

Flow: `TelemetrySampler.run` ticks every `period_s` on the monotonic clock (missed ticks are skipped, not
bunched), reads all GPUs in parallel through the per-GPU workers, scrapes engine metrics through the
agent's callback (`agent.node.NodeAgent.scrape_engines`), stores the `NodeSample` in the ring buffer and
offers it to every `Subscription`.
A subscription keeps every `stride`-th sample in a queue of at most `subscriber_queue` samples; when a
slow reader lets it fill, the oldest sample is dropped and counted (in the subscription's stream, and in
the sampler's total that `agent.metrics` exports), so neither the sampler nor other subscribers ever wait
for it. `agent.service.StreamTelemetry` drains a subscription into the gRPC stream.
Each sample also keeps, per GPU, the clock lock the agent had applied at that instant (the node's
`clock_targets` callback, from the state `agent.safety` keeps), so every GpuSample carries target and
measured clock side by side (and the lock read back where the backend can).

Stream periods are validated before a subscription exists (`agent.control.validate_stream`): a period
outside [max(min_period_s, sampler period), max_period_s] is INVALID_ARGUMENT naming period_s, checked
before the stride `period_s / sampler period` is computed (1e308 / 0.05 overflows to inf, which used to
surface as INTERNAL). `Subscription` refuses a plan whose stride is not a positive integer.

Energy cross-check: over the ring buffer, the energy counter's increase is compared with the integral of
the sampled power (`energy_discrepancy`, pure): a trapezoid for instantaneous readings, and for readings
averaged over the last W seconds (`GpuInfo.power_average_s`; NVML on Ampere and newer GPUs, the
simulated backend) the sum of W x reading chained back from the last sample, which is what such
readings measure. A relative difference above the threshold is logged as `energy_counter_mismatch`
(a counter that stalls or wraps, or power sampled too coarsely for the load). A backend that runs faster
than the wall clock (a time-compressed simulated node: `time_scale` simulated seconds per wall second,
energy counter in simulated joules, power in watts) declares its `time_scale`; the integral of power
over wall time is multiplied by it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from agent.api.clock import Clock
from agent.api.errors import InvalidArgumentError
from agent.api.v1 import common_pb2, telemetry_pb2
from agent.control import StreamPlan
from agent.convert import gpu_sample_pb
from agent.gpu.base import GpuReading
from agent.gpu.worker import GpuWorkers

log = structlog.get_logger("agent.telemetry")

EngineScraper = Callable[[], Awaitable[Sequence[common_pb2.EngineMetrics]]]
# GPU index -> the SM clock lock (min, max) MHz the agent applied; None: driver-default clocks.
ClockTargets = Callable[[int], tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class NodeSample:
    """One sampling instant: GPU readings (ascending index; failed reads left out) and engine metrics."""

    seq: int
    ts_unix_ns: int
    monotonic_s: float
    readings: tuple[tuple[int, GpuReading], ...]
    engines: tuple[common_pb2.EngineMetrics, ...]
    # (GPU index, the lock the agent had applied, None: default clocks) for the GPUs read; empty
    # without a `clock_targets` callback.
    targets: tuple[tuple[int, tuple[int, int] | None], ...] = ()


@dataclass(frozen=True, slots=True)
class EnergyCheck:
    """Energy of one GPU over a window, two ways."""

    gpu_index: int
    window_s: float
    counter_j: float  # increase of the driver's energy counter
    integrated_j: float  # trapezoidal integral of sampled power

    @property
    def discrepancy_ratio(self) -> float:
        """|counter - integrated| / counter (0 when the counter did not move and neither did power)."""
        if self.counter_j <= 0.0:
            return 0.0 if self.integrated_j <= 0.0 else math.inf
        return abs(self.counter_j - self.integrated_j) / self.counter_j


def energy_discrepancy(
    samples: Sequence[NodeSample], gpu_index: int, power_average_s: float = 0.0, time_scale: float = 1.0
) -> EnergyCheck | None:
    """Compare counter and integrated power for one GPU over `samples` (None with fewer than two readings,
    or, for averaged power, a window shorter than one average).

    `power_average_s` = W > 0: each power reading is the average over the W seconds before it
    (`GpuInfo.power_average_s`; NVML on Ampere and newer GPUs), so W x reading is exactly the energy of
    those W seconds. The integral is then chained back from the last sample in steps of W (readings
    interpolated between samples) and compared with the counter over the same span. A trapezoid over
    averaged readings would lag the counter by W/2 of every load step near either end of the window.
    W = 0 (instantaneous readings): the trapezoid over the whole window.
    `time_scale`: counter joules per watt x wall second (a time-compressed simulated node; 1 elsewhere).
    """
    points = [(s.monotonic_s, r) for s in samples for i, r in s.readings if i == gpu_index]
    if len(points) < 2:
        return None
    times = [t for t, _ in points]

    def at(t_s: float, value: Callable[[GpuReading], float]) -> float:
        """A reading's value at t_s, linear between the samples around it."""
        i = bisect.bisect_left(times, t_s)
        if i < len(times) and times[i] == t_s:
            return value(points[i][1])
        (t0, r0), (t1, r1) = points[i - 1], points[i]  # t0 < t_s < t1: t_s lies inside the window
        return value(r0) + (value(r1) - value(r0)) * (t_s - t0) / (t1 - t0)

    end_s = times[-1]
    if power_average_s <= 0.0:
        start_s = times[0]
        integrated_j = math.fsum(
            0.5 * (r0.power_w + r1.power_w) * (t1 - t0) for (t0, r0), (t1, r1) in itertools.pairwise(points)
        )
    else:
        steps = math.floor((end_s - times[0]) / power_average_s + 1e-9)
        if steps < 1:
            return None
        start_s = end_s - steps * power_average_s
        integrated_j = power_average_s * math.fsum(
            at(end_s - k * power_average_s, _power_w) for k in range(steps)
        )
    return EnergyCheck(
        gpu_index=gpu_index,
        window_s=end_s - start_s,
        counter_j=points[-1][1].energy_j - at(max(start_s, times[0]), _energy_j),
        integrated_j=integrated_j * time_scale,
    )


def backend_time_scale(backend: object) -> float:
    """Simulated seconds per wall second of a backend that declares it (`time_scale`, the simulated
    backend), else 1."""
    scale = getattr(backend, "time_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 < scale < math.inf:
        return 1.0
    return float(scale)


def _power_w(r: GpuReading) -> float:
    return r.power_w


def _energy_j(r: GpuReading) -> float:
    return r.energy_j


class Subscription:
    """One StreamTelemetry caller's queue: every `plan.stride`-th sample, newest `maxlen` kept."""

    def __init__(self, plan: StreamPlan, maxlen: int) -> None:
        if isinstance(plan.stride, bool) or not isinstance(plan.stride, int) or plan.stride < 1:
            raise InvalidArgumentError("period_s", plan.period_s, "a whole multiple of the sampler period")
        self.plan = plan
        self.dropped_count = 0
        self._wanted = frozenset(plan.gpu_indices)
        self._queue: deque[NodeSample] = deque(maxlen=maxlen)
        self._offered = 0
        self._ready = asyncio.Event()

    def offer(self, sample: NodeSample) -> bool:
        """Called by the sampler; never blocks. True when the oldest queued sample was dropped for it."""
        self._offered += 1
        if (self._offered - 1) % self.plan.stride:
            return False
        dropped = len(self._queue) == self._queue.maxlen  # the deque drops the oldest on append
        self.dropped_count += dropped
        self._queue.append(sample)
        self._ready.set()
        return dropped

    async def next(self) -> NodeSample:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def to_pb(self, sample: NodeSample) -> telemetry_pb2.TelemetrySample:
        targets = dict(sample.targets)
        return telemetry_pb2.TelemetrySample(
            ts_unix_ns=sample.ts_unix_ns,
            period_s=self.plan.period_s,
            gpus=[gpu_sample_pb(i, r, targets.get(i)) for i, r in sample.readings if i in self._wanted],
            engines=list(sample.engines) if self.plan.include_engines else [],
            dropped_samples_count=self.dropped_count,
        )


class TelemetrySampler:
    """The node's one sampler (see module docstring)."""

    def __init__(
        self,
        workers: GpuWorkers,
        clock: Clock,
        *,
        period_s: float,
        buffer: int,
        subscriber_queue: int,
        mismatch_ratio: float,
        scrape_engines: EngineScraper | None = None,
        clock_targets: ClockTargets | None = None,
    ) -> None:
        self.period_s = period_s
        self.ring: deque[NodeSample] = deque(maxlen=buffer)
        self.last_energy_checks: dict[int, EnergyCheck] = {}
        self.overrun_count = 0
        self.dropped_count = 0  # samples dropped from every subscriber's queue, ended streams included
        self._workers = workers
        self._clock = clock
        self._subscriber_queue = subscriber_queue
        self._mismatch_ratio = mismatch_ratio
        self._scrape_engines = scrape_engines
        self._clock_targets = clock_targets
        self._subscriptions: set[Subscription] = set()
        self._seq = 0
        self._failing: set[int] = set()  # GPUs whose last read failed (log once per failure streak)
        # At least 1 s (the driver updates its counter every 20-100 ms) and ten samples.
        self._check_every_s = max(1.0, 10 * period_s)
        self._last_check_s: float | None = None

    def subscribe(self, plan: StreamPlan) -> Subscription:
        sub = Subscription(plan, self._subscriber_queue)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    async def sample_once(self) -> NodeSample:
        ts_unix_ns = self._clock.wall_ns()
        monotonic_s = self._clock.monotonic_s()
        want_engines = self._scrape_engines is not None and any(
            s.plan.include_engines for s in self._subscriptions
        )
        indices = list(range(self._workers.count))
        # The targets in force when the reads start (a clock change lands in the next sample).
        targets_at_start = {i: self._clock_targets(i) for i in indices} if self._clock_targets else {}
        if want_engines and self._scrape_engines is not None:
            results, engines = await asyncio.gather(self._workers.read_many(indices), self._scrape_engines())
        else:
            results, engines = await self._workers.read_many(indices), ()
        readings: list[tuple[int, GpuReading]] = []
        for index, result in zip(indices, results, strict=True):
            if isinstance(result, BaseException):
                if index not in self._failing:
                    self._failing.add(index)
                    log.warning("gpu_read_failed", gpu_index=index, error=str(result))
                continue
            if index in self._failing:
                self._failing.discard(index)
                log.info("gpu_read_recovered", gpu_index=index)
            readings.append((index, result))
        self._seq += 1
        targets = tuple(
            (index, targets_at_start[index]) for index, _ in readings if index in targets_at_start
        )
        return NodeSample(self._seq, ts_unix_ns, monotonic_s, tuple(readings), tuple(engines), targets)

    def publish(self, sample: NodeSample) -> None:
        self.ring.append(sample)
        for sub in self._subscriptions:
            self.dropped_count += sub.offer(sample)
        if self._last_check_s is None:
            self._last_check_s = sample.monotonic_s
        elif sample.monotonic_s - self._last_check_s >= self._check_every_s:
            self._last_check_s = sample.monotonic_s
            self._check_energy()

    def _check_energy(self) -> None:
        samples = list(self.ring)
        time_scale = backend_time_scale(self._workers.backend)
        for index in range(self._workers.count):
            check = energy_discrepancy(samples, index, self._workers.infos[index].power_average_s, time_scale)
            if check is None:
                continue
            self.last_energy_checks[index] = check
            if check.discrepancy_ratio > self._mismatch_ratio:
                log.warning(
                    "energy_counter_mismatch",
                    gpu_index=index,
                    window_s=round(check.window_s, 3),
                    counter_j=round(check.counter_j, 3),
                    integrated_j=round(check.integrated_j, 3),
                    discrepancy_ratio=round(check.discrepancy_ratio, 4),
                    power_average_s=self._workers.infos[index].power_average_s,
                    time_scale=time_scale,
                    hint="the counter stalled or wrapped, or power is sampled too coarsely for the load",
                )

    async def run(self) -> None:
        """Sample every period until cancelled; a tick that overran skips the ticks it missed."""
        next_s = self._clock.monotonic_s()
        while True:
            try:
                self.publish(await self.sample_once())
            except Exception:
                log.exception("telemetry_sample_failed")
            next_s += self.period_s
            now_s = self._clock.monotonic_s()
            if next_s <= now_s:
                missed = math.floor((now_s - next_s) / self.period_s) + 1
                self.overrun_count += missed
                next_s += missed * self.period_s
            await asyncio.sleep(next_s - now_s)
