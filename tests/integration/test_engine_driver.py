"""EngineDriver against real subprocesses: the simulated engine program (`python -m agent.sim.engine`)
and two tiny test programs (one ignoring SIGTERM with a worker child, one failing at start-up).

Covers start/health/metrics/stop, SIGKILL after the grace for the whole process group, start failures
surfacing the engine's log tail, a ready timeout, an unexpected exit, and reconfigure TP 4 -> 8 under
client load (streaming clients that retry 503s and refused connections; none of the accepted requests may
be lost) plus a failed reconfigure rolling back to the previous configuration.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from agent.api.errors import UnavailableError
from agent.engine.driver import SIMULATED_COMMAND_TEMPLATE, EngineDriver, EngineSpec, EngineState

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama2-70b"
# Engine flags for fast tests: short imitated loading, a grace long enough for in-flight requests.
SIM_OPTIONS = {"startup-s": "0.2", "shutdown-grace-s": "10"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def make_driver(tmp_path: Path, template: str = SIMULATED_COMMAND_TEMPLATE, **kwargs: float) -> EngineDriver:
    return EngineDriver(
        template,
        ready_timeout_s=kwargs.get("ready_timeout_s", 20.0),
        stop_grace_s=kwargs.get("stop_grace_s", 10.0),
        log_dir=tmp_path / "logs",
        template_vars={"node_dir": str(tmp_path / "node"), "tmp": str(tmp_path)},
        env={"PYTHONPATH": str(ROOT)},
        poll_s=0.05,
    )


@pytest.fixture
async def sim_driver(tmp_path: Path) -> AsyncIterator[EngineDriver]:
    driver = make_driver(tmp_path)
    try:
        yield driver
    finally:
        await driver.stop_all(grace_s=2.0)
        await driver.close()


def sim_spec(gpus: tuple[int, ...], port: int, **options: str) -> EngineSpec:
    return EngineSpec(
        engine_id="eng-a",
        model=MODEL,
        gpu_indices=gpus,
        tp_degree=len(gpus),
        http_port=port,
        options={**SIM_OPTIONS, **options},
    )


async def test_start_health_metrics_stop(sim_driver: EngineDriver) -> None:
    port = free_port()
    start_s = await sim_driver.start(sim_spec((0, 1), port))
    assert 0.0 < start_s < 20.0
    status = sim_driver.engine("eng-a")
    assert status.state is EngineState.READY
    assert status.pid is not None
    pid = status.pid
    assert process_alive(pid)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
            assert resp.status == 200
        body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 12}
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 12
    metrics = await sim_driver.metrics("eng-a")
    assert metrics.generation_tokens == 12
    assert metrics.finished_requests_count == 1
    assert metrics.outstanding_requests_count == 0
    stop_s = await sim_driver.stop("eng-a")
    assert stop_s < 5.0  # an idle simulated engine exits at once on SIGTERM
    assert sim_driver.engine("eng-a").state is EngineState.STOPPED
    assert sim_driver.engine("eng-a").pid is None
    assert not process_alive(pid)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/health")


STUBBORN_ENGINE = """
import http.server, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the worker below
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(worker.pid))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


async def test_sigkill_after_grace_reaches_the_whole_group(tmp_path: Path) -> None:
    (tmp_path / "stubborn.py").write_text(STUBBORN_ENGINE)
    driver = make_driver(tmp_path, "{python} {tmp}/stubborn.py {port} {tmp}/worker.pid", stop_grace_s=0.5)
    port = free_port()
    await driver.start(EngineSpec("stubborn", "none", (0,), 1, port))
    leader = driver.engine("stubborn").pid
    assert leader is not None
    worker = int((tmp_path / "worker.pid").read_text())
    assert process_alive(worker)
    t0 = time.monotonic()
    stop_s = await driver.stop("stubborn")
    assert 0.5 <= stop_s < 3.0  # waited for the grace, then killed
    assert time.monotonic() - t0 < 5.0
    assert not process_alive(leader)
    for _ in range(50):  # the orphaned worker is reaped by init shortly after its SIGKILL
        if not process_alive(worker):
            break
        await asyncio.sleep(0.05)
    assert not process_alive(worker)
    assert driver.engine("stubborn").state is EngineState.STOPPED
    await driver.close()


async def test_start_failure_surfaces_the_log_tail(sim_driver: EngineDriver) -> None:
    bad = EngineSpec("eng-a", "no-such-model", (0, 1), 2, free_port(), dict(SIM_OPTIONS))
    with pytest.raises(UnavailableError) as info:
        await sim_driver.start(bad)
    message = str(info.value)
    assert "exited with status 2 during start-up" in message
    assert "--model: got 'no-such-model'" in message  # the engine's own error line
    status = sim_driver.engine("eng-a")
    assert status.state is EngineState.FAILED
    assert "--model: got 'no-such-model'" in status.failure_reason
    assert status.pid is None


async def test_ready_timeout_fails_and_kills(sim_driver: EngineDriver) -> None:
    slow = sim_spec((0, 1), free_port(), **{"startup-s": "60"})
    with pytest.raises(UnavailableError, match=r"not ready within 1 s"):
        await sim_driver.start(slow, ready_timeout_s=1.0)
    assert sim_driver.engine("eng-a").state is EngineState.FAILED


