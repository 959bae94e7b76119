"""agent.safety: state document round trip (v2, and v1 files read), the atomic store with serialised and
ordered saves, the defaults snapshot taken once per GPU and never re-read, write-ahead before every
write, rollback on partial failure, restore to exactly the snapshot, crash recovery (pending writes,
GPUs matched by UUID, another boot discarded), interrupted calls recorded. A small in-memory GpuBackend
stands in for the hardware (the real backends are covered by the integration tests)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agent.api.errors import DataFileError, PermissionDeniedError, UnavailableError
from agent.api.generations import Outcome, ScopeRecord
from agent.control import GpuPlan
from agent.gpu.base import GpuInfo, GpuProcess, GpuReading
from agent.gpu.worker import GpuWorkers
from agent.safety import (
    UNMODIFIED,
    AgentStateDoc,
    GpuApplied,
    GpuDefault,
    GpuSafety,
    PendingCall,
    StateStore,
    after_recovery,
    decode_state,
    encode_state,
    read_boot_id,
    state_for_boot,
)

CLOCKS = tuple(range(210, 1981, 15))
BOOT = "boot-1"


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
        self.calls.append(("power_limit_w", index))
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

    def compute_processes(self, index: int) -> tuple[GpuProcess, ...]:
        return ()

    def close(self) -> None:
        self.closed = True

    def writes(self) -> list[tuple[str, int]]:
        return [c for c in self.calls if c[0] != "power_limit_w"]


class Harness:
    def __init__(self, tmp_path: Path, count: int = 3) -> None:
        self.backend = FakeBackend(count)
        self.store = StateStore(tmp_path / "state.json")
        self.saved: list[AgentStateDoc] = []
        self.writes_at_save: list[int] = []  # how many hardware writes had happened at each save
        self.safety: GpuSafety

    async def start(self, doc: AgentStateDoc | None = None) -> GpuSafety:
        workers = await GpuWorkers.create(self.backend)
        doc = doc or AgentStateDoc()
        self.safety = GpuSafety(
            workers, self.persist, defaults=doc.defaults, applied=doc.applied, boot_id=BOOT
        )
        return self.safety

    async def persist(self) -> None:
        # What the hardware looks like at the moment of each save: the tests check saves come first.
        writing = self.safety.writing_by_uuid()
        doc = AgentStateDoc(
            defaults=dict(self.safety.defaults),
            applied=self.safety.applied_by_uuid(),
            pending={"gpu": PendingCall("ApplyGpuConfig", 1, "f", 0, writing)} if writing else {},
            boot_id=BOOT,
        )
        self.saved.append(doc)
        self.writes_at_save.append(len(self.backend.writes()))
        self.store.save(doc)


def test_state_round_trip_and_atomic_store(tmp_path: Path) -> None:
    doc = AgentStateDoc(
        defaults={"GPU-0": GpuDefault("GPU-0", 700.0), "GPU-1": GpuDefault("GPU-1", 650.5)},
        applied={"GPU-1": GpuApplied((1200, 1400), 500.0), "GPU-0": GpuApplied(None, 300.0)},
        gpu_scope=ScopeRecord(9, "ab" * 32, Outcome(b"\x08\x09\x00")),
        engine_scopes={"e1": ScopeRecord(4, "cd" * 32, Outcome(None, "UNAVAILABLE", "engine e1: not ready"))},
        lease_holder="controller",
        lease_generation=9,
        lease_expires_unix_ns=123,
        pending={
            "gpu": PendingCall("ApplyGpuConfig", 10, "ef" * 32, 5, {"GPU-1": GpuApplied((990, 990), None)}),
            "engine:e1": PendingCall("ReconfigureEngine", 5, "01" * 32, 6, engine="m on GPUs [0]"),
        },
        boot_id=BOOT,
    )
    assert decode_state(encode_state(doc), source="x") == doc
    store = StateStore(tmp_path / "sub" / "state.json")
    assert store.load() == AgentStateDoc()  # first start: no file
    store.save(doc)
    assert store.load() == doc
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["state.json"]  # no temporary file left


def test_version_1_files_are_read(tmp_path: Path) -> None:
    """Files of the agent before v2 kept GPUs by index, the UUID inside the defaults snapshot."""
    v1 = {
        "format": "dynamollm.agent-state/v1",
        "defaults": {"0": {"uuid": "GPU-7", "power_limit_w": 650.0}},
        "applied": {"0": {"sm_clock_lock": [900, 900], "power_limit_w": None}},
        "gpu_scope": {"generation": 3, "fingerprint": "aa", "reply": "", "code": "", "message": ""},
        "engine_scopes": {},
        "lease": {"holder": "c", "generation": 3, "expires_unix_ns": 0},
    }
    doc = decode_state(json.dumps(v1), source="v1")
    assert doc.defaults == {"GPU-7": GpuDefault("GPU-7", 650.0)}
    assert doc.applied == {"GPU-7": GpuApplied((900, 900), None)}
    assert doc.gpu_scope is not None and doc.gpu_scope.generation == 3 and doc.boot_id == ""


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{", "document"),
        ('{"format": "other/v9"}', "format"),
        ('{"format": "dynamollm.agent-state/v2", "boot_id": "b", "defaults": {"G": {}}}', "defaults"),
        (
            '{"format": "dynamollm.agent-state/v2", "boot_id": "b", "defaults": {}, '
            '"applied": {"G": {"sm_clock_lock": [1]}}}',
            "applied",
        ),
        (
            '{"format": "dynamollm.agent-state/v2", "boot_id": "b", "defaults": {}, "applied": {}, '
            '"pending": {"gpu": {"rpc": "x"}}}',
            "pending",
        ),
    ],
)
def test_corrupt_state_names_the_field(text: str, field: str) -> None:
    with pytest.raises(DataFileError) as info:
        decode_state(text, source="/run/state.json")
    assert info.value.field == field and info.value.path == "/run/state.json"


def test_concurrent_saves_never_collide(tmp_path: Path) -> None:
    """A cancelled caller's save keeps running in its thread while the next one starts: saves must not
    rename each other's temporary file away (FileNotFoundError) nor leave a torn file."""
    store = StateStore(tmp_path / "state.json")
    errors: list[BaseException] = []

    def saver(n: int) -> None:
        for i in range(150):
            try:
                store.save(AgentStateDoc(lease_holder=f"t{n}", lease_generation=i))
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=saver, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.load().lease_generation == 149
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_older_document_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    assert store.save(AgentStateDoc(lease_generation=2), version=2)
    assert not store.save(AgentStateDoc(lease_generation=1), version=1)  # built earlier, ran later
    assert store.load().lease_generation == 2


