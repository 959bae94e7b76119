"""pytest fixtures over the fake NVML library; tests/conftest.py registers them as a plugin.

`fake_nvml_lib` (session): builds the library once per session and binds this process's pynvml to it.
`fake_nvml` (per test): a fresh state file for the test, FAKE_NVML_STATE pointing at it (the library
reads the variable on every call, so in-process backends follow), and `FakeNvml.env()` for subprocesses.
Without a C compiler the fixtures skip, or fail under CI=true so CI never skips them silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.api.errors import UnavailableError
from tests.fakenvml import GPUS_ENV, STATE_ENV, FakeNvml, FakeNvmlState, bind_pynvml, build_fake_nvml


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        library = build_fake_nvml(tmp_path_factory.mktemp("fakenvml"))
    except UnavailableError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {exc}")
        pytest.skip(str(exc))
    bind_pynvml(library)
    return library


@pytest.fixture
def fake_nvml(fake_nvml_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    state = FakeNvmlState(tmp_path / "fake-nvml-state")
    monkeypatch.setenv(STATE_ENV, str(state.path))
    monkeypatch.delenv(GPUS_ENV, raising=False)
    return FakeNvml(lib_path=fake_nvml_lib, state=state)
