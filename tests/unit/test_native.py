"""The compiled engine (tools/build_native.py, `agent.sim.native`): used where built and current, the
same results as the plain engine bit for bit, never a build older than its source."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.sim import native
from agent.sim.engine_core import EngineConfig, SimEngine
from agent.sim.physics import load_perf_model
from tests.conftest import _missing
from tests.unit.test_engine_core import FakePerf, _drive

CONFIG = EngineConfig()


def _compiled() -> None:
    status = native.native_status()
    if status != "compiled":
        _missing(f"the compiled engine is not in use here: {status}")


def test_compiled_engine_gives_the_plain_engine_results_bit_for_bit() -> None:
    _compiled()
    perf = load_perf_model("llama2-70b", "h100-sxm", 2)
    engine = native.make_engine(perf, 1980, np.random.default_rng(5), CONFIG, start_s=0.0, power_bin_s=1.0)
    assert type(engine).__module__ == f"{native.PACKAGE}.engine_core"
    plain = SimEngine(perf, 1980, np.random.default_rng(5), CONFIG)
    reference = SimEngine(perf, 1980, np.random.default_rng(5), CONFIG, stepwise=True)
    got = _drive(engine, 5)
    assert got == _drive(plain, 5) == _drive(reference, 5)
    assert isinstance(got["preemptions"], int) and got["preemptions"] > 0


def test_plain_engine_for_the_reference_a_fake_model_or_when_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    perf = load_perf_model("llama2-70b", "h100-sxm", 4)
    rng = np.random.default_rng(0)
    reference = native.make_engine(perf, 1980, rng, CONFIG, start_s=0.0, power_bin_s=1.0, stepwise=True)
    assert type(reference) is SimEngine
    assert type(native.make_engine(FakePerf(), 1980, rng, CONFIG, start_s=0.0, power_bin_s=1.0)) is SimEngine
    monkeypatch.setenv("DYNAMOLLM_NATIVE", "0")
    assert type(native.make_engine(perf, 1980, rng, CONFIG, start_s=0.0, power_bin_s=1.0)) is SimEngine
    assert native.native_status() == "plain Python (DYNAMOLLM_NATIVE=0)"


def _package(root: Path, name: str, digests: dict[str, str]) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, digest in digests.items():
        (root / name / f"{module}.py").write_text(f'SOURCE_SHA256 = "{digest}"\n')


def test_a_build_of_other_sources_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in packages with the modules the loader checks: matching digests load, a digest of an older
    source or a missing build is refused with the reason."""
    root = Path(__file__).resolve().parents[2]
    current = {m: hashlib.sha256((root / src).read_bytes()).hexdigest() for m, src in native.SOURCES.items()}
    _package(tmp_path, "native_current", current)
    _package(tmp_path, "native_stale", {**current, "physics_model": "0" * 64})
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    loaded = native.load_modules("native_current")
    assert isinstance(loaded, dict) and sorted(loaded) == sorted(native.SOURCES)
    assert native.load_modules("native_stale") == (
        "plain Python (the compiled build predates agent/sim/physics/model.py: run tools/build_native.py)"
    )
    absent = native.load_modules("native_absent")
    assert isinstance(absent, str) and absent.startswith("plain Python (no compiled build")