def test_leftover_temporary_files_are_removed_at_load(tmp_path: Path) -> None:
    (tmp_path / "state.json.4242.tmp").write_text("half a document")
    StateStore(tmp_path / "state.json").load()
    assert list(tmp_path.iterdir()) == []


def test_boot_id_is_read_or_empty(tmp_path: Path) -> None:
    (tmp_path / "boot_id").write_text("1f0e-ab\n")
    assert read_boot_id(tmp_path / "boot_id") == "1f0e-ab"
    assert read_boot_id(tmp_path / "missing") == ""


async def test_snapshot_once_and_write_ahead_before_every_write(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    await safety.apply([GpuPlan(1, 1200, 1200, None)])
    # snapshot of every GPU (not only GPU 1), by UUID, taken before the write, saved before the write
    assert safety.defaults == {f"GPU-{i}": GpuDefault(f"GPU-{i}", 650.0) for i in range(3)}
    assert h.writes_at_save == [0] and h.saved[0].applied == {"GPU-1": GpuApplied((1200, 1200), None)}
    assert h.saved[0].defaults == safety.defaults
    assert h.saved[0].pending["gpu"].gpu_writes == {"GPU-1": GpuApplied((1200, 1200), None)}
    assert h.backend.locks[1] == (1200, 1200) and h.backend.limits_w[1] == 650.0
    assert h.backend.writes() == [("set_locked_clocks", 1)]  # default power limit: untouched
    assert safety.writing == {}
    # a GPU already modified is also saved (with the new targets) before its next write
    await safety.apply([GpuPlan(1, 1400, 1500, 400.0)])
    assert h.writes_at_save == [0, 1]
    assert h.saved[1].applied == {"GPU-1": GpuApplied((1400, 1500), 400.0)}
    assert h.backend.locks[1] == (1400, 1500) and h.backend.limits_w[1] == 400.0
    # back to the default limit: written, and recorded as default
    await safety.apply([GpuPlan(1, 1400, 1500, None)])
    assert h.backend.limits_w[1] == 650.0 and safety.setting(1) == GpuApplied((1400, 1500), None)
    # the snapshot value given explicitly is also "the default"
    await safety.apply([GpuPlan(2, 1980, 1980, 650.0)])
    assert safety.setting(2).power_limit_w is None
    # restore everything, then change a limit behind the agent's back: the snapshot is not re-read
    await safety.restore([0, 1, 2])
    reads = h.backend.calls.count(("power_limit_w", 0))
    h.backend.limits_w[0] = 333.0
    await safety.apply([GpuPlan(0, 1200, 1200, 500.0)])
    assert h.backend.calls.count(("power_limit_w", 0)) == reads
    await safety.restore([0])
    assert h.backend.limits_w[0] == 650.0  # exactly the snapshot


async def test_failed_write_ahead_changes_nothing(tmp_path: Path) -> None:
    backend = FakeBackend()

    async def full_disk() -> None:
        raise UnavailableError("cannot save the agent state: no space left on device")

    safety = GpuSafety(await GpuWorkers.create(backend), full_disk, boot_id=BOOT)
    with pytest.raises(UnavailableError):
        await safety.apply([GpuPlan(0, 1200, 1200, 300.0)])
    assert backend.writes() == [] and safety.applied == {} and safety.writing == {}


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
    # saved before the writes (all three GPUs named) and after the rollback
    assert h.saved[-2].applied.keys() == {"GPU-0", "GPU-1", "GPU-2"}
    assert h.saved[-1].applied == {"GPU-0": GpuApplied((1000, 1000), 500.0)}
    assert h.store.load().applied == {"GPU-0": GpuApplied((1000, 1000), 500.0)}


async def test_failed_rollback_keeps_gpu_marked_modified(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    h.backend.fail[("set_locked_clocks", 1)] = UnavailableError("gpu lost")
    h.backend.fail[("reset_locked_clocks", 0)] = UnavailableError("still lost")
    with pytest.raises(UnavailableError, match="gpu lost"):
        await safety.apply([GpuPlan(0, 1200, 1200, None), GpuPlan(1, 1200, 1200, None)])
    assert 0 in safety.applied  # unknown state: a later restore must still reset it
    assert 1 not in safety.applied


async def test_restore_writes_both_knobs_and_tries_every_gpu(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    safety = await h.start()
    await safety.apply([GpuPlan(i, 1200, 1200, 300.0) for i in range(3)])
    h.backend.fail[("reset_locked_clocks", 1)] = UnavailableError("busy")
    with pytest.raises(UnavailableError):
        await safety.restore([0, 1, 2], write_ahead=True)
    assert h.saved[-1].pending["gpu"].gpu_writes == dict.fromkeys(("GPU-0", "GPU-1", "GPU-2"), UNMODIFIED)
    assert h.backend.locks == {0: None, 1: (1200, 1200), 2: None}
    assert h.backend.limits_w == {0: 650.0, 1: 300.0, 2: 650.0}
    assert safety.modified_indices() == (1,)
    assert await safety.restore([0, 1, 2]) == [1]
    assert safety.modified_indices() == ()
    assert await safety.restore([0, 1, 2]) == []  # nothing modified: nothing written
    assert h.backend.calls.count(("reset_locked_clocks", 0)) == 1
    # a GPU recorded with clocks only still gets its power limit written back
    h.backend.limits_w[2] = 280.0
    safety.applied[2] = GpuApplied((900, 900), None)
    await safety.restore([2])
    assert h.backend.limits_w[2] == 650.0


async def test_recover_restores_applied_and_pending_gpus_by_uuid_to_the_snapshot(tmp_path: Path) -> None:
    h = Harness(tmp_path, count=4)
    h.backend.locks[2] = (900, 900)
    h.backend.limits_w[2] = 250.0
    h.backend.limits_w[3] = 300.0  # written by a call the record did not name as applied yet
    crashed = AgentStateDoc(
        # the GPUs were other indices in the crashed run; UUIDs say where they are now
        defaults={"GPU-2": GpuDefault("GPU-2", 690.0), "GPU-3": GpuDefault("GPU-3", 610.0)},
        applied={"GPU-2": GpuApplied((900, 900), None)},  # clocks only: the power write was not saved
        pending={"gpu": PendingCall("ApplyGpuConfig", 5, "f", 0, {"GPU-3": GpuApplied((990, 990), 300.0)})},
        boot_id=BOOT,
    )
    safety = await h.start()
    assert await safety.recover(crashed) == [2, 3]
    assert h.backend.locks[2] is None and h.backend.limits_w[2] == 690.0
    assert h.backend.limits_w[3] == 610.0
    assert safety.applied == {}
    assert safety.defaults == crashed.defaults  # kept: valid for this boot, never re-read


async def test_state_of_another_boot_is_discarded(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    earlier = AgentStateDoc(
        defaults={"GPU-0": GpuDefault("GPU-0", 300.0)},
        applied={"GPU-0": GpuApplied((900, 900), None)},
        boot_id="boot-0",
    )
    safety = await h.start()
    assert await safety.recover(earlier) == []  # the driver reloaded: nothing of ours is on the GPUs
    assert h.backend.writes() == [] and safety.defaults == {}
    assert state_for_boot(earlier, "boot-0") == earlier
    assert state_for_boot(earlier, BOOT).defaults == {}


def test_after_recovery_records_interrupted_calls() -> None:
    doc = AgentStateDoc(
        defaults={"GPU-0": GpuDefault("GPU-0", 650.0)},
        applied={"GPU-0": GpuApplied((900, 900), None)},
        gpu_scope=ScopeRecord(1, "a", Outcome(b"")),
        lease_generation=2,
        lease_expires_unix_ns=99,
        pending={
            "gpu": PendingCall("ApplyGpuConfig", 2, "b", 0, {"GPU-0": GpuApplied((990, 990), 300.0)}),
            "engine:e1": PendingCall("ReconfigureEngine", 7, "c", 0, engine="m on GPUs [1]"),
        },
        boot_id=BOOT,
    )
    settled = after_recovery(doc, boot_id=BOOT)
    assert settled.applied == {} and settled.pending == {} and settled.lease_expires_unix_ns == 0
    assert settled.defaults == doc.defaults and settled.lease_generation == 2
    gpu = settled.gpu_scope
    assert gpu is not None and (gpu.generation, gpu.fingerprint) == (2, "b") and gpu.outcome is not None
    assert gpu.outcome.code == "ABORTED" and "interrupted" in gpu.outcome.message
    assert "restored to its defaults" in gpu.outcome.message
    engine = settled.engine_scopes["e1"]
    assert engine.generation == 7 and engine.outcome is not None and engine.outcome.code == "ABORTED"
    assert "GetInventory" in engine.outcome.message


async def test_reset_all_unknown(tmp_path: Path) -> None:
    h = Harness(tmp_path, count=2)
    h.backend.locks[0] = (800, 800)
    safety = await h.start()
    await safety.reset_all_unknown()
    assert h.backend.locks == {0: None, 1: None}
    assert h.backend.limits_w == {0: 700.0, 1: 700.0}  # the driver default: no snapshot is known
