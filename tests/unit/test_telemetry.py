"""agent.telemetry: stream period validation (huge periods included), bounded subscriber queues with
counted drops, the energy cross-check, the sampler over an in-memory backend, and the clock targets each
sample carries beside the measured clock."""

from __future__ import annotations

import asyncio

import pytest

from agent.api.clock import SystemClock
from agent.api.errors import InvalidArgumentError
from agent.api.v1 import telemetry_pb2
from agent.control import StreamPlan, validate_stream
from agent.convert import gpu_sample_pb, sm_clock_below_target
from agent.gpu.base import GpuInfo, GpuProcess, GpuReading
from agent.gpu.worker import GpuWorkers
from agent.telemetry import NodeSample, Subscription, TelemetrySampler, energy_discrepancy


def _reading(power_w: float, energy_j: float) -> GpuReading:
    return GpuReading(power_w, energy_j, 1980, 2619, 0.5, 0.4, 1 << 30, 50.0, 700.0, 0x4)


def _sample(seq: int, t_s: float, readings: dict[int, GpuReading]) -> NodeSample:
    return NodeSample(seq, 1_000 + seq, t_s, tuple(sorted(readings.items())), ())


class StuckCounterBackend:
    """Constant power and an energy counter stuck at 0 (what the cross-check must catch); `fail_gpu`
    makes one GPU's reads fail."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.fail_gpu: int | None = None

    @property
    def kind(self) -> str:
        return "simulated"

    def device_count(self) -> int:
        return self.count

    def info(self, index: int) -> GpuInfo:
        return GpuInfo(
            index, f"GPU-{index}", "Fake", (1980,), 200.0, 700.0, 700.0, 1, f"00000000:{index:02X}:00.0"
        )

    def read(self, index: int) -> GpuReading:
        if index == self.fail_gpu:
            raise InvalidArgumentError("index", index, "a GPU that answers")
        return _reading(100.0 + index, 0.0)

    def power_limit_w(self, index: int) -> float:
        return 700.0

    def set_locked_clocks(self, index: int, min_clock_mhz: int, max_clock_mhz: int) -> None: ...

    def reset_locked_clocks(self, index: int) -> None: ...

    def set_power_limit(self, index: int, power_limit_w: float) -> None: ...

    def compute_processes(self, index: int) -> tuple[GpuProcess, ...]:
        return ()

    def close(self) -> None: ...


def _stream_request(period_s: float, gpus: list[int] | None = None) -> telemetry_pb2.StreamTelemetryRequest:
    return telemetry_pb2.StreamTelemetryRequest(period_s=period_s, gpu_indices=gpus or [])


@pytest.mark.parametrize(
    ("period_s", "stride", "effective_s"), [(0.0, 1, 0.5), (0.5, 1, 0.5), (1.5, 3, 1.5), (60.0, 120, 60.0)]
)
def test_stream_periods_are_multiples_of_the_sampler(
    period_s: float, stride: int, effective_s: float
) -> None:
    plan = validate_stream(
        _stream_request(period_s), gpu_count=2, sampler_period_s=0.5, min_period_s=0.1, max_period_s=60.0
    )
    assert (plan.stride, plan.period_s, plan.gpu_indices) == (stride, pytest.approx(effective_s), (0, 1))


@pytest.mark.parametrize("period_s", [0.1, 0.7, -1.0, 61.0, float("nan"), float("inf")])
def test_bad_stream_periods(period_s: float) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_stream(
            _stream_request(period_s), gpu_count=2, sampler_period_s=0.5, min_period_s=0.1, max_period_s=60.0
        )
    assert info.value.field == "period_s"
    assert "multiple of 0.5 s within [0.5, 60]" in info.value.allowed


@pytest.mark.parametrize(("gpus", "field"), [([2], "gpu_indices[0]"), ([1, 1], "gpu_indices[1]")])
def test_bad_stream_gpus(gpus: list[int], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_stream(
            _stream_request(0, gpus), gpu_count=2, sampler_period_s=1, min_period_s=0.1, max_period_s=60
        )
    assert info.value.field == field


async def test_subscription_keeps_newest_and_counts_drops() -> None:
    sub = Subscription(StreamPlan(1.0, 2, (1,), False), maxlen=3)
    for seq in range(1, 13):  # stride 2: samples 1, 3, 5, 7, 9, 11 are kept for this subscriber
        sub.offer(_sample(seq, float(seq), {0: _reading(1, 1), 1: _reading(2, 2)}))
    assert sub.dropped_count == 3
    got = [await sub.next() for _ in range(3)]
    assert [s.seq for s in got] == [7, 9, 11]
    pb = sub.to_pb(got[0])
    assert [g.gpu_index for g in pb.gpus] == [1]
    assert pb.dropped_samples_count == 3 and pb.period_s == 1.0
    waiter = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.offer(_sample(13, 13.0, {}))
    assert (await asyncio.wait_for(waiter, 1.0)).seq == 13


def test_energy_discrepancy() -> None:
    # 100 W then 300 W sampled at 1 s: trapezoid says 200 J + 300 J over 2 s
    samples = [
        _sample(1, 0.0, {0: _reading(100.0, 1000.0)}),
        _sample(2, 1.0, {0: _reading(300.0, 1200.0)}),
        _sample(3, 2.0, {1: _reading(1.0, 0.0)}),  # GPU 0's read failed in this sample
        _sample(4, 3.0, {0: _reading(300.0, 1800.0)}),
    ]
    check = energy_discrepancy(samples, 0)
    assert check is not None
    assert check.window_s == 3.0
    assert check.counter_j == 800.0
    assert check.integrated_j == pytest.approx(200.0 + 600.0)
    assert check.discrepancy_ratio == pytest.approx(0.0)
    assert energy_discrepancy(samples, 1) is None


def test_energy_discrepancy_of_power_averaged_over_the_last_second() -> None:
    # True power steps from 100 W to 500 W at t = 5.3 s; the counter is exact, the reading is the average
    # over the second before the read (NVML on Ampere and newer, the simulated backend).
    def energy_j(t: float) -> float:
        return 100.0 * min(t, 5.3) + 500.0 * max(0.0, t - 5.3)

    for period_s in (1.0, 0.25):
        times = [k * period_s for k in range(round(9.0 / period_s) + 1)]
        samples = [
            _sample(k, t, {0: _reading(energy_j(t) - energy_j(t - 1.0), energy_j(t))})
            for k, t in enumerate(times)
        ]
        trapezoid = energy_discrepancy(samples, 0)
        assert trapezoid is not None and trapezoid.discrepancy_ratio > 0.05  # lags the step
        check = energy_discrepancy(samples, 0, power_average_s=1.0)
        assert check is not None
        assert check.window_s == 9.0
        assert check.counter_j == pytest.approx(energy_j(9.0) - energy_j(0.0))
        assert check.discrepancy_ratio == pytest.approx(0.0, abs=1e-9)
    short = [_sample(k, 0.25 * k, {0: _reading(100.0, 25.0 * k)}) for k in range(4)]
    assert energy_discrepancy(short, 0, power_average_s=1.0) is None  # shorter than one average


async def test_sampler_ticks_publishes_and_checks_energy() -> None:
    backend = StuckCounterBackend()
    workers = await GpuWorkers.create(backend)
    sampler = TelemetrySampler(
        workers, SystemClock(), period_s=0.02, buffer=50, subscriber_queue=4, mismatch_ratio=0.05
    )
    sub = sampler.subscribe(StreamPlan(0.04, 2, (0, 1), False))
    task = asyncio.create_task(sampler.run())
    try:
        first = await asyncio.wait_for(sub.next(), 1.0)
        second = await asyncio.wait_for(sub.next(), 1.0)
        assert second.seq - first.seq == 2  # every second sample for a 2x period
        assert (second.monotonic_s - first.monotonic_s) == pytest.approx(0.04, abs=0.03)
        assert [i for i, _ in first.readings] == [0, 1]
        backend.fail_gpu = 1
        await asyncio.sleep(0.1)
        latest = sampler.ring[-1]
        assert [i for i, _ in latest.readings] == [0]  # a failing GPU is left out, the rest keep coming
        await asyncio.sleep(1.1)  # past the 1 s cross-check interval
        # The fake's counter never moves while power is ~100 W: the cross-check must flag it.
        assert sampler.last_energy_checks[0].counter_j == 0.0
        assert sampler.last_energy_checks[0].discrepancy_ratio == float("inf")
        assert len(sampler.ring) == 50
    finally:
        task.cancel()
        sampler.unsubscribe(sub)
        workers.close()
    assert sampler.subscriber_count == 0


@pytest.mark.parametrize("period_s", [1e308, 1.7976931348623157e308, -1e308, 1e300, 61.0])
@pytest.mark.parametrize("sampler_period_s", [0.05, 0.001, 1.0])
def test_huge_stream_periods_are_invalid_argument_naming_period_s(
    period_s: float, sampler_period_s: float
) -> None:
    """Fault: 1e308 / 0.05 is inf, and round(inf) raised OverflowError (INTERNAL at the RPC)."""
    with pytest.raises(InvalidArgumentError) as info:
        validate_stream(
            _stream_request(period_s),
            gpu_count=2,
            sampler_period_s=sampler_period_s,
            min_period_s=0.05,
            max_period_s=60.0,
        )
    assert info.value.field == "period_s" and "60" in info.value.allowed


def test_subscription_refuses_a_plan_without_a_whole_stride() -> None:
    for stride in (0, -1):
        with pytest.raises(InvalidArgumentError):
            Subscription(StreamPlan(0.1, stride, (0,), False), 4)


def test_clock_below_target_only_when_busy_and_under_the_minimum() -> None:
    busy = GpuReading(300.0, 1.0, 1005, 2619, 0.9, 0.5, 1, 50.0, 700.0, 0x20)
    idle = GpuReading(70.0, 1.0, 345, 2619, 0.0, 0.0, 1, 30.0, 700.0, 0x1)
    assert sm_clock_below_target(busy, (1410, 1410))
    assert not sm_clock_below_target(busy, (990, 1410))  # within the range
    assert not sm_clock_below_target(busy, None)  # no target: nothing to fall short of
    assert not sm_clock_below_target(idle, (1410, 1410))  # idle: the clock says nothing
    msg = gpu_sample_pb(0, busy, (1410, 1410))
    assert (msg.target_sm_clock_lock.min_clock_mhz, msg.target_sm_clock_lock.max_clock_mhz) == (1410, 1410)
    assert msg.sm_clock_below_target and not msg.HasField("effective_sm_clock_lock")
    plain = gpu_sample_pb(0, busy)
    assert not plain.HasField("target_sm_clock_lock") and not plain.sm_clock_below_target


async def test_samples_carry_the_targets_in_force_when_read() -> None:
    backend = StuckCounterBackend()
    workers = await GpuWorkers.create(backend)
    targets: dict[int, tuple[int, int] | None] = {0: (1200, 1410), 1: None}
    sampler = TelemetrySampler(
        workers,
        SystemClock(),
        period_s=0.02,
        buffer=5,
        subscriber_queue=4,
        mismatch_ratio=0.05,
        clock_targets=targets.__getitem__,
    )
    sub = sampler.subscribe(StreamPlan(0.02, 1, (0, 1), False))
    try:
        sample = await sampler.sample_once()
        assert sample.targets == ((0, (1200, 1410)), (1, None))
        targets[0] = None  # a later change does not rewrite an earlier sample
        g0, g1 = sub.to_pb(sample).gpus
        assert (g0.target_sm_clock_lock.min_clock_mhz, g0.target_sm_clock_lock.max_clock_mhz) == (1200, 1410)
        assert g0.sm_clock_below_target is False  # 1980 MHz measured, above the minimum
        assert not g1.HasField("target_sm_clock_lock")
        assert (await sampler.sample_once()).targets == ((0, None), (1, None))
    finally:
        sampler.unsubscribe(sub)
        workers.close()
