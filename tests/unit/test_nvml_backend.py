"""The real NvmlBackend and nvidia-ml-py over the fake libnvidia-ml.so.1 (tests/fakenvml).

Covers inventory, supported clocks, the setters as seen in the fake's state file, readings and the
energy counter against integrated power, and the NVML error table (every code pynvml defines, injected
through the fake, ends as the error class the table names).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from agent.api.errors import (
    DynamoError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    UnsupportedError,
)
from agent.gpu.nvml import NVML_ERROR_TABLE, NvmlBackend
from tests.fakenvml import FakeNvml

ROOT = Path(__file__).resolve().parents[2]
H100_SM_CLOCKS_MHZ = tuple(range(345, 1981, 15))
NVML_ERROR_CODES = sorted(getattr(pynvml, name) for name in dir(pynvml) if name.startswith("NVML_ERROR_"))


@pytest.fixture
def backend(fake_nvml: FakeNvml) -> Iterator[NvmlBackend]:
    gpu_backend = NvmlBackend()
    yield gpu_backend
    gpu_backend.close()


def test_inventory_of_two_h100_like_gpus(backend: NvmlBackend) -> None:
    assert backend.kind == "nvml"
    assert backend.device_count() == 2
    infos = [backend.info(i) for i in range(2)]
    assert [info.index for info in infos] == [0, 1]
    assert len({info.uuid for info in infos}) == 2
    assert all(info.uuid.startswith("GPU-") for info in infos)
    assert [info.pci_bus_id for info in infos] == ["00000000:18:00.0", "00000000:19:00.0"]
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
    assert infos[0].mem_total_bytes == 81559 * 1024 * 1024
    assert (infos[0].min_power_limit_w, infos[0].max_power_limit_w, infos[0].default_power_limit_w) == (
        200.0,
        700.0,
        700.0,
    )


def test_gpu_count_from_state_file_and_from_env(fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml.state.update({"gpus": 8})
    with_file = NvmlBackend()
    try:
        assert with_file.device_count() == 8
    finally:
        with_file.close()
    fresh_state = fake_nvml.state.path.with_name("fresh-state")
    monkeypatch.setenv("FAKE_NVML_STATE", str(fresh_state))
    monkeypatch.setenv("FAKE_NVML_GPUS", "3")
    with_env = NvmlBackend()
    try:
        assert with_env.device_count() == 3
    finally:
        with_env.close()


def test_supported_clocks_come_from_the_highest_memory_clock(fake_nvml: FakeNvml) -> None:
    # Lowest memory clock listed first: the fake offers only half the SM range at it.
    fake_nvml.state.update({"mem_clocks_mhz": "1593,2619"})
    gpu_backend = NvmlBackend()
    try:
        assert gpu_backend.info(1).supported_sm_clocks_mhz == H100_SM_CLOCKS_MHZ
    finally:
        gpu_backend.close()


def test_no_supported_clocks_where_clocks_cannot_lock(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    fake_nvml.state.fail_next("nvmlDeviceGetSupportedMemoryClocks", pynvml.NVML_ERROR_NOT_SUPPORTED, gpu=0)
    assert backend.info(0).supported_sm_clocks_mhz == ()
    assert backend.info(1).supported_sm_clocks_mhz == H100_SM_CLOCKS_MHZ


def test_info_is_read_once(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    first = backend.info(0)
    fake_nvml.state.fail_always("nvmlDeviceGetUUID", pynvml.NVML_ERROR_GPU_IS_LOST)
    assert backend.info(0) is first


def test_locked_clocks_reach_the_driver_and_slow_the_gpu(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    before = backend.read(0)
    assert before.sm_clock_mhz == 1980
    backend.set_locked_clocks(0, 990, 1200)
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (990, 1200)
    assert fake_nvml.state.gpu(1).locked_clocks_mhz is None
    locked = backend.read(0)
    assert locked.sm_clock_mhz == 1200
    assert locked.power_w < before.power_w
    backend.reset_locked_clocks(0)
    assert fake_nvml.state.gpu(0).locked_clocks_mhz is None
    assert backend.read(0).sm_clock_mhz == 1980


@pytest.mark.parametrize(("min_mhz", "max_mhz"), [(1200, 990), (0, 990), (-256, 990), (990, 2100)])
def test_bad_locked_clocks_are_refused_and_change_nothing(
    fake_nvml: FakeNvml, backend: NvmlBackend, min_mhz: int, max_mhz: int
) -> None:
    backend.set_locked_clocks(0, 1500, 1500)
    with pytest.raises(InvalidArgumentError) as caught:
        backend.set_locked_clocks(0, min_mhz, max_mhz)
    assert caught.value.field == "locked_clocks_mhz"
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1500, 1500)


def test_out_of_range_clock_names_the_supported_range(backend: NvmlBackend) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        backend.set_locked_clocks(1, 990, 2100)
    assert "345..1980 MHz" in caught.value.allowed
    assert "NVML_ERROR_INVALID_ARGUMENT" in str(caught.value)


def test_power_limit_in_watts(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    assert backend.power_limit_w(1) == 700.0
    backend.set_power_limit(1, 312.5)
    assert fake_nvml.state.gpu(1).power_limit_w == 312.5
    assert fake_nvml.state.gpu(0).power_limit_w == 700.0
    assert backend.power_limit_w(1) == 312.5
    assert backend.read(1).enforced_power_limit_w == 312.5


@pytest.mark.parametrize("power_limit_w", [150.0, 700.5, 0.0, -5.0, math.nan, math.inf])
def test_bad_power_limit_is_refused_and_changes_nothing(
    fake_nvml: FakeNvml, backend: NvmlBackend, power_limit_w: float
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        backend.set_power_limit(0, power_limit_w)
    assert caught.value.field == "power_limit_w"
    assert caught.value.allowed.startswith("200..700 W")
    assert fake_nvml.state.gpu(0).power_limit_w == 700.0


def test_power_cap_lowers_the_clock_and_says_why(backend: NvmlBackend) -> None:
    backend.set_power_limit(0, 200.0)
    reading = backend.read(0)
    assert reading.power_w <= 200.0
    assert reading.sm_clock_mhz < 1980
    assert reading.clock_event_reasons_mask & pynvml.nvmlClocksEventReasonSwPowerCap


def test_reading_units(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    fake_nvml.state.update({"gpu1.load_pct": 100, "gpu1.mem_used_bytes": 3 * 2**30})
    reading = backend.read(1)
    assert reading.power_w == 700.0
    assert reading.mem_clock_mhz == 2619
    assert (reading.util_gpu_ratio, reading.util_mem_ratio) == (1.0, 0.5)
    assert reading.mem_used_bytes == 3 * 2**30
    assert reading.temperature_c == 100.0
    assert reading.clock_event_reasons_mask == 0
    fake_nvml.state.set_load(1, 0.0)
    idle = backend.read(1)
    assert idle.power_w == 70.0
    assert idle.util_gpu_ratio == 0.0
    assert idle.clock_event_reasons_mask == pynvml.nvmlClocksEventReasonGpuIdle


def test_energy_counter_matches_integrated_power(backend: NvmlBackend) -> None:
    # Every library call happens between the two monotonic stamps around it (the fake integrates power
    # over CLOCK_MONOTONIC, as time.monotonic reads it), which bounds the expected energy from both sides.
    full_power_w = backend.read(0).power_w
    t0_before_s = time.monotonic()
    e0_j = backend.read(0).energy_j
    t0_after_s = time.monotonic()
    time.sleep(0.3)
    t1_before_s = time.monotonic()
    backend.set_locked_clocks(0, 990, 990)
    t1_after_s = time.monotonic()
    low_power_w = backend.read(0).power_w
    time.sleep(0.3)
    t2_before_s = time.monotonic()
    e2_j = backend.read(0).energy_j
    t2_after_s = time.monotonic()
    assert low_power_w < 0.5 * full_power_w
    least_j = full_power_w * (t1_before_s - t0_after_s) + low_power_w * (t2_before_s - t1_after_s)
    most_j = full_power_w * (t1_after_s - t0_before_s) + low_power_w * (t2_after_s - t1_before_s)
    counter_step_j = 0.001  # NVML counts whole mJ
    assert least_j - counter_step_j <= e2_j - e0_j <= most_j + counter_step_j


def test_state_is_shared_between_backends(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    backend.set_locked_clocks(1, 1005, 1005)
    other = NvmlBackend()
    try:
        assert other.read(1).sm_clock_mhz == 1005
    finally:
        other.close()


def test_missing_privilege_is_permission_denied_and_changes_nothing(
    fake_nvml: FakeNvml, backend: NvmlBackend
) -> None:
    fake_nvml.state.deny_set_clocks()
    with pytest.raises(PermissionDeniedError, match="CAP_SYS_ADMIN"):
        backend.set_locked_clocks(0, 990, 990)
    with pytest.raises(PermissionDeniedError):
        backend.reset_locked_clocks(0)
    backend.set_power_limit(0, 400.0)
    fake_nvml.state.deny_set_power()
    with pytest.raises(PermissionDeniedError, match="nvmlDeviceSetPowerManagementLimit on GPU 0"):
        backend.set_power_limit(0, 300.0)
    gpu = fake_nvml.state.gpu(0)
    assert (gpu.locked_clocks_mhz, gpu.power_limit_w) == (None, 400.0)


def test_failure_can_target_one_gpu(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    fake_nvml.state.fail_next("nvmlDeviceSetGpuLockedClocks", pynvml.NVML_ERROR_GPU_IS_LOST, gpu=1)
    backend.set_locked_clocks(0, 990, 990)
    with pytest.raises(UnavailableError, match="GPU 1"):
        backend.set_locked_clocks(1, 990, 990)
    assert fake_nvml.state.gpu(1).locked_clocks_mhz is None
    backend.set_locked_clocks(1, 990, 990)  # fail_next fails once
    assert fake_nvml.state.gpu(1).locked_clocks_mhz == (990, 990)


def test_error_table_covers_every_nvml_code() -> None:
    assert set(NVML_ERROR_CODES) <= set(NVML_ERROR_TABLE)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_NO_PERMISSION, PermissionDeniedError),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, UnsupportedError),
        (pynvml.NVML_ERROR_NOT_FOUND, NotFoundError),
        (pynvml.NVML_ERROR_GPU_IS_LOST, UnavailableError),
        (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, UnsupportedError),
        (pynvml.NVML_ERROR_UNINITIALIZED, InternalError),
        (pynvml.NVML_ERROR_UNKNOWN, UnavailableError),
    ],
)
def test_key_codes_map_as_documented(code: int, expected: type[DynamoError]) -> None:
    assert NVML_ERROR_TABLE[code][0] is expected


@pytest.mark.parametrize("code", NVML_ERROR_CODES)
def test_every_code_from_the_driver_ends_as_its_table_error(
    fake_nvml: FakeNvml, backend: NvmlBackend, code: int
) -> None:
    fake_nvml.state.fail_next("nvmlDeviceGetPowerUsage", code)
    expected = NVML_ERROR_TABLE[code][0]
    if expected is InvalidArgumentError:
        expected = InternalError  # a read carries no caller input: a bad argument is our bug
    with pytest.raises(expected) as caught:
        backend.read(0)
    assert type(caught.value) is expected
    assert f"({code})" in str(caught.value)
    assert backend.read(0).power_w > 0  # one-shot


def test_invalid_argument_from_a_setter_names_the_field(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    fake_nvml.state.fail_next("nvmlDeviceSetGpuLockedClocks", pynvml.NVML_ERROR_FREQ_NOT_SUPPORTED)
    with pytest.raises(InvalidArgumentError) as caught:
        backend.set_locked_clocks(0, 990, 990)
    assert caught.value.field == "locked_clocks_mhz"
    assert caught.value.value == (990, 990)


def test_unlisted_code_is_unavailable(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    fake_nvml.state.fail_next("nvmlDeviceGetTotalEnergyConsumption", 77)
    with pytest.raises(UnavailableError, match="77"):
        backend.read(1)


def test_gpu_index_out_of_range(backend: NvmlBackend) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        backend.read(2)
    assert (caught.value.field, caught.value.allowed) == ("gpu_index", "0..1")
    with pytest.raises(InvalidArgumentError):
        backend.set_power_limit(-1, 300.0)


def test_init_failure_is_unavailable(fake_nvml: FakeNvml) -> None:
    fake_nvml.state.fail_next("nvmlInitWithFlags", pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(UnavailableError, match="driver is not loaded"):
        NvmlBackend()


def test_failure_after_init_shuts_nvml_down(fake_nvml: FakeNvml) -> None:
    fake_nvml.state.fail_next("nvmlDeviceGetHandleByIndex_v2", pynvml.NVML_ERROR_GPU_IS_LOST, gpu=1)
    with pytest.raises(UnavailableError, match="nvmlDeviceGetHandleByIndex on GPU 1"):
        NvmlBackend()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_close_is_idempotent_and_final(fake_nvml: FakeNvml) -> None:
    gpu_backend = NvmlBackend()
    gpu_backend.close()
    gpu_backend.close()
    with pytest.raises(InternalError, match="NVML_ERROR_UNINITIALIZED"):
        gpu_backend.read(0)


_SUBPROCESS_SCRIPT = """
import ctypes, json, os, signal, sys
mode = sys.argv[1]
if mode == "missing":
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        print(json.dumps({"outcome": "library present"}))
        sys.exit(0)
    except OSError:
        pass
