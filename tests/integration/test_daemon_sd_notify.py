"""The controller and the router as systemd Type=notify services: each, run as a real process with a
NOTIFY_SOCKET and a watchdog, sends READY=1 once it serves, pings WATCHDOG=1 every WATCHDOG_USEC / 2, and
exits 0 on SIGTERM (the agent's own test is in test_agent_process.py)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.system.stack import ROOT, clean_env

UNREACHABLE = "127.0.0.1:1"  # neither daemon needs its peers to start


def _command(daemon: str, tmp_path: Path) -> list[str]:
    if daemon == "controller":
        return [
            "-m", "controller.app", "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--store", str(tmp_path / "controller.db"), "--node", f"n0={UNREACHABLE}",
        ]  # fmt: skip
    return ["-m", "controller.router.app", "--listen", "127.0.0.1:0", "--controller", UNREACHABLE]


@pytest.mark.parametrize("daemon", ["controller", "router"])
async def test_ready_watchdog_and_a_clean_stop(daemon: str, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    env = clean_env({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "100000"})
    env.pop("WATCHDOG_PID", None)
    with open(tmp_path / "daemon.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *_command(daemon, tmp_path), env=env, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    loop = asyncio.get_running_loop()
    try:
        messages = [(await asyncio.wait_for(loop.sock_recv(sock, 64), 30)).decode() for _ in range(3)]
        assert messages == ["READY=1", "WATCHDOG=1", "WATCHDOG=1"], (tmp_path / "daemon.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        rest = []
        while True:
            try:
                rest.append(sock.recv(64).decode())
            except BlockingIOError:
                break
        assert "STOPPING=1" in rest
    finally:
        sock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
