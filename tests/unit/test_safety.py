"""agent.safety: state document round trip and atomic store, snapshot before the first write, persist
before the hardware changes, rollback on partial failure, restore, crash recovery. A small in-memory
GpuBackend stands in for the hardware (the real backends are covered by the integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api.errors import DataFileError, PermissionDeniedError, UnavailableError
from agent.api.generations import Outcome, ScopeRecord
from agent.control import GpuPlan
from agent.gpu.base import GpuInfo, GpuReading
from agent.gpu.worker import GpuWorkers
from agent.safety import (
    AgentStateDoc,
    GpuApplied,
    GpuDefault,
    GpuSafety,
    StateStore,
    decode_state,
    encode_state,
)

CLOCKS = tuple(range(210, 1981, 15))


class FakeBackend:
    """In-memory GPUs; `fail` maps (method, index) to the error the next such call raises."""

    def __init__(self, count: int = 3) -> None:
        self.locks: dict[int, tuple[int, int] | None] = dict.fromkeys(range(count))
        self.limits_w = dict.fromkeys(range(count), 650.0)  # an admin-set limit below the 700 W default
        self.fail: dict[tuple[str, int], Exception] = {}
        self.calls: list[tuple[str, int]] = []
        self.closed = False

    @property
    def kind(self) -> str:
        return "simulated"

    def device_count(self) -> int:
        return len(self.locks)

    def info(self, index: int) -> GpuInfo:
        return GpuInfo(index, f"GPU-{index}", "Fake H100", CLOCKS, 200.0, 700.0, 700.0, 80 << 30, "")

    def read(self, index: int) -> GpuReading:
        lock = self.locks[index]
        return GpuReading(
            100.0, 0.0, lock[1] if lock else 1980, 2619, 0.0, 0.0, 0, 40.0, self.limits_w[index], 0
        )

    def _call(self, name: str, index: int) -> None:
        self.calls.append((name, index))
        error = self.fail.pop((name, index), None)
        if error is not None:
            raise error

    def power_limit_w(self, index: int) -> float:
        return self.limits_w[index]

    def set_locked_clocks(self, index: int, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self._call("set_locked_clocks", index)
        self.locks[index] = (min_clock_mhz, max_clock_mhz)

    def reset_locked_clocks(self, index: int) -> None:
        self._call("reset_locked_clocks", index)
        self.locks[index] = None

    def set_power_limit(self, index: int, power_limit_w: float) -> None:
        self._call("set_power_limit", index)
        self.limits_w[index] = power_limit_w

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, tmp_path: Path, count: int = 3) -> None:
        self.backend = FakeBackend(count)
        self.store = StateStore(tmp_path / "state.json")
        self.saved: list[AgentStateDoc] = []
        self.safety: GpuSafety

    async def start(self, doc: AgentStateDoc | None = None) -> GpuSafety:
        workers = await GpuWorkers.create(self.backend)
        doc = doc or AgentStateDoc()
        self.safety = GpuSafety(workers, self.persist, defaults=doc.defaults, applied=doc.applied)
        return self.safety

    async def persist(self) -> None:
        # What the hardware looks like at the moment of each save: the test checks saves come first.
        doc = AgentStateDoc(defaults=dict(self.safety.defaults), applied=dict(self.safety.applied))
        self.saved.append(doc)
        self.store.save(doc)


def test_state_round_trip_and_atomic_store(tmp_path: Path) -> None:
    doc = AgentStateDoc(
        defaults={0: GpuDefault("GPU-0", 700.0), 1: GpuDefault("GPU-1", 650.5)},
        applied={1: GpuApplied((1200, 1400), 500.0), 0: GpuApplied(None, 300.0)},
        gpu_scope=ScopeRecord(9, "ab" * 32, Outcome(b"\x08\x09\x00")),
        engine_scopes={"e1": ScopeRecord(4, "cd" * 32, Outcome(None, "UNAVAILABLE", "engine e1: not ready"))},
        lease_holder="controller",
        lease_generation=9,
        lease_expires_unix_ns=123,
    )
    assert decode_state(encode_state(doc), source="x") == doc
    store = StateStore(tmp_path / "sub" / "state.json")
    assert store.load() == AgentStateDoc()  # first start: no file
    store.save(doc)
    assert store.load() == doc
    assert not (tmp_path / "sub" / "state.json.tmp").exists()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{", "document"),
        ('{"format": "other/v9"}', "format"),
        ('{"format": "dynamollm.agent-state/v1", "defaults": {"0": {"uuid": "x"}}}', "defaults"),
        (
            '{"format": "dynamollm.agent-state/v1", "defaults": {}, '
            '"applied": {"0": {"sm_clock_lock": [1]}}}',
            "applied",
        ),
    ],
)
def test_corrupt_state_names_the_field(text: str, field: str) -> None:
    with pytest.raises(DataFileError) as info:
        decode_state(text, source="/run/state.json")
    assert info.value.field == field and info.value.path == "/run/state.json"


async def test_snapshot_and_persist_before_first_write(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    await safety.apply([GpuPlan(1, 1200, 1200, None)])
    # snapshot of every GPU (not only GPU 1), taken before the write, persisted before the write
    assert safety.defaults == {i: GpuDefault(f"GPU-{i}", 650.0) for i in range(3)}
    assert len(h.saved) == 1 and h.saved[0].applied == {1: GpuApplied((1200, 1200), None)}
    assert h.backend.locks[1] == (1200, 1200) and h.backend.limits_w[1] == 650.0
    assert h.backend.calls == [("set_locked_clocks", 1)]  # default power limit: untouched
    # a GPU already modified needs no save before its next write
    await safety.apply([GpuPlan(1, 1400, 1500, 400.0)])
    assert len(h.saved) == 1
    assert h.backend.locks[1] == (1400, 1500) and h.backend.limits_w[1] == 400.0
    assert safety.setting(1) == GpuApplied((1400, 1500), 400.0)
    # back to the default limit: written, and recorded as default
    await safety.apply([GpuPlan(1, 1400, 1500, None)])
    assert h.backend.limits_w[1] == 650.0 and safety.setting(1) == GpuApplied((1400, 1500), None)
    # the snapshot value given explicitly is also "the default"
    await safety.apply([GpuPlan(2, 1980, 1980, 650.0)])
    assert safety.setting(2).power_limit_w is None


async def test_rollback_on_partial_failure(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    await safety.apply([GpuPlan(0, 1000, 1000, 500.0)])
    h.backend.fail[("set_power_limit", 2)] = PermissionDeniedError("no CAP_SYS_ADMIN")
    with pytest.raises(PermissionDeniedError):
        await safety.apply(
            [GpuPlan(0, 1500, 1500, 300.0), GpuPlan(1, 1200, 1200, None), GpuPlan(2, 1200, 1200, 400.0)]
        )
    # everything back as before the call, on the hardware and in the record
    assert h.backend.locks == {0: (1000, 1000), 1: None, 2: None}
    assert h.backend.limits_w == {0: 500.0, 1: 650.0, 2: 650.0}
    assert safety.applied == {0: GpuApplied((1000, 1000), 500.0)}
    # saved before the writes (GPUs 1 and 2 newly modified) and after the rollback
    assert h.saved[-2].applied.keys() == {0, 1, 2}
    assert h.saved[-1].applied == {0: GpuApplied((1000, 1000), 500.0)}
    assert h.store.load().applied == {0: GpuApplied((1000, 1000), 500.0)}


async def test_failed_rollback_keeps_gpu_marked_modified(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    h.backend.fail[("set_locked_clocks", 1)] = UnavailableError("gpu lost")
    h.backend.fail[("reset_locked_clocks", 0)] = UnavailableError("still lost")
    with pytest.raises(UnavailableError, match="gpu lost"):
        await safety.apply([GpuPlan(0, 1200, 1200, None), GpuPlan(1, 1200, 1200, None)])
    assert 0 in safety.applied  # unknown state: a later restore must still reset it
    assert 1 not in safety.applied


async def test_restore_tries_every_gpu(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    await safety.apply([GpuPlan(i, 1200, 1200, 300.0) for i in range(3)])
    h.backend.fail[("reset_locked_clocks", 1)] = UnavailableError("busy")
    with pytest.raises(UnavailableError):
        await safety.restore([0, 1, 2])
    assert h.backend.locks == {0: None, 1: (1200, 1200), 2: None}
    assert h.backend.limits_w == {0: 650.0, 1: 300.0, 2: 650.0}
    assert safety.modified_indices() == (1,)
    assert await safety.restore([0, 1, 2]) == [1]
    assert safety.modified_indices() == ()
    assert await safety.restore([0, 1, 2]) == []  # nothing modified: nothing written
    assert h.backend.calls.count(("reset_locked_clocks", 0)) == 1


async def test_recover_after_crash_matches_by_uuid(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.backend.locks[2] = (900, 900)
    h.backend.limits_w[2] = 250.0
    crashed = AgentStateDoc(
        # the GPU was index 0 in the crashed run; its UUID says it is index 2 now
        defaults={0: GpuDefault("GPU-2", 690.0)},
        applied={0: GpuApplied((900, 900), 250.0)},
    )
    safety = await h.start()
    assert await safety.recover(crashed) == [2]
    assert h.backend.locks[2] is None and h.backend.limits_w[2] == 690.0
    assert safety.applied == {} and safety.defaults == {}


async def test_reset_all_unknown(tmp_path: Path) -> None:
    h = Harness(tmp_path, count=2)
    h.backend.locks[0] = (800, 800)
    safety = await h.start()
    await safety.reset_all_unknown()
    assert h.backend.locks == {0: None, 1: None}
    assert h.backend.limits_w == {0: 700.0, 1: 700.0}  # the driver default: no snapshot is known
