"""The simulated engine program as a real subprocess on a free port: HTTP API, metrics, clock effect, drain,
and latencies equal to the simulator's engine core (SimEngine) for the same request.

Uses llama3.1-8b at TP1 (iterations of a few milliseconds) so that every test runs in about a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent.sim.engine_core import EngineConfig, SimEngine
from agent.sim.gpu import SimulatedGpuBackend
from agent.sim.node import NodeDir
from agent.sim.physics import load_perf_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama3.1-8b"


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_engine(tmp_path: Path, *args: str, name: str = "engine") -> Engine:
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "agent.sim.engine", "--model", MODEL, "--tp", "1", "--port", "0", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"engine_listening"' in line:
                return Engine(proc, json.loads(line)["port"], log)
        if proc.poll() is not None:
            raise AssertionError(f"engine exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"engine did not listen: {log.read_text()}")


async def wait_ready(session: aiohttp.ClientSession, engine: Engine) -> None:
    for _ in range(500):
        async with session.get(engine.url + "/health") as r:
            if r.status == 200:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("engine never became ready")


@pytest.fixture
def node(tmp_path: Path) -> SimulatedGpuBackend:
    return SimulatedGpuBackend(tmp_path / "node", gpus=2, gpu="h100-sxm", model=MODEL)


@pytest.fixture
def engine(tmp_path: Path, node: SimulatedGpuBackend) -> Iterator[Engine]:
    eng = start_engine(tmp_path, "--gpus", "1", "--node-dir", str(node.node_dir), "--startup-s", "0")
    yield eng
    if eng.proc.poll() is None:
        eng.proc.send_signal(signal.SIGTERM)
        assert eng.proc.wait(10) == 0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def stream_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block]


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value, checking the exposition format on the way (HELP/TYPE before samples)."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')
    typed: set[str] = set()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        m = sample.match(line)
        assert m, f"bad sample line: {line!r}"
        name = m.group(1)
        assert any(name == t or name.startswith(t + "_") for t in typed), f"{name} has no TYPE"
        out[name + (m.group(2) or "")] = float(m.group(3))
    return out


async def get_metrics(session: aiohttp.ClientSession, engine: Engine) -> dict[str, float]:
    async with session.get(engine.url + "/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        return parse_metrics(await r.text())


LAB = f'{{model_name="{MODEL}"}}'


async def test_health_is_503_until_loaded_and_the_gpus_are_claimed_then(
    tmp_path: Path, node: SimulatedGpuBackend, session: aiohttp.ClientSession
) -> None:
    eng = start_engine(tmp_path, "--gpus", "0", "--node-dir", str(node.node_dir), "--startup-s", "0.5")
    try:
        async with session.get(eng.url + "/health") as r:
            assert r.status == 503
        async with session.post(eng.url + "/v1/completions", json={"prompt": "hi"}) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
        assert node.read(0).mem_used_bytes == 0
        await wait_ready(session, eng)
        assert node.read(0).mem_used_bytes > 0
        assert node.read(1).mem_used_bytes == 0
        async with session.get(eng.url + "/v1/models") as r:
            models = await r.json()
        assert models["data"][0]["id"] == MODEL
    finally:
        eng.proc.send_signal(signal.SIGTERM)
        assert eng.proc.wait(10) == 0
    assert node.read(0).mem_used_bytes == 0


async def test_completions_whole_answers(engine: Engine, session: aiohttp.ClientSession) -> None:
    await wait_ready(session, engine)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 7, "ignore_eos": True}
    async with session.post(engine.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["object"] == "text_completion"
    assert doc["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    assert len(doc["choices"][0]["text"].split()) == 7
    assert doc["choices"][0]["finish_reason"] == "length"

    body = {"prompt_token_ids": list(range(123)), "max_tokens": 3}
    async with session.post(engine.url + "/v1/completions", json=body) as r:
        assert (await r.json())["usage"]["prompt_tokens"] == 123

    chat = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        "max_tokens": 4,
    }
    async with session.post(engine.url + "/v1/chat/completions", json=chat) as r:
        doc = await r.json()
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert len(doc["choices"][0]["message"]["content"].split()) == 4
    assert doc["usage"]["completion_tokens"] == 4
    assert doc["usage"]["prompt_tokens"] == 1 + 2 + 1 + 2 * 4  # "Be" "brief." "Hi!" + per-message markers


async def test_streaming_one_chunk_per_token(engine: Engine, session: aiohttp.ClientSession) -> None:
    await wait_ready(session, engine)
    body = {"prompt": "count", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(engine.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        events = await stream_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 5
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 4 + ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True}
    async with session.post(engine.url + "/v1/chat/completions", json=chat) as r:
        events = await stream_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 4
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks).split() == ["the", "quick", "brown"]


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt_token_ids": [1] * 100, "max_tokens": 200000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
]


async def test_bad_requests_name_the_field(engine: Engine, session: aiohttp.ClientSession) -> None:
    await wait_ready(session, engine)
    for path, body, status, param in BAD_REQUESTS:
        async with session.post(engine.url + path, json=body) as r:
            doc = await r.json()
            assert (r.status, doc["param"], doc["code"]) == (status, param, status), (path, body, doc)
    async with session.post(engine.url + "/v1/completions", data=b"{oops") as r:
        assert r.status == 400
    m = await get_metrics(session, engine)
    assert m["vllm:prompt_tokens_total" + LAB] == 0  # nothing was admitted


async def test_metrics_have_vllm_names_and_count_tokens(
    engine: Engine, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, engine)
    for n in (10, 20, 30):
        async with session.post(
            engine.url + "/v1/completions", json={"prompt_token_ids": [1] * n, "max_tokens": 4}
        ) as r:
            assert r.status == 200
    m = await get_metrics(session, engine)
    assert m["vllm:num_requests_running" + LAB] == 0
    assert m["vllm:num_requests_waiting" + LAB] == 0
    assert m["vllm:gpu_cache_usage_perc" + LAB] == 0
    assert m["vllm:kv_cache_usage_perc" + LAB] == 0
    assert m["vllm:prompt_tokens_total" + LAB] == 60
    assert m["vllm:generation_tokens_total" + LAB] == 12
    assert m[f'vllm:request_success_total{{model_name="{MODEL}",finished_reason="length"}}'] == 3
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert m[f"vllm:{hist}_count" + LAB] == 3
        assert m[f'vllm:{hist}_bucket{{model_name="{MODEL}",le="+Inf"}}'] == 3
    assert m["vllm:time_per_output_token_seconds_count" + LAB] == 9
    assert m["dynamollm_sim_engine_sm_clock_hertz" + LAB] == 1980e6
    # exact energy bookkeeping: what the engine counted is what the backend's counter holds above idle
    activity = NodeDir(engine_node_dir(engine)).read_activity(1)
    assert activity.extra_energy_j == pytest.approx(m["dynamollm_sim_engine_energy_joules_total" + LAB])
    assert activity.extra_energy_j > 0


def engine_node_dir(engine: Engine) -> Path:
    args = engine.proc.args
    assert isinstance(args, list)
    return Path(args[args.index("--node-dir") + 1])


async def _timed_prefill_load(session: aiohttp.ClientSession, engine: Engine) -> float:
    """Seconds for four long-prompt requests: compute-bound prefill, where the clock matters most."""
    body = {"prompt_token_ids": [7] * 4000, "max_tokens": 8}
    t0 = time.monotonic()

    async def one() -> None:
        async with session.post(engine.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            await r.read()

    await asyncio.gather(*(one() for _ in range(4)))
    return time.monotonic() - t0


async def test_a_clock_lock_through_the_backend_slows_the_engine_and_lowers_power(
    engine: Engine, node: SimulatedGpuBackend, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, engine)
    e0 = node.read(1).energy_j
    fast_s = await _timed_prefill_load(session, engine)
    await asyncio.sleep(0.1)  # the idle record is written when the batch empties
    e1 = node.read(1).energy_j
    node.set_locked_clocks(1, 800, 800)  # picked up by the running engine at its next iteration
    slow_s = await _timed_prefill_load(session, engine)
    await asyncio.sleep(0.1)
    e2 = node.read(1).energy_j
    assert slow_s > 1.3 * fast_s, (fast_s, slow_s)
    fast_w, slow_w = (e1 - e0) / (fast_s + 0.1), (e2 - e1) / (slow_s + 0.1)
    assert slow_w < 0.8 * fast_w, (fast_w, slow_w)
    m = await get_metrics(session, engine)
    assert m["dynamollm_sim_engine_sm_clock_hertz" + LAB] == 800e6
    assert node.read(0).energy_j < e2  # GPU 0 only idled


async def test_power_limit_caps_the_clock(
    engine: Engine, node: SimulatedGpuBackend, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, engine)
    node.set_power_limit(1, 300.0)  # between the engine's power at 800 and at 1980 MHz
    body = {"prompt_token_ids": [7] * 4000, "max_tokens": 200, "stream": True}
    async with session.post(engine.url + "/v1/completions", json=body) as r:
        await r.content.readline()  # first token: the engine is busy with a capped prefill or decode
        await asyncio.sleep(0.3)  # past the next activity write (every 100 ms while busy)
        reading = node.read(1)
        await r.read()
    assert reading.power_w <= 300.0 + 1e-6
    assert 800 < reading.sm_clock_mhz < 1980
    assert reading.clock_event_reasons_mask & 0x4


async def test_drain_then_sigterm_loses_no_accepted_request(
    tmp_path: Path, engine: Engine, node: SimulatedGpuBackend, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, engine)
    n_requests, n_tokens = 20, 60

    async def client() -> int:
        body = {"prompt": "go", "max_tokens": n_tokens, "stream": True}
        async with session.post(engine.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            events = await stream_events(r)
        assert events[-1] == "[DONE]"
        return len(events) - 1

    tasks = [asyncio.create_task(client()) for _ in range(n_requests)]
    for _ in range(200):
        m = await get_metrics(session, engine)
        if m["vllm:num_requests_running" + LAB] + m["vllm:num_requests_waiting" + LAB] == n_requests:
            break
        await asyncio.sleep(0.005)
    async with session.post(engine.url + "/admin/drain") as r:
        assert r.status == 200
        assert (await r.json())["draining"] is True
    async with session.post(engine.url + "/v1/completions", json={"prompt": "late"}) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
    engine.proc.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*tasks) == [n_tokens] * n_requests
    assert await asyncio.to_thread(engine.proc.wait, 10) == 0
    log = engine.log.read_text()
    assert '"engine_stopped"' in log and "grace_expired" not in log
    released = NodeDir(node.node_dir).read_activity(1)
    assert released.pid == 0 and released.extra_power_w == 0.0 and released.extra_energy_j > 0

    # a new engine on the same GPU continues the energy counter
    again = start_engine(
        tmp_path, "--gpus", "1", "--node-dir", str(node.node_dir), "--startup-s", "0", name="again"
    )
    try:
        await wait_ready(session, again)
        async with session.post(again.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}) as r:
            assert r.status == 200
        await asyncio.sleep(0.1)
        assert NodeDir(node.node_dir).read_activity(1).extra_energy_j > released.extra_energy_j
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(10) == 0


async def test_sigterm_grace_expiry_exits_zero(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    eng = start_engine(tmp_path, "--startup-s", "0", "--shutdown-grace-s", "0.2")
    await wait_ready(session, eng)
    async with session.post(
        eng.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5000, "stream": True}
    ) as r:
        await r.content.readline()
        eng.proc.send_signal(signal.SIGTERM)
        events = await stream_events(r)
    assert "[DONE]" not in events  # cut short: the client can tell
    assert await asyncio.to_thread(eng.proc.wait, 10) == 0
    assert '"engine_grace_expired"' in eng.log.read_text()


async def test_latencies_are_the_simulator_cores(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """The program runs the cluster simulator's SimEngine on the wall clock: with the same seed (same
    jitter draws), one request's TTFT and end-to-end latency in the engine's own histograms are the core's
    exactly, and what a streaming client measures is the core's plus the HTTP round trip."""
    seed, n_in, n_out = 7, 3000, 40
    eng = start_engine(tmp_path, "--startup-s", "0", "--seed", str(seed))
    try:
        await wait_ready(session, eng)
        body = {"prompt_token_ids": [7] * n_in, "max_tokens": n_out, "stream": True}
        arrivals_s: list[float] = []
        t0 = time.monotonic()
        async with session.post(eng.url + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    arrivals_s.append(time.monotonic() - t0)
        m = await get_metrics(session, eng)
    finally:
        eng.proc.send_signal(signal.SIGTERM)
        assert eng.proc.wait(10) == 0

    core = SimEngine(load_perf_model(MODEL, "h100-sxm", 1), 1980, np.random.default_rng(seed), EngineConfig())
    core.submit(0, 0.0, n_in, n_out)
    core.advance_to(60.0)
    (rec,) = core.pop_completed()
    assert m["vllm:time_to_first_token_seconds_sum" + LAB] == pytest.approx(rec.ttft_s, abs=1e-9)
    assert m["vllm:e2e_request_latency_seconds_sum" + LAB] == pytest.approx(rec.e2e_s, abs=1e-9)
    assert len(arrivals_s) == n_out
    slack_s = 0.1  # HTTP and event-loop latency on a busy test machine
    assert rec.ttft_s <= arrivals_s[0] < rec.ttft_s + slack_s, (arrivals_s[0], rec.ttft_s)
    assert rec.e2e_s <= arrivals_s[-1] < rec.e2e_s + slack_s, (arrivals_s[-1], rec.e2e_s)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--tp", "3"], "--tp"),
        (["--gpus", "0,1"], "--gpus"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--gpu", "a100"], "--gpu"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    cmd = [sys.executable, "-m", "agent.sim.engine", "--model", MODEL, "--port", "0", *args]
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert flag in done.stderr.decode()
