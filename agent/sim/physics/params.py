"""Fitted parameters on disk: `params/<model>__<gpu>.json`, written by tools/fit_physics.py and committed.

The only I/O of the physics package. `load_perf_model` is the entry point every simulated engine,
profile generator and cluster simulation uses; it reads a file shipped with the package, so nothing at
run time needs the calibration data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from functools import cache
from pathlib import Path
from typing import Any

from agent.api.errors import DataFileError, InvalidArgumentError
from agent.sim.physics.model import (
    AllReduceParams,
    AttentionParams,
    ClockParams,
    EngineParams,
    KernelParams,
    PerfModel,
    PerfParams,
    PowerParams,
)
from agent.sim.physics.specs import GPU_NAMES, MODEL_NAMES, TP_DEGREES, arch_for, gpu_for, kv_capacity_tokens

PARAMS_DIR = Path(__file__).resolve().parent / "params"
FORMAT = "dynamollm.physics-params/v1"


def params_path(model: str, gpu: str, directory: Path = PARAMS_DIR) -> Path:
    return directory / f"{model}__{gpu}.json"


def params_to_json(params: PerfParams, provenance: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of `params`; `provenance` records the data and split the fit used."""
    doc = asdict(params)
    doc["allreduce"] = [asdict(a) for a in params.allreduce]
    return {"format": FORMAT, **doc, "provenance": provenance}


def _section(doc: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise DataFileError(str(path), None, name, "missing or not an object")
    return value


def _numbers(section: dict[str, Any], cls: Any, name: str, path: Path) -> dict[str, Any]:
    """The fields of dataclass `cls` from `section`, checked to be present and numeric (or str)."""
    out: dict[str, Any] = {}
    for field in (f.name for f in fields(cls)):
        if field not in section:
            raise DataFileError(str(path), None, f"{name}.{field}", "missing")
        value = section[field]
        if field == "source":
            if not isinstance(value, str):
                raise DataFileError(str(path), None, f"{name}.{field}", "must be a string")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise DataFileError(str(path), None, f"{name}.{field}", f"must be a number, got {value!r}")
        out[field] = value
    return out


def params_from_json(doc: Any, path: Path) -> PerfParams:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataFileError(str(path), None, "format", f"expected {FORMAT!r}")
    allreduce_doc = doc.get("allreduce")
    if not isinstance(allreduce_doc, list):
        raise DataFileError(str(path), None, "allreduce", "missing or not a list")
    allreduce = []
    for i, item in enumerate(allreduce_doc):
        if not isinstance(item, dict):
            raise DataFileError(str(path), None, f"allreduce[{i}]", "not an object")
        fields = _numbers(item, AllReduceParams, f"allreduce[{i}]", path)
        allreduce.append(
            AllReduceParams(
                tp=int(fields["tp"]), alpha_s=fields["alpha_s"], bw_bytes_per_s=fields["bw_bytes_per_s"]
            )
        )
    for name in ("model", "gpu"):
        if not isinstance(doc.get(name), str):
            raise DataFileError(str(path), None, name, "missing or not a string")
    return PerfParams(
        model=doc["model"],
        gpu=doc["gpu"],
        kernels=KernelParams(**_numbers(_section(doc, "kernels", path), KernelParams, "kernels", path)),
        attention=AttentionParams(
            **_numbers(_section(doc, "attention", path), AttentionParams, "attention", path)
        ),
        allreduce=tuple(allreduce),
        engine=EngineParams(**_numbers(_section(doc, "engine", path), EngineParams, "engine", path)),
        clock=ClockParams(**_numbers(_section(doc, "clock", path), ClockParams, "clock", path)),
        power=PowerParams(**_numbers(_section(doc, "power", path), PowerParams, "power", path)),
    )


def load_params_file(path: Path) -> PerfParams:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataFileError(str(path), err.lineno, None, f"not JSON: {err.msg}") from None
    return params_from_json(doc, path)


@cache
def _committed_params(model: str, gpu: str) -> PerfParams:
    return load_params_file(params_path(model, gpu))


def load_perf_model(model: str, gpu: str, tp: int) -> PerfModel:
    """The fitted model of `model` on `tp` GPUs of type `gpu`, from the committed parameter files."""
    if model not in MODEL_NAMES:
        raise InvalidArgumentError("model", model, MODEL_NAMES)
    if gpu not in GPU_NAMES:
        raise InvalidArgumentError("gpu", gpu, GPU_NAMES)
    arch, spec, params = arch_for(model), gpu_for(gpu), _committed_params(model, gpu)
    fitted_tp = {1} | {a.tp for a in params.allreduce}
    allowed = tuple(t for t in TP_DEGREES if t in fitted_tp and kv_capacity_tokens(arch, spec, t) > 0)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp not in allowed:
        raise InvalidArgumentError("tp", tp, allowed)
    return PerfModel(arch, spec, tp, params)
