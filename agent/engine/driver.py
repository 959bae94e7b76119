"""Engine life cycle on one node: spawn, health-wait, scrape, drain, stop, reconfigure with rollback.

Flow: the node agent (`agent.node.NodeAgent`, behind the NodeControl servicer) calls
`EngineDriver.reconfigure` / `stop` for ReconfigureEngine / StopEngine after checking generations; the
telemetry sampler calls `metrics` every period; `engines()` feeds GetInventory. The driver runs each
engine instance as a subprocess from a command template (real `vllm serve`, or the simulated engine
`python -m agent.sim.engine`), pinned to its GPUs with `CUDA_VISIBLE_DEVICES`, in its own process group
(so SIGTERM/SIGKILL reach its workers too), with stdout/stderr in a log file whose tail explains start
failures.

Engines are owned (`agent.engine.ownership`): each gets a parent-death signal (it goes when the agent
dies, SIGKILL included), and every running engine process is listed in the driver's record file, which
`adopt_or_stop` reads when an agent starts: an engine that is still the same process and healthy is
managed again (READY), any other has its process group killed. Before it starts an engine the driver
asks the GPU backend which processes hold the engine's GPUs (`gpu_processes` seam) and refuses GPUs held
by a process that is not one of its engines. Everything is validated (spec, option values with their
types, GPU and port conflicts, foreign processes) before anything stops; a failed reconfiguration rolls
back to the previous configuration with a ready timeout derived from that configuration's own measured
start time, never the caller's.

Two seams keep the logic testable without mock.patch: `HttpClient` (GET /health, GET /metrics, POST
/admin/drain) and `Spawner` (launch a process, signal its group, wait). Defaults: `AiohttpClient` and
`SubprocessSpawner`. Errors are raised from `agent.api.errors` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import shlex
import signal
import string
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from agent.api.clock import Clock, SystemClock
from agent.api.errors import (
    DataFileError,
    DynamoError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    UnsupportedError,
)
from agent.engine.metrics import EngineMetrics, extract_engine_metrics, parse_prometheus_text
from agent.engine.options import validate_engine_options
from agent.engine.ownership import (
    AdoptedProcess,
    EngineRecord,
    GpuProcessLister,
    RecordEntry,
    group_is_ours,
    load_records,
    parent_death_argv,
    process_name,
    process_session_id,
    process_start_ticks,
    same_process,
    save_records,
    signal_group,
)
from agent.gpu.base import GpuProcess

log = structlog.get_logger(__name__)

# `vllm serve` takes the model positionally; the pipeline-parallel size is the GPU count over tp.
VLLM_COMMAND_TEMPLATE = (
    "vllm serve {model} --tensor-parallel-size {tp} --pipeline-parallel-size {pp} --port {port}"
)
# Needs template_vars={"node_dir": ...}: the simulated node directory shared with SimulatedGpuBackend.
SIMULATED_COMMAND_TEMPLATE = (
    "{python} -m agent.sim.engine --model {model} --tp {tp} --port {port} --gpus {gpus} --node-dir {node_dir}"
)
# Fields every template may use; `template_vars` adds more (e.g. node_dir).
TEMPLATE_FIELDS = ("engine_id", "model", "tp", "pp", "port", "gpus", "python")

ENGINE_ID_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_MODEL_CHARS = 256
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 4000
RECORD_FILE_NAME = "engines.json"
# A rollback restarts a configuration that has already started on this node: it gets that start's
# measured time times this margin, at least the floor (model weights may have left the page cache
# meanwhile), and the driver's default ready timeout when no start was measured (an adopted engine
# whose record predates the measurement).
ROLLBACK_READY_MARGIN = 3.0
ROLLBACK_READY_FLOOR_S = 30.0
ADOPTION_HEALTH_TIMEOUT_S = 5.0


class EngineState(enum.Enum):
    """Life cycle (common.proto EngineState): STARTING -> READY -> DRAINING -> STOPPED; FAILED from any."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


LIVE_STATES = (EngineState.STARTING, EngineState.READY, EngineState.DRAINING)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Desired configuration of one engine instance (ReconfigureEngineRequest without the generation)."""

    engine_id: str
    model: str
    gpu_indices: tuple[int, ...]
    tp_degree: int
    http_port: int
    options: Mapping[str, str] = field(default_factory=dict)  # flags without dashes, e.g. max-num-seqs

    def __post_init__(self) -> None:
        # Normalised so that specs built from a proto map and from a dict compare equal.
        object.__setattr__(self, "gpu_indices", tuple(self.gpu_indices))
        object.__setattr__(self, "options", dict(sorted(dict(self.options).items())))

    @property
    def pp_degree(self) -> int:
        """Pipeline-parallel size: the GPUs not covered by one tensor-parallel group."""
        return len(self.gpu_indices) // self.tp_degree


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What the driver knows of one engine (GetInventory's EngineInfo, less what the service adds)."""

    spec: EngineSpec
    state: EngineState
    state_since_unix_ns: int
    pid: int | None  # None when no process is running
    failure_reason: str  # empty unless FAILED
    log_path: Path


