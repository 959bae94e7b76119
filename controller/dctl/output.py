"""What `dctl` writes where: stdout carries only the command's own output, everything else goes to stderr.

Where it sits: `controller.dctl.main` wraps every command in `reserved_stdout()`; the command modules
write their output (tables, JSON, one-line results) with `echo` and nothing else. Inside the block:

* file descriptor 1 points at stderr, so whatever C libraries write to "stdout" (HiGHS's banner from the
  pool MILP, gRPC, ...) lands on stderr, and so do worker processes that inherit it;
* `sys.stdout` is `sys.stderr`, so Python-level `print` of third-party code lands there as well;
* `echo` writes through a duplicate of the original stdout taken at start-up, so `dctl ... --output
  json | jq` always gets parseable JSON. Pipes, files, terminals and pytest's capture all work: when
  stdout has no file descriptor (an in-memory capture), only the Python-level swap is done.

On the way out the original stdout is put back. A reader that went away (`dctl ... | head`) raises
BrokenPipeError from `echo` or the final flush; the block then points both descriptors at /dev/null so
that no later flush fails again, and re-raises for `main` to exit quietly (docs: exit code 141).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TextIO

_out: TextIO | None = None


def stdout() -> TextIO:
    """The stream of the command's own output (the real stdout, also while it is redirected)."""
    return _out if _out is not None else sys.stdout


def echo(text: str = "", *, flush: bool = False) -> None:
    """One piece of the command's output, with a newline; `flush` for streaming commands (`watch`)."""
    stream = stdout()
    stream.write(text + "\n")
    if flush:
        stream.flush()


def _fileno(stream: object) -> int | None:
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # in-memory capture, closed stream
        return None
    return fd if isinstance(fd, int) else None


@contextlib.contextmanager
def reserved_stdout() -> Iterator[TextIO]:
    """Within the block, fd 1, the descriptor under `sys.stdout` (when another one) and `sys.stdout`
    itself go to stderr; the yielded stream (also `stdout()`) writes to the original stdout. Restores all
    on exit; on BrokenPipeError silences the dead stdout, then re-raises."""
    global _out
    original = sys.stdout
    original.flush()
    out_fd = _fileno(original)
    err_fd = _fileno(sys.stderr)
    if err_fd is None:
        err_fd = 2
    stream: TextIO = original
    if out_fd is not None and out_fd != err_fd:
        with contextlib.suppress(OSError):  # a closed stdout: nothing to write to, nothing to protect
            stream = open(  # noqa: SIM115 - closed in the finally below, after the descriptors are restored
                os.dup(out_fd),
                "w",
                buffering=1 if getattr(original, "line_buffering", False) else -1,  # 1: line-buffered
                encoding=getattr(original, "encoding", None) or "utf-8",
                errors=getattr(original, "errors", None) or "strict",
                closefd=True,
            )
    saved: dict[int, int] = {}  # redirected descriptor -> a duplicate of what it was
    sys.stderr.flush()
    targets = {1} if out_fd is None else {1, out_fd}
    for fd in sorted(targets - {err_fd}):
        with contextlib.suppress(OSError):  # a closed descriptor stays closed
            saved[fd] = os.dup(fd)
            os.dup2(err_fd, fd)
    _out = stream
    sys.stdout = sys.stderr
    broken = False
    try:
        yield stream
        stream.flush()
    except BrokenPipeError:
        broken = True
        raise
    finally:
        _out = None
        sys.stdout = original
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        if broken:
            _silence(stream, original)
        if stream is not original:
            with contextlib.suppress(OSError):
                stream.close()


def _silence(*streams: TextIO) -> None:
    """Point the descriptors of dead output streams at /dev/null, so their buffered bytes and the
    interpreter's final flush go nowhere instead of raising BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for s in streams:
            fd = _fileno(s)
            if fd is not None:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
