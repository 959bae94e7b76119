"""Time-compressed simulated nodes (`simulated.time_scale`, the engine's `--time-scale`): the engine loop
maps wall time to simulated time as sim = X x wall, so a request's tokens come at 1/X of the wall time
they take at X = 1 while the simulated energy of the same work is unchanged; the simulated backend's
energy counter runs X times faster per wall second while power stays physical, and the agent's
energy cross-check multiplies integrated power by the backend's declared scale."""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path

import pytest

from agent.api.errors import InvalidArgumentError
from agent.app import build_parser, make_driver
from agent.gpu.base import GpuReading
from agent.settings import SIMULATED_ENGINE_COMMAND, merge_settings
from agent.sim.engine import _build_parser as engine_parser
from agent.sim.engine import options_from_args
from agent.sim.engine_core import EngineConfig
from agent.sim.gpu import SimulatedGpuBackend, idle_power_w
from agent.sim.node import GpuActivity, NodeDir
from agent.sim.physics import PerfModel, load_perf_model
from agent.sim.realtime import STREAM_INTERVAL_S, EngineRequest, RealTimeEngine
from agent.telemetry import NodeSample, backend_time_scale, energy_discrepancy

SEED = 11


class FakeClock:
    """Wall clock of the test (seconds)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def monotonic_s(self) -> float:
        return self.t

    def wall_ns(self) -> int:
        return int(self.t * 1e9)


def _engine(
    perf: PerfModel, clock: FakeClock, time_scale: float, node: NodeDir | None = None
) -> RealTimeEngine:
    return RealTimeEngine(
        perf,
        "h100-sxm",
        tuple(range(perf.tp)),
        node,
        EngineConfig(),
        seed=SEED,
        monotonic_s=clock.monotonic_s,
        time_scale=time_scale,
    )


def _wall_at(engine: RealTimeEngine, clock: FakeClock, sim_s: float) -> float:
    """The first wall time at which the engine's simulated time has reached `sim_s` (x / X x X may
    round just below x)."""
    saved, t = clock.t, engine.wall_s(sim_s)
    clock.t = t
    while engine.now_s() < sim_s:
        clock.t = t = math.nextafter(t, math.inf)
    clock.t = saved
    return t


def _run_one(
    time_scale: float, n_in: int, n_out: int, node: NodeDir | None = None
) -> tuple[RealTimeEngine, FakeClock, EngineRequest, float, list[float]]:
    """One request arriving at simulated 0.2 s; the wall times of its tokens, stepping at the engine's
    wake-ups (simulated times, turned into wall times by the engine's own scale)."""
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    clock = FakeClock()
    engine = _engine(perf, clock, time_scale, node)
    if node is not None:
        engine.mark_loaded()
    clock.t = engine.wall_s(0.2)
    engine.step(engine.now_s())
    submitted_wall_s = clock.t
    req = engine.submit(n_in, n_out)
    times: list[float] = []
    for _ in range(100_000):
        engine.step(engine.now_s())
        while not req.tokens.empty():
            if req.tokens.get_nowait() is not None:
                times.append(clock.t)
        if req.emitted == req.output_tokens and len(times) == n_out:
            break
        clock.t = max(clock.t, _wall_at(engine, clock, engine.next_wake_s(engine.now_s())))
    else:
        raise AssertionError("the request never finished")
    return engine, clock, req, submitted_wall_s, times


def test_tokens_come_at_a_tenth_of_the_wall_time_at_time_scale_10() -> None:
    _, _, req1, t1, times1 = _run_one(1.0, 1500, 60)
    _, _, req10, t10, times10 = _run_one(10.0, 1500, 60)
    assert len(times1) == len(times10) == 60
    # the same simulated schedule (same seed, same arrival in simulated time)...
    assert req10.first_token_s == pytest.approx(req1.first_token_s, abs=1e-9)
    assert req10.finish_s == pytest.approx(req1.finish_s, abs=1e-9)
    # ...delivered in a tenth of the wall time: the first and last token exactly, those between in
    # bunches (each at most one stream interval of wall time late, at either scale)
    for k, (a, b) in enumerate(zip(times1, times10, strict=True)):
        slack_s = 1e-9 if k in (0, len(times1) - 1) else STREAM_INTERVAL_S + 1e-9
        assert abs((b - t10) - (a - t1) / 10.0) <= slack_s
    assert times1[-1] - t1 > 0.3  # a request that takes a while at X = 1


def test_the_same_work_costs_the_same_simulated_energy(tmp_path: Path) -> None:
    results = {}
    for x in (1.0, 10.0):
        node = NodeDir(tmp_path / f"node-{x:g}")
        node.path.mkdir()
        engine, clock, _, _, _ = _run_one(x, 2000, 100, node)
        clock.t += 1.5  # idle for 1.5 wall seconds: the average (over the last wall second) is idle
        gauges = engine.gauges()
        engine.step(engine.now_s())
        results[x] = (gauges.extra_energy_j, node.read_activity(0).extra_energy_j, gauges.power_w)
    (e1, a1, p1), (e10, a10, p10) = results[1.0], results[10.0]
    assert e1 > 100.0
    assert e10 == pytest.approx(e1, rel=1e-6)
    assert a10 == pytest.approx(a1, rel=1e-3) and a1 == pytest.approx(e1, rel=1e-3)
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    assert p1 == p10 == perf.idle_power_w  # idle again at both scales


def test_power_stays_physical_averaged_over_the_last_wall_second() -> None:
    """Mid-way through a long steady decode the one-wall-second average (10 simulated seconds at X = 10)
    reads the same watts as the one-second average at X = 1."""
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    powers = {}
    for x in (1.0, 10.0):
        clock = FakeClock()
        engine = _engine(perf, clock, x)
        engine.step(0.0)
        req = engine.submit(100, 3000)
        while engine.now_s() < 15.0 and req.emitted < req.output_tokens:
            engine.step(engine.now_s())
            clock.t = _wall_at(engine, clock, min(15.0, engine.next_wake_s(engine.now_s())))
        assert req.emitted < req.output_tokens  # still decoding
        powers[x] = engine.gauges().power_w
    assert perf.idle_power_w + 20.0 < powers[1.0] < perf.tdp_w
    assert powers[10.0] == pytest.approx(powers[1.0], rel=0.05)


async def test_the_run_loop_sleeps_wall_time() -> None:
    """The loop on the real clock: a request worth about 1.5 simulated seconds ends in about 0.1 s."""
    perf = load_perf_model("llama3.1-8b", "h100-sxm", 1)
    engine = RealTimeEngine(perf, "h100-sxm", (0,), None, EngineConfig(), seed=SEED, time_scale=15.0)
    task = asyncio.create_task(engine.run())
    try:
        start = time.monotonic()
        req = engine.submit(500, 200)
        while await asyncio.wait_for(req.tokens.get(), 10) is not None:
            pass
        wall_s = time.monotonic() - start
        sim_s = req.finish_s - req.arrival_s
        assert sim_s > 1.0
        assert sim_s / 15.0 * 0.9 <= wall_s <= sim_s / 15.0 * 1.5 + 0.25
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---------------------------------------------------------------------------- backend and cross-check


def _record(extra_energy_j: float, extra_power_w: float, busy_s: float) -> GpuActivity:
    return GpuActivity(
        pid=os.getpid(),
        extra_energy_j=extra_energy_j,
        extra_power_w=extra_power_w,
        busy_s=busy_s,
        clock_mhz=1980,
        power_capped=False,
        mem_used_bytes=1 << 30,
    )


def test_backend_counter_runs_time_scale_faster_power_unchanged(tmp_path: Path) -> None:
    idle_w = idle_power_w("llama2-70b", "h100-sxm")
    readings = {}
    for x in (1.0, 20.0):
        clock = FakeClock(100.0)
        backend = SimulatedGpuBackend(tmp_path / f"n{x:g}", gpus=1, clock=clock, time_scale=x)
        assert backend.time_scale == x and backend_time_scale(backend) == x
        assert backend.info(0).power_average_s == 1.0  # averaged over the last wall second
        node = NodeDir(backend.node_dir)
        node.write_activity(0, _record(0.0, 0.0, 0.0))
        first = backend.read(0)
        clock.t += 2.0  # two wall seconds: 2 x simulated seconds of a 300 W-above-idle load
        sim_s = 2.0 * x
        node.write_activity(0, _record(300.0 * sim_s, 300.0, 0.5 * sim_s))
        second = backend.read(0)
        readings[x] = (second.energy_j - first.energy_j, second.power_w, second.util_gpu_ratio)
    (d1, p1, u1), (d20, p20, u20) = readings[1.0], readings[20.0]
    assert d1 == pytest.approx(2.0 * (idle_w + 300.0))
    assert d20 == pytest.approx(20.0 * d1)
    assert p1 == p20 == pytest.approx(idle_w + 300.0)
    assert u1 == u20 == pytest.approx(0.5)


def test_backend_refuses_a_bad_time_scale(tmp_path: Path) -> None:
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(InvalidArgumentError, match="time_scale"):
            SimulatedGpuBackend(tmp_path / "n", gpus=1, time_scale=bad)


def _samples(time_scale: float, seconds: int, power_w: float) -> list[NodeSample]:
    """A steady GPU read once per wall second: counter in simulated joules, power in watts."""
    out = []
    for k in range(seconds + 1):
        reading = GpuReading(
            power_w=power_w,
            energy_j=1000.0 + power_w * time_scale * k,
            sm_clock_mhz=1980,
            mem_clock_mhz=2619,
            util_gpu_ratio=1.0,
            util_mem_ratio=1.0,
            mem_used_bytes=0,
            temperature_c=50.0,
            enforced_power_limit_w=700.0,
            clock_event_reasons_mask=0,
        )
        out.append(NodeSample(k + 1, int(k * 1e9), float(k), ((0, reading),), ()))
    return out


def test_cross_check_multiplies_integrated_power_by_the_time_scale() -> None:
    samples = _samples(20.0, 10, 350.0)
    check = energy_discrepancy(samples, 0, power_average_s=1.0, time_scale=20.0)
    assert check is not None and check.discrepancy_ratio == pytest.approx(0.0, abs=1e-12)
    assert check.counter_j == pytest.approx(350.0 * 20.0 * 10.0)
    unscaled = energy_discrepancy(samples, 0, power_average_s=1.0)
    assert unscaled is not None and unscaled.discrepancy_ratio == pytest.approx(0.95)
    trapezoid = energy_discrepancy(samples, 0, time_scale=20.0)
    assert trapezoid is not None and trapezoid.discrepancy_ratio == pytest.approx(0.0, abs=1e-12)
    assert backend_time_scale(object()) == 1.0  # NVML and other backends declare none


# ------------------------------------------------------------------------------------- configuration


def test_setting_cli_environment_and_command_template(tmp_path: Path) -> None:
    s = merge_settings({"gpu": {"backend": "simulated"}}, {}, {}, hostname="n")
    assert s.simulated.time_scale == 1.0
    s = merge_settings(
        {"gpu": {"backend": "simulated"}, "runtime_dir": str(tmp_path)},
        {"DYNAMOLLM_AGENT_SIMULATED_TIME_SCALE": "5"},
        {"simulated.time_scale": "20"},
        hostname="n",
    )
    assert s.simulated.time_scale == 20.0  # CLI beats the environment
    assert s.engine.command == SIMULATED_ENGINE_COMMAND
    assert "--time-scale {time_scale}" in SIMULATED_ENGINE_COMMAND
    ns = build_parser().parse_args(["--simulated", "--time-scale", "20"])
    assert ns.time_scale == "20"
    driver = make_driver(s, FakeClock())
    assert driver._template_vars["time_scale"] == "20.0"


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf", "2e6"])
def test_bad_time_scale_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match=r"simulated\.time_scale"):
        merge_settings({"gpu": {"backend": "simulated"}}, {}, {"simulated.time_scale": value}, hostname="n")


def test_time_scale_needs_the_simulated_backend_and_a_command_passing_it() -> None:
    with pytest.raises(InvalidArgumentError, match=r"simulated\.time_scale"):
        merge_settings({}, {}, {"simulated.time_scale": "20"}, hostname="n")
    with pytest.raises(InvalidArgumentError, match=r"engine\.command"):
        merge_settings(
            {"gpu": {"backend": "simulated"}, "engine": {"command": "{python} -m agent.sim.engine"}},
            {},
            {"simulated.time_scale": "20"},
            hostname="n",
        )


def test_engine_option_time_scale() -> None:
    parser = engine_parser()
    opts = options_from_args(parser.parse_args(["--model", "llama3.1-8b"]), {})
    assert opts.time_scale == 1.0
    opts = options_from_args(parser.parse_args(["--model", "llama3.1-8b", "--time-scale", "20"]), {})
    assert opts.time_scale == 20.0
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(InvalidArgumentError, match="--time-scale"):
            options_from_args(parser.parse_args(["--model", "llama3.1-8b", "--time-scale", bad]), {})