@dataclass(frozen=True, slots=True)
class ReconfigureTimings:
    """Seconds each step of a reconfiguration took; 0 for a step that did not happen."""

    drain_s: float
    stop_s: float
    start_s: float
    restarted: bool  # False when the engine already ran this spec and nothing was done


@dataclass(frozen=True, slots=True)
class AdoptionOutcome:
    """What `adopt_or_stop` did with one entry of the record file.

    outcome: "adopted" (same process, /health 200: managed again, READY); "stopped" (same process but
    not healthy, not adoptable, or its GPUs/port/id taken: its process group was killed); "gone" (the
    process had exited: leftover members of its group were killed); "pid_reused" (the pid now belongs to
    another process: nothing signalled). Every entry is dropped from the file except adopted ones.
    """

    engine_id: str
    pid: int
    outcome: str
    reason: str


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: str


class HttpClient(Protocol):
    """The driver's view of HTTP: one request, whole body as text.

    Unreachable or timed out -> UnavailableError.
    """

    async def request(self, method: str, url: str, *, timeout_s: float) -> HttpResponse: ...

    async def close(self) -> None: ...


class EngineProcess(Protocol):
    """A launched engine: its pid, exit status, and signals to its whole process group."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def signal_group(self, sig: int) -> None:
        """Send `sig` to every process of the engine's group; a group that is gone is not an error."""
        ...


class Spawner(Protocol):
    """Launches `argv` in a new process group with exactly `env`, stdout+stderr to `log_path`.

    OSError when the program cannot be run (missing executable, permission).
    """

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> EngineProcess: ...


