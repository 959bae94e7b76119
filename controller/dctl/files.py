"""Input files named on the `dctl` command line: errors that say which flag named the file.

Where it sits: between a command's flags and the readers that own the file formats (`controller.profiles`,
`controller.sim.traces`, `controller.sim.carbon`, `controller.sim.week`). The readers raise NotFoundError
for a missing file and DataFileError for one that is unreadable, binary, not UTF-8 or malformed (naming
the file, and the line and field where there is one); `named_by(flag)` puts the flag in front, so the
operator reads one line such as

    dctl simulate: error: --carbon data/x.bin:1: binary data (NUL byte at offset 0), not text; expected ...

and `main` exits 2 (bad input), never with a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from agent.api.errors import DataFileError, InvalidArgumentError, NotFoundError


class FlagFileError(DataFileError):
    """A data file named by a flag is unreadable or malformed: the flag, then the reader's message."""

    def __init__(self, flag: str, err: DataFileError) -> None:
        super().__init__(err.path, err.line, err.field, err.reason)
        self.flag = flag

    def __str__(self) -> str:
        return f"{self.flag} {super().__str__()}"


class FlagFileNotFoundError(NotFoundError):
    """A file named by a flag does not exist."""

    def __init__(self, flag: str, path: str, expected: str) -> None:
        super().__init__(f"{flag} {path}: not found (no such file); expected {expected}")
        self.flag = flag
        self.path = path


@contextlib.contextmanager
def named_by(flag: str) -> Iterator[None]:
    """Within the block, a file error (DataFileError, NotFoundError) is re-raised with `flag` in front."""
    try:
        yield
    except (FlagFileError, FlagFileNotFoundError):
        raise
    except DataFileError as err:
        raise FlagFileError(flag, err) from None
    except NotFoundError as err:
        raise NotFoundError(f"{flag} {err}") from None


def existing_file(value: str | None, flag: str, expected: str) -> Path | None:
    """The path a flag names, checked before any work starts: FlagFileNotFoundError when nothing is there,
    FlagFileError when it is not a regular file (a folder, a device)."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise FlagFileNotFoundError(flag, value, expected)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise FlagFileError(flag, DataFileError(value, None, None, f"{what}; expected {expected}"))
    return path


def writable_json(value: str | None, flag: str = "--json") -> Path | None:
    """The path of a JSON file to write (`flag`, a `--json` report by default), checked before any work:
    a file path in a folder that exists (or will be created under one that does) and is writable;
    InvalidArgumentError naming the flag."""
    if value is None:
        return None
    path = Path(value)
    allowed = "a file path in a writable folder"
    if path.is_dir():
        raise InvalidArgumentError(flag, value, allowed)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # missing folders are created on write: the first existing one decides
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise InvalidArgumentError(flag, value, allowed)
    return path
