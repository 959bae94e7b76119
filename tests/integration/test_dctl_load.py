"""`dctl load` against the simulated engine program, a real subprocess on a free port.

The engine serves llama2-70b at TP8 (a 4096-token context); when the program has `--time-scale` it runs
as fast as the replay's `--speedup`, so the latencies reported (wall x speedup) are the engine's
simulated ones. Every command goes through `controller.dctl.main.main`, so exit codes and the one-line
errors are those an operator sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.sim.engine_http import approx_token_count
from controller.dctl.main import main
from controller.loadgen import OUTCOMES, SCHEMA, LoadRequest, ReplayConfig, prompt_text, replay
from controller.model.classes import CLASS_NAMES

ROOT = Path(__file__).resolve().parents[2]
SPEEDUP = 4


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _has_time_scale() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "agent.sim.engine", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return "--time-scale" in out.stdout


def start_engine(folder: Path, *args: str, name: str = "engine") -> Engine:
    log = folder / f"{name}.log"
    cmd = [sys.executable, "-m", "agent.sim.engine", "--port", "0", "--startup-s", "0", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20.0
        port = None
        while port is None and time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if '"engine_listening"' in line:
                    port = int(json.loads(line)["port"])
            if proc.poll() is not None:
                raise AssertionError(f"engine exited with {proc.returncode}: {log.read_text()}")
            time.sleep(0.02)
        if port is None:
            raise AssertionError(f"engine did not listen: {log.read_text()}")
        while time.monotonic() < deadline:  # ready: /health answers 200
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return Engine(proc, port, log)
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"engine never became ready: {log.read_text()}")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


def stop_engine(engine: Engine) -> None:
    if engine.proc.poll() is None:
        engine.proc.send_signal(signal.SIGTERM)
        try:
            engine.proc.wait(15)
        except subprocess.TimeoutExpired:
            engine.proc.kill()
            engine.proc.wait(10)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    scale = ["--time-scale", str(SPEEDUP)] if _has_time_scale() else []
    eng = start_engine(
        tmp_path_factory.mktemp("engine"), "--model", "llama2-70b", "--gpu", "h100-sxm", "--tp", "8", *scale
    )
    try:
        yield eng
    finally:
        stop_engine(eng)


def _dctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["load", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dctl load: error: "), err
    return lines[0]


def _csv(path: Path, rows: list[tuple[float, int, int]]) -> Path:
    path.write_text("arrival_s,input_tokens,output_tokens\n" + "".join(f"{a},{i},{o}\n" for a, i, o in rows))
    return path


def _check_accounting(report: dict[str, Any]) -> None:
    assert report["requests"] == sum(report[o] for o in OUTCOMES)
    assert report["trace_requests"] == report["requests"] + report["not_sent"]
    assert report["admitted"] == report["requests"] - report["refused"]
    for key in ("requests", *OUTCOMES, "slo_met"):
        assert sum(c[key] for c in report["per_class"].values()) == report[key], key
    for c in report["per_class"].values():
        assert c["requests"] == sum(c[o] for o in OUTCOMES)


@pytest.mark.parametrize("tokens", [0, 1, 7, 255, 4096])
def test_prompt_has_the_trace_token_count_by_the_engine_count(tokens: int) -> None:
    assert approx_token_count(prompt_text(tokens)) == tokens


def test_synthetic_window_every_request_accounted(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "out" / "load.json"
    t0 = time.monotonic()
    code, out, err = _dctl(
        capsys,
        "--url",
        engine.url,
        "--trace",
        "synthetic:conversation",
        "--duration",
        "16",
        "--speedup",
        str(SPEEDUP),
        "--timeout-s",
        "10",
        "--output",
        "json",
        "--json",
        str(out_file),
    )
    wall = time.monotonic() - t0
    assert code == 0, err
    assert wall < 20.0
    report = json.loads(out)
    assert json.loads(out_file.read_text()) == report
    assert report["schema"] == SCHEMA
    assert report["speedup"] == SPEEDUP
    assert "x speedup 4" in report["time_basis"]
    assert report["model"] == "llama2-70b"  # the first id of GET /v1/models
    assert report["max_model_len"] == 4096
    assert report["requests"] > 20
    assert report["not_sent"] == 0
    _check_accounting(report)
    assert report["ok"] > 0
    assert set(report["per_class"]) == set(CLASS_NAMES)
    for c in report["per_class"].values():
        assert {"ttft_s_p50", "ttft_s_p99", "tbt_s_p50", "tbt_s_p99", "e2e_s_p99", "slo_attainment"} <= set(c)
        assert c["slo"]["ttft_s"] > 0 and c["slo"]["tbt_s"] > 0
        if c["ok"]:
            assert c["ttft_s_p50"] > 0 and c["ttft_s_p99"] >= c["ttft_s_p50"]
            assert c["e2e_s_p99"] >= c["ttft_s_p50"]
    assert report["ttft_s_p50"] > 0
    assert report["tbt_s_p50"] > 0
    assert 0.0 <= report["slo_attainment"] <= 1.0
    assert report["slo_met"] <= report["ok"]


def test_request_longer_than_the_context_is_refused_at_admission(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trace = _csv(tmp_path / "t.csv", [(0.0, 100, 10), (0.05, 50_000, 20), (0.1, 4090, 100)])
    code, out, err = _dctl(
        capsys,
        "--url",
        engine.url,
        "--trace",
        str(trace),
        "--output",
        "json",
        "--per-request",
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads(out)
    _check_accounting(report)
    assert (report["requests"], report["ok"], report["refused"], report["admitted"]) == (3, 1, 2, 1)
    assert report["per_class"]["SS"]["ok"] == 1
    assert report["per_class"]["LS"]["refused"] == 1 and report["per_class"]["LM"]["refused"] == 1
    assert report["slo_attainment"] == report["slo_met"] / 1
    records = report["request_records"]
    assert [r["outcome"] for r in records] == ["ok", "refused", "refused"]
    assert records[0]["tokens"] == 10 and records[0]["ttft_s"] > 0
    assert records[1]["status"] == 400 and "context" in records[1]["reason"]
    assert records[1]["prompt_tokens_sent"] == 4097  # capped one past the announced context
    # the table says it too
    code, out, err = _dctl(capsys, "--url", engine.url, "--trace", str(trace), "--no-progress")
    assert code == 0, err
    assert "refused at admission 2" in out
    assert "Request classes XY" in out


def test_nothing_sent_after_max_duration(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trace = _csv(tmp_path / "t.csv", [(0.0, 20, 5), (0.1, 20, 5), (60.0, 20, 5)])
    t0 = time.monotonic()
    code, out, err = _dctl(
        capsys, "--url", engine.url, "--trace", str(trace), "--max-duration-s", "1", "--output", "json"
    )
    assert code == 0, err
    assert time.monotonic() - t0 < 10.0
    report = json.loads(out)
    _check_accounting(report)
    assert (report["trace_requests"], report["requests"], report["not_sent"], report["ok"]) == (3, 2, 1, 2)


def test_draining_engine_rejections_are_counted_with_their_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    eng = start_engine(tmp_path, "--model", "llama3.1-8b", "--tp", "1", name="draining")
    try:
        req = urllib.request.Request(eng.url + "/admin/drain", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        trace = _csv(tmp_path / "t.csv", [(0.0, 20, 5), (0.01, 300, 5)])
        code, out, err = _dctl(capsys, "--url", eng.url, "--trace", str(trace), "--output", "json")
    finally:
        stop_engine(eng)
    assert code == 0, err
    report = json.loads(out)
    _check_accounting(report)
    assert (report["rejected"], report["ok"], report["slo_attainment"]) == (2, 0, 0.0)
    assert report["rejected_by_status"]["503"]["count"] == 2
    assert "draining" in report["rejected_by_status"]["503"]["example"]


def test_timeout_counts_as_failed(engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = _csv(tmp_path / "t.csv", [(0.0, 50, 2000)])  # thousands of decode steps: far beyond 0.3 s
    code, out, err = _dctl(
        capsys, "--url", engine.url, "--trace", str(trace), "--timeout-s", "0.3", "--output", "json"
    )
    assert code == 0, err
    report = json.loads(out)
    _check_accounting(report)
    assert report["failed"] == 1 and "timeout" in report["failed_by_kind"]
    assert report["slo_attainment"] == 0.0


def test_replay_core_sends_on_the_injected_clock(engine: Engine) -> None:
    """The replay core's clock/sleep seam: sends wait for the clock, nothing goes out at or past the bound."""
    now = [100.0]
    delays: list[float] = []

    def clock() -> float:
        return now[0]

    async def sleep(delay_s: float) -> None:
        delays.append(delay_s)
        now[0] += delay_s

    requests = [
        LoadRequest(index=i, send_s=t, input_tokens=20, output_tokens=3, class_name="SS")
        for i, t in enumerate((0.0, 0.5, 2.0))
    ]
    config = ReplayConfig(url=engine.url, model="llama2-70b", max_duration_s=1.0, timeout_s=10.0)
    result = asyncio.run(replay(requests, config, clock=clock, sleep=sleep))
    assert delays == [0.5]
    assert result.not_sent == 1
    assert [(r.index, r.sent_s, r.outcome, r.tokens) for r in result.records] == [
        (0, 0.0, "ok", 3),
        (1, 0.5, "ok", 3),
    ]
    assert not any(r.slo_met for r in result.records)  # no SLOs given: nothing is judged met


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_url_exits_3_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code, out, err = _dctl(capsys, "--url", url, "--trace", "synthetic:conversation", "--duration", "5")
    assert code == 3
    assert out == ""
    line = _error_line(err)
    assert f"--url {url}" in line and "unreachable" in line


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--speedup", "0"], "--speedup"),
        (["--speedup", "-2"], "--speedup"),
        (["--speedup", "fast"], "--speedup"),
        (["--trace", "synthetic:nope"], "--trace"),
        (["--trace", "no/such/trace.csv"], "--trace"),
        (["--url", "localhost:8000"], "--url"),
        (["--concurrency-limit", "0"], "--concurrency-limit"),
        (["--timeout-s", "0"], "--timeout-s"),
        (["--max-duration-s", "-1"], "--max-duration-s"),
        (["--output", "yaml"], "--output"),
    ],
)
def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str], flags: list[str], named: str) -> None:
    base = {
        "--url": f"http://127.0.0.1:{_free_port()}",
        "--trace": "synthetic:conversation",
        "--duration": "5",
    }
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        base[flag] = value
    code, out, err = _dctl(capsys, *[x for kv in base.items() for x in kv])
    assert code == 2
    assert out == ""
    assert named in _error_line(err)


def test_bad_trace_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,input_tokens,output_tokens\n0,ten,5\n")
    code, out, err = _dctl(capsys, "--url", f"http://127.0.0.1:{_free_port()}", "--trace", str(bad))
    assert code == 2
    assert out == ""
    assert "--trace" in _error_line(err)