class AiohttpClient:
    """`HttpClient` over one aiohttp session, created on first use (it must live on the running loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, url: str, *, timeout_s: float) -> HttpResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                method, url, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                return HttpResponse(status=resp.status, body=await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UnavailableError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _AsyncioProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def signal_group(self, sig: int) -> None:
        # start_new_session made the engine a session and group leader: its pgid is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)


class SubprocessSpawner:
    """`Spawner` with asyncio subprocesses in a new session (setsid), given a parent-death signal by a
    small launcher that execs the engine (`agent.engine.ownership.parent_death_argv`), output appended to
    the log file.

    Call `spawn` on the event loop's thread (asyncio forks there): the parent-death signal fires when the
    forking thread exits, and the loop's thread lives as long as the agent.
    """

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> EngineProcess:
        launched = parent_death_argv(argv, env)  # FileNotFoundError (an OSError) for a missing program
        with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *launched,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        return _AsyncioProcess(proc)


@dataclass
class _Engine:
    """Mutable record of one engine; only the driver touches it."""

    spec: EngineSpec
    state: EngineState
    state_since_unix_ns: int
    log_path: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    process: EngineProcess | None = None
    failure_reason: str = ""
    # GPUs and port this record holds against other engines: its spec's, or old+new during a reconfigure.
    reserved_gpus: frozenset[int] = frozenset()
    reserved_ports: frozenset[int] = frozenset()
    busy: bool = False  # an operation is in progress (holds its reservations whatever the state)
    expected_exit: bool = False  # the driver is stopping it: an exit is not a failure
    last_metrics: EngineMetrics | None = None
    watcher: asyncio.Task[None] | None = None
    start_ticks: int | None = None  # the running process's start time (/proc/PID/stat field 22)
    ready_s: float | None = None  # how long the running process took to become READY (None: not yet)

    def holds_resources(self) -> bool:
        return self.busy or self.state in LIVE_STATES


def _template_fields(argv_template: Sequence[str]) -> set[str]:
    names: set[str] = set()
    for token in argv_template:
        for _, name, _, _ in string.Formatter().parse(token):
            if name is not None:
                names.add(name)
    return names


def validate_spec(spec: EngineSpec) -> None:
    """Raise InvalidArgumentError naming the first bad field of `spec`; pure."""
    if not ENGINE_ID_PATTERN.match(spec.engine_id):
        raise InvalidArgumentError(
            "engine_id", spec.engine_id, "1-63 characters of [a-z0-9-], starting with a letter"
        )
    if not spec.model or spec.model != spec.model.strip() or len(spec.model) > MAX_MODEL_CHARS:
        raise InvalidArgumentError(
            "model",
            spec.model,
            f"a non-empty model name of at most {MAX_MODEL_CHARS} characters, no surrounding spaces",
        )
    if not spec.gpu_indices:
        raise InvalidArgumentError("gpu_indices", list(spec.gpu_indices), "a non-empty list of GPU indices")
    if any(i < 0 for i in spec.gpu_indices) or len(set(spec.gpu_indices)) != len(spec.gpu_indices):
        raise InvalidArgumentError("gpu_indices", list(spec.gpu_indices), "distinct GPU indices >= 0")
    n = len(spec.gpu_indices)
    if spec.tp_degree < 1 or n % spec.tp_degree != 0:
        raise InvalidArgumentError("tp_degree", spec.tp_degree, [d for d in range(1, n + 1) if n % d == 0])
    if not 1 <= spec.http_port <= 65535:
        raise InvalidArgumentError("http_port", spec.http_port, "1..65535")
    validate_engine_options(spec.options)


def _check_ready_timeout(ready_timeout_s: float | None) -> None:
    if ready_timeout_s is not None and ready_timeout_s < 0:
        raise InvalidArgumentError("ready_timeout_s", ready_timeout_s, ">= 0 (0: the agent default)")


def _read_log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * LOG_TAIL_CHARS))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(data.splitlines()[-LOG_TAIL_LINES:])
    return tail[-LOG_TAIL_CHARS:]


def _last_line(tail: str) -> str:
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


class EngineDriver:
    """Runs engine instances of one node as subprocesses; one asyncio lock per engine serialises its changes.

    `command_template` is split like a shell line, then each word is formatted with {engine_id} {model}
    {tp} {pp} {port} {gpus} (comma-joined indices) {python} and the keys of `template_vars`; the spec's
    options follow as `--key value` (`--key` alone for an empty value). Unknown template fields raise
    InvalidArgumentError("engine.command", ...) here, at construction.

    `record_path` is the record file of running engines (default LOG_DIR/engines.json; the agent passes
    RUNTIME_DIR/engines.json); call `adopt_or_stop` once, before the first start, to take over or stop
    what a previous agent left running. `gpu_processes` lists the compute processes on GPUs
    (`agent.engine.ownership.gpu_process_lister` over the agent's GPU workers); without it no GPU is
    checked for foreign processes. A rollback waits for READY up to `rollback_ready_margin` x the previous
    configuration's measured start time, at least `rollback_ready_floor_s`.
    """

    def __init__(
        self,
        command_template: str,
        *,
        ready_timeout_s: float = 600.0,
        stop_grace_s: float = 30.0,
        http: HttpClient | None = None,
        spawner: Spawner | None = None,
        clock: Clock | None = None,
        log_dir: Path | None = None,
        template_vars: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        poll_s: float = 0.1,
        record_path: Path | None = None,
        gpu_processes: GpuProcessLister | None = None,
        rollback_ready_margin: float = ROLLBACK_READY_MARGIN,
        rollback_ready_floor_s: float = ROLLBACK_READY_FLOOR_S,
    ) -> None:
        try:
            self._argv_template = shlex.split(command_template)
        except ValueError as exc:
            allowed_line = f"a shell-like line ({exc})"
            raise InvalidArgumentError("engine.command", command_template, allowed_line) from exc
        self._template_vars = dict(template_vars or {})
        allowed = set(TEMPLATE_FIELDS) | set(self._template_vars)
        unknown = _template_fields(self._argv_template) - allowed
        if not self._argv_template or unknown:
            raise InvalidArgumentError(
                "engine.command", command_template, "a command using the fields " + ", ".join(sorted(allowed))
            )
        if ready_timeout_s <= 0:
            raise InvalidArgumentError("engine.ready_timeout_s", ready_timeout_s, "> 0")
        if stop_grace_s < 0:
            raise InvalidArgumentError("engine.stop_grace_s", stop_grace_s, ">= 0")
        if not rollback_ready_margin >= 1.0:
            raise InvalidArgumentError("rollback_ready_margin", rollback_ready_margin, ">= 1")
        if not rollback_ready_floor_s > 0:
            raise InvalidArgumentError("rollback_ready_floor_s", rollback_ready_floor_s, "> 0 seconds")
        self.command_template = command_template
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self._owns_http = http is None
        self._http: HttpClient = http if http is not None else AiohttpClient()
        self._spawner: Spawner = spawner if spawner is not None else SubprocessSpawner()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._log_dir = log_dir if log_dir is not None else Path(tempfile.gettempdir()) / "dynamollm-engines"
        self._env = dict(env or {})
        self._host = host
        self._poll_s = poll_s
        self._request_timeout_s = max(1.0, 10 * poll_s)
        self._engines: dict[str, _Engine] = {}
        self.record_path = record_path if record_path is not None else self._log_dir / RECORD_FILE_NAME
        self._gpu_processes = gpu_processes
        self._rollback_ready_margin = rollback_ready_margin
        self._rollback_ready_floor_s = rollback_ready_floor_s
        self._gpu_processes_unsupported_logged = False

    # ---- queries -------------------------------------------------------------------------------------

    def engines(self) -> list[EngineStatus]:
        """Every engine ever started, STOPPED and FAILED included, ascending engine_id."""
        return [self._status(rec) for _, rec in sorted(self._engines.items())]

    def engine(self, engine_id: str) -> EngineStatus:
        return self._status(self._record(engine_id))

    def command_for(self, spec: EngineSpec) -> list[str]:
        """The argv `start(spec)` would run (validated spec)."""
        validate_spec(spec)
        values: dict[str, object] = {
            "engine_id": spec.engine_id,
            "model": spec.model,
            "tp": spec.tp_degree,
            "pp": spec.pp_degree,
            "port": spec.http_port,
            "gpus": ",".join(str(i) for i in spec.gpu_indices),
            "python": sys.executable,
            **self._template_vars,
        }
        argv = [token.format(**values) for token in self._argv_template]
        for key, value in spec.options.items():
            argv.append(f"--{key}")
            if value != "":
                argv.append(value)
        return argv

    def owns_pid(self, pid: int) -> bool:
        """Whether `pid` is one of this driver's engine processes or one of their workers (a process in the
        session of an engine, which leads its session: vLLM's TP workers inherit it)."""
        leaders = {
            rec.process.pid
            for rec in self._engines.values()
            if rec.process is not None and rec.process.returncode is None
        }
        return pid in leaders or process_session_id(pid) in leaders

    async def foreign_processes(
        self, gpu_indices: Iterable[int], *, strict: bool = False
    ) -> dict[int, tuple[GpuProcess, ...]]:
        """GPU index -> compute processes on it that are not this driver's engines (GPUs without any are
        left out). Without a `gpu_processes` lister, or where the backend cannot list processes
        (UnsupportedError), nothing is found. Another failure raises UnavailableError when `strict`,
        and is logged (`gpu_processes_unreadable`) and finds nothing otherwise (GetInventory)."""
        indices = sorted(set(gpu_indices))
        if self._gpu_processes is None or not indices:
            return {}
        try:
            listed = await self._gpu_processes(indices)
        except UnsupportedError as exc:
            if not self._gpu_processes_unsupported_logged:
                self._gpu_processes_unsupported_logged = True
                log.warning("gpu_processes_unsupported", error=str(exc))
            return {}
        except DynamoError as exc:
            if strict:
                raise UnavailableError(f"cannot list the processes on GPU(s) {indices}: {exc}") from exc
            log.warning("gpu_processes_unreadable", gpu_indices=indices, error=str(exc))
            return {}
        found: dict[int, tuple[GpuProcess, ...]] = {}
        for index in indices:
            foreign = tuple(p for p in listed.get(index, ()) if not self.owns_pid(p.pid))
            if foreign:
                found[index] = foreign
        return found

    async def metrics(self, engine_id: str) -> EngineMetrics:
        """Scrape the engine's /metrics now; rates are against the previous scrape of the same process.

        FailedPreconditionError when no process runs; UnavailableError when it does not answer;
        DataFileError when the exposition is malformed or lacks the request gauges.
        """
        rec = self._record(engine_id)
        process = rec.process
        if process is None or process.returncode is not None:
            raise FailedPreconditionError(f"engine {engine_id} is {rec.state.value}: no process to scrape")
        metrics = await self._scrape(rec)
        if rec.process is process:  # a restart during the scrape starts a new rate baseline
            rec.last_metrics = metrics
        return metrics

    # ---- control -------------------------------------------------------------------------------------

    async def start(self, spec: EngineSpec, *, ready_timeout_s: float | None = None) -> float:
        """Launch `spec` and wait until /health answers 200; returns seconds from launch to READY.

        InvalidArgumentError for a bad spec; FailedPreconditionError when the engine is live (use
        `reconfigure`) or its GPUs/port belong to another live engine; UnavailableError (engine FAILED,
        message with the log tail) when it exits or is not ready within the timeout.
        """
        validate_spec(spec)
        _check_ready_timeout(ready_timeout_s)
        if spec.engine_id not in self._engines:  # refuse before a new engine is even registered
            await self._refuse_foreign_processes(spec)
        rec = self._record_for(spec)
        async with rec.lock:
            if rec.state in LIVE_STATES:
                raise FailedPreconditionError(
                    f"engine {spec.engine_id} is {rec.state.value}; reconfigure it or stop it first"
                )
            self._check_conflicts(spec, rec)
            await self._refuse_foreign_processes(spec)
            self._check_conflicts(spec, rec)  # again: others ran while the GPUs were listed
            rec.busy = True
            try:
                return await self._start_locked(rec, spec, ready_timeout_s)
            finally:
                self._settle(rec)

    async def drain(self, engine_id: str, timeout_s: float) -> float:
        """Stop admitting and wait (up to timeout_s) until no request runs or waits; returns seconds spent.

        Uses POST /admin/drain when the engine offers it (the simulated engine does; vLLM does not: the
        router stops sending to DRAINING engines). Never fails on a timeout: the stop that follows ends
        what is left. Nothing to do (0 s) unless the engine is STARTING or READY.
        """
        if timeout_s < 0:
            raise InvalidArgumentError("drain_timeout_s", timeout_s, ">= 0")
        rec = self._record(engine_id)
        async with rec.lock:
            return await self._drain_locked(rec, timeout_s)

    async def stop(self, engine_id: str, grace_s: float | None = None) -> float:
        """SIGTERM the engine's process group, SIGKILL after the grace; STOPPED. Returns signal-to-exit s."""
        if grace_s is not None and grace_s < 0:
            raise InvalidArgumentError("grace_s", grace_s, ">= 0")
        rec = self._record(engine_id)
        async with rec.lock:
            return await self._stop_locked(rec, self.stop_grace_s if grace_s is None else grace_s)

    async def reconfigure(
        self, spec: EngineSpec, drain_timeout_s: float, *, ready_timeout_s: float | None = None
    ) -> ReconfigureTimings:
        """Bring engine spec.engine_id to `spec`: drain -> stop -> start -> READY (creates it when new).

        Nothing is done (restarted=False) when it is READY with exactly `spec`. Validation (spec, GPU and
        port conflicts) happens before anything changes. If the new spec fails to start, the previous one
        (when one was live) is started again and UnavailableError says both what failed and the rollback.
        """
        validate_spec(spec)
        if drain_timeout_s < 0:
            raise InvalidArgumentError("drain_timeout_s", drain_timeout_s, ">= 0")
        _check_ready_timeout(ready_timeout_s)
        if spec.engine_id not in self._engines:  # refuse before a new engine is even registered
            await self._refuse_foreign_processes(spec)
        rec = self._record_for(spec)
        async with rec.lock:
            self._check_conflicts(spec, rec)
            alive = rec.process is not None and rec.process.returncode is None
            if rec.state is EngineState.READY and rec.spec == spec and alive:
                return ReconfigureTimings(drain_s=0.0, stop_s=0.0, start_s=0.0, restarted=False)
            await self._refuse_foreign_processes(spec)
            self._check_conflicts(spec, rec)  # again: others ran while the GPUs were listed
            previous = rec.spec if rec.state in LIVE_STATES else None
            # The previous configuration's own measured start time bounds its rollback, not the caller's
            # ready timeout (which may be far too short for any start, as it was for the new one).
            rollback_timeout_s = self._rollback_ready_timeout_s(rec.ready_s if previous is not None else None)
            rec.busy = True
            rec.reserved_gpus = rec.reserved_gpus | frozenset(spec.gpu_indices)
            rec.reserved_ports = rec.reserved_ports | {spec.http_port}
            try:
                drain_s = await self._drain_locked(rec, drain_timeout_s)
                stop_s = await self._stop_locked(rec, self.stop_grace_s)
                try:
                    start_s = await self._start_locked(rec, spec, ready_timeout_s)
                except UnavailableError as exc:
                    if previous is None:
                        raise
                    log.warning(
                        "engine_rollback",
                        engine_id=spec.engine_id,
                        failed_reason=rec.failure_reason,
                        rollback_ready_timeout_s=round(rollback_timeout_s, 3),
                    )
                    try:
                        await self._start_locked(rec, previous, rollback_timeout_s)
                    except UnavailableError as rollback_exc:
                        raise UnavailableError(
                            f"engine {spec.engine_id}: new configuration failed to start ({exc}); "
                            f"restarting the previous configuration failed too ({rollback_exc})"
                        ) from exc
                    raise UnavailableError(
                        f"engine {spec.engine_id}: new configuration failed to start; previous "
                        f"configuration restored and READY. {exc}"
                    ) from exc
            finally:
                self._settle(rec)
            return ReconfigureTimings(drain_s=drain_s, stop_s=stop_s, start_s=start_s, restarted=True)

    async def adopt_or_stop(
        self, *, health_timeout_s: float = ADOPTION_HEALTH_TIMEOUT_S
    ) -> list[AdoptionOutcome]:
        """Take over, or stop, the engines the record file lists (an agent that died left them): call once
        at start-up, before anything is started.

        An entry whose process still runs (same pid AND same start time) and answers GET /health with 200
        within `health_timeout_s` is adopted: READY again under its recorded spec, its GPUs and port held,
        watched through /proc (no parent-death signal: it is not this agent's child; the next start-up
        adopts or stops it again). Any other live one has its process group stopped (SIGTERM, SIGKILL
        after the stop grace); an exited one has what is left of its group killed; a reused pid is left
        alone. The file is rewritten with the adopted engines only. An unreadable file is logged
        (`engine_records_unreadable`) and replaced.
        """
        try:
            entries = load_records(self.record_path)
        except DataFileError as exc:
            log.error("engine_records_unreadable", path=str(self.record_path), error=str(exc))
            entries = []
        outcomes = [await self._adopt_or_stop_one(entry, health_timeout_s) for entry in entries]
        self._save_records()
        return outcomes

    async def stop_all(self, grace_s: float | None = None) -> None:
        """Stop every engine concurrently (agent shutdown); engines finish in-flight work within the grace."""
        ids = sorted(self._engines)
        results = await asyncio.gather(*(self.stop(i, grace_s) for i in ids), return_exceptions=True)
        for engine_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                log.error("engine_stop_failed", engine_id=engine_id, reason=str(result))

    async def close(self) -> None:
        """Release the HTTP client the driver created (an injected one stays its owner's)."""
        if self._owns_http:
            await self._http.close()

    # ---- internals -----------------------------------------------------------------------------------

    def _record(self, engine_id: str) -> _Engine:
        rec = self._engines.get(engine_id)
        if rec is None:
            raise NotFoundError(f"engine {engine_id!r} is not known to this agent")
        return rec

    def _record_for(self, spec: EngineSpec) -> _Engine:
        """The engine's record; a new id is registered only once its GPUs and port are known to be free.

        No await between the check and the registration, so a concurrent call for the same new id finds
        this record (and waits on its lock) instead of creating a second one.
        """
        rec = self._engines.get(spec.engine_id)
        if rec is not None:
            return rec
        self._check_conflicts(spec, None)
        rec = _Engine(
            spec=spec,
            state=EngineState.STOPPED,
            state_since_unix_ns=self._clock.wall_ns(),
            log_path=self._log_dir / f"{spec.engine_id}.log",
        )
        self._engines[spec.engine_id] = rec
        return rec

    def _status(self, rec: _Engine) -> EngineStatus:
        running = rec.process is not None and rec.process.returncode is None
        return EngineStatus(
            spec=rec.spec,
            state=rec.state,
            state_since_unix_ns=rec.state_since_unix_ns,
            pid=rec.process.pid if running and rec.process is not None else None,
            failure_reason=rec.failure_reason,
            log_path=rec.log_path,
        )

    def _set_state(self, rec: _Engine, state: EngineState, failure_reason: str = "") -> None:
        rec.state = state
        rec.state_since_unix_ns = self._clock.wall_ns()
        rec.failure_reason = failure_reason

    def _settle(self, rec: _Engine) -> None:
        rec.busy = False
        rec.reserved_gpus = frozenset(rec.spec.gpu_indices)
        rec.reserved_ports = frozenset({rec.spec.http_port})

    def _check_conflicts(self, spec: EngineSpec, own: _Engine | None) -> None:
        for other_id, other in sorted(self._engines.items()):
            if other is own or not other.holds_resources():
                continue
            shared = sorted(frozenset(spec.gpu_indices) & other.reserved_gpus)
            if shared:
                raise FailedPreconditionError(
                    f"gpu_indices: GPU(s) {shared} belong to engine {other_id} ({other.state.value})"
                )
            if spec.http_port in other.reserved_ports:
                raise FailedPreconditionError(
                    f"http_port: port {spec.http_port} belongs to engine {other_id} ({other.state.value})"
                )

    def _rollback_ready_timeout_s(self, known_start_s: float | None) -> float:
        if known_start_s is None:
            return self.ready_timeout_s
        return max(self._rollback_ready_floor_s, self._rollback_ready_margin * known_start_s)

    async def _refuse_foreign_processes(self, spec: EngineSpec) -> None:
        """FailedPreconditionError naming the GPU and the pid when a process this driver does not own
        holds one of the spec's GPUs (e.g. an engine a dead agent left, or someone's job)."""
        found = await self.foreign_processes(spec.gpu_indices, strict=True)
        for index in spec.gpu_indices:
            for proc in found.get(index, ()):
                memory = f", {proc.used_memory_bytes} bytes of GPU memory" if proc.used_memory_bytes else ""
                raise FailedPreconditionError(
                    f"gpu_indices: GPU {index} is in use by process {proc.pid} "
                    f"({process_name(proc.pid)}{memory}), which is not an engine of this agent; "
                    "stop that process or choose other GPUs"
                )

    def _records(self) -> list[EngineRecord]:
        records: list[EngineRecord] = []
        for engine_id, rec in sorted(self._engines.items()):
            process = rec.process
            if process is None or process.returncode is not None or rec.start_ticks is None:
                continue
            spec = rec.spec
            records.append(
                EngineRecord(
                    engine_id=engine_id,
                    pid=process.pid,
                    start_time_ticks=rec.start_ticks,
                    model=spec.model,
                    gpu_indices=spec.gpu_indices,
                    tp_degree=spec.tp_degree,
                    http_port=spec.http_port,
                    options=dict(spec.options),
                    ready_s=rec.ready_s,
                )
            )
        return records

    def _save_records(self) -> None:
        """Rewrite the record file with every running engine process (synchronously: a few hundred bytes,
        and the order of writes must follow the order of changes)."""
        try:
            save_records(self.record_path, self._records())
        except OSError as exc:
            log.error("engine_records_write_failed", path=str(self.record_path), error=str(exc))

    async def _adopt_or_stop_one(self, entry: RecordEntry, health_timeout_s: float) -> AdoptionOutcome:
        pid, ticks = entry.pid, entry.start_time_ticks

        def done(outcome: str, reason: str) -> AdoptionOutcome:
            event = {"adopted": "engine_adopted", "stopped": "engine_orphan_stopped"}.get(
                outcome, "engine_record_dropped"
            )
            log.warning(event, engine_id=entry.engine_id, pid=pid, outcome=outcome, reason=reason)
            return AdoptionOutcome(entry.engine_id, pid, outcome, reason)

        for rec in self._engines.values():  # a second call must not stop what the first one adopted
            if rec.process is not None and rec.process.pid == pid and rec.start_ticks == ticks:
                return done("adopted", "already managed by this driver")
        if not same_process(pid, ticks):
            if not group_is_ours(pid, ticks):
                return done("pid_reused", "the pid belongs to another process now; nothing signalled")
            signal_group(pid, signal.SIGKILL)  # workers the engine left behind, if any
            return done("gone", "the engine process had exited; what was left of its group was killed")
        reason = await self._adoption_refusal(entry, health_timeout_s)
        if reason:
            await self._stop_orphan(pid, ticks)
            return done("stopped", reason)
        record = entry.record
        assert record is not None
        spec = _spec_of(record)
        process = AdoptedProcess(pid, ticks, self._poll_s)
        rec = _Engine(
            spec=spec,
            state=EngineState.READY,
            state_since_unix_ns=self._clock.wall_ns(),
            log_path=self._log_dir / f"{spec.engine_id}.log",
            process=process,
            start_ticks=ticks,
            ready_s=record.ready_s,
        )
        self._settle(rec)
        self._engines[spec.engine_id] = rec
        rec.watcher = asyncio.get_running_loop().create_task(self._watch(rec, process))
        return done("adopted", f"same process, /health 200 on port {spec.http_port}")

    async def _adoption_refusal(self, entry: RecordEntry, health_timeout_s: float) -> str:
        """Why the live process of `entry` cannot be adopted; empty when it can."""
        record = entry.record
        if record is None:
            return f"record unusable: {entry.problem}"
        spec = _spec_of(record)
        try:
            validate_spec(spec)
            if spec.engine_id in self._engines:
                raise FailedPreconditionError(f"engine {spec.engine_id} is listed twice")
            self._check_conflicts(spec, None)
        except DynamoError as exc:
            return f"record not adoptable: {exc}"
        url = self._base_url(spec) + "/health"
        deadline_s = self._clock.monotonic_s() + health_timeout_s
        while True:
            try:
                resp = await self._http.request("GET", url, timeout_s=max(0.05, min(1.0, health_timeout_s)))
                if resp.status == 200:
                    return ""
                last = f"HTTP {resp.status}"
            except UnavailableError as exc:
                last = str(exc)
            if self._clock.monotonic_s() >= deadline_s:
                return f"not healthy within {health_timeout_s:g} s (GET {url}: {last})"
            await asyncio.sleep(self._poll_s)

    async def _stop_orphan(self, pid: int, ticks: int) -> None:
        """SIGTERM an engine's process group, SIGKILL after the stop grace, then SIGKILL what is left."""
        process = AdoptedProcess(pid, ticks, self._poll_s)
        process.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self.stop_grace_s)
        except TimeoutError:
            process.signal_group(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=max(1.0, self.stop_grace_s))
        process.signal_group(signal.SIGKILL)

    def _base_url(self, spec: EngineSpec) -> str:
        return f"http://{self._host}:{spec.http_port}"

    async def _scrape(self, rec: _Engine) -> EngineMetrics:
        url = self._base_url(rec.spec) + "/metrics"
        resp = await self._http.request("GET", url, timeout_s=self._request_timeout_s)
        if resp.status != 200:
            raise UnavailableError(f"GET {url}: HTTP {resp.status}")
        families = parse_prometheus_text(resp.body, source=url)
        return extract_engine_metrics(
            families, scraped_s=self._clock.monotonic_s(), previous=rec.last_metrics, source=url
        )

    def _rotate_log(self, rec: _Engine) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        if rec.log_path.exists():  # keep the previous run's log (e.g. the failed start before a rollback)
            rec.log_path.replace(rec.log_path.with_suffix(".prev.log"))

    async def _start_locked(self, rec: _Engine, spec: EngineSpec, ready_timeout_s: float | None) -> float:
        timeout_s = ready_timeout_s if ready_timeout_s else self.ready_timeout_s
        argv = self.command_for(spec)
        env = {**os.environ, **self._env, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in spec.gpu_indices)}
        rec.spec = spec
        rec.last_metrics = None
        rec.expected_exit = False
        rec.ready_s = None
        self._rotate_log(rec)
        self._set_state(rec, EngineState.STARTING)
        log.info("engine_starting", engine_id=spec.engine_id, argv=argv, log_path=str(rec.log_path))
        t0 = self._clock.monotonic_s()
        try:
            process = await self._spawner.spawn(argv, env, rec.log_path)
        except OSError as exc:
            reason = f"cannot run {argv[0]!r}: {exc}"
            self._set_state(rec, EngineState.FAILED, reason)
            log.warning("engine_start_failed", engine_id=spec.engine_id, reason=reason)
            raise UnavailableError(f"engine {spec.engine_id}: {reason}") from exc
        rec.process = process
        rec.start_ticks = process_start_ticks(process.pid, zombies=True)
        self._save_records()  # from now on a restarted agent finds it, whatever happens to this one
        rec.watcher = asyncio.get_running_loop().create_task(self._watch(rec, process))
        url = self._base_url(spec) + "/health"
        deadline_s = t0 + timeout_s
        while True:
            if process.returncode is not None:
                reason = f"exited with status {process.returncode} during start-up"
                await self._fail_start(rec, process, reason)
            try:
                resp = await self._http.request(
                    "GET", url, timeout_s=max(0.05, min(1.0, deadline_s - self._clock.monotonic_s()))
                )
                if resp.status == 200 and process.returncode is None:
                    break
            except UnavailableError:
                pass  # not listening yet
            if self._clock.monotonic_s() >= deadline_s:
                await self._fail_start(rec, process, f"not ready within {timeout_s:g} s (GET {url})")
            await asyncio.sleep(self._poll_s)
        start_s = self._clock.monotonic_s() - t0
        rec.ready_s = start_s  # this configuration's known-good start time (rollback, adoption)
        self._set_state(rec, EngineState.READY)
        self._save_records()
        log.info("engine_ready", engine_id=spec.engine_id, pid=process.pid, start_s=round(start_s, 3))
        return start_s

    async def _fail_start(self, rec: _Engine, process: EngineProcess, reason: str) -> None:
        rec.expected_exit = True
        await self._terminate(rec, process, self.stop_grace_s)
        if rec.watcher is not None:
            await rec.watcher
            rec.watcher = None
        rec.process = None
        rec.start_ticks = None
        self._save_records()
        tail = _read_log_tail(rec.log_path)
        last = _last_line(tail)
        failure = f"{reason}: {last}" if last else reason
        self._set_state(rec, EngineState.FAILED, failure)
        log.warning("engine_start_failed", engine_id=rec.spec.engine_id, reason=failure)
        raise UnavailableError(
            f"engine {rec.spec.engine_id}: {reason}; log {rec.log_path} ends with:\n{tail or '(empty)'}"
        )

    async def _watch(self, rec: _Engine, process: EngineProcess) -> None:
        returncode = await process.wait()
        if rec.process is not process or rec.expected_exit or rec.state is EngineState.STARTING:
            return  # a stop we asked for, or the start-up loop reports it
        # Workers the leader left behind (e.g. vLLM's TP processes) must not keep the GPUs.
        process.signal_group(signal.SIGKILL)
        self._save_records()
        last = _last_line(_read_log_tail(rec.log_path))
        if isinstance(process, AdoptedProcess):
            reason = "exited (adopted after an agent restart: exit status unknown)"
        else:
            reason = f"exited with status {returncode}"
        reason += f": {last}" if last else ""
        self._set_state(rec, EngineState.FAILED, reason)
        log.error(
            "engine_exited_unexpectedly", engine_id=rec.spec.engine_id, returncode=returncode, reason=reason
        )

    async def _drain_locked(self, rec: _Engine, timeout_s: float) -> float:
        process = rec.process
        if rec.state not in (EngineState.STARTING, EngineState.READY) or process is None:
            return 0.0
        t0 = self._clock.monotonic_s()
        self._set_state(rec, EngineState.DRAINING)
        base = self._base_url(rec.spec)
        try:
            resp = await self._http.request("POST", base + "/admin/drain", timeout_s=self._request_timeout_s)
            if resp.status >= 300:
                log.info("engine_drain_endpoint_missing", engine_id=rec.spec.engine_id, status=resp.status)
        except UnavailableError:
            pass  # not answering: the metrics loop below finds out whether it still runs
        deadline_s = t0 + timeout_s
        while process.returncode is None and self._clock.monotonic_s() < deadline_s:
            try:
                if (await self._scrape(rec)).outstanding_requests_count == 0:
                    break
            except (UnavailableError, DataFileError) as exc:
                log.info("engine_drain_metrics_unreadable", engine_id=rec.spec.engine_id, reason=str(exc))
            await asyncio.sleep(self._poll_s)
        drain_s = self._clock.monotonic_s() - t0
        log.info("engine_drained", engine_id=rec.spec.engine_id, drain_s=round(drain_s, 3))
        return drain_s

    async def _terminate(self, rec: _Engine, process: EngineProcess, grace_s: float) -> None:
        process.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=grace_s)
        except TimeoutError:
            log.warning("engine_killed_after_grace", engine_id=rec.spec.engine_id, grace_s=grace_s)
            process.signal_group(signal.SIGKILL)
            await process.wait()
        # Workers the leader left behind (e.g. vLLM's TP processes) must not keep the GPUs.
        process.signal_group(signal.SIGKILL)

    async def _stop_locked(self, rec: _Engine, grace_s: float) -> float:
        process = rec.process
        if process is None:
            if rec.state is not EngineState.STOPPED:
                self._set_state(rec, EngineState.STOPPED)
            return 0.0
        rec.expected_exit = True
        t0 = self._clock.monotonic_s()
        if process.returncode is None:
            await self._terminate(rec, process, grace_s)
        else:
            process.signal_group(signal.SIGKILL)
        stop_s = self._clock.monotonic_s() - t0
        if rec.watcher is not None:
            await rec.watcher
            rec.watcher = None
        rec.process = None
        rec.start_ticks = None
        rec.last_metrics = None
        self._set_state(rec, EngineState.STOPPED)
        self._save_records()
        log.info(
            "engine_stopped",
            engine_id=rec.spec.engine_id,
            returncode=process.returncode,
            stop_s=round(stop_s, 3),
        )
        return stop_s


def _spec_of(record: EngineRecord) -> EngineSpec:
    """The engine spec a record file entry describes."""
    return EngineSpec(
        engine_id=record.engine_id,
        model=record.model,
        gpu_indices=record.gpu_indices,
        tp_degree=record.tp_degree,
        http_port=record.http_port,
        options=record.options,
    )
