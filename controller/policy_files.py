"""Policy settings files: `PolicySettings` from a TOML file (`dctl simulate --policy-config`, and the
controller daemon's config later). The file's top-level keys are the policy's knobs, with the tables
`[periods]` (cluster_s, pool_s, instance_s) and `[costs]` (the reconfiguration costs); what it does not
name keeps its default. Example: docs/control.md, "Policy settings".

Where it sits: the I/O edge in front of the pure `controller.policy.registry.policy_settings_from_doc`,
which checks every key and value; a missing, binary or malformed file is one DataFileError /
NotFoundError naming the file (and the line, for TOML syntax).
"""

from __future__ import annotations

import os
import tomllib

from agent.api.errors import DataFileError
from controller.policy.registry import PolicySettings, policy_settings_from_doc
from controller.textfiles import read_text

_EXPECTED = "a TOML file of policy settings (docs/control.md, Policy settings)"


def load_policy_settings(path: str | os.PathLike[str], base: PolicySettings | None = None) -> PolicySettings:
    """The settings in `path`, over `base` (default `PolicySettings()`)."""
    text = read_text(path, _EXPECTED)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = getattr(err, "lineno", None)
        raise DataFileError(
            os.fspath(path), line, None, f"not valid TOML: {err}; expected {_EXPECTED}"
        ) from None
    return policy_settings_from_doc(doc, base)
