"""Engine ownership on one node: parent-death signal, the record file of running engines, adopted
processes, and which processes hold the node's GPUs.

Where it sits: `agent.engine.driver.EngineDriver` uses these pieces so that an engine never outlives or
escapes its agent unnoticed:

- `parent_death_argv`: every engine is started (`SubprocessSpawner`) in its own session and process
  group through a small launcher that sets PR_SET_PDEATHSIG and then execs the engine (same pid, and the
  setting survives the exec), so the kernel sends the engine SIGTERM when the agent dies, SIGKILL
  included. A launcher rather than a `preexec_fn`: Python code in the forked child of the agent, whose
  gRPC threads hold locks at the fork, crashed that child (SIGSEGV). The signal fires when the THREAD
  that forked the engine exits, not the process: engines must be spawned from the thread that lives as
  long as the agent, the event loop's (asyncio forks in the calling thread), never from a worker thread
  (`asyncio.to_thread`, an executor) that may exit first (tests/integration/test_engine_ownership.py
  shows an engine killed by its forking thread's exit while the process lives on). It is not inherited
  across fork: an engine's own workers (vLLM's TP processes) are reached through the process group.
- `EngineRecord`, `load_records`, `save_records`: the driver keeps RUNTIME_DIR/engines.json (written
  atomically: temporary file, fsync, rename, directory fsync) listing every engine process it runs: pid,
  the process's start time (field 22 of /proc/PID/stat, in clock ticks since boot: with the pid it names
  one process, so a reused pid is recognised), GPUs, engine id, spec, port, and the measured start time.
- `AdoptedProcess`: an engine process a previous agent started and this one adopted at start-up
  (`EngineDriver.adopt_or_stop`): not a child, so it is watched through /proc and signalled through its
  process group, never a group whose number another process has taken since.
- `gpu_process_lister`: the compute processes on each GPU (`GpuBackend.compute_processes`, through the
  per-GPU workers); `process_session_id` tells the driver's engines (their workers included) from
  processes it does not know.

Linux only (prctl, /proc); elsewhere the parent-death signal is not set and /proc reads find nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.errors import DataFileError
from agent.api.files import replace_file
from agent.gpu.base import GpuProcess
from agent.gpu.worker import GpuWorkers

# What the kernel sends an engine when its agent dies: SIGTERM lets vLLM (and the simulated engine) shut
# down in order and take their workers along; whatever is left is SIGKILLed by the next agent's
# adopt_or_stop (the record file names its process group).
PARENT_DEATH_SIGNAL = signal.SIGTERM
RECORD_FILE_VERSION = 1
# /proc/PID/stat fields after the command name (field 2): index = field number - 3.
_STAT_STATE, _STAT_SESSION, _STAT_START_TIME = 0, 3, 19

# GPU index -> the compute processes on it; raises agent.api.errors on failure (UnsupportedError where
# the driver cannot list processes).
GpuProcessLister = Callable[[Sequence[int]], Awaitable[Mapping[int, tuple[GpuProcess, ...]]]]


# ---------------------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields if len(fields) > _STAT_START_TIME else None


def process_start_ticks(pid: int, *, zombies: bool = False) -> int | None:
    """Start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22); None when no such
    process runs. A zombie (exited, not yet reaped) counts as gone unless `zombies`."""
    fields = _stat_fields(pid)
    if fields is None or (not zombies and fields[_STAT_STATE] in ("Z", "X")):
        return None
    return int(fields[_STAT_START_TIME])


def process_session_id(pid: int) -> int | None:
    """The session of process `pid` (field 6): an engine is its session's leader, its workers members."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[_STAT_SESSION])


def process_name(pid: int) -> str:
    """The command name of `pid` (/proc/PID/comm), or why it is not known."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "not visible in the agent's PID namespace"


def same_process(pid: int, start_ticks: int) -> bool:
    """Whether `pid` is still the process that started at `start_ticks` and has not exited."""
    return process_start_ticks(pid) == start_ticks


def group_is_ours(pid: int, start_ticks: int) -> bool:
    """Whether process group `pid` may still be signalled as the group of the engine that started at
    `start_ticks`: its leader is that process (exited or not), or no process `pid` exists any more. A
    group outlives its leader while members remain, and Linux hands out no pid that is still a group's
    id; a process `pid` with another start time means the number was reused: not ours."""
    ticks = process_start_ticks(pid, zombies=True)
    return ticks is None or ticks == start_ticks


def signal_group(pid: int, sig: int) -> None:
    """killpg, where a group that is gone (or not ours to signal) is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# ------------------------------------------------------------------------------ parent-death signal

# The launcher: python -I -S -c LAUNCHER PARENT_PID SIGNAL PROGRAM ARGV0 ARG... sets the parent-death
# signal, checks that the parent is still the one that launched it (otherwise the signal would never
# come), and execs PROGRAM in place (same pid) with the engine's own argv (ARGV0 ARG...). Isolated
# mode without `site`: a few ms, nothing imported but ctypes.
LAUNCHER = """\
import ctypes, os, sys
parent_pid, sig, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
    sys.stderr.write("engine launcher: prctl(PR_SET_PDEATHSIG) failed: errno %d\\n" % ctypes.get_errno())
    os._exit(126)
if os.getppid() != parent_pid:
    os._exit(1)
os.execv(program, sys.argv[4:])
"""


def parent_death_argv(
    argv: Sequence[str], env: Mapping[str, str], sig: int = PARENT_DEATH_SIGNAL
) -> list[str]:
    """`argv` wrapped in the launcher that gives the engine a parent-death signal (`argv` unchanged off
    Linux). The program is resolved on env's PATH here, so a missing one is FileNotFoundError at spawn,
    as without the launcher."""
    program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None:
        raise FileNotFoundError(2, "No such file or directory (or not executable)", argv[0])
    if not sys.platform.startswith("linux"):
        return [program, *argv[1:]]
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(os.getpid()), str(int(sig)), program]
    return [*launcher, *argv]


