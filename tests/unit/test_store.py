"""The controller's SQLite store: schema creation and migration, refusal of foreign or newer files, the
generation counter, the write-ahead step transaction, the command queue, paging, the audited mode, the
energy ledger, pruning, and a kill -9 in the middle of a stream of steps."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api.errors import DataFileError, FailedPreconditionError, InvalidArgumentError
from controller.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ClassEnergy,
    EnergyRow,
    NewCommand,
    NewDecision,
    Store,
    TrafficRow,
    create_at_version,
)

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, start_ns: int = 1_000_000_000_000) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "controller.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    yield s
    s.close()


def _cmd(gen: int = 0, *, kind: str = "start", status: str = "pending", step: int = 0) -> NewCommand:
    return NewCommand(1.0, gen, "node-a", kind, "e1", json.dumps({"step": step}), status)


def _dec(level: str = "pool", summary: str = "s", cycle_time_s: float = 1.0) -> NewDecision:
    return NewDecision(cycle_time_s, level, summary, "{}")


def _sql(path: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def _tables(path: Path) -> set[str]:
    return {str(r[0]) for r in _sql(path, "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}


# ------------------------------------------------------------------------------------ opening


def test_fresh_store_is_created_in_wal_mode_and_survives_reopen(db: Path) -> None:
    with Store(db) as s:
        s.set_meta("origin_unix_s", "1700000000.0")
        rows = s.commit_step(
            snapshot=(b"\x00cycle", 12.5, "v1"), decisions=[_dec("cluster")], commands=[_cmd(7)]
        )
        assert [r.id for r in rows] == [1]
    assert _sql(db, "PRAGMA journal_mode") == [("wal",)]
    assert _sql(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    with Store(db) as s:
        assert s.get_meta("origin_unix_s") == "1700000000.0"
        assert s.get_meta("absent") is None
        assert s.load_snapshot() == (b"\x00cycle", 12.5, "v1")
        assert [c.generation for c in s.pending_commands()] == [7]
        last = s.last_decision()
        assert last is not None and last.level == "cluster"


def test_migration_from_v1_keeps_data_and_adds_the_ledger(db: Path) -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    create_at_version(db, 1)
    assert _sql(db, "PRAGMA user_version") == [(1,)]
    assert "energy" not in _tables(db) and "decisions_by_time" not in _tables(db)
    conn = sqlite3.connect(db)
    with conn:  # what a v1 controller left: a decision, a pending command, the counter
        conn.execute(
            "INSERT INTO decisions (ts_unix_ns, cycle_time_s, level, summary, detail_json) "
            "VALUES (5, 1.0, 'pool', 'old', '{}')"
        )
        conn.execute(
            "INSERT INTO commands (ts_unix_ns, cycle_time_s, generation, node, kind, target, request_json, "
            "status, updated_unix_ns) VALUES (5, 1.0, 3, 'n', 'start', 'e', '{}', 'pending', 5)"
        )
        conn.execute("INSERT INTO meta (key, value) VALUES ('generation', '3')")
    conn.close()

    with Store(db) as s:
        assert [d.summary for d in s.list_decisions()] == ["old"]
        assert [c.generation for c in s.pending_commands()] == [3]
        assert s.current_generation() == 3
        s.add_energy([EnergyRow(0.0, 10.0, "n", "p", 5.0)])
        assert s.energy_total_j() == 5.0
    assert _sql(db, "PRAGMA user_version") == [(2,)]
    assert {"energy", "traffic", "decisions_by_time"} <= _tables(db)


def test_newer_schema_is_refused_with_upgrade_advice(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(DataFileError) as err:
        Store(db)
    assert err.value.field == "schema_version"
    assert str(db) in str(err.value) and "upgrade the controller" in str(err.value)


def test_non_sqlite_file_is_a_data_file_error(db: Path) -> None:
    db.write_bytes(b"this is not a database\x00\xff" * 200)
    with pytest.raises(DataFileError) as err:
        Store(db)
    assert str(db) in str(err.value)


def test_database_of_something_else_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    with pytest.raises(DataFileError, match="something else"):
        Store(db)
    assert _tables(db) == {"users"}  # untouched


def test_missing_directory_is_an_invalid_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        Store(tmp_path / "nope" / "c.db")
    assert err.value.field == "store.path"


def test_closed_store_refuses_use(db: Path) -> None:
    s = Store(db)
    s.close()
    s.close()  # idempotent
    with pytest.raises(FailedPreconditionError):
        s.get_meta("x")


# ------------------------------------------------------------------------------------ generations


def test_generations_strictly_increase_across_reopen(db: Path) -> None:
    with Store(db) as s:
        assert s.current_generation() == 0
        assert s.next_generations(3) == [1, 2, 3]
        assert s.current_generation() == 3
    with Store(db) as s:
        assert s.next_generations() == [4]
        assert s.next_generations(2, at_least=10) == [11, 12]
        assert s.next_generations(1, at_least=5) == [13]  # at_least below the counter changes nothing
        s.raise_generation(20)
        s.raise_generation(5)
        assert s.current_generation() == 20
        with pytest.raises(InvalidArgumentError):
            s.next_generations(0)
        with pytest.raises(InvalidArgumentError):
            s.set_meta("generation", "1")  # the counter never goes back
    with Store(db) as s:
        assert s.next_generations() == [21]


def test_generations_are_unique_across_threads(store: Store) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(50):
            g = store.next_generations(2)
            with lock:
                got.extend(g)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 401))


# ------------------------------------------------------------------------------------ steps and commands


def test_commit_step_is_atomic(store: Store) -> None:
    store.commit_step(snapshot=(b"one", 1.0, "v"), decisions=[_dec(summary="first")], commands=[_cmd(1)])
    before = (
        store.load_snapshot(),
        store.list_decisions(),
        store.list_commands(),
        store.current_generation(),
    )

    # The invalid status is found at the second command, after the snapshot, the decisions and the first
    # command went in: the whole step must roll back.
    with pytest.raises(InvalidArgumentError) as err:
        store.commit_step(
            snapshot=(b"two", 2.0, "v"),
            decisions=[_dec(summary="second"), _dec(summary="third")],
            commands=[_cmd(5), _cmd(6, status="bogus")],
        )
    assert err.value.field == "status"
    after = (store.load_snapshot(), store.list_decisions(), store.list_commands(), store.current_generation())
    assert after == before

    with pytest.raises(InvalidArgumentError) as err:
        store.commit_step(snapshot=(b"three", 3.0, "v"), decisions=[_dec(level="nope")], commands=[])
    assert err.value.field == "level"
    assert store.load_snapshot() == (b"one", 1.0, "v")


def test_commit_step_raises_the_counter_and_bounds_summaries(store: Store) -> None:
    rows = store.commit_step(
        snapshot=None, decisions=[_dec(summary="x" * 2000)], commands=[_cmd(9), _cmd(0, kind="reject")]
    )
    assert [(r.generation, r.status, r.attempts, r.result_json) for r in rows] == [
        (9, "pending", 0, ""),
        (0, "pending", 0, ""),
    ]
    assert rows == store.list_commands()
    assert store.current_generation() == 9
    assert len(store.list_decisions()[0].summary) == 500
    assert store.load_snapshot() is None


def test_pending_to_finished_counts_attempts(store: Store) -> None:
    a, b, c = store.commit_step(
        snapshot=None, decisions=[], commands=[_cmd(1), _cmd(2, kind="drain"), _cmd(3, status="skipped")]
    )
    assert [r.id for r in store.pending_commands()] == [a.id, b.id]  # skipped (observe mode) is not pending

    store.note_attempt(a.id, '{"error": "unavailable"}')
    (first, _) = store.pending_commands()
    assert (first.id, first.status, first.attempts, first.result_json) == (
        a.id,
        "pending",
        1,
        '{"error": "unavailable"}',
    )
    store.finish_command(a.id, "done", '{"ok": true}')
    store.finish_command(b.id, "failed", '{"error": "no"}')
    assert store.pending_commands() == []
    done = store.list_commands()[0]
    assert (done.status, done.attempts, done.result_json) == ("done", 2, '{"ok": true}')
    assert store.command_counts() == {("start", "done"): 1, ("drain", "failed"): 1, ("start", "skipped"): 1}

    with pytest.raises(FailedPreconditionError):
        store.finish_command(a.id, "done", "{}")
    with pytest.raises(FailedPreconditionError):
        store.note_attempt(c.id, "{}")
    with pytest.raises(InvalidArgumentError) as err:
        store.finish_command(999, "done", "{}")
    assert err.value.field == "command_id"
    with pytest.raises(InvalidArgumentError) as err:
        store.finish_command(b.id, "pending", "{}")
    assert err.value.field == "status"
    assert [r.id for r in store.list_commands(after_id=a.id, limit=1)] == [b.id]


# ------------------------------------------------------------------------------------ decisions, mode, audit


def test_list_decisions_pages_by_id_and_filters(db: Path) -> None:
    clock = FakeClock()
    with Store(db, clock_ns=clock) as s:
        for i in range(5):
            clock.now_ns = 1000 + i
            s.commit_step(
                snapshot=None, decisions=[_dec("cluster" if i == 2 else "pool", f"d{i}", i)], commands=[]
            )
        page1 = s.list_decisions(limit=2)
        page2 = s.list_decisions(after_id=page1[-1].id, limit=2)
        page3 = s.list_decisions(after_id=page2[-1].id, limit=2)
        assert [d.summary for d in page1 + page2 + page3] == ["d0", "d1", "d2", "d3", "d4"]
        assert [d.ts_unix_ns for d in page1] == [1000, 1001]
        assert [d.summary for d in s.list_decisions(since_unix_ns=1003)] == ["d3", "d4"]
        assert [d.summary for d in s.list_decisions(since_unix_ns=1001, after_id=page1[-1].id, limit=1)] == [
            "d2"
        ]
        assert [d.summary for d in s.list_decisions(level="cluster")] == ["d2"]
        last_pool = s.last_decision("pool")
        assert last_pool is not None and last_pool.summary == "d4"
        assert s.last_decision("guard") is None
        assert [d.summary for d in s.decisions_from(page2[0].id)] == ["d2", "d3", "d4"]
        for bad in (0, 1001):
            with pytest.raises(InvalidArgumentError) as err:
                s.list_decisions(limit=bad)
            assert err.value.field == "page_size"
        with pytest.raises(InvalidArgumentError) as err:
            s.list_decisions(level="bogus")
        assert err.value.field == "level"


def test_set_mode_is_audited_and_unknown_modes_refused(store: Store) -> None:
    assert store.mode() == "observe"
    assert store.mode("paused") == "paused"
    assert store.set_mode("apply", caller="c" * 300, reason="r" * 900) == "observe"
    assert store.mode() == "apply"
    assert store.set_mode("paused", caller="ops", reason="maintenance") == "apply"
    rows = store.list_audit()
    assert [(a.action, a.result) for a in rows] == [("SetMode", "OK"), ("SetMode", "OK")]
    assert len(rows[0].caller) == 200
    first = json.loads(rows[0].request_json)
    assert (first["mode"], first["previous_mode"], len(first["reason"])) == ("apply", "observe", 500)

    with pytest.raises(InvalidArgumentError) as err:
        store.set_mode("turbo", caller="ops", reason="")
    assert err.value.field == "mode" and "observe, apply, paused" in str(err.value)
    with pytest.raises(InvalidArgumentError):
        store.set_meta("mode", "apply")  # only through set_mode, with its audit row
    assert store.mode() == "paused" and len(store.list_audit()) == 2

    store.audit(caller="router", action="ReportTraffic", request_json="{}", result="PERMISSION_DENIED")
    assert [a.action for a in store.list_audit(after_id=rows[-1].id)] == ["ReportTraffic"]


# ------------------------------------------------------------------------------------ energy ledger


def test_class_energy_splits_pool_energy_by_output_tokens(store: Store) -> None:
    store.add_energy(
        [
            EnergyRow(100.0, 10.0, "n1", "A", 600.0),
            EnergyRow(100.0, 10.0, "n2", "A", 400.0),
            EnergyRow(110.0, 10.0, "n1", "A", 200.0),  # no traffic in this interval: stays with the pool
            EnergyRow(100.0, 10.0, "n3", "B", 50.0),  # traffic without tokens: split by requests
            EnergyRow(50.0, 10.0, "n1", "A", 1e6),  # before `since` below
        ]
    )
    store.add_traffic(
        [
            TrafficRow(100.0, 10.0, "A", "short", 6, 300),
            TrafficRow(100.0, 10.0, "A", "long", 2, 100),
            TrafficRow(100.0, 10.0, "B", "x", 5, 0),
            TrafficRow(100.0, 10.0, "C", "y", 3, 30),  # traffic without energy
        ]
    )
    got = {(c.pool, c.class_name): c for c in store.class_energy(since_unix_s=100.0)}
    assert got == {
        ("A", ""): ClassEnergy("A", "", 200.0, 0, 0, None, None),
        ("A", "long"): ClassEnergy("A", "long", 250.0, 2, 100, 125.0, 2.5),
        ("A", "short"): ClassEnergy("A", "short", 750.0, 6, 300, 125.0, 2.5),
        ("B", "x"): ClassEnergy("B", "x", 50.0, 5, 0, 10.0, None),
        ("C", "y"): ClassEnergy("C", "y", 0.0, 3, 30, 0.0, 0.0),
    }
    assert [(c.pool, c.class_name) for c in store.class_energy(since_unix_s=100.0)] == sorted(got)
    assert store.energy_by("pool", since_unix_s=100.0) == {"A": 1200.0, "B": 50.0}
    assert store.energy_by("node") == {"n1": 1e6 + 800.0, "n2": 400.0, "n3": 50.0}
    assert store.energy_total_j(since_unix_s=100.0) == 1250.0
    assert store.energy_total_j(since_unix_s=1e9) == 0.0
    with pytest.raises(InvalidArgumentError):
        store.energy_by("class")
    with pytest.raises(InvalidArgumentError):
        store.add_energy([EnergyRow(0.0, 10.0, "n", "A", float("nan"))])
    with pytest.raises(InvalidArgumentError):
        store.add_traffic([TrafficRow(0.0, 10.0, "A", "", 1, 1)])


# ------------------------------------------------------------------------------------ prune


def test_prune_keeps_the_newest_and_every_pending_command(store: Store) -> None:
    for i in range(6):
        store.commit_step(snapshot=None, decisions=[_dec(summary=f"d{i}")], commands=[_cmd(i + 1)])
        store.audit(caller="c", action=f"a{i}", request_json="{}", result="OK")
    ids = [c.id for c in store.list_commands()]
    for cid in ids[1:5]:  # the oldest and the newest stay pending
        store.finish_command(cid, "done", "{}")

    store.prune(keep_decisions=2, keep_commands=1, keep_audit=0)
    assert [d.summary for d in store.list_decisions()] == ["d4", "d5"]
    assert [c.id for c in store.list_commands()] == [ids[0], ids[4], ids[5]]
    assert [c.id for c in store.pending_commands()] == [ids[0], ids[5]]
    assert store.list_audit() == []

    store.prune(keep_decisions=0, keep_commands=0, keep_audit=0)
    assert store.list_decisions() == []
    assert [c.id for c in store.list_commands()] == [ids[0], ids[5]]
    # ids are never reused, so a client paging with after_id sees every later row
    store.commit_step(snapshot=None, decisions=[_dec()], commands=[])
    assert store.list_decisions()[0].id > 6
    with pytest.raises(InvalidArgumentError):
        store.prune(keep_decisions=-1, keep_commands=0, keep_audit=0)


# ------------------------------------------------------------------------------------ kill -9

_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from controller.store import NewCommand, NewDecision, Store

store = Store(Path(sys.argv[2]))
step = 0
while True:
    step += 1
    gens = store.next_generations(2)
    t = float(step)
    store.commit_step(
        snapshot=(json.dumps({"step": step}).encode(), t, "test"),
        decisions=[
            NewDecision(t, "pool", f"step {step}", json.dumps({"step": step, "i": i})) for i in range(3)
        ],
        commands=[NewCommand(t, g, "n1", "start", "e1", json.dumps({"step": step})) for g in gens],
    )
    if step == 20:
        print("ready", flush=True)
"""


