"""Durable file replacement, shared by the agent (state file, engine records) and the controller
(reports, profiles): one way to write a file a crash must never leave half-written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_file(
    path: str | os.PathLike[str], text: str, *, mode: int | None = None, tmp: Path | None = None
) -> None:
    """Replace `path` with `text`: written to a temporary file in the same folder (`tmp`, else a unique
    name), fsynced, renamed over `path`, then the folder fsynced. A reader sees the old file or the new
    one, never half of one, and after a crash the rename has happened or not. `mode`: the new file's
    permission bits (default 0600). The temporary file is removed if anything fails."""
    target = Path(path)
    if tmp is None:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    else:
        fd, name = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), os.fspath(tmp)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
