"""agent.sim.realtime: the simulated engine program's loop is the simulator's SimEngine core on a clock.

Driven here by a fake clock, stepping exactly at the engine's own wake-ups, and compared with a reference
SimEngine fed the same arrivals: every request's first and last token come at the core's first-token and
finish times, and the tokens in between at the core's iteration ends (spread evenly after a preemption).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from agent.sim.engine_core import CompletedRequest, EngineConfig, SimEngine
from agent.sim.gpu import supported_clocks_mhz
from agent.sim.physics import PerfModel, load_perf_model
from agent.sim.physics.specs import gpu_for
from agent.sim.realtime import STREAM_INTERVAL_S, EngineRequest, PowerCappedPerf, RealTimeEngine

SEED = 11
Arrival = tuple[float, int, int]  # (time, input tokens, output tokens)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic_s(self) -> float:
        return self.t


def make_engine(perf: PerfModel, config: EngineConfig, clock: FakeClock) -> RealTimeEngine:
    return RealTimeEngine(
        perf, "h100-sxm", tuple(range(perf.tp)), None, config, seed=SEED, monotonic_s=clock.monotonic_s
    )


def reference(
    perf: PerfModel, config: EngineConfig, arrivals: dict[int, Arrival]
) -> tuple[dict[int, CompletedRequest], list[float], SimEngine]:
    """The core alone, fed the same arrivals; also the end time of every iteration it ran."""
    core = SimEngine(perf, perf.max_clock_mhz, np.random.default_rng(SEED), config, power_bin_s=3600.0)
    ends: list[float] = []

    def one_iteration() -> None:
        core.advance_to(math.nextafter(core.now_s, math.inf))
        ends.append(core.now_s)

    for request_id, (t, n_in, n_out) in sorted(arrivals.items(), key=lambda kv: kv[1][0]):
        while core.now_s < t and (core.num_running or core.num_waiting):
            one_iteration()
        core.advance_to(t)
        core.submit(request_id, t, n_in, n_out)
    while core.num_running or core.num_waiting:
        one_iteration()
    return {r.request_id: r for r in core.pop_completed()}, ends, core


def drive(
    engine: RealTimeEngine, clock: FakeClock, arrivals: list[Arrival], abort: dict[int, float] | None = None
) -> tuple[list[EngineRequest], dict[int, list[float]]]:
    """Step the engine at its wake-ups and at the arrivals; when each token reached its queue."""
    pending = deque(sorted(arrivals))
    aborts = dict(abort or {})
    requests: list[EngineRequest] = []
    delivered: dict[int, list[float]] = {}
    now = 0.0
    for _ in range(1_000_000):
        t = min(pending[0][0] if pending else math.inf, engine.next_wake_s(now), *aborts.values(), math.inf)
        if t == math.inf:
            break
        now = clock.t = max(now, t)
        while pending and pending[0][0] <= now:
            _, n_in, n_out = pending.popleft()
            req = engine.submit(n_in, n_out)
            requests.append(req)
            delivered[req.request_id] = []
        for request_id, at_s in list(aborts.items()):
            if at_s <= now:
                engine.abort(requests[request_id])
                del aborts[request_id]
        engine.step(now)
        for req in requests:
            while not req.tokens.empty():
                if req.tokens.get_nowait() is not None:
                    delivered[req.request_id].append(now)
    else:
        raise AssertionError("the engine never went idle")
    return requests, delivered


def poisson_arrivals(n: int, rate_per_s: float, max_in: int, max_out: int) -> list[Arrival]:
    rng = np.random.default_rng(5)
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, n))
    return [(float(t), int(rng.integers(20, max_in)), int(rng.integers(1, max_out))) for t in times]


def check_against_reference(
    perf: PerfModel, config: EngineConfig, arrivals: list[Arrival], abort: dict[int, float] | None = None
) -> tuple[RealTimeEngine, dict[int, CompletedRequest]]:
    clock = FakeClock()
    engine = make_engine(perf, config, clock)
    _, delivered = drive(engine, clock, arrivals, abort)
    kept = {i: a for i, a in enumerate(sorted(arrivals)) if i not in (abort or {})}
    records, ends, _ = reference(perf, config, kept)
    assert set(records) == set(kept)
    for request_id, rec in records.items():
        times = delivered[request_id]
        assert len(times) == rec.output_tokens
        assert times[0] == pytest.approx(rec.first_token_s, abs=1e-9)
        assert times[-1] == pytest.approx(rec.finish_s, abs=1e-9)
        assert times == sorted(times)
        in_span = [e for e in ends if rec.first_token_s <= e <= rec.finish_s]
        if len(in_span) == rec.output_tokens:  # not preempted: one token per iteration
            # the ones between the first and the last come in bunches, at most one interval late
            bunch_s = STREAM_INTERVAL_S * engine.time_scale
            assert all(e <= t <= e + bunch_s + 1e-9 for e, t in zip(in_span, times, strict=True))
    for request_id in abort or {}:
        assert delivered[request_id] == []
    stats = engine.stats
    assert stats.requests_finished == len(records)
    assert stats.ttft.sum == pytest.approx(sum(r.ttft_s for r in records.values()), abs=1e-6)
    assert stats.e2e.sum == pytest.approx(sum(r.e2e_s for r in records.values()), abs=1e-6)
    assert stats.generation_tokens == sum(r.output_tokens for r in records.values())
    return engine, records


def test_one_request_has_the_cores_latencies() -> None:
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    check_against_reference(perf, EngineConfig(), [(0.5, 3000, 40)])


def test_a_busy_engine_follows_the_core_arrival_by_arrival() -> None:
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512)
    engine, _ = check_against_reference(perf, config, poisson_arrivals(60, 40.0, 1500, 120))
    assert engine.stats.tpot.count == sum(max(0, n - 1) for _, _, n in poisson_arrivals(60, 40.0, 1500, 120))


def test_preempted_requests_still_finish_at_the_cores_times() -> None:
    # Llama-2-70B on two GPUs holds ~14k KV tokens: long requests arriving together preempt each other.
    perf = load_perf_model("llama2-70b", "h100-sxm", 2)
    arrivals = [(0.01 * i, 1500, 1500) for i in range(12)]
    engine, _ = check_against_reference(perf, EngineConfig(), arrivals)
    assert engine.num_running == engine.num_waiting == 0
    assert engine.gauges().preemptions > 0


def test_a_request_abandoned_before_it_starts_leaves_the_queue() -> None:
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=512)
    arrivals = [(0.0, 500, 50), (0.001, 500, 50), (0.002, 500, 50)]
    check_against_reference(perf, config, arrivals, abort={1: 0.05})


def test_energy_and_the_one_second_power_average() -> None:
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    clock = FakeClock()
    engine = make_engine(perf, EngineConfig(), clock)
    clock.t = 0.2
    engine.step(clock.t)
    req = engine.submit(2000, 100)
    while req.emitted < req.output_tokens:  # step at the engine's wake-ups until the answer is out
        engine.step(clock.t)
        clock.t = engine.next_wake_s(clock.t)
    _, _, core = reference(perf, EngineConfig(), {0: (0.2, 2000, 100)})
    busy_end_s = core.now_s
    extra_j = core.energy_j - perf.idle_power_w * busy_end_s
    clock.t = busy_end_s + 0.3  # idle again, but the last second still holds busy time
    g = engine.gauges()
    assert g.extra_energy_j == pytest.approx(extra_j, rel=1e-9)
    assert perf.idle_power_w < g.power_w < perf.tdp_w
    clock.t = busy_end_s + 1.5
    g = engine.gauges()
    assert g.power_w == perf.idle_power_w  # the average has decayed to idle
    assert g.extra_energy_j == pytest.approx(extra_j, rel=1e-9)  # idle adds nothing above idle


def test_power_cap_lowers_the_clock_of_heavy_iterations_only() -> None:
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    capped = PowerCappedPerf(perf, supported_clocks_mhz(gpu_for("h100-sxm")))
    heavy = (512, 512 * 2000, 0, 0)
    light = (0, 0, 1, 100)
    free_s, free_w = perf.iteration(1980, *heavy)
    capped.power_limit_w = 0.8 * free_w
    latency_s, power_w = capped.iteration(1980, *heavy)
    assert power_w <= capped.power_limit_w and latency_s > free_s
    assert capped.last_capped and 800 <= capped.last_clock_mhz < 1980
    assert capped.iteration(1980, *light) == perf.iteration(1980, *light)
    assert not capped.last_capped and capped.last_clock_mhz == 1980
