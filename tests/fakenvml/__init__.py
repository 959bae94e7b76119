"""The fake NVML library for tests: build it, point processes at it, read and steer its state file.

Where it sits: `fake_nvml.c` (beside this file) is a C libnvidia-ml.so.1 whose GPUs live in a text state
file (env FAKE_NVML_STATE). The real `agent.gpu.nvml.NvmlBackend` and nvidia-ml-py run over it:
in-process through `bind_pynvml` (the session fixture in `fixtures.py` does it), in a subprocess agent
through `FakeNvml.env()` (LD_LIBRARY_PATH + FAKE_NVML_STATE). `FakeNvmlState` reads what the agent set
and injects permission errors and failures, under the same flock as the library.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.api.errors import InvalidArgumentError, NotFoundError, UnavailableError

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_ENV = "FAKE_NVML_STATE"
GPUS_ENV = "FAKE_NVML_GPUS"
END_LINE = "# end"
MARKER_SYMBOL = "fakeNvmlIsFake"  # exported by the fake only: how tests tell it from a real driver

GLOBAL_KEYS = frozenset(
    {
        "gpus",
        "sm_clock_min_mhz",
        "sm_clock_max_mhz",
        "sm_clock_step_mhz",
        "mem_clocks_mhz",
        "min_power_limit_mw",
        "max_power_limit_mw",
        "default_power_limit_mw",
        "idle_power_w",
        "peak_power_w",
        "deny_set_clocks",
        "deny_set_power",
        "fail_next",
        "fail_always",
        "updated_ns",
    }
)
GPU_KEYS = frozenset(
    {"locked_min_mhz", "locked_max_mhz", "power_limit_mw", "energy_mj", "load_pct", "mem_used_bytes"}
)


def build_fake_nvml(out_dir: Path) -> Path:
    """Compile fake_nvml.c into `out_dir`/libnvidia-ml.so.1 unless an up-to-date build is there."""
    target = out_dir / LIBRARY_NAME
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise UnavailableError("no C compiler (gcc or cc) on PATH: cannot build the fake NVML library")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{LIBRARY_NAME}.{os.getpid()}"
    command = [
        gcc,
        "-shared",
        "-fPIC",
        "-O2",
        "-Wall",
        "-Wextra",
        f"-Wl,-soname,{LIBRARY_NAME}",
        "-o",
        str(partial),
        str(SOURCE),
        "-lm",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UnavailableError(f"building the fake NVML library failed: {' '.join(command)}\n{done.stderr}")
    os.replace(partial, target)  # atomic: a concurrent builder never sees half a library
    return target


def bind_pynvml(library: Path) -> None:
    """Make this process's pynvml call the fake at `library`.

    pynvml keeps the first library it loaded for the life of the process; binding it explicitly (and
    preloading with RTLD_GLOBAL so that dlopen("libnvidia-ml.so.1") also finds the fake by soname)
    guarantees in-process tests never reach a real driver, even on a GPU host.
    """
    import pynvml

    handle = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    if not hasattr(handle, MARKER_SYMBOL):
        raise UnavailableError(f"{library} is not the fake NVML library (no {MARKER_SYMBOL} symbol)")
    with pynvml.libLoadLock:
        pynvml.nvmlLib = handle
        pynvml._nvmlGetFunctionPointer_cache.clear()


@dataclass(frozen=True, slots=True)
class FakeGpuState:
    """One fake GPU as the state file holds it."""

    index: int
    locked_clocks_mhz: tuple[int, int] | None  # None: unlocked (driver-default clocks)
    power_limit_w: float
    energy_j: float
    load_ratio: float
    mem_used_bytes: int


class FakeNvmlState:
    """Reader and writer of one fake NVML state file, under the library's flock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, str]:
        """All keys of the file (empty before the library or `update` first touched it)."""
        if not self.path.exists():
            return {}
        with self.path.open("r") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            return _parse(fh.read())

    def update(self, values: Mapping[str, object]) -> None:
        """Set keys (global ones, or `gpu<i>.<field>`); keys the library does not know are refused.

        Keys absent from a file take the library's defaults, so a test may write e.g. {"gpus": 8}
        before anything else has run.
        """
        for key in values:
            _check_key(key)
        with self.path.open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            state = _parse(fh.read())
            state.update({key: str(value) for key, value in values.items()})
            fh.seek(0)
            fh.truncate()
            fh.write("".join(f"{key}={value}\n" for key, value in state.items()))

    def gpu_count(self) -> int:
        return int(self._required(self.read(), "gpus"))

    def gpu(self, index: int) -> FakeGpuState:
        state = self.read()
        gpus = int(self._required(state, "gpus"))
        if not 0 <= index < gpus:
            raise InvalidArgumentError("index", index, f"0..{gpus - 1}")

        def field(name: str) -> str:
            return self._required(state, f"gpu{index}.{name}")

        locked_max_mhz = int(field("locked_max_mhz"))
        return FakeGpuState(
            index=index,
            locked_clocks_mhz=(int(field("locked_min_mhz")), locked_max_mhz) if locked_max_mhz else None,
            power_limit_w=int(field("power_limit_mw")) / 1000.0,
            energy_j=float(field("energy_mj")) / 1000.0,
            load_ratio=int(field("load_pct")) / 100.0,
            mem_used_bytes=int(field("mem_used_bytes")),
        )

    def set_load(self, index: int, load_ratio: float) -> None:
        """How busy GPU `index` pretends to be (0 = idle); power, clocks and utilisation follow."""
        self.update({f"gpu{index}.load_pct": round(load_ratio * 100)})

    def deny_set_clocks(self, denied: bool = True) -> None:
        """Locked-clock setters return NVML_ERROR_NO_PERMISSION, as without CAP_SYS_ADMIN."""
        self.update({"deny_set_clocks": int(denied)})

    def deny_set_power(self, denied: bool = True) -> None:
        """nvmlDeviceSetPowerManagementLimit returns NVML_ERROR_NO_PERMISSION."""
        self.update({"deny_set_power": int(denied)})

    def fail_next(self, function: str, code: int, gpu: int | None = None) -> None:
        """The next call of NVML `function` (on GPU `gpu`, or any) returns `code`; later calls succeed."""
        self._add_failure("fail_next", function, code, gpu)

    def fail_always(self, function: str, code: int, gpu: int | None = None) -> None:
        """Every call of NVML `function` (on GPU `gpu`, or any) returns `code`."""
        self._add_failure("fail_always", function, code, gpu)

    def clear_failures(self) -> None:
        self.update({"fail_next": "", "fail_always": "", "deny_set_clocks": 0, "deny_set_power": 0})

    def _add_failure(self, key: str, function: str, code: int, gpu: int | None) -> None:
        entry = f"{function}:{code}" if gpu is None else f"{function}:{code}:{gpu}"
        listed = self.read().get(key, "")
        self.update({key: f"{listed},{entry}" if listed else entry})

    def _required(self, state: Mapping[str, str], key: str) -> str:
        if key not in state:
            raise NotFoundError(f"{self.path}: no {key!r} yet (no NVML call has run on this state file)")
        return state[key]


@dataclass(frozen=True, slots=True)
class FakeNvml:
    """What a test needs: the built library and this test's state file."""

    lib_path: Path
    state: FakeNvmlState

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess agent that must load the fake instead of a driver."""
        env = dict(os.environ if base is None else base)
        inherited = env.get("LD_LIBRARY_PATH")
        lib_dir = str(self.lib_path.parent)
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{inherited}" if inherited else lib_dir
        env[STATE_ENV] = str(self.state.path)
        return env


def _parse(text: str) -> dict[str, str]:
    state: dict[str, str] = {}
    for line in text.splitlines():
        if line == END_LINE:  # what follows is a stale tail (see fake_nvml.c)
            break
        if line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        state[key] = value.strip()
    return state


def _check_key(key: str) -> None:
    if key in GLOBAL_KEYS:
        return
    prefix, _, field = key.partition(".")
    if prefix.startswith("gpu") and prefix[3:].isdigit() and field in GPU_KEYS:
        return
    allowed = sorted(GLOBAL_KEYS) + [f"gpu<i>.{name}" for name in sorted(GPU_KEYS)]
    raise InvalidArgumentError("key", key, allowed)
