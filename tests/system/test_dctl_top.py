"""`dctl top` as a process against the real stack: a simulated agent and the controller (observe mode, so
that no engine process starts) as real processes on loopback, `dctl top` run as an operator runs it.

What it proves: one frame (`--once`) shows the controller's pools, instances, nodes and mode, and the SLO
attainment of the classes routers reported (the ClusterStatus per-class figures, end to end); `--once
--output json` prints exactly one `dynamollm.top/v1` document; the live view on a terminal (a pty)
redraws in place within the terminal's width and height and exits 0 on Ctrl-C (SIGINT); the live JSON
view exits 3 with one line when the controller goes away; bad flags and an unreachable controller exit
2 and 3 with one line naming the flag or the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Sequence
from typing import Any

import pytest

from controller.api.v1 import admin_pb2
from tests.system.stack import ROOT, Controller, Pending, Stack, clean_env, kill, run_to_end, wait_for

TEST_LIMIT_S = 40.0
TTY_COLUMNS, TTY_LINES = 72, 20
DCTL = (sys.executable, "-m", "controller.dctl.main", "top")


async def _dctl(*args: str) -> tuple[int, str, str]:
    """`dctl top ARGS` to its end: (exit status, stdout, stderr)."""
    return await run_to_end(*DCTL[1:], *args)


async def _live(*args: str, stdout: int = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *DCTL, *args, env=clean_env({}), cwd=ROOT, stdout=stdout, stderr=asyncio.subprocess.PIPE
    )


async def _ended(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """The exit status and stderr of a live view that is ending (killed after 15 s)."""
    assert proc.stderr is not None
    try:
        err = await asyncio.wait_for(proc.stderr.read(), 15)
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


async def _stack_ready(stack: Stack) -> tuple[Controller, admin_pb2.ListPoolsResponse]:
    """The controller over one agent once its node is READY and every pool has instances, with ten SS
    completions reported (nine met their SLO) and counted in its SLO window."""
    agents = await stack.start_agents(1)
    ctl = await stack.start_controller([(a.name, a.address) for a in agents], mode="observe")

    async def placed() -> admin_pb2.ListPoolsResponse | Pending:
        async with ctl.admin() as admin:
            nodes, pools = await admin.list_nodes(), await admin.list_pools()
        if [n.state for n in nodes.nodes] != [admin_pb2.NODE_STATE_READY]:
            return Pending(f"node states {[n.state for n in nodes.nodes]}")
        if not pools.pools or not all(p.instances for p in pools.pools):
            return Pending(f"pools {pools}")
        return pools

    async def counted() -> bool:
        async with ctl.admin() as admin:
            status = await admin.cluster_status()
        return [c.completions_count for c in status.class_attainments if c.class_name == "SS"] == [10]

    pools = await wait_for("the node and the pools", placed, 20.0)
    done = [
        admin_pb2.TrafficCompletion(
            finished_unix_ns=time.time_ns(),
            routed_class="SS",
            slo_met=i < 9,
            output_tokens=50,
            pool=pools.pools[0].name,
        )
        for i in range(10)
    ]
    async with ctl.admin() as admin:
        await admin.report_traffic([], done)
    await wait_for("the SS completions in the SLO window", counted, 10.0)
    return ctl, pools


def _read_pty(fd: int, frames: int | None, timeout_s: float) -> str:
    """What the pty's far end shows until `frames` frames have been drawn (each starts at home), or
    (None) until the far end is closed."""
    text = b""
    deadline = time.monotonic() + timeout_s
    while (frames is None or text.count(b"\x1b[H") < frames) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                text += os.read(fd, 65536)
            except OSError:  # EIO: the far end closed
                break
    return text.decode(errors="replace")


def _frames_lines(text: str) -> list[str]:
    """The visible lines of every frame drawn (control sequences removed)."""
    for code in ("\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J", "\r"):
        text = text.replace(code, "\n" if code == "\x1b[H" else "")
    return text.split("\n")


async def _on_a_terminal(address: str) -> tuple[int, str, str]:
    """The live view on a pty of TTY_COLUMNS x TTY_LINES for three frames, then Ctrl-C (SIGINT)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", TTY_LINES, TTY_COLUMNS, 0, 0))
    try:
        proc = await _live("--controller", address, "--interval-s", "0.3", stdout=slave)
        os.close(slave)
        slave = -1
        shown = await asyncio.to_thread(_read_pty, master, 3, 20.0)
        proc.send_signal(signal.SIGINT)
        # read on until it closes the terminal: a full pty buffer would block its writes
        rest, (code, err) = await asyncio.gather(
            asyncio.to_thread(_read_pty, master, None, 20.0), _ended(proc)
        )
        shown += rest
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return code, shown, err


