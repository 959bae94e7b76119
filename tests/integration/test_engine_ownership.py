"""Engine ownership at the driver level, with real processes: the record file, `adopt_or_stop` and the
parent-death signal (the agent-level crash test is tests/integration/test_agent_engine_crash.py).

A driver that is abandoned while its engine runs (the test process stays alive, so the parent-death
signal does not fire) stands for an agent that died without taking its engine with it; a second driver
on the same record file is the restarted agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.engine.driver import SIMULATED_COMMAND_TEMPLATE, EngineDriver, EngineSpec, EngineState
from agent.engine.ownership import parent_death_argv, process_start_ticks

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama3.1-8b"


def engine_pids(node_dir: Path) -> list[int]:
    """Live simulated-engine processes started with `--node-dir node_dir` (whoever their parent is)."""
    wanted = str(node_dir)
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "agent.sim.engine" in words and wanted in words and state != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def kill_groups(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


async def wait_until(predicate: object, timeout_s: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


# ------------------------------------------------------------------------- adopt_or_stop, driver level


def make_driver(tmp_path: Path, **kwargs: float) -> EngineDriver:
    return EngineDriver(
        SIMULATED_COMMAND_TEMPLATE,
        ready_timeout_s=30.0,
        stop_grace_s=kwargs.get("stop_grace_s", 5.0),
        log_dir=tmp_path / "engines",
        record_path=tmp_path / "engines.json",
        template_vars={"node_dir": str(tmp_path / "node")},
        poll_s=0.05,
    )


def spec(port: int, startup_s: str = "0") -> EngineSpec:
    return EngineSpec(
        engine_id="e1",
        model=MODEL,
        gpu_indices=(0,),
        tp_degree=1,
        http_port=port,
        options={"startup-s": startup_s},
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def abandoned(tmp_path: Path) -> AsyncIterator[tuple[EngineDriver, int]]:
    """A driver that started an engine and was then abandoned, as by an agent that died: (driver, pid)."""
    old = make_driver(tmp_path)
    await old.start(spec(free_port()))
    pid = old.engine("e1").pid
    assert pid is not None
    try:
        yield old, pid
    finally:
        kill_groups([pid])
        await old.close()


async def test_adopt_healthy_engine_then_manage_it(
    tmp_path: Path, abandoned: tuple[EngineDriver, int]
) -> None:
    old, pid = abandoned
    records = json.loads((tmp_path / "engines.json").read_text())
    (record,) = records["engines"]
    assert (record["engine_id"], record["pid"]) == ("e1", pid)
    assert record["start_time_ticks"] == process_start_ticks(pid) and record["gpu_indices"] == [0]

    new = make_driver(tmp_path)
    try:
        outcomes = await new.adopt_or_stop()
        assert [(o.engine_id, o.pid, o.outcome) for o in outcomes] == [("e1", pid, "adopted")]
        status = new.engine("e1")
        assert (status.state, status.pid, status.spec) == (EngineState.READY, pid, old.engine("e1").spec)
        again = await new.adopt_or_stop()  # a second call leaves the adopted engine alone
        assert [(o.pid, o.outcome) for o in again] == [(pid, "adopted")] and new.engine("e1").pid == pid
        # The same configuration again: nothing started (no second engine on GPU 0).
        timings = await new.reconfigure(old.engine("e1").spec, drain_timeout_s=1.0)
        assert not timings.restarted and new.engine("e1").pid == pid
        assert (await new.metrics("e1")).running_requests_count == 0
        await new.stop("e1")
        assert new.engine("e1").state is EngineState.STOPPED
        assert process_start_ticks(pid) is None  # gone (the test process reaps its zombie)
        assert json.loads((tmp_path / "engines.json").read_text())["engines"] == []
    finally:
        await new.stop_all(grace_s=1.0)
        await new.close()


async def test_adopted_engine_that_dies_is_failed(
    tmp_path: Path, abandoned: tuple[EngineDriver, int]
) -> None:
    _, pid = abandoned
    new = make_driver(tmp_path)
    try:
        await new.adopt_or_stop()
        os.kill(pid, signal.SIGKILL)
        assert await wait_until(lambda: new.engine("e1").state is EngineState.FAILED, 10)
        assert "adopted" in new.engine("e1").failure_reason
        assert json.loads((tmp_path / "engines.json").read_text())["engines"] == []
    finally:
        await new.close()


async def test_unhealthy_engine_is_stopped_not_adopted(tmp_path: Path) -> None:
    old = make_driver(tmp_path)
    task = asyncio.ensure_future(old.start(spec(free_port(), startup_s="60")))  # loading: /health 503
    try:
        assert await wait_until(lambda: "e1" in {s.spec.engine_id for s in old.engines()}, 10)
        assert await wait_until(lambda: old.engine("e1").pid is not None, 10)
        pid = old.engine("e1").pid
        assert pid is not None
        new = make_driver(tmp_path, stop_grace_s=2.0)
        outcomes = await new.adopt_or_stop(health_timeout_s=0.5)
        assert [(o.engine_id, o.outcome) for o in outcomes] == [("e1", "stopped")]
        assert await wait_until(lambda: process_start_ticks(pid) is None, 10)
        assert new.engines() == []
        await new.close()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await old.close()


async def test_dead_and_reused_pids_are_dropped_untouched(tmp_path: Path) -> None:
    # A recorded engine whose pid now belongs to another process (pid reuse): the start time differs.
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ticks = process_start_ticks(bystander.pid)
        assert ticks is not None
        base = {"model": MODEL, "gpu_indices": [0], "tp_degree": 1, "http_port": 1, "options": {}}
        records = {
            "version": 1,
            "engines": [
                {"engine_id": "reused", "pid": bystander.pid, "start_time_ticks": ticks - 1, **base},
                {"engine_id": "dead", "pid": 2**22 + 7, "start_time_ticks": 1, **base},
            ],
        }
        (tmp_path / "engines.json").write_text(json.dumps(records))
        driver = make_driver(tmp_path)
        outcomes = await driver.adopt_or_stop()
        assert sorted((o.engine_id, o.outcome) for o in outcomes) == [
            ("dead", "gone"),
            ("reused", "pid_reused"),
        ]
        assert bystander.poll() is None  # never signalled
        assert json.loads((tmp_path / "engines.json").read_text())["engines"] == []
        await driver.close()
    finally:
        bystander.kill()
        bystander.wait()


async def test_unreadable_record_file_is_reported_and_replaced(tmp_path: Path) -> None:
    (tmp_path / "engines.json").write_text("{not json")
    driver = make_driver(tmp_path)
    assert await driver.adopt_or_stop() == []
    assert json.loads((tmp_path / "engines.json").read_text())["engines"] == []
    await driver.close()


def test_parent_death_signal_reaches_the_engine(tmp_path: Path) -> None:
    """A driver in a child process starts an engine; SIGKILL of that process takes the engine with it."""
    script = f"""
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from agent.engine.driver import SubprocessSpawner
async def main():
    p = await SubprocessSpawner().spawn(["sleep", "300"], {{}}, Path({str(tmp_path / "s.log")!r}))
    print(p.pid, flush=True)
    await asyncio.sleep(300)
asyncio.run(main())
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert process_start_ticks(child) is not None
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while process_start_ticks(child) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_start_ticks(child) is None, "the engine outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def test_parent_death_signal_follows_the_forking_thread() -> None:
    """The caveat the driver is built around: the signal fires when the THREAD that forked the engine
    exits, even though the process lives on. So engines are spawned from the event loop's thread."""
    children: list[subprocess.Popen[bytes]] = []

    def spawn() -> None:
        children.append(subprocess.Popen(parent_death_argv(["sleep", "300"], os.environ)))
        time.sleep(1.0)  # the launcher has set the signal by now (it takes a few ms)

    worker = threading.Thread(target=spawn)
    worker.start()
    worker.join()  # the forking thread is gone; this process is not
    spawn()  # forked by the main thread, which outlives the test
    from_worker, from_main = children
    try:
        assert from_worker.wait(timeout=5) == -signal.SIGTERM
        time.sleep(0.2)
        assert from_main.poll() is None
    finally:
        for child in children:
            child.kill()
            child.wait()
