"""Profile files on disk (`dynamollm.profile/v1` JSON): read, write, and the committed default profiles.

Where it sits: between the pure data model (`controller.model.profile`) and every reader of a profile
file: the simulator (`dctl simulate`), `dctl profile`, and the live controller daemon. Because the daemon
reads profiles too, this module imports only the model and `agent.api` - never `controller.sim` or
`agent.sim` (tests/unit/test_profile.py checks). Measuring a profile stays in `controller.sim.profiling`.

The committed defaults are `controller/profile_data/<model>_<gpu>.json` (package data). The format, field
by field: docs/profile-format.md. A missing file is a NotFoundError; a binary, non-UTF-8, unreadable or
malformed one a DataFileError naming the file (and line and field where there is one), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from agent.api.errors import DataFileError, NotFoundError
from controller.model.profile import PROFILE_FORMAT, Profile

PROFILES_DIR = Path(__file__).resolve().parent / "profile_data"
_EXPECTED = f"expected a {PROFILE_FORMAT} JSON file"


def default_profile_path(model: str, gpu: str) -> Path:
    """Where the committed default profile of (model, gpu) lives (whether or not it exists)."""
    return PROFILES_DIR / f"{model}_{gpu}.json"


def default_profile(model: str, gpu: str) -> Profile:
    """The committed profile generated from the physics model for (model, gpu)."""
    path = default_profile_path(model, gpu)
    if not path.is_file():
        available = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise NotFoundError(
            f"no default profile for model {model!r} on gpu {gpu!r} "
            f"(available: {', '.join(available) or 'none'}); generate one with `dctl profile generate`"
        )
    return load_profile(path)


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile file; a bad field -> DataFileError naming the file and the field."""
    p = Path(path)
    text = _read_utf8(p)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(str(p), err.lineno, None, f"not valid JSON: {err.msg}; {_EXPECTED}") from None
    return Profile.from_dict(doc, str(p))


def profile_to_json(profile: Profile) -> str:
    """The document as text, one line per (class, TP, clock): diffs of regenerated files stay readable."""
    doc = profile.to_dict()
    head = {k: v for k, v in doc.items() if k != "classes"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "classes": [')
    for ci, cls in enumerate(doc["classes"]):
        meta = {k: v for k, v in cls.items() if k != "configs"}
        lines.append("    " + json.dumps(meta)[:-1] + ', "configs": [')
        for j, cfg in enumerate(cls["configs"]):
            sep = "," if j < len(cls["configs"]) - 1 else ""
            lines.append("      " + json.dumps(cfg) + sep)
        lines.append("    ]}" + ("," if ci < len(doc["classes"]) - 1 else ""))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write the profile atomically (a temporary file in the same folder, then a rename: a reader never
    sees half a file), readable like any file the user creates (0666 less the umask, usually 0644)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(profile_to_json(profile))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_utf8(p: Path) -> str:
    """The file's text; NotFoundError when missing, DataFileError when unreadable, binary or not UTF-8."""
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{p}: not found (no such file); {_EXPECTED}") from None
    except IsADirectoryError:
        raise DataFileError(str(p), None, None, f"a folder, not a file; {_EXPECTED}") from None
    except OSError as err:
        raise DataFileError(str(p), None, None, f"cannot read: {err.strerror or err}; {_EXPECTED}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        reason = f"binary data (NUL byte at offset {nul}), not text; {_EXPECTED}"
        raise DataFileError(str(p), line, None, reason)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        reason = f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); {_EXPECTED}"
        raise DataFileError(str(p), line, None, reason) from None


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc), else set and reset."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
