"""systemd integration shared by the daemons' entry points (`dynamollm-agent`, the controller's and the
router's): readiness and stop notices on NOTIFY_SOCKET (Type=notify) and the watchdog keep-alive. Outside
systemd every call here is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger("agent.api.systemd")


def sd_notify(message: str) -> bool:
    """Send a datagram to systemd's NOTIFY_SOCKET (Type=notify); False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
        return False
    return True


def watchdog_period_s() -> float | None:
    """Half of systemd's WatchdogSec when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def watchdog_loop(period_s: float) -> None:
    """Tell systemd the daemon is alive every `period_s` (`watchdog_period_s`), until cancelled."""
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(period_s)


def notify_ready(tasks: list[asyncio.Task[None]]) -> None:
    """READY=1 for a daemon that now serves, and its watchdog pings as a task added to `tasks` (the
    daemon cancels them at its stop) when systemd's watchdog is on for this process."""
    sd_notify("READY=1")
    period_s = watchdog_period_s()
    if period_s is not None:
        tasks.append(asyncio.create_task(watchdog_loop(period_s), name="sd-watchdog"))
