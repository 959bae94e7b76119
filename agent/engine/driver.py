"""Engine life cycle on one node: spawn, health-wait, scrape, drain, stop, reconfigure with rollback.

Flow: the node agent (`agent.node.NodeAgent`, behind the NodeControl servicer) calls
`EngineDriver.reconfigure` / `stop` for ReconfigureEngine / StopEngine after checking generations; the
telemetry sampler calls `metrics` every period; `engines()` feeds GetInventory. The driver runs each
engine instance as a subprocess from a command template (real `vllm serve`, or the simulated engine
`python -m agent.sim.engine`), pinned to its GPUs with `CUDA_VISIBLE_DEVICES`, in its own process group
(so SIGTERM/SIGKILL reach its workers too), with stdout/stderr in a log file whose tail explains start
failures.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from agent.api.clock import Clock, SystemClock
from agent.api.errors import (
    DataFileError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from agent.engine.metrics import EngineMetrics, extract_engine_metrics, parse_prometheus_text

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
OPTION_KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 4000


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
    """`Spawner` with asyncio subprocesses in a new session (setsid), output appended to the log file."""

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> EngineProcess:
        with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                *argv,
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
    if not spec.model or spec.model != spec.model.strip():
        raise InvalidArgumentError("model", spec.model, "a non-empty model name without surrounding spaces")
    if not spec.gpu_indices:
        raise InvalidArgumentError("gpu_indices", list(spec.gpu_indices), "a non-empty list of GPU indices")
    if any(i < 0 for i in spec.gpu_indices) or len(set(spec.gpu_indices)) != len(spec.gpu_indices):
        raise InvalidArgumentError("gpu_indices", list(spec.gpu_indices), "distinct GPU indices >= 0")
    n = len(spec.gpu_indices)
    if spec.tp_degree < 1 or n % spec.tp_degree != 0:
        raise InvalidArgumentError("tp_degree", spec.tp_degree, [d for d in range(1, n + 1) if n % d == 0])
    if not 1 <= spec.http_port <= 65535:
        raise InvalidArgumentError("http_port", spec.http_port, "1..65535")
    for key, value in spec.options.items():
        if not OPTION_KEY_PATTERN.match(key):
            raise InvalidArgumentError(
                "engine_options", key, "flag names of [a-z0-9-] without leading dashes"
            )
        if "\x00" in value:
            raise InvalidArgumentError(f"engine_options[{key}]", value, "a string without NUL characters")


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
        rec = self._record_for(spec)
        async with rec.lock:
            if rec.state in LIVE_STATES:
                raise FailedPreconditionError(
                    f"engine {spec.engine_id} is {rec.state.value}; reconfigure it or stop it first"
                )
            self._check_conflicts(spec, rec)
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
        rec = self._record_for(spec)
        async with rec.lock:
            self._check_conflicts(spec, rec)
            alive = rec.process is not None and rec.process.returncode is None
            if rec.state is EngineState.READY and rec.spec == spec and alive:
                return ReconfigureTimings(drain_s=0.0, stop_s=0.0, start_s=0.0, restarted=False)
            previous = rec.spec if rec.state in LIVE_STATES else None
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
                    log.warning("engine_rollback", engine_id=spec.engine_id, failed_reason=rec.failure_reason)
                    try:
                        await self._start_locked(rec, previous, ready_timeout_s)
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
        self._set_state(rec, EngineState.READY)
        log.info("engine_ready", engine_id=spec.engine_id, pid=process.pid, start_s=round(start_s, 3))
        return start_s

    async def _fail_start(self, rec: _Engine, process: EngineProcess, reason: str) -> None:
        rec.expected_exit = True
        await self._terminate(rec, process, self.stop_grace_s)
        if rec.watcher is not None:
            await rec.watcher
            rec.watcher = None
        rec.process = None
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
        last = _last_line(_read_log_tail(rec.log_path))
        reason = f"exited with status {returncode}" + (f": {last}" if last else "")
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
        rec.last_metrics = None
        self._set_state(rec, EngineState.STOPPED)
        log.info(
            "engine_stopped",
            engine_id=rec.spec.engine_id,
            returncode=process.returncode,
            stop_s=round(stop_s, 3),
        )
        return stop_s
