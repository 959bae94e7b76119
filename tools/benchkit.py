"""What the benchmarks share (tools/bench_controller.py, tools/bench_router.py): child processes in their
own process groups, always stopped; CPU time read from /proc; quantiles; the figures table."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILDREN: list[subprocess.Popen[bytes]] = []  # every child started, stopped at the end whatever happens


def spawn(
    args: Sequence[str], *, env: dict[str, str], out: Path, err: Path, cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """A child in its own session (process group), stdout and stderr to files (no pipe to fill), on
    `cpus` when given (set before exec: every thread it starts inherits it)."""

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=fo,
            stderr=fe,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=pin if cpus else None,  # only sched_setaffinity: no lock taken
        )
    CHILDREN.append(proc)
    return proc


def stop_all(
    procs: Iterable[subprocess.Popen[bytes]], grace_s: float = 15.0, *, in_order: bool = False
) -> None:
    """SIGTERM to each child's process group (all at once, or one after the other with `in_order`, e.g. a
    router before the controller it reports to), then SIGKILL to the groups whose leader is still alive
    (a reaped leader's group id could have been reused: left alone)."""
    procs = [p for p in procs if p.returncode is None]
    deadline = time.monotonic() + grace_s

    def wait(p: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))

    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        if in_order:
            wait(p)
    for p in procs:
        wait(p)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)
    for p in procs:
        with contextlib.suppress(ValueError):
            CHILDREN.remove(p)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return ru.ru_utime + ru.ru_stime


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(rows: Sequence[tuple[str, str, str]]) -> None:
    w0 = max((len(r[0]) for r in rows), default=10)
    w1 = max((len(r[1]) for r in rows), default=10)
    print(f"{'figure':<{w0}}  {'value':<{w1}}  target")
    print(f"{'-' * w0}  {'-' * w1}  {'-' * 10}")
    for name, value, target in rows:
        print(f"{name:<{w0}}  {value:<{w1}}  {target}")
