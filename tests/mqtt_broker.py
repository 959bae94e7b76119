"""A real Mosquitto broker for the MQTT tests: its own generated config (one listener on a free loopback
port, anonymous clients allowed, no persistence, so a restart loses every retained message), started
and stopped as a process; `restart()` comes back on the same port.

`mosquitto_path()` finds the program (Debian installs it in /usr/sbin, often not on a user's PATH); the
`mqtt_broker` fixture in tests/conftest.py skips without it, and fails under CI=true. `observe()` is a
plain aiomqtt client the tests watch a broker with, independent of the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
RECEIVE_TIMEOUT_S = 15.0
SEARCHED = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next((p for p in SEARCHED if Path(p).is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One broker process at a time on `port`; `log_path` keeps what every run of it wrote."""

    def __init__(self, program: str, workdir: Path, port: int | None = None) -> None:
        self.program = program
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.config_path.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n",
            encoding="utf-8",
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        assert not self.running
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.program, "-c", str(self.config_path)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise AssertionError(f"mosquitto did not start on port {self.port}; its log ends:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (clients see their connections closed), SIGKILL after STOP_TIMEOUT_S; reaped."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


Received = asyncio.Queue[tuple[str, bytes]]


@contextlib.asynccontextmanager
async def observe(host: str, port: int, topic: str, **client_options: Any) -> AsyncIterator[Received]:
    """A client subscribed to `topic` (SUBACK received on entry); every (topic, payload) it gets, in
    order, for the duration. `client_options`: aiomqtt.Client's (user name, TLS, ...)."""
    received: Received = asyncio.Queue()
    async with aiomqtt.Client(host, port, **client_options) as client:
        await client.subscribe(topic, qos=1)

        async def pump() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.put_nowait((message.topic.value, message.payload))

        task = asyncio.create_task(pump())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def next_payload(received: Received, topic: str, timeout_s: float = RECEIVE_TIMEOUT_S) -> bytes:
    """The next payload on `topic` (messages on other topics are skipped)."""

    async def read() -> bytes:
        while True:
            got, payload = await received.get()
            if got == topic:
                return payload

    return await asyncio.wait_for(read(), timeout_s)
