"""SimulatedGpuBackend over a node directory, with a fake clock and a fake engine writing its activity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.api.errors import DataFileError, FailedPreconditionError, InvalidArgumentError
from agent.gpu.base import GpuBackend
from agent.sim.gpu import (
    REASON_CLOCKS_SETTING,
    REASON_GPU_IDLE,
    REASON_SW_POWER_CAP,
    SimulatedGpuBackend,
    idle_power_w,
)
from agent.sim.node import GpuActivity, GpuControl, NodeDir, process_alive
from agent.sim.physics import load_perf_model


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def monotonic_s(self) -> float:
        return self.now_s

    def wall_ns(self) -> int:
        return int(self.now_s * 1e9)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend(tmp_path: Path, clock: FakeClock) -> SimulatedGpuBackend:
    return SimulatedGpuBackend(tmp_path / "node", gpus=2, gpu="h100-sxm", model="llama2-70b", clock=clock)


def _engine_record(**overrides: object) -> GpuActivity:
    values: dict[str, object] = {
        "pid": os.getpid(),  # a live process stands in for the engine
        "extra_energy_j": 0.0,
        "extra_power_w": 0.0,
        "busy_s": 0.0,
        "clock_mhz": 1980,
        "power_capped": False,
        "mem_used_bytes": 70 * 2**30,
    }
    values.update(overrides)
    return GpuActivity(**values)  # type: ignore[arg-type]


def test_satisfies_the_backend_protocol(backend: SimulatedGpuBackend) -> None:
    as_protocol: GpuBackend = backend
    assert as_protocol.kind == "simulated"
    assert as_protocol.device_count() == 2


def test_inventory_is_an_h100_sxm_with_the_profile_clocks(backend: SimulatedGpuBackend) -> None:
    info = backend.info(1)
    clocks = info.supported_sm_clocks_mhz
    assert list(clocks) == sorted(set(clocks))
    assert clocks[0] == 800 and clocks[-1] == 1980
    perf = load_perf_model("llama2-70b", "h100-sxm", 8)
    assert set(perf.profile_clocks_mhz) <= set(clocks)
    assert {1965, 1950, 1500} <= set(clocks)  # NVIDIA's 15 MHz grid
    assert (info.min_power_limit_w, info.max_power_limit_w, info.default_power_limit_w) == (
        200.0,
        700.0,
        700.0,
    )
    assert info.mem_total_bytes == 81559 * 2**20
    assert info.uuid.startswith("GPU-") and info.uuid != backend.info(0).uuid
    assert info.index == 1
    assert info.power_average_s == 1.0  # power reads as NVML's one-second average on H100


def test_uuids_are_stable_across_restarts(tmp_path: Path, clock: FakeClock) -> None:
    first = SimulatedGpuBackend(tmp_path / "node", gpus=2, clock=clock)
    second = SimulatedGpuBackend(tmp_path / "node", gpus=2, clock=clock)
    assert [first.info(i).uuid for i in range(2)] == [second.info(i).uuid for i in range(2)]


def test_idle_gpu_reads_idle_power_and_counts_idle_energy(
    backend: SimulatedGpuBackend, clock: FakeClock
) -> None:
    idle_w = idle_power_w("llama2-70b", "h100-sxm")
    first = backend.read(0)
    clock.now_s += 10.0
    second = backend.read(0)
    assert second.power_w == pytest.approx(idle_w)
    assert second.energy_j - first.energy_j == pytest.approx(10.0 * idle_w)
    assert second.sm_clock_mhz == 1980
    assert second.util_gpu_ratio == 0.0
    assert second.mem_used_bytes == 0
    assert second.clock_event_reasons_mask == REASON_GPU_IDLE
    assert second.enforced_power_limit_w == 700.0


def test_engine_activity_drives_power_energy_and_utilisation(
    backend: SimulatedGpuBackend, clock: FakeClock
) -> None:
    idle_w = idle_power_w("llama2-70b", "h100-sxm")
    node = NodeDir(backend.node_dir)
    node.write_activity(0, _engine_record(extra_energy_j=0.0, busy_s=0.0))
    start = backend.read(0)
    clock.now_s += 2.0
    node.write_activity(0, _engine_record(extra_energy_j=500.0, extra_power_w=300.0, busy_s=1.5))
    reading = backend.read(0)
    assert reading.power_w == pytest.approx(idle_w + 300.0)
    # exact: idle over the elapsed time plus what the engine accumulated, not power x sample period
    assert reading.energy_j - start.energy_j == pytest.approx(2.0 * idle_w + 500.0)
    assert reading.util_gpu_ratio == pytest.approx(0.75)
    assert reading.mem_used_bytes == 70 * 2**30
    assert reading.clock_event_reasons_mask == 0
    assert reading.temperature_c > start.temperature_c
    # the other GPU is untouched
    assert backend.read(1).power_w == pytest.approx(idle_w)


def test_power_capped_engine_reports_its_lower_clock(backend: SimulatedGpuBackend) -> None:
    NodeDir(backend.node_dir).write_activity(
        0, _engine_record(extra_power_w=100.0, clock_mhz=1410, power_capped=True)
    )
    reading = backend.read(0)
    assert reading.sm_clock_mhz == 1410
    assert reading.clock_event_reasons_mask & REASON_SW_POWER_CAP


def test_dead_engine_leaves_its_energy_but_no_power(backend: SimulatedGpuBackend, clock: FakeClock) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    NodeDir(backend.node_dir).write_activity(
        0, _engine_record(pid=child.pid, extra_energy_j=1234.0, extra_power_w=400.0, busy_s=3.0)
    )
    idle_w = idle_power_w("llama2-70b", "h100-sxm")
    reading = backend.read(0)
    assert reading.power_w == pytest.approx(idle_w)
    assert reading.energy_j == pytest.approx(1234.0)  # no time has passed on the fake clock
    assert reading.mem_used_bytes == 0
    assert reading.sm_clock_mhz == 1980


def test_zombie_engine_counts_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
        child.kill()
        # not reaped yet: a zombie still answers signal 0
        for _ in range(200):
            if not process_alive(child.pid):
                break
            subprocess.run(["sleep", "0.01"], check=True)
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(0)


def test_locked_clocks_and_power_limit_are_written_for_the_engine(backend: SimulatedGpuBackend) -> None:
    node = NodeDir(backend.node_dir)
    backend.set_locked_clocks(1, 1200, 1400)
    assert node.read_control(1) == GpuControl(1200, 1400, 700.0)
    backend.set_power_limit(1, 450.0)
    assert node.read_control(1) == GpuControl(1200, 1400, 450.0)
    assert backend.power_limit_w(1) == 450.0
    reading = backend.read(1)
    assert reading.sm_clock_mhz == 1400
    assert reading.enforced_power_limit_w == 450.0
    assert reading.clock_event_reasons_mask == REASON_GPU_IDLE | REASON_CLOCKS_SETTING
    backend.reset_locked_clocks(1)
    assert node.read_control(1) == GpuControl(None, None, 450.0)
    assert backend.read(1).sm_clock_mhz == 1980
    assert node.read_control(0) is None  # never written: defaults


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda b: b.set_locked_clocks(0, 1200, 1201), "max_clock_mhz"),
        (lambda b: b.set_locked_clocks(0, 700, 1200), "min_clock_mhz"),
        (lambda b: b.set_locked_clocks(0, 1400, 1200), "min_clock_mhz"),
        (lambda b: b.set_locked_clocks(0, 1200, 2010), "max_clock_mhz"),
        (lambda b: b.set_power_limit(0, 150.0), "power_limit_w"),
        (lambda b: b.set_power_limit(0, 701.0), "power_limit_w"),
        (lambda b: b.set_power_limit(0, float("nan")), "power_limit_w"),
        (lambda b: b.set_locked_clocks(2, 1200, 1200), "index"),
        (lambda b: b.read(-1), "index"),
        (lambda b: b.info(True), "index"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(
    backend: SimulatedGpuBackend, call: object, field: str
) -> None:
    backend.set_locked_clocks(0, 1000, 1600)
    before = [NodeDir(backend.node_dir).read_control(i) for i in range(2)]
    with pytest.raises(InvalidArgumentError) as err:
        call(backend)  # type: ignore[operator]
    assert err.value.field == field
    assert [NodeDir(backend.node_dir).read_control(i) for i in range(2)] == before
    assert backend.control(0) == GpuControl(1000, 1600, 700.0)


def test_settings_survive_an_agent_restart(tmp_path: Path, clock: FakeClock) -> None:
    first = SimulatedGpuBackend(tmp_path / "node", gpus=2, clock=clock)
    first.set_locked_clocks(0, 1200, 1200)
    first.set_power_limit(1, 300.0)
    first.close()
    second = SimulatedGpuBackend(tmp_path / "node", gpus=2, clock=clock)
    assert second.control(0) == GpuControl(1200, 1200, 700.0)
    assert second.power_limit_w(1) == 300.0


def test_node_dir_of_another_shape_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    SimulatedGpuBackend(tmp_path / "node", gpus=2, clock=clock)
    with pytest.raises(FailedPreconditionError, match="gpus=4"):
        SimulatedGpuBackend(tmp_path / "node", gpus=4, clock=clock)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"gpus": 0}, "gpus"), ({"gpu": "a100"}, "gpu"), ({"model": "gpt-5"}, "model")],
)
def test_bad_constructor_arguments(tmp_path: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        SimulatedGpuBackend(tmp_path / "node", **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_closed_backend_refuses_calls(backend: SimulatedGpuBackend) -> None:
    backend.close()
    with pytest.raises(FailedPreconditionError):
        backend.read(0)


def test_corrupt_node_file_names_the_file(backend: SimulatedGpuBackend) -> None:
    node = NodeDir(backend.node_dir)
    node.activity_path(0).write_text("{not json")
    with pytest.raises(DataFileError, match=r"gpu-0\.activity\.json"):
        backend.read(0)
    node.activity_path(0).write_text('{"pid": "x"}')
    with pytest.raises(DataFileError, match="pid"):
        backend.read(0)


def test_idle_engine_reports_the_locked_clock_not_its_last_iteration(backend: SimulatedGpuBackend) -> None:
    backend.set_locked_clocks(0, 1200, 1410)
    NodeDir(backend.node_dir).write_activity(0, _engine_record(extra_power_w=0.0, clock_mhz=1980))
    assert backend.read(0).sm_clock_mhz == 1410


def test_locked_clocks_are_read_back_from_the_node(backend: SimulatedGpuBackend) -> None:
    assert backend.info(0).sm_clock_lock_readable
    assert backend.read(0).sm_clock_lock_mhz is None
    backend.set_locked_clocks(0, 1200, 1410)
    assert backend.read(0).sm_clock_lock_mhz == (1200, 1410)
    assert backend.read(1).sm_clock_lock_mhz is None
    # What the GPU holds is what the control file says, not what the backend remembers.
    NodeDir(backend.node_dir).write_control(0, GpuControl(990, 990, 700.0))
    assert backend.read(0).sm_clock_lock_mhz == (990, 990)
    backend.reset_locked_clocks(0)
    assert backend.read(0).sm_clock_lock_mhz is None


def test_compute_processes_are_the_live_registered_engine(backend: SimulatedGpuBackend) -> None:
    node = NodeDir(backend.node_dir)
    assert backend.compute_processes(0) == ()
    node.write_activity(0, _engine_record())
    (proc,) = backend.compute_processes(0)
    assert (proc.pid, proc.used_memory_bytes) == (os.getpid(), 70 * 2**30)
    assert backend.compute_processes(1) == ()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    node.write_activity(0, _engine_record(pid=dead.pid))
    assert backend.compute_processes(0) == ()
    with pytest.raises(InvalidArgumentError):
        backend.compute_processes(2)