# ------------------------------------------------------------------------------------ record file


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """One running engine process as the record file keeps it (the spec's fields, flat)."""

    engine_id: str
    pid: int
    start_time_ticks: int
    model: str
    gpu_indices: tuple[int, ...]
    tp_degree: int
    http_port: int
    options: Mapping[str, str] = field(default_factory=dict)
    ready_s: float | None = None  # measured launch-to-READY time of this process; None: not READY yet

    def to_json(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "pid": self.pid,
            "start_time_ticks": self.start_time_ticks,
            "model": self.model,
            "gpu_indices": list(self.gpu_indices),
            "tp_degree": self.tp_degree,
            "http_port": self.http_port,
            "options": dict(self.options),
            "ready_s": self.ready_s,
        }


@dataclass(frozen=True, slots=True)
class RecordEntry:
    """One entry of the record file as read: the process it names (`pid`, `start_time_ticks`, enough to
    stop it), and the engine (`record`) when every other field is valid too (enough to adopt it)."""

    engine_id: str
    pid: int
    start_time_ticks: int
    record: EngineRecord | None
    problem: str  # why `record` is None; empty otherwise


def _int(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _entry(doc: Any) -> RecordEntry | None:
    if not isinstance(doc, dict):
        return None
    pid, ticks = _int(doc, "pid"), _int(doc, "start_time_ticks")
    engine_id = doc.get("engine_id")
    if pid is None or pid <= 1 or ticks is None or not isinstance(engine_id, str):
        return None
    gpus, options, ready_s = doc.get("gpu_indices"), doc.get("options"), doc.get("ready_s")
    tp, port, model = _int(doc, "tp_degree"), _int(doc, "http_port"), doc.get("model")
    problem = ""
    if not isinstance(model, str) or tp is None or port is None:
        problem = "model, tp_degree or http_port missing or of the wrong type"
    elif not isinstance(gpus, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
        problem = "gpu_indices is not a list of integers"
    elif not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    ):
        problem = "options is not a string map"
    elif ready_s is not None and (not isinstance(ready_s, int | float) or isinstance(ready_s, bool)):
        problem = "ready_s is not a number"
    if problem:
        return RecordEntry(engine_id, pid, ticks, None, problem)
    assert isinstance(model, str) and tp is not None and port is not None
    assert isinstance(gpus, list) and isinstance(options, dict)
    record = EngineRecord(
        engine_id=engine_id,
        pid=pid,
        start_time_ticks=ticks,
        model=model,
        gpu_indices=tuple(gpus),
        tp_degree=tp,
        http_port=port,
        options=dict(options),
        ready_s=None if ready_s is None else float(ready_s),
    )
    return RecordEntry(engine_id, pid, ticks, record, "")


def load_records(path: Path) -> list[RecordEntry]:
    """The entries of the record file ([] when there is none). DataFileError when it is not a record
    file at all; entries without a usable pid and start time are left out (nothing to stop)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(str(path), None, None, f"unreadable: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(str(path), exc.lineno, None, f"not JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("version") != RECORD_FILE_VERSION:
        raise DataFileError(
            str(path), None, "version", f"not an engine record file of version {RECORD_FILE_VERSION}"
        )
    engines = doc.get("engines")
    if not isinstance(engines, list):
        raise DataFileError(str(path), None, "engines", "not a list")
    return [entry for entry in map(_entry, engines) if entry is not None]


def save_records(path: Path, records: Sequence[EngineRecord]) -> None:
    """Replace the record file atomically (temporary file, fsync, rename, fsync of the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": RECORD_FILE_VERSION, "engines": [r.to_json() for r in records]}
    replace_file(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------- adopted process


ADOPTED_EXIT_STATUS_UNKNOWN = -1  # returncode of an adopted process that exited (not our child: unknown)


class AdoptedProcess:
    """`EngineProcess` for an engine another agent started: watched through /proc every `poll_s`,
    signalled through its process group while that group is still the engine's (`group_is_ours`)."""

    def __init__(self, pid: int, start_ticks: int, poll_s: float) -> None:
        self._pid = pid
        self._start_ticks = start_ticks
        self._poll_s = poll_s
        self._returncode: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def start_ticks(self) -> int:
        return self._start_ticks

    @property
    def returncode(self) -> int | None:
        if self._returncode is None and not same_process(self._pid, self._start_ticks):
            self._returncode = ADOPTED_EXIT_STATUS_UNKNOWN
        return self._returncode

    async def wait(self) -> int:
        while self.returncode is None:
            await asyncio.sleep(self._poll_s)
        return ADOPTED_EXIT_STATUS_UNKNOWN

    def signal_group(self, sig: int) -> None:
        if group_is_ours(self._pid, self._start_ticks):
            signal_group(self._pid, sig)


# ------------------------------------------------------------------------------------ GPU processes


def gpu_process_lister(workers: GpuWorkers) -> GpuProcessLister:
    """`GpuBackend.compute_processes` of several GPUs, each on its GPU's worker thread, in parallel.
    The first error (UnsupportedError where the driver cannot list processes) is raised."""

    async def list_processes(indices: Sequence[int]) -> dict[int, tuple[GpuProcess, ...]]:
        results = await asyncio.gather(
            *(workers.run(i, functools.partial(workers.backend.compute_processes, i)) for i in indices),
            return_exceptions=True,
        )
        found: dict[int, tuple[GpuProcess, ...]] = {}
        for index, result in zip(indices, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            found[index] = result
        return found

    return list_processes
