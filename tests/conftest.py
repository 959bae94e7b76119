"""Shared fixtures. Every test starts from structlog's defaults; `shared_data` is the public data set
beside the checkout (../shared/data); `mqtt_broker` a real Mosquitto on a free loopback port
(tests/mqtt_broker.py), stopped at teardown.

Where either is absent (a user's fresh clone, no mosquitto installed) tests that need it skip with the
reason; under CI=true they fail instead, so CI never skips them silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import structlog

from tests.mqtt_broker import MosquittoBroker, mosquitto_path

ROOT = Path(__file__).resolve().parents[1]

# The fake libnvidia-ml.so.1 (built with gcc) and its per-test state: the real NvmlBackend and
# nvidia-ml-py run against it (tests/fakenvml).
pytest_plugins = ["tests.fakenvml.fixtures"]


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def shared_data_dir() -> Path:
    return Path(os.environ.get("DYNAMOLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts from structlog's defaults: a test that runs a daemon's or dctl's main in-process
    configures cached loggers, and a logger bound under that config would slip past `capture_logs` in a
    later test."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "README.md").is_file():
        _missing(f"public data set not found at {path} (set DYNAMOLLM_SHARED_DATA or clone with ../shared)")
    return path


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    program = mosquitto_path()
    if program is None:
        _missing("mosquitto not found on PATH or in /usr/sbin (Debian: apt-get install mosquitto)")
    broker = MosquittoBroker(program, tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