def test_kill_9_mid_stream_leaves_whole_steps(db: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(ROOT), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the store's log lines come before "ready"
    )
    # A child that never says "ready" must not hang the suite: kill it after a while whatever happens.
    guard = threading.Timer(20.0, child.kill)
    guard.start()
    try:
        assert child.stdout is not None
        output: list[bytes] = []
        while (line := child.stdout.readline()) not in (b"ready\n", b""):
            output.append(line)
        assert line == b"ready\n", b"".join(output).decode(errors="replace")
        time.sleep(0.3)  # let it commit more steps and be killed somewhere inside one
    finally:
        guard.cancel()
        child.kill()  # SIGKILL
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    with Store(db) as s:
        assert _sql(db, "PRAGMA integrity_check") == [("ok",)]
        commands: list[tuple[int, int]] = []  # (step, generation)
        after = 0
        while page := s.list_commands(after_id=after, limit=1000):
            commands += [(json.loads(c.request_json)["step"], c.generation) for c in page]
            after = page[-1].id
        decisions: dict[int, int] = {}
        after = 0
        while dpage := s.list_decisions(after_id=after, limit=1000):
            for d in dpage:
                step = json.loads(d.detail_json)["step"]
                decisions[step] = decisions.get(step, 0) + 1
            after = dpage[-1].id
        steps = sorted({step for step, _ in commands})
        assert len(steps) >= 20 and steps == list(range(1, steps[-1] + 1))
        # every committed step is whole: its 2 commands, its 3 decisions and (the last) its snapshot
        assert len(commands) == 2 * len(steps)
        assert decisions == dict.fromkeys(steps, 3)
        snapshot = s.load_snapshot()
        assert snapshot is not None and json.loads(snapshot[0]) == {"step": steps[-1]}
        generations = [g for _, g in commands]
        assert len(set(generations)) == len(generations)
        assert s.current_generation() >= max(generations)
        assert s.next_generations()[0] > max(generations)
