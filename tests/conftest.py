"""Shared fixtures. `shared_data` is the public data set beside the checkout (../shared/data).

Where it is absent (a user's fresh clone) tests that need it skip with the reason; under CI=true they
fail instead, so CI never skips them silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The fake libnvidia-ml.so.1 (built with gcc) and its per-test state: the real NvmlBackend and
# nvidia-ml-py run against it (tests/fakenvml).
pytest_plugins = ["tests.fakenvml.fixtures"]


def shared_data_dir() -> Path:
    return Path(os.environ.get("DYNAMOLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "README.md").is_file():
        reason = f"public data set not found at {path} (set DYNAMOLLM_SHARED_DATA or clone with ../shared)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path
