"""The shared state of one simulated GPU node: a directory that the agent and the engines both use.

Where it sits: `agent.sim.gpu.SimulatedGpuBackend` (inside the agent) writes what an operator sets
on a GPU — the locked SM clock range and the power limit — and the simulated engine program
(`python -m agent.sim.engine`, a separate process) picks those settings up within an iteration and
writes back what it does with its GPUs: cumulative energy above idle, power above idle averaged over the
last second, busy time, effective clock and memory held. The backend turns that into readings (power,
energy counter, utilisation) the way NVML reports a real GPU's.

Layout of `node_dir` (every file JSON, replaced atomically by write-to-temp + rename, so a reader sees
either the old or the new content and never a torn one; each file has exactly one writer):

    node.json              {"gpu": "h100-sxm", "model": "llama2-70b", "gpus": 8}       backend
    gpu-<i>.control.json   {"locked_min_clock_mhz", "locked_max_clock_mhz", "power_limit_w"}  backend
    gpu-<i>.activity.json  {"pid", "extra_energy_j", "extra_power_w", "busy_s", "clock_mhz",
                            "power_capped", "mem_used_bytes"}                               engine

The directory outlives both processes, like a GPU's settings outlive the agent: an agent restarted after
a crash finds the clocks it had locked, and an engine restarted on the same GPU continues the energy
counter from where the previous one left it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.api.errors import DataFileError, InvalidArgumentError


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What the simulated node is: GPU type, the model whose fitted power parameters it uses, GPU count."""

    gpu: str
    model: str
    gpus: int


@dataclass(frozen=True, slots=True)
class GpuControl:
    """Settings of one GPU: locked SM clock range (both None when unlocked) and the power limit."""

    locked_min_clock_mhz: int | None
    locked_max_clock_mhz: int | None
    power_limit_w: float

    @property
    def locked(self) -> bool:
        return self.locked_max_clock_mhz is not None


@dataclass(frozen=True, slots=True)
class GpuActivity:
    """What the engine on one GPU has done: counters since the GPU first served an engine, and now.

    `pid` is the engine process (0: no engine); `extra_power_w` the power above idle averaged over the
    last second (as NVML reports power); `clock_mhz` the clock it runs at (0: no engine), lower than the
    locked maximum when the power limit caps it (`power_capped`).
    """

    pid: int
    extra_energy_j: float
    extra_power_w: float
    busy_s: float
    clock_mhz: int
    power_capped: bool
    mem_used_bytes: int


NO_ACTIVITY = GpuActivity(
    pid=0,
    extra_energy_j=0.0,
    extra_power_w=0.0,
    busy_s=0.0,
    clock_mhz=0,
    power_capped=False,
    mem_used_bytes=0,
)


def _atomic_write_json(path: Path, doc: dict[str, Any]) -> None:
    # A per-writer temporary name: the backend and an engine never share a file, but two engines briefly
    # overlapping on a GPU during a restart must not collide on the temporary either.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(str(path), err.lineno, None, f"not JSON: {err.msg}") from None
    if not isinstance(doc, dict):
        raise DataFileError(str(path), None, None, "not a JSON object")
    return doc


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = doc.get(name)
    if isinstance(value, bool) and kind is not bool:
        raise DataFileError(str(path), None, name, f"expected a number, got {value!r}")
    if not isinstance(value, kind):
        raise DataFileError(str(path), None, name, f"missing or of the wrong type: {value!r}")
    return value


class NodeDir:
    """Typed access to one node directory. Cheap to construct; every call touches the file system."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _gpu_path(self, index: int, kind: str) -> Path:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidArgumentError("gpu_index", index, "an integer >= 0")
        return self.path / f"gpu-{index}.{kind}.json"

    def control_path(self, index: int) -> Path:
        return self._gpu_path(index, "control")

    def activity_path(self, index: int) -> Path:
        return self._gpu_path(index, "activity")

    # ---------------------------------------------------------------- node
    def read_spec(self) -> NodeSpec | None:
        """The node's spec, or None when no backend has initialised the directory."""
        path = self.path / "node.json"
        doc = _read_json(path)
        if doc is None:
            return None
        return NodeSpec(
            gpu=_field(doc, "gpu", str, path),
            model=_field(doc, "model", str, path),
            gpus=_field(doc, "gpus", int, path),
        )

    def write_spec(self, spec: NodeSpec) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.path / "node.json", asdict(spec))

    # ------------------------------------------------------------- control
    def read_control(self, index: int) -> GpuControl | None:
        """The GPU's settings, or None when never written (the GPU's defaults apply)."""
        path = self.control_path(index)
        doc = _read_json(path)
        if doc is None:
            return None
        lo, hi = doc.get("locked_min_clock_mhz"), doc.get("locked_max_clock_mhz")
        if (lo is None) != (hi is None):
            raise DataFileError(str(path), None, "locked_min_clock_mhz", "both clock bounds or neither")
        return GpuControl(
            locked_min_clock_mhz=None if lo is None else _field(doc, "locked_min_clock_mhz", int, path),
            locked_max_clock_mhz=None if hi is None else _field(doc, "locked_max_clock_mhz", int, path),
            power_limit_w=float(_field(doc, "power_limit_w", (int, float), path)),
        )

    def write_control(self, index: int, control: GpuControl) -> None:
        _atomic_write_json(self.control_path(index), asdict(control))

    # ------------------------------------------------------------ activity
    def read_activity(self, index: int) -> GpuActivity:
        """The engine activity of the GPU; `NO_ACTIVITY` when no engine ever ran on it."""
        path = self.activity_path(index)
        doc = _read_json(path)
        if doc is None:
            return NO_ACTIVITY
        num = (int, float)
        return GpuActivity(
            pid=_field(doc, "pid", int, path),
            extra_energy_j=float(_field(doc, "extra_energy_j", num, path)),
            extra_power_w=float(_field(doc, "extra_power_w", num, path)),
            busy_s=float(_field(doc, "busy_s", num, path)),
            clock_mhz=_field(doc, "clock_mhz", int, path),
            power_capped=_field(doc, "power_capped", bool, path),
            mem_used_bytes=_field(doc, "mem_used_bytes", int, path),
        )

    def write_activity(self, index: int, activity: GpuActivity) -> None:
        _atomic_write_json(self.activity_path(index), asdict(activity))


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (an engine killed with SIGKILL leaves its last record)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # A killed child its parent has not reaped yet is a zombie: it still answers signal 0.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"
