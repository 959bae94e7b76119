"""NvmlBackend on a real NVIDIA GPU: read-only checks, skipped where there is none.

The backend runs in a child process with the fake library's variables removed: this test process may
have bound pynvml to the fake (tests/fakenvml), and a child is the only way to reach the real driver
cleanly. The child never calls a setter: no clock, power limit or other setting of a real GPU changes.
The same probe over the fake library must give values of the same shape, so the fake stays faithful.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fakenvml import GPUS_ENV, MARKER_SYMBOL, STATE_ENV, FakeNvml

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
ENERGY_WINDOW_S = 1.2  # the driver updates the energy counter every 20-100 ms; take differences over >= 1 s

_PROBE = f"""
import ctypes, dataclasses, json, sys, time
try:
    library = ctypes.CDLL("libnvidia-ml.so.1")
except OSError:
    print(json.dumps({{"skip": "no libnvidia-ml.so.1 on this host"}}))
    sys.exit(0)
fake = hasattr(library, "{MARKER_SYMBOL}")
from agent.api.errors import UnavailableError
from agent.gpu.nvml import NvmlBackend
try:
    backend = NvmlBackend()
except UnavailableError as exc:
    print(json.dumps({{"skip": f"nvmlInit failed: {{exc}}"}}))
    sys.exit(0)
count = backend.device_count()
infos = [dataclasses.asdict(backend.info(i)) for i in range(count)]
first = [dataclasses.asdict(backend.read(i)) for i in range(count)]
t0 = time.monotonic()
time.sleep({ENERGY_WINDOW_S})
second = [dataclasses.asdict(backend.read(i)) for i in range(count)]
elapsed_s = time.monotonic() - t0
limits = [backend.power_limit_w(i) for i in range(count)]
backend.close()
print(json.dumps({{"fake": fake, "infos": infos, "first": first, "second": second,
                  "elapsed_s": elapsed_s, "limits_w": limits}}))
"""


def _probe(env: Mapping[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def real() -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if key not in (STATE_ENV, GPUS_ENV, "LD_PRELOAD")}
    result = _probe(env)
    if "skip" in result:
        pytest.skip(f"no real NVIDIA GPU: {result['skip']}")
    if result["fake"]:
        pytest.skip("libnvidia-ml.so.1 on the library path is the fake, not a driver")
    if not result["infos"]:
        pytest.skip("NVML works but lists no GPU")
    return result


def test_inventory(real: dict[str, Any]) -> None:
    for index, info in enumerate(real["infos"]):
        assert info["index"] == index
        assert info["uuid"].startswith(("GPU-", "MIG-"))
        assert info["name"]
        assert info["mem_total_bytes"] > 0
        assert 0 < info["min_power_limit_w"] <= info["default_power_limit_w"] <= info["max_power_limit_w"]
        clocks = info["supported_sm_clocks_mhz"]
        assert clocks == sorted(set(clocks))
        assert all(clock > 0 for clock in clocks)
    assert len({info["uuid"] for info in real["infos"]}) == len(real["infos"])


def test_readings(real: dict[str, Any]) -> None:
    for info, reading, limit_w in zip(real["infos"], real["first"], real["limits_w"], strict=True):
        assert 0 < reading["power_w"] < 2 * info["max_power_limit_w"]
        assert reading["sm_clock_mhz"] > 0
        assert reading["mem_clock_mhz"] > 0
        assert 0.0 <= reading["util_gpu_ratio"] <= 1.0
        assert 0.0 <= reading["util_mem_ratio"] <= 1.0
        assert 0 <= reading["mem_used_bytes"] <= info["mem_total_bytes"]
        assert 0 < reading["temperature_c"] < 120
        assert 0 < reading["enforced_power_limit_w"] <= info["max_power_limit_w"]
        assert info["min_power_limit_w"] <= limit_w <= info["max_power_limit_w"]


def test_energy_counter_advances_with_power(real: dict[str, Any]) -> None:
    for info, before, after in zip(real["infos"], real["first"], real["second"], strict=True):
        delta_j = after["energy_j"] - before["energy_j"]
        assert delta_j > 0
        # A counter that updates every <= 100 ms, over the window: average power within the board's range.
        average_power_w = delta_j / real["elapsed_s"]
        assert average_power_w < 2 * info["max_power_limit_w"]


def test_the_fake_has_the_same_shape(real: dict[str, Any], fake_nvml: FakeNvml) -> None:
    fake = _probe(fake_nvml.env())
    assert fake["fake"] is True
    for key in ("infos", "first", "second"):
        real_item, fake_item = real[key][0], fake[key][0]
        assert real_item.keys() == fake_item.keys()
        assert {k: type(v) for k, v in real_item.items()} == {k: type(v) for k, v in fake_item.items()}
    assert type(real["limits_w"][0]) is type(fake["limits_w"][0])
