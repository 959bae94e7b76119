"""The agent's Prometheus metrics, scraped over HTTP from real agents: a `python -m agent.app --simulated`
process after control calls (one accepted, one refused) and an engine start, every metric checked against
what was applied; the drop counter with a subscriber that never reads; an agent on the NVML backend (the
fake NVML library) scraped before its first telemetry sample; `metrics_listen` off; a bad or taken
`metrics_listen` stopping start-up with one line naming the key."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from agent.api.v1 import common_pb2, control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import start_agent
from agent.control import StreamPlan
from agent.engine.metrics import MetricFamily, parse_prometheus_text
from agent.settings import AgentSettings, merge_settings
from tests.fakenvml import FakeNvml

ROOT = Path(__file__).resolve().parents[2]
PERIOD_S = 0.1
GPU_FAMILIES = (
    "dynamollm_gpu_power_watts",
    "dynamollm_gpu_energy_joules_total",
    "dynamollm_gpu_sm_clock_target_hertz",
    "dynamollm_gpu_sm_clock_effective_hertz",
    "dynamollm_gpu_power_limit_watts",
)
ENGINE_STATES = {"starting", "ready", "draining", "stopped", "failed"}


async def scrape(port: int) -> dict[str, MetricFamily]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus_text(await resp.text(), source="agent /metrics")


def values(families: dict[str, MetricFamily], name: str, key: str = "gpu") -> dict[str, float]:
    """The samples of family `name` by their `key` label."""
    return {s.label(key) or "": s.value for s in families[name].samples}


async def scrape_until(
    port: int, wanted: Callable[[dict[str, MetricFamily]], bool], timeout_s: float = 10.0
) -> dict[str, MetricFamily]:
    """The first scrape for which `wanted` holds (the measured values follow the telemetry sampler)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        families = await scrape(port)
        if wanted(families) or loop.time() > deadline:
            return families
        await asyncio.sleep(PERIOD_S)


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A simulated agent process on free ports; yields its `agent_listening` line."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0",
        "DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S": str(PERIOD_S),
        "DYNAMOLLM_AGENT_TELEMETRY_MIN_PERIOD_S": str(PERIOD_S),
    }
    with open(tmp_path / "agent.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.app", "--simulated", "--gpus", "2", "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--runtime-dir", str(tmp_path / "run"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert event["event"] == "agent_listening" and event["metrics_port"] > 0, event
        yield event
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_simulated_agent_exports_every_metric(agent_process: dict[str, Any]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent_process['port']}") as channel:
        ctl = control_pb2_grpc.NodeControlStub(channel)
        tel = telemetry_pb2_grpc.NodeTelemetryStub(channel)
        setting = control_pb2.GpuSetting(
            gpu_index=1, min_clock_mhz=1200, max_clock_mhz=1200, power_limit_w=500
        )
        await ctl.ApplyGpuConfig(control_pb2.ApplyGpuConfigRequest(generation=1, lease_s=60, gpus=[setting]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ctl.ApplyGpuConfig(
                control_pb2.ApplyGpuConfigRequest(
                    generation=2, lease_s=60, gpus=[control_pb2.GpuSetting(gpu_index=7)]
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        started = await ctl.ReconfigureEngine(
            control_pb2.ReconfigureEngineRequest(
                generation=1,
                engine_id="e1",
                model="llama3.1-8b",
                gpu_indices=[0],
                tp_degree=1,
                engine_options={"startup-s": "0.05"},
            ),
            timeout=60,
        )
        assert started.engine.state == common_pb2.ENGINE_STATE_READY
        inventory = await tel.GetInventory(telemetry_pb2.GetInventoryRequest())

    port = agent_process["metrics_port"]
    # The measured values follow the next telemetry samples after the apply.
    families = await scrape_until(
        port,
        lambda f: (
            values(f, "dynamollm_gpu_sm_clock_effective_hertz").get("1") == 1.2e9
            and values(f, "dynamollm_gpu_power_limit_watts").get("1") == 500.0
        ),
    )
    types = {name: f.type for name, f in families.items() if name.startswith("dynamollm_")}
    assert types == {
        "dynamollm_gpu_power_watts": "gauge",
        "dynamollm_gpu_energy_joules_total": "counter",
        "dynamollm_gpu_sm_clock_target_hertz": "gauge",
        "dynamollm_gpu_sm_clock_effective_hertz": "gauge",
        "dynamollm_gpu_power_limit_watts": "gauge",
        "dynamollm_agent_lease_remaining_seconds": "gauge",
        "dynamollm_agent_telemetry_samples_dropped_total": "counter",
        "dynamollm_agent_control_calls_total": "counter",
        "dynamollm_agent_control_calls_created": "gauge",
        "dynamollm_engine_state": "gauge",
    }

    power = values(families, "dynamollm_gpu_power_watts")
    assert set(power) == {"0", "1"} and all(w > 0 for w in power.values())
    energy = values(families, "dynamollm_gpu_energy_joules_total")
    assert set(energy) == {"0", "1"} and all(j > 0 for j in energy.values())
    # GPU 1 is locked at 1200 MHz; GPU 0 is unlocked: its target is the highest clock it supports.
    highest_hz = max(inventory.gpus[0].supported_sm_clocks_mhz) * 1e6
    assert values(families, "dynamollm_gpu_sm_clock_target_hertz") == {"0": highest_hz, "1": 1.2e9}
    assert values(families, "dynamollm_gpu_sm_clock_effective_hertz")["1"] == 1.2e9
    limits = values(families, "dynamollm_gpu_power_limit_watts")
    assert limits == {"0": inventory.gpus[0].power_limit_w, "1": 500.0}
    (lease,) = families["dynamollm_agent_lease_remaining_seconds"].samples
    assert 0 < lease.value <= 60
    (dropped,) = families["dynamollm_agent_telemetry_samples_dropped_total"].samples
    assert dropped.value == 0

    calls = {
        (s.label("rpc"), s.label("result")): s.value
        for s in families["dynamollm_agent_control_calls_total"].samples
    }
    assert calls == {
        ("ApplyGpuConfig", "OK"): 1,
        ("ApplyGpuConfig", "INVALID_ARGUMENT"): 1,
        ("ReconfigureEngine", "OK"): 1,
        ("StopEngine", "OK"): 0,
        ("RenewLease", "OK"): 0,
        ("RestoreDefaults", "OK"): 0,
    }
    states = {s.label("state"): s.value for s in families["dynamollm_engine_state"].samples}
    assert {s.label("engine") for s in families["dynamollm_engine_state"].samples} == {"e1"}
    assert states == {state: 1.0 if state == "ready" else 0.0 for state in ENGINE_STATES}

    later = await scrape_until(
        port, lambda f: values(f, "dynamollm_gpu_energy_joules_total")["0"] > energy["0"]
    )
    assert values(later, "dynamollm_gpu_energy_joules_total")["0"] > energy["0"]  # a counter: it only grows


def _settings(tmp_path: Path, metrics_listen: str) -> AgentSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": metrics_listen,
        "runtime_dir": str(tmp_path / "run"),
        "log_level": "warning",
        "gpu": {"backend": "simulated"},
        "simulated": {"gpus": 1},
        "telemetry": {"period_s": 0.05, "min_period_s": 0.05, "subscriber_queue": 2},
    }
    return merge_settings(values, {}, {}, hostname="metrics-node")


async def test_samples_dropped_for_a_subscriber_that_never_reads_are_counted(tmp_path: Path) -> None:
    def dropped(families: dict[str, MetricFamily]) -> float:
        return families["dynamollm_agent_telemetry_samples_dropped_total"].samples[0].value

    running = await start_agent(_settings(tmp_path, "127.0.0.1:0"))
    try:
        sampler = running.agent.sampler
        stalled = sampler.subscribe(
            StreamPlan(period_s=0.05, stride=1, gpu_indices=(0,), include_engines=False)
        )
        before = dropped(await scrape_until(running.metrics_port, lambda f: dropped(f) >= 3))
        sampler.unsubscribe(stalled)  # the stream ended: its drops stay counted
        after = dropped(await scrape(running.metrics_port))
        assert after == stalled.dropped_count >= before >= 3
    finally:
        await running.stop()


async def test_an_nvml_agent_exports_every_gpu(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    settings = merge_settings(
        {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "runtime_dir": str(tmp_path / "run")},
        {},
        {},
        hostname="nvml-node",
    )
    running = await start_agent(settings)
    # Stopped before its first sample: the scrape reads the GPUs itself.
    next(t for t in running.tasks if t.get_name() == "telemetry-sampler").cancel()
    try:
        families = await scrape(running.metrics_port)
        assert not running.agent.sampler.ring
        infos = running.agent.workers.infos
        gpus = {str(info.index) for info in infos}
        for name in GPU_FAMILIES:
            assert set(values(families, name)) == gpus, name
        assert all(w > 0 for w in values(families, "dynamollm_gpu_power_watts").values())
        assert values(families, "dynamollm_gpu_sm_clock_target_hertz") == {
            str(info.index): max(info.supported_sm_clocks_mhz) * 1e6 for info in infos
        }
    finally:
        await running.stop()


async def test_empty_metrics_listen_serves_no_metrics(tmp_path: Path) -> None:
    running = await start_agent(_settings(tmp_path, ""))
    try:
        assert running.metrics_port == 0 and running.metrics_runner is None
    finally:
        await running.stop()


def _free_port_held() -> socket.socket:
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("nowhere", "HOST:PORT or [IPV6]:PORT (port 0..65535), or empty for none"),
        ("unix:/tmp/metrics.sock", "HOST:PORT or [IPV6]:PORT (port 0..65535), or empty for none"),
        ("held", "an address this host can bind"),
    ],
)
async def test_a_bad_metrics_listen_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, value: str, allowed: str
) -> None:
    held = _free_port_held()
    if value == "held":
        value = f"127.0.0.1:{held.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DYNAMOLLM_AGENT_LOG_LEVEL": "error"}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.app", "--simulated", "--gpus", "1", "--listen", "127.0.0.1:0",
            "--metrics-listen", value, "--runtime-dir", str(tmp_path / "run"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        held.close()
    assert proc.returncode == 2 and out == b""
    (line,) = err.decode().splitlines()
    assert line.startswith(f"dynamollm-agent: error: metrics_listen: got '{value}'; allowed: {allowed}"), line
