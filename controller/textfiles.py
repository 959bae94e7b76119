"""Reading and writing the text files the controller and the simulator take and give (profiles, policy
settings, hourly carbon and price series, reports, tables): one way to fail on a bad file, one way to
write one.

Reading: a missing file raises NotFoundError; a folder, an unreadable file, binary data (a NUL byte) or
text that is not UTF-8 raises DataFileError naming the file, the line and what was expected, never a
traceback. Writing: atomic (a temporary file in the same folder, then a rename: a reader never sees half
a file), readable like any file the user creates (0666 less the umask, usually 0644).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.api.errors import DataFileError, NotFoundError
from agent.api.files import replace_file


def open_error(path: str | os.PathLike[str], err: OSError, expected: str) -> NotFoundError | DataFileError:
    """The error to raise for an OSError opening `path`: NotFoundError when nothing is there, else
    DataFileError (naming the file and what went wrong)."""
    name = os.fspath(path)
    if isinstance(err, FileNotFoundError):
        return NotFoundError(f"{name}: not found (no such file); expected {expected}")
    if isinstance(err, IsADirectoryError):
        return DataFileError(name, None, None, f"a folder, not a file; expected {expected}")
    return DataFileError(name, None, None, f"cannot read: {err.strerror or err}; expected {expected}")


def read_text(path: str | os.PathLike[str], expected: str) -> str:
    """The whole file as UTF-8 text (a byte-order mark is dropped); errors as the module docstring says.
    `expected` ends each error message ("expected <expected>")."""
    name = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise open_error(path, err, expected) from None
    nul = data.find(b"\0")
    if nul >= 0:
        reason = f"binary data (NUL byte at offset {nul}), not text; expected {expected}"
        raise DataFileError(name, data.count(b"\n", 0, nul) + 1, None, reason)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        reason = f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); expected {expected}"
        raise DataFileError(name, data.count(b"\n", 0, err.start) + 1, None, reason) from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically, mode 0666 less the umask (module docstring)."""
    replace_file(path, text, mode=0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc), else set and reset."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