from agent.api.errors import UnavailableError
from agent.gpu.nvml import NvmlBackend
try:
    backend = NvmlBackend()
except UnavailableError as exc:
    print(json.dumps({"outcome": "unavailable", "message": str(exc)}))
    sys.exit(0)
backend.set_locked_clocks(0, 1410, 1410)
backend.set_power_limit(1, 450.0)
print(json.dumps({"outcome": "set"}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_script(mode: str, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    env = {**env, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    outcome: dict[str, str] = json.loads(lines[-1])
    return done.returncode, outcome


def test_subprocess_loads_the_fake_and_its_settings_survive_kill_9(fake_nvml: FakeNvml) -> None:
    returncode, outcome = _run_script("set", fake_nvml.env())
    assert outcome == {"outcome": "set"}
    assert returncode == -9
    assert fake_nvml.state.gpu(0).locked_clocks_mhz == (1410, 1410)
    assert fake_nvml.state.gpu(1).power_limit_w == 450.0


def test_missing_library_is_unavailable() -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    _, outcome = _run_script("missing", env)
    if outcome["outcome"] == "library present":
        pytest.skip("a libnvidia-ml.so.1 is installed on this host")
    assert outcome["outcome"] == "unavailable"
    assert "NVML_ERROR_LIBRARY_NOT_FOUND" in outcome["message"]


def test_state_helper_refuses_unknown_keys(fake_nvml: FakeNvml) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        fake_nvml.state.update({"deny_set_clock": 1})
    assert "deny_set_clocks" in caught.value.allowed
    with pytest.raises(InvalidArgumentError):
        fake_nvml.state.update({"gpu0.locked_mhz": 1})
    with pytest.raises(NotFoundError):
        fake_nvml.state.gpu(0)  # nothing has run on this state file yet


# ---- compute processes and clocks a GPU cannot hold (environment knobs of the fake) -------------------


def test_compute_processes_per_gpu(backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend.compute_processes(0) == backend.compute_processes(1) == ()
    monkeypatch.setenv("FAKE_NVML_COMPUTE_PIDS", "1:4243,1:4242:1000,0:77:5")
    assert [(p.pid, p.used_memory_bytes) for p in backend.compute_processes(1)] == [
        (4242, 1000),
        (4243, 2**30),
    ]
    assert [(p.pid, p.used_memory_bytes) for p in backend.compute_processes(0)] == [(77, 5)]


def test_compute_processes_errors_go_through_the_table(fake_nvml: FakeNvml, backend: NvmlBackend) -> None:
    fake_nvml.state.fail_next("nvmlDeviceGetComputeRunningProcesses_v3", pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(UnsupportedError, match="nvmlDeviceGetComputeRunningProcesses on GPU 0"):
        backend.compute_processes(0)
    fake_nvml.state.fail_next("nvmlDeviceGetComputeRunningProcesses_v3", pynvml.NVML_ERROR_GPU_IS_LOST, gpu=1)
    with pytest.raises(UnavailableError):
        backend.compute_processes(1)


def test_lock_is_not_readable_and_a_capped_gpu_shows_it(
    fake_nvml: FakeNvml, backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not backend.info(0).sm_clock_lock_readable
    backend.set_locked_clocks(0, 1410, 1410)
    backend.set_locked_clocks(1, 1410, 1410)
    held = backend.read(0)
    assert (held.sm_clock_mhz, held.sm_clock_lock_mhz) == (1410, None)
    monkeypatch.setenv("FAKE_NVML_SM_CLOCK_CAP_MHZ", "0:1005")  # GPU 0 cannot run above 1005 MHz
    capped, other = backend.read(0), backend.read(1)
    assert capped.sm_clock_mhz == 1005 and capped.clock_event_reasons_mask & 0x20
    assert capped.power_w < held.power_w  # the energy model follows the clock it really runs at
    assert other.sm_clock_mhz == 1410 and not other.clock_event_reasons_mask & 0x20
    monkeypatch.setenv("FAKE_NVML_SM_CLOCK_CAP_MHZ", "1500")  # a bare value caps every GPU
    assert backend.read(0).sm_clock_mhz == 1410 and backend.read(1).sm_clock_mhz == 1410
