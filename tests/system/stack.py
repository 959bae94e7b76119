"""A whole dynamollm stack as real processes on loopback, for the system tests.

`Stack` starts simulated node agents (`python -m agent.app --simulated`) and the controller
(`python -m controller.app`), reads what they write (the first JSON line on stdout with the bound ports,
the agents' audit logs, the simulated GPUs' control files, the controller's SQLite store, read-only),
and, in `close()`, ends every process it started: the controllers with SIGKILL, the agents with SIGTERM
(they stop their engines and restore their GPUs) then SIGKILL, and last every engine process ever seen on
a GPU of an agent (engines run in process groups of their own, so killing an agent does not end them).

`TcpProxy` forwards one loopback port to another, and can be cut (listener and every connection closed)
to make a live agent unreachable from the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.api.client import AgentClient
from agent.api.v1 import telemetry_pb2
from agent.sim.node import NodeDir, process_alive
from controller.api.client import AdminClient

ROOT = Path(__file__).resolve().parents[2]
GPUS_PER_NODE = 8
START_TIMEOUT_S = 30.0
CONTROL_RPCS = ("ApplyGpuConfig", "ReconfigureEngine", "StopEngine", "RenewLease", "RestoreDefaults")
ACTING_RPCS = ("ApplyGpuConfig", "ReconfigureEngine", "StopEngine")
# Results of a call refused before anything was done (nothing acted on under its generation).
REFUSED = frozenset(
    {
        "ABORTED",
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
    }
)
# Fast settings for tests: a 4-s lease renewed every ~1.3 s, a node unavailable after 3 s of silence, a
# reconciler pass every 0.2 s, and the control cycle 30x faster than the wall clock (a 5-s instance tick
# every ~0.17 s, a 300-s pool step every 10 s).
FAST_CONTROLLER_ENV: Mapping[str, str] = {
    "DYNAMOLLM_CONTROLLER_CONTROL_TIME_SCALE": "30",
    "DYNAMOLLM_CONTROLLER_FLEET_LEASE_S": "4",
    "DYNAMOLLM_CONTROLLER_FLEET_UNAVAILABLE_AFTER_S": "3",
    "DYNAMOLLM_CONTROLLER_FLEET_RECONCILE_PERIOD_S": "0.2",
    "DYNAMOLLM_CONTROLLER_FLEET_CALL_TIMEOUT_S": "5",
    "DYNAMOLLM_CONTROLLER_FLEET_DRAIN_TIMEOUT_S": "2",
    "DYNAMOLLM_CONTROLLER_LOG_JSON": "true",
}

T = TypeVar("T")


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without any DYNAMOLLM_ setting of the caller's shell, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMOLLM_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


async def run_to_end(
    *argv: str, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> tuple[int, str, str]:
    """`python ARGV` (a module's main, from the checkout) to its end, killed after `timeout_s`: (exit
    status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=clean_env(env or {}), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _listening_line(proc: asyncio.subprocess.Process, log_path: Path, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
    except TimeoutError:
        line = b""
    if not line:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise AssertionError(f"{what} did not start (exit {proc.returncode}); its log ends:\n{tail}")
    event: dict[str, Any] = json.loads(line)
    return event


@dataclass(frozen=True, slots=True)
class Pending:
    """What a probe of `wait_for` is still waiting for (shown when the wait times out)."""

    reason: str


async def wait_for(
    what: str, probe: Callable[[], Awaitable[T | Pending | None]], timeout_s: float, period_s: float = 0.1
) -> T:
    """`probe()` until it returns something other than None, False or a `Pending`; AssertionError naming
    `what` and the last value probed when `timeout_s` passes first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: Any = None
    while True:
        try:
            last = await probe()
        except Exception as exc:  # a probe of a process still starting may fail: try again
            last = exc
        else:
            if last is not None and last is not False and not isinstance(last, Pending):
                return last  # type: ignore[no-any-return]
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(period_s)


# -------------------------------------------------------------------------------------------- agents


@dataclass
class Agent:
    """One simulated node agent process (node name `n<index>`)."""

    index: int
    runtime_dir: Path
    log_path: Path
    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int = 0  # its Prometheus /metrics port
    engine_pids: set[int] = field(default_factory=set)  # every engine process seen on its GPUs

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def node_dir(self) -> NodeDir:
        return NodeDir(self.runtime_dir / "simnode")

    def client(self) -> AgentClient:
        return AgentClient(self.address, timeout_s=5.0)

    async def inventory(self) -> telemetry_pb2.GetInventoryResponse:
        self.note_engines()
        async with self.client() as client:
            return await client.inventory()

    def note_engines(self) -> None:
        """Remember the engine processes now on the node's GPUs (killed in `Stack.close`)."""
        for gpu in range(GPUS_PER_NODE):
            with contextlib.suppress(Exception):  # a file being replaced: the next look sees it
                pid = self.node_dir.read_activity(gpu).pid
                if pid > 0:
                    self.engine_pids.add(pid)

    def audit(self) -> list[dict[str, Any]]:
        """Every line of the audit log (rotated files first), oldest first."""
        base = self.runtime_dir / "audit.jsonl"
        paths = sorted(base.parent.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
        lines: list[dict[str, Any]] = []
        for path in [*paths, base]:
            if path.exists():
                lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return lines

    def control_calls(self, rpcs: Iterable[str] = ACTING_RPCS) -> list[dict[str, Any]]:
        wanted = set(rpcs)
        return [line for line in self.audit() if line["rpc"] in wanted]

    def locked_clocks(self) -> dict[int, int]:
        """GPU -> locked maximum SM clock, as the simulated GPUs hold them (absent: default clocks)."""
        out: dict[int, int] = {}
        for gpu in range(GPUS_PER_NODE):
            control = self.node_dir.read_control(gpu)
            if control is not None and control.locked_max_clock_mhz is not None:
                out[gpu] = control.locked_max_clock_mhz
        return out


# -------------------------------------------------------------------------------------------- controller


@dataclass
class Controller:
    """One `dynamollm-controller` process."""

    proc: asyncio.subprocess.Process
    port: int
    metrics_port: int
    store_path: Path
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin(self) -> AdminClient:
        return AdminClient(self.address, timeout_s=5.0)

    def store_rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the store, read-only (the controller keeps writing it)."""
        conn = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True, timeout=5.0)
        try:
            return list(conn.execute(sql, args))
        finally:
            conn.close()


# -------------------------------------------------------------------------------------------- the stack


class Stack:
    """Processes started under `tmp`; `close()` ends every one of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.agents: list[Agent] = []
        self.controllers: list[Controller] = []
        self._starts = 0

    async def start_agent(
        self, index: int, *, port: int = 0, time_scale: float = 1.0, env: Mapping[str, str] | None = None
    ) -> Agent:
        """Agent `n<index>` with runtime dir `run<index>` (kept across restarts) on `port` (0: any), its
        simulated node `time_scale` times faster than real time, `env` added to its environment."""
        runtime_dir = self.tmp / f"run{index}"
        self._starts += 1
        log_path = self.tmp / f"agent{index}.{self._starts}.log"
        agent_env = clean_env(
            {
                "DYNAMOLLM_AGENT_ENGINE_BASE_PORT": "0",
                "DYNAMOLLM_AGENT_SIMULATED_TIME_SCALE": str(time_scale),
                **(env or {}),
            }
        )
        with open(log_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.app", "--simulated", "--gpus", str(GPUS_PER_NODE),
                "--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0",
                "--runtime-dir", str(runtime_dir),
                env=agent_env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=ROOT,
            )  # fmt: skip
        agent = Agent(index, runtime_dir, log_path, proc, 0)
        self.agents.append(agent)
        event = await _listening_line(proc, log_path, f"agent n{index}")
        assert event["event"] == "agent_listening", event
        agent.port, agent.metrics_port = int(event["port"]), int(event["metrics_port"])
        return agent

    async def start_agents(
        self, count: int, *, time_scale: float = 1.0, env: Callable[[int], Mapping[str, str]] | None = None
    ) -> list[Agent]:
        """`count` agents; `env(index)`: what each one's environment adds."""
        starts = [self.start_agent(i, time_scale=time_scale, env=env and env(i)) for i in range(count)]
        return list(await asyncio.gather(*starts))

    async def start_controller(
        self,
        nodes: Iterable[tuple[str, str]],
        *,
        mode: str = "apply",
        store: Path | None = None,
        env: Mapping[str, str] | None = None,
        config: Path | None = None,
    ) -> Controller:
        """The controller driving `nodes` (name, address), with `FAST_CONTROLLER_ENV` and `env`."""
        store_path = store or self.tmp / "controller.db"
        self._starts += 1
        log_path = self.tmp / f"controller.{self._starts}.log"
        args = [
            sys.executable, "-m", "controller.app", "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--store", str(store_path), "--mode", mode,
        ]  # fmt: skip
        for name, address in nodes:
            args += ["--node", f"{name}={address}"]
        if config is not None:
            args += ["--config", str(config)]
        with open(log_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *args,
                env=clean_env({**FAST_CONTROLLER_ENV, **(env or {})}),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
            )
        controller = Controller(proc, 0, 0, store_path, log_path)
        self.controllers.append(controller)
        event = await _listening_line(proc, log_path, "controller")
        assert event["event"] == "controller_listening", event
        controller.port, controller.metrics_port = int(event["port"]), int(event["metrics_port"])
        return controller

    async def close(self) -> None:
        for controller in self.controllers:
            await kill(controller.proc)
        await asyncio.gather(*(stop(agent.proc, signal.SIGTERM, 15.0) for agent in self.agents))
        for agent in self.agents:
            agent.note_engines()
            for pid in agent.engine_pids:
                if process_alive(pid):  # engines run in their own process group: end the group
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL (when still running) and reap."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


async def stop(proc: asyncio.subprocess.Process, sig: int, timeout_s: float) -> int:
    """Send `sig`, wait up to `timeout_s` for the exit, SIGKILL after that; the exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout_s)
    await kill(proc)
    assert proc.returncode is not None
    return proc.returncode


# -------------------------------------------------------------------------------------------- proxy


class TcpProxy:
    """Loopback TCP forwarder to `target_port`; `cut()` closes the listener and every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