async def test_unexpected_exit_is_failed(sim_driver: EngineDriver) -> None:
    await sim_driver.start(sim_spec((0, 1), free_port()))
    pid = sim_driver.engine("eng-a").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if sim_driver.engine("eng-a").state is EngineState.FAILED:
            break
        await asyncio.sleep(0.02)
    status = sim_driver.engine("eng-a")
    assert status.state is EngineState.FAILED
    assert status.failure_reason.startswith(f"exited with status {-signal.SIGKILL}")


@dataclass
class LoadStats:
    accepted: int = 0  # answered 200: the engine took the request
    completed: int = 0  # full answer and [DONE]
    lost: list[str] = field(default_factory=list)  # accepted but not fully answered
    retries: int = 0  # 503 or refused connection before acceptance
    completed_at_s: list[float] = field(default_factory=list)


async def stream_client(
    http: aiohttp.ClientSession, url: str, stop: asyncio.Event, stats: LoadStats, max_tokens: int
) -> None:
    body = {"model": MODEL, "prompt": "tell me a story " * 8, "max_tokens": max_tokens, "stream": True}
    while not stop.is_set():
        accepted = False
        try:
            async with http.post(url, json=body) as resp:
                if resp.status == 503:
                    stats.retries += 1
                    await asyncio.sleep(0.05)
                    continue
                assert resp.status == 200, resp.status
                accepted = True
                stats.accepted += 1
                tokens, done = 0, False
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    tokens += sum(1 for c in json.loads(line[6:])["choices"] if c["text"])
                if done and tokens == max_tokens:
                    stats.completed += 1
                    stats.completed_at_s.append(time.monotonic())
                else:
                    stats.lost.append(f"{tokens}/{max_tokens} tokens, done={done}")
        except aiohttp.ClientError as exc:
            if accepted:
                stats.lost.append(f"{type(exc).__name__}: {exc}")
            else:
                stats.retries += 1  # not listening (between the old and the new engine)
                await asyncio.sleep(0.05)


async def test_reconfigure_tp4_to_tp8_under_load_loses_nothing(sim_driver: EngineDriver) -> None:
    port = free_port()
    await sim_driver.start(sim_spec((0, 1, 2, 3), port))
    url = f"http://127.0.0.1:{port}/v1/completions"
    stats = LoadStats()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        clients = [asyncio.create_task(stream_client(http, url, stop, stats, 16)) for _ in range(16)]
        for _ in range(100):  # until the old engine has answered a few
            if stats.completed >= 16:
                break
            await asyncio.sleep(0.05)
        assert stats.completed >= 16
        assert (await sim_driver.metrics("eng-a")).running_requests_count > 0  # drained under real load
        t0 = time.monotonic()
        timings = await sim_driver.reconfigure(sim_spec(tuple(range(8)), port), drain_timeout_s=10.0)
        ready_s = time.monotonic() - t0
        done_at_ready = stats.completed
        for _ in range(100):  # until the new engine has answered a few
            if stats.completed >= done_at_ready + 16:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
    print(
        f"\nreconfigure TP4->8: drain {timings.drain_s:.3f} s, stop {timings.stop_s:.3f} s, "
        f"start {timings.start_s:.3f} s, until READY {ready_s:.3f} s; accepted {stats.accepted}, "
        f"completed {stats.completed}, lost {len(stats.lost)}, retries {stats.retries}"
    )
    assert timings.restarted
    assert timings.drain_s > 0.0
    assert stats.lost == []
    assert stats.accepted == stats.completed
    assert sum(1 for t in stats.completed_at_s if t > t0 + ready_s) > 0  # the new engine serves
    assert stats.retries > 0  # clients did meet the drain/restart window
    status = sim_driver.engine("eng-a")
    assert status.state is EngineState.READY
    assert status.spec.tp_degree == 8


async def test_failed_reconfigure_rolls_back(sim_driver: EngineDriver) -> None:
    port = free_port()
    old = sim_spec((0, 1, 2, 3), port)
    await sim_driver.start(old)
    old_pid = sim_driver.engine("eng-a").pid
    # Each value passes the driver's checks; together they do not (the engine wants at least
    # max-num-seqs batched tokens) and the engine rejects them at start-up.
    broken = sim_spec(tuple(range(8)), port, **{"max-num-batched-tokens": "8"})
    with pytest.raises(UnavailableError) as info:
        await sim_driver.reconfigure(broken, drain_timeout_s=5.0)
    assert "previous configuration restored" in str(info.value)
    assert "--max-num-batched-tokens" in str(info.value)
    status = sim_driver.engine("eng-a")
    assert status.state is EngineState.READY
    assert status.spec == old
    assert status.pid not in (None, old_pid)
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3}
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
            assert resp.status == 200


async def test_rollback_uses_the_known_good_start_time_not_the_callers_timeout(
    sim_driver: EngineDriver,
) -> None:
    """Fault: a 0.05 s ready timeout fails the new configuration (as it should); the rollback used to get
    the same 0.05 s, failed too, and left a READY engine FAILED. It now gets the previous configuration's
    measured start time times a margin (with a floor)."""
    port = free_port()
    old = sim_spec((0, 1), port)
    await sim_driver.start(old)
    new = sim_spec((0, 1), port, **{"max-num-seqs": "8"})
    with pytest.raises(UnavailableError) as info:
        await sim_driver.reconfigure(new, drain_timeout_s=1.0, ready_timeout_s=0.05)
    assert "previous configuration restored" in str(info.value), str(info.value)
    status = sim_driver.engine("eng-a")
    assert (status.state, status.spec) == (EngineState.READY, old)