def _assert_frame_shows(text: str, address: str, pools: admin_pb2.ListPoolsResponse) -> None:
    assert f"controller {address}" in text and "mode observe" in text, text
    for pool in pools.pools:
        assert any(line.startswith(f"{pool.name} ") for line in text.splitlines()), (pool.name, text)
    assert "n0    READY" in text, text
    assert "short prompt   SS 90.00% of 10" in text, text  # the grid: class SS under "short answer"
    instances = sorted(i.instance_id for p in pools.pools for i in p.instances)
    assert f"INSTANCES ({len(instances)})" in text, text


async def test_top_against_the_stack(stack: Stack) -> None:
    async def body() -> None:
        ctl, pools = await _stack_ready(stack)
        address = ctl.address
        (code, out, err), (jcode, jout, jerr) = await asyncio.gather(
            _dctl("--once", "--controller", address),
            _dctl("--once", "--output", "json", "--controller", address),
        )
        assert code == 0 and jcode == 0, (err, jerr)
        _assert_frame_shows(out, address, pools)
        lines = jout.splitlines()
        assert len(lines) == 1, jout
        doc: dict[str, Any] = json.loads(lines[0])
        assert doc["schema"] == "dynamollm.top/v1" and doc["mode"] == "observe"
        assert [p["name"] for p in doc["pools"]] == [p.name for p in pools.pools]
        assert [n["name"] for n in doc["nodes"]] == ["n0"]
        ss = next(c for c in doc["classes"] if c["class_name"] == "SS")
        assert ss["meaning"] == "short prompt, short answer" and ss["slo_attainment_ratio"] == 0.9
        assert doc["decisions"] and doc["decisions"][0]["level"] == "initial", doc["decisions"]

        code, shown, err = await _on_a_terminal(address)
        assert code == 0 and err == "", err
        assert shown.startswith("\x1b[2J\x1b[H") and shown.count("\x1b[H") >= 3, shown[:300]
        frame_lines = _frames_lines(shown)
        assert max(len(line) for line in frame_lines) < TTY_COLUMNS, frame_lines
        assert "more lines: a taller terminal shows them" in shown  # cut to the terminal's height

        live = await _live("--controller", address, "--output", "json", "--interval-s", "0.3")
        assert live.stdout is not None
        first = await asyncio.wait_for(live.stdout.readline(), 15)
        assert json.loads(first)["schema"] == "dynamollm.top/v1"
        await kill(ctl.proc)  # the controller goes away
        code, err = await _ended(live)
        assert code == 3, err
        assert _one_line(err).startswith("dctl top: error: the controller went away: "), err

    await asyncio.wait_for(body(), TEST_LIMIT_S)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "code", "starts"),
    [
        (["--interval-s", "0"], 2, "dctl top: error: --interval-s: got '0'; allowed: "),
        (["--interval-s", "nan"], 2, "dctl top: error: --interval-s: got 'nan'; allowed: "),
        (["--decisions", "0"], 2, "dctl top: error: --decisions: got '0'; allowed: an integer >= 1"),
        (["--controller", "nowhere"], 2, "dctl top: error: --controller: got 'nowhere'; allowed: "),
        (
            ["--once", "--controller", "127.0.0.1:{closed}"],
            3,
            "dctl top: error: * to controller 127.0.0.1:{closed} failed: UNAVAILABLE: ",
        ),
    ],
)
async def test_bad_flags_and_an_unreachable_controller_exit_with_one_line(
    args: Sequence[str], code: int, starts: str
) -> None:
    closed = _closed_port()
    got, out, err = await _dctl(*(a.format(closed=closed) for a in args))
    assert (got, out) == (code, ""), err
    assert fnmatch.fnmatchcase(_one_line(err), starts.format(closed=closed) + "*"), err
