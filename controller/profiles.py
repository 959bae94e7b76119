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

import json
import os
from pathlib import Path

from agent.api.errors import DataFileError, NotFoundError
from controller.model.profile import PROFILE_FORMAT, Profile
from controller.textfiles import read_text, write_text_atomic

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
    text = read_text(p, _EXPECTED.removeprefix("expected "))
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
    """Write the profile atomically, readable like any file the user creates (`write_text_atomic`)."""
    write_text_atomic(path, profile_to_json(profile))
