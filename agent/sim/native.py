"""Simulated engines from the compiled copy of the engine and its physics, where it is built and current.

Where it sits: the cluster simulator (`controller.sim.fleet`) creates its engines through `make_engine`.
`tools/build_native.py` (run by `make`) compiles agent/sim/engine_core.py and agent/sim/physics/model.py
with mypyc into the `dynamollm_native` package, each module holding the SHA-256 of the source it was
built from. `make_engine` returns a compiled engine only while both sources still hash the same, so an
edited source runs as plain Python until the next build instead of as a stale one; otherwise, or for a
performance model that is not `PerfModel` (the tests' fakes), or with `DYNAMOLLM_NATIVE=0` in the
environment, the plain `SimEngine`. Both run the same code on the same draws: the results are identical,
only the speed differs (docs/simulator.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy as np

from agent.sim import engine_core
from agent.sim.engine_core import EngineConfig, PerfModelLike, SimEngine
from agent.sim.physics import model

PACKAGE = "dynamollm_native"
# compiled module name -> source file, relative to the repository root
SOURCES = {"engine_core": "agent/sim/engine_core.py", "physics_model": "agent/sim/physics/model.py"}
_LOADED = {"engine_core": engine_core, "physics_model": model}


def native_status() -> str:
    """'compiled', or why the engines run as plain Python."""
    if os.environ.get("DYNAMOLLM_NATIVE") == "0":
        return "plain Python (DYNAMOLLM_NATIVE=0)"
    modules = _modules()
    return "compiled" if isinstance(modules, dict) else modules


@functools.cache
def _modules() -> dict[str, ModuleType] | str:
    return load_modules(PACKAGE)


def load_modules(package: str) -> dict[str, ModuleType] | str:
    """The compiled modules of `package` by name (SOURCES), or why they cannot be used: not built, or
    built from another version of a source."""
    out: dict[str, ModuleType] = {}
    for name, source in SOURCES.items():
        try:
            mod = importlib.import_module(f"{package}.{name}")
        except ImportError:
            return "plain Python (no compiled build: run tools/build_native.py)"
        loaded = _LOADED[name].__file__
        assert loaded is not None
        if getattr(mod, "SOURCE_SHA256", None) != hashlib.sha256(Path(loaded).read_bytes()).hexdigest():
            return f"plain Python (the compiled build predates {source}: run tools/build_native.py)"
        out[name] = mod
    return out


def make_engine(
    perf: PerfModelLike,
    clock_mhz: float,
    rng: np.random.Generator,
    config: EngineConfig,
    *,
    start_s: float,
    power_bin_s: float,
    stepwise: bool = False,
) -> SimEngine:
    """A `SimEngine` (arguments as its constructor's), compiled where possible (module docstring).
    `stepwise` is the reference engine: plain Python, every iteration on its own."""
    modules = _modules()
    usable = not stepwise and type(perf) is model.PerfModel and os.environ.get("DYNAMOLLM_NATIVE") != "0"
    if not usable or not isinstance(modules, dict):
        return SimEngine(perf, clock_mhz, rng, config, start_s, power_bin_s, stepwise=stepwise)
    native_config = _convert(config, modules["engine_core"])
    native_perf = _native_perf(cast(model.PerfModel, perf), modules["physics_model"])
    engine = modules["engine_core"].SimEngine(
        native_perf, clock_mhz, rng, native_config, start_s, power_bin_s
    )
    return cast(SimEngine, engine)


@functools.lru_cache(maxsize=64)
def _native_perf(perf: model.PerfModel, native: ModuleType) -> Any:
    return native.PerfModel(perf.arch, perf.gpu_spec, perf.tp, _convert(perf.params, native))


def _convert(value: Any, native: ModuleType) -> Any:
    """A value of the plain module's dataclasses rebuilt from the compiled module's classes of the same
    names (compiled code checks argument types)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = getattr(native, type(value).__name__)
        return cls(**{f.name: _convert(getattr(value, f.name), native) for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        return tuple(_convert(v, native) for v in value)
    return value
