"""The controller's persistent store: one SQLite database in WAL mode, and the only module of the
controller that imports sqlite3.

Where it sits: `dynamollm-controller` opens one `Store` at start-up. Its control loop runs the pure
control cycle on the wall clock; each step's outcome (the pickled cycle, the decision records and the
commands for the agents) goes in with `commit_step`, one transaction, BEFORE any command is sent, so a
crash leaves either the whole step or none of it (write-ahead). The executor then sends the pending
commands and records each outcome (`finish_command`, `note_attempt`); a restart resumes from the
snapshot and the commands still pending. Generations for the agents' desired-state calls come from the
one counter here (`next_generations`), on disk before they are used, so no generation is ever handed out
twice, whatever kills the process. The admin API reads decisions, commands and the audit from here and
changes the mode through `set_mode` (audited in the same transaction); the energy ledger (per node, pool
and request class) is written by the telemetry loop and read by the admin API and metrics.

Schema: `PRAGMA user_version` is the schema version; `MIGRATIONS` take a database from one version to
the next. A new database runs them all in one transaction; an older one runs the missing ones, each in
its own transaction together with its user_version bump. A database of a newer version than this code
knows is refused (`DataFileError`): upgrade the controller, never downgrade a database.

Errors leave as the project's error tree, never as sqlite3 exceptions (callers must not need sqlite3):
a damaged or foreign file is a `DataFileError`, a busy, full or read-only disk an `UnavailableError`,
anything else an `InternalError`.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent.api.errors import (
    DataFileError,
    DynamoError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
)

log = structlog.get_logger("controller.store")

MODES: Final = ("observe", "apply", "paused")
COMMAND_STATUSES: Final = ("pending", "done", "failed", "skipped")
FINISHED_STATUSES: Final = ("done", "failed", "skipped")
# The levels of the control cycle's decision records (controller.model.decisions.Level) and the instance
# level's clock decisions.
DECISION_LEVELS: Final = ("initial", "cluster", "pool", "guard", "instance")
ENERGY_KEYS: Final = ("node", "pool")

SUMMARY_LIMIT_CHARS: Final = 500
CALLER_LIMIT_CHARS: Final = 200
REASON_LIMIT_CHARS: Final = 500
PAGE_SIZE_MAX: Final = 1000

# A writer from another process (an operator's sqlite3 shell, a second controller started by mistake)
# holds the lock for milliseconds; wait that long rather than fail the step.
BUSY_TIMEOUT_MS: Final = 5000

# Meta keys the store owns: the counter only grows (next_generations, raise_generation) and the mode is
# changed only with its audit row (set_mode), so set_meta refuses them.
_GENERATION_KEY: Final = "generation"
_MODE_KEY: Final = "mode"
_RESERVED_KEYS: Final = (_GENERATION_KEY, _MODE_KEY)

# sqlite3 error names (extended codes start with these) that say the disk or another process is in the
# way, and that retrying later may succeed.
_UNAVAILABLE_ERRORS: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
)
_DAMAGED_ERRORS: Final = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


# ------------------------------------------------------------------------------------ schema


@dataclass(frozen=True, slots=True)
class Migration:
    """Takes the database from `version - 1` to `version`."""

    version: int
    description: str
    script: str


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "base tables: meta, commands, decisions, audit, snapshot",
        """
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_unix_ns INTEGER NOT NULL,
    cycle_time_s REAL NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 0),
    node TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    request_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'skipped')),
    result_json TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_unix_ns INTEGER NOT NULL
);
-- The executor reads the pending commands after every step; the partial index is as small as the queue.
CREATE INDEX commands_pending ON commands (id) WHERE status = 'pending';
CREATE TABLE decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_unix_ns INTEGER NOT NULL,
    cycle_time_s REAL NOT NULL,
    level TEXT NOT NULL,
    summary TEXT NOT NULL,
    detail_json TEXT NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_unix_ns INTEGER NOT NULL,
    caller TEXT NOT NULL,
    action TEXT NOT NULL,
    request_json TEXT NOT NULL,
    result TEXT NOT NULL
);
-- One row: the last control cycle, replaced at every step.
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    ts_unix_ns INTEGER NOT NULL,
    cycle_time_s REAL NOT NULL,
    code_version TEXT NOT NULL,
    blob BLOB NOT NULL
);
""",
    ),
    Migration(
        2,
        "energy ledger (energy per node and pool, traffic per pool and class); decisions by time",
        """
CREATE TABLE energy (
    id INTEGER PRIMARY KEY,
    interval_start_unix_s REAL NOT NULL,
    interval_s REAL NOT NULL CHECK (interval_s > 0),
    node TEXT NOT NULL,
    pool TEXT NOT NULL,
    energy_j REAL NOT NULL CHECK (energy_j >= 0)
);
CREATE INDEX energy_by_time ON energy (interval_start_unix_s);
CREATE TABLE traffic (
    id INTEGER PRIMARY KEY,
    interval_start_unix_s REAL NOT NULL,
    interval_s REAL NOT NULL CHECK (interval_s > 0),
    pool TEXT NOT NULL,
    class_name TEXT NOT NULL,
    requests_count INTEGER NOT NULL CHECK (requests_count >= 0),
    output_tokens INTEGER NOT NULL CHECK (output_tokens >= 0)
);
CREATE INDEX traffic_by_time ON traffic (interval_start_unix_s);
-- ListDecisions with since_unix_ns, and the admin API's "decisions of the last hour".
CREATE INDEX decisions_by_time ON decisions (ts_unix_ns);
""",
    ),
)

SCHEMA_VERSION: Final[int] = MIGRATIONS[-1].version


def _statements(script: str) -> list[str]:
    """The statements of a migration script, one by one: executescript would commit the transaction the
    migration must run in."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if any(ln.strip() and not ln.strip().startswith("--") for ln in buf.splitlines()):
        raise InternalError(f"migration script ends inside a statement: {buf.strip()[:200]!r}")
    return out


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: str, target: int = SCHEMA_VERSION) -> None:
    """Bring the database to schema `target`: all at once when new, one migration per transaction when
    older. The version is read again under the write lock, so two processes opening one file at once
    never run a migration twice."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(conn)
            if version > SCHEMA_VERSION:
                raise DataFileError(
                    path,
                    None,
                    "schema_version",
                    f"the database has schema version {version}, newer than {SCHEMA_VERSION}, the newest "
                    "this controller knows: it was written by a newer controller; upgrade the controller "
                    "(never downgrade a database)",
                )
            todo = [m for m in MIGRATIONS if version < m.version <= target]
            if not todo:
                conn.execute("COMMIT")
                return
            if version == 0:
                tables = [
                    r[0]
                    for r in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                    )
                ]
                if tables:
                    raise DataFileError(
                        path,
                        None,
                        "schema_version",
                        f"an SQLite database of something else (schema version 0 with tables "
                        f"{', '.join(sorted(tables))[:200]}); point the controller at a new file",
                    )
            else:
                todo = todo[:1]  # an upgrade: each migration in its own transaction
            for migration in todo:
                for statement in _statements(migration.script):
                    conn.execute(statement)
            # PRAGMA user_version is written to the database header inside the transaction: the bump
            # commits, or rolls back, with the migration's tables.
            conn.execute(f"PRAGMA user_version = {int(todo[-1].version)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        log.info(
            "store_schema_migrated",
            path=path,
            from_version=version,
            to_version=todo[-1].version,
            migrations=[m.description for m in todo],
        )


def _connect(path: Path) -> sqlite3.Connection:
    if path.is_dir() or not path.parent.is_dir():
        raise InvalidArgumentError("store.path", str(path), "a file path in an existing directory")
    # isolation_level=None: no implicit transactions; every write below says BEGIN IMMEDIATE itself.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            # A filesystem without shared memory (some network mounts): still correct, only readers
            # wait for writers.
            log.warning("store_wal_unavailable", path=str(path), journal_mode=mode)
        # In WAL mode, synchronous=NORMAL makes a committed transaction durable against the process being
        # killed (it is in the WAL file, in the OS's cache, when COMMIT returns), which is what restart
        # safety needs; only a power loss or OS crash may lose the last transactions (never corrupt the
        # database), and it saves an fsync per commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _map_error(path: Path, exc: sqlite3.Error) -> DynamoError:
    name = str(getattr(exc, "sqlite_errorname", ""))
    if name.startswith(_DAMAGED_ERRORS):
        return DataFileError(
            str(path), None, None, f"not a readable controller store (SQLite database): {exc} ({name})"
        )
    if name.startswith(_UNAVAILABLE_ERRORS):
        return UnavailableError(f"store {path}: {exc} ({name})")
    return InternalError(f"store {path}: {exc} ({name or type(exc).__name__})")


def create_at_version(path: Path, version: int) -> None:
    """Create a new database at the older schema `version` (tests and upgrade drills): the state a
    controller of that version would have left."""
    if not 1 <= version <= SCHEMA_VERSION:
        raise InvalidArgumentError("version", version, f"1..{SCHEMA_VERSION}")
    try:
        conn = _connect(path)
        try:
            _migrate(conn, str(path), version)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _map_error(path, exc) from None


# ------------------------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class CommandRow:
    id: int  # store sequence number: increasing, never reused
    ts_unix_ns: int  # when it was recorded
    cycle_time_s: float  # the control cycle's time of the command
    generation: int  # agent generation the command carries (0: none, e.g. queue commands)
    node: str  # node name ("" for commands that address no node)
    kind: str  # e.g. "start", "drain", "abort", "set_clock", "reject", "move"
    target: str  # engine id or "" (what on the node it acts on)
    request_json: str  # the command's fields as JSON
    status: str  # "pending" | "done" | "failed" | "skipped"
    result_json: str  # "" until finished; the agent's reply or the error as JSON
    attempts: int
    updated_unix_ns: int


@dataclass(frozen=True, slots=True)
class NewCommand:
    """A command as the daemon hands it in."""

    cycle_time_s: float
    generation: int
    node: str
    kind: str
    target: str
    request_json: str
    status: str = "pending"  # "skipped" for commands recorded in observe mode


@dataclass(frozen=True, slots=True)
class DecisionRow:
    id: int
    ts_unix_ns: int
    cycle_time_s: float
    level: str
    summary: str
    detail_json: str


@dataclass(frozen=True, slots=True)
class NewDecision:
    cycle_time_s: float
    level: str
    summary: str  # one line for people, cut to SUMMARY_LIMIT_CHARS
    detail_json: str


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    ts_unix_ns: int
    caller: str
    action: str
    request_json: str
    result: str


@dataclass(frozen=True, slots=True)
class EnergyRow:
    """One ledger entry: the energy of one node's GPUs attributed to one pool over one interval. Rows add
    up: two rows for the same interval, node and pool both count."""

    interval_start_unix_s: float
    interval_s: float
    node: str
    pool: str  # "" for GPUs in no pool (idle)
    energy_j: float


@dataclass(frozen=True, slots=True)
class TrafficRow:
    """Requests finished per pool and class over one interval (rows add up, like `EnergyRow`). To be
    attributed a pool's energy, it must use the interval starts of that pool's energy rows."""

    interval_start_unix_s: float
    interval_s: float
    pool: str
    class_name: str
    requests_count: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ClassEnergy:
    """The ledger's figures for one (pool, class) over a time range; class_name "" holds a pool's energy
    of intervals without traffic."""

    pool: str
    class_name: str
    energy_j: float
    requests_count: int
    output_tokens: int
    j_per_request: float | None  # None when requests_count is 0
    j_per_output_token: float | None  # None when output_tokens is 0


_COMMAND_COLUMNS: Final = (
    "id, ts_unix_ns, cycle_time_s, generation, node, kind, target, request_json, status, result_json, "
    "attempts, updated_unix_ns"
)
_DECISION_COLUMNS: Final = "id, ts_unix_ns, cycle_time_s, level, summary, detail_json"
_AUDIT_COLUMNS: Final = "id, ts_unix_ns, caller, action, request_json, result"


# Rows come back in the columns' order, which is the dataclasses' field order.
def _command(r: Sequence[Any]) -> CommandRow:
    return CommandRow(*r)


def _decision(r: Sequence[Any]) -> DecisionRow:
    return DecisionRow(*r)


def _audit(r: Sequence[Any]) -> AuditRow:
    return AuditRow(*r)


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InvalidArgumentError(field, value, allowed)


def _check_finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgumentError(field, value, "a finite number")


def _check_page(limit: int) -> None:
    if not 1 <= limit <= PAGE_SIZE_MAX:
        raise InvalidArgumentError("page_size", limit, f"1..{PAGE_SIZE_MAX}")


def _check_non_negative(field: str, value: int) -> None:
    if value < 0:
        raise InvalidArgumentError(field, value, ">= 0")


# ------------------------------------------------------------------------------------ the store


class Store:
    """The controller's database. One connection shared by the event loop and worker threads, every use
    under one lock (sqlite3 connections are not safe to use from two threads at once); writes are
    `BEGIN IMMEDIATE` transactions, so a second process writing the file waits (busy_timeout) instead of
    failing half-way."""

    def __init__(self, path: Path, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        try:
            conn = _connect(path)
        except sqlite3.Error as exc:
            raise _map_error(path, exc) from None
        try:
            _migrate(conn, str(path))
        except sqlite3.Error as exc:
            conn.close()
            raise _map_error(path, exc) from None
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        log.info("store_opened", path=str(path), schema_version=SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPreconditionError(f"store {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    raise
            except sqlite3.Error as exc:
                raise _map_error(self.path, exc) from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Reads of one statement each (each statement sees one committed state)."""
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise _map_error(self.path, exc) from exc

    def _now_ns(self) -> int:
        return int(self._clock_ns())

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _put_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _generation(self, conn: sqlite3.Connection) -> int:
        text = self._meta(conn, _GENERATION_KEY)
        if text is None:
            return 0
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise DataFileError(str(self.path), None, _GENERATION_KEY, f"not a generation: {text[:200]!r}")
        return value

    def _insert_audit(
        self, conn: sqlite3.Connection, *, caller: str, action: str, request_json: str, result: str
    ) -> None:
        conn.execute(
            "INSERT INTO audit (ts_unix_ns, caller, action, request_json, result) VALUES (?, ?, ?, ?, ?)",
            (self._now_ns(), caller[:CALLER_LIMIT_CHARS], action, request_json, result),
        )

    # -------------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        with self._read() as conn:
            return self._meta(conn, key)

    def set_meta(self, key: str, value: str) -> None:
        if not key or key in _RESERVED_KEYS:
            raise InvalidArgumentError(
                "key", key, "a non-empty key other than generation and mode (next_generations, set_mode)"
            )
        with self._write() as conn:
            self._put_meta(conn, key, value)

    # -------------------------------------------------------------------- generations

    def next_generations(self, n: int = 1, *, at_least: int = 0) -> list[int]:
        """`n` consecutive generations, each above every generation handed out before and above
        `at_least`; committed before they are returned, so a kill right after never hands them out
        again."""
        if n < 1:
            raise InvalidArgumentError("n", n, ">= 1")
        _check_non_negative("at_least", at_least)
        with self._write() as conn:
            first = max(self._generation(conn), at_least) + 1
            self._put_meta(conn, _GENERATION_KEY, str(first + n - 1))
        return list(range(first, first + n))

    def current_generation(self) -> int:
        """The last generation handed out (0: none)."""
        with self._read() as conn:
            return self._generation(conn)

    def raise_generation(self, at_least: int) -> None:
        """counter = max(counter, at_least): e.g. after reading a higher generation from an agent."""
        _check_non_negative("at_least", at_least)
        with self._write() as conn:
            if at_least > self._generation(conn):
                self._put_meta(conn, _GENERATION_KEY, str(at_least))

    # -------------------------------------------------------------------- mode

    def mode(self, default: str = "observe") -> str:
        _check_choice("default", default, MODES)
        with self._read() as conn:
            stored = self._meta(conn, _MODE_KEY)
        if stored is None:
            return default
        if stored not in MODES:
            raise DataFileError(str(self.path), None, _MODE_KEY, f"unknown mode {stored[:200]!r}")
        return stored

    def set_mode(self, mode: str, *, caller: str, reason: str, default: str = "observe") -> str:
        """Switch the mode and audit it in one transaction; returns the previous mode (`default` when none
        was ever set)."""
        _check_choice("mode", mode, MODES)
        _check_choice("default", default, MODES)
        reason = reason[:REASON_LIMIT_CHARS]
        with self._write() as conn:
            previous = self._meta(conn, _MODE_KEY) or default
            self._put_meta(conn, _MODE_KEY, mode)
            self._insert_audit(
                conn,
                caller=caller,
                action="SetMode",
                request_json=json.dumps({"mode": mode, "previous_mode": previous, "reason": reason}),
                result="OK",
            )
        log.info("mode_set", mode=mode, previous_mode=previous, caller=caller[:CALLER_LIMIT_CHARS])
        return previous

    # -------------------------------------------------------------------- snapshot and steps

    def _put_snapshot(self, conn: sqlite3.Connection, blob: bytes, cycle_time_s: float, version: str) -> None:
        _check_finite("cycle_time_s", cycle_time_s)
        conn.execute(
            "INSERT OR REPLACE INTO snapshot (id, ts_unix_ns, cycle_time_s, code_version, blob) "
            "VALUES (1, ?, ?, ?, ?)",
            (self._now_ns(), cycle_time_s, version, sqlite3.Binary(blob)),
        )

    def save_snapshot(self, blob: bytes, *, cycle_time_s: float, code_version: str) -> None:
        with self._write() as conn:
            self._put_snapshot(conn, blob, cycle_time_s, code_version)

    def load_snapshot(self) -> tuple[bytes, float, str] | None:
        """(blob, cycle_time_s, code_version) of the last snapshot; None before the first."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT blob, cycle_time_s, code_version FROM snapshot WHERE id = 1"
            ).fetchone()
        return None if row is None else (bytes(row[0]), float(row[1]), str(row[2]))

    def commit_step(
        self,
        *,
        snapshot: tuple[bytes, float, str] | None,
        decisions: Sequence[NewDecision],
        commands: Sequence[NewCommand],
    ) -> list[CommandRow]:
        """The write-ahead transaction of one control step: the snapshot (blob, cycle_time_s,
        code_version), the decisions and the commands, all committed or none. The generation counter is
        raised to the highest command generation in the same transaction, so after any crash it is
        never below a recorded command's. Returns the command rows with their ids."""
        now = self._now_ns()
        out: list[CommandRow] = []
        with self._write() as conn:
            # Validation happens as rows go in: anything refused rolls back what the step already wrote.
            if snapshot is not None:
                self._put_snapshot(conn, *snapshot)
            for d in decisions:
                _check_choice("level", d.level, DECISION_LEVELS)
                _check_finite("cycle_time_s", d.cycle_time_s)
                conn.execute(
                    "INSERT INTO decisions (ts_unix_ns, cycle_time_s, level, summary, detail_json) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (now, d.cycle_time_s, d.level, d.summary[:SUMMARY_LIMIT_CHARS], d.detail_json),
                )
            top = 0
            for c in commands:
                _check_choice("status", c.status, ("pending", "skipped"))
                _check_finite("cycle_time_s", c.cycle_time_s)
                _check_non_negative("generation", c.generation)
                cur = conn.execute(
                    "INSERT INTO commands (ts_unix_ns, cycle_time_s, generation, node, kind, target, "
                    "request_json, status, result_json, attempts, updated_unix_ns) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', 0, ?)",
                    (
                        now,
                        c.cycle_time_s,
                        c.generation,
                        c.node,
                        c.kind,
                        c.target,
                        c.request_json,
                        c.status,
                        now,
                    ),
                )
                if cur.lastrowid is None:
                    raise InternalError("the store returned no id for a new command")
                out.append(
                    CommandRow(
                        cur.lastrowid,
                        now,
                        c.cycle_time_s,
                        c.generation,
                        c.node,
                        c.kind,
                        c.target,
                        c.request_json,
                        c.status,
                        "",
                        0,
                        now,
                    )
                )
                top = max(top, c.generation)
            if top > self._generation(conn):
                self._put_meta(conn, _GENERATION_KEY, str(top))
        return out

    # -------------------------------------------------------------------- commands

    def pending_commands(self) -> list[CommandRow]:
        """Commands not carried out yet, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE status = 'pending' ORDER BY id"
            ).fetchall()
        return [_command(r) for r in rows]

    def _update_pending(self, command_id: int, status: str, result_json: str) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT status FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None:
                raise InvalidArgumentError("command_id", command_id, "the id of a recorded command")
            if row[0] != "pending":
                raise FailedPreconditionError(
                    f"command {command_id} is {row[0]}, not pending: its outcome is already recorded"
                )
            conn.execute(
                "UPDATE commands SET status = ?, result_json = ?, attempts = attempts + 1, "
                "updated_unix_ns = ? WHERE id = ?",
                (status, result_json, self._now_ns(), command_id),
            )

    def finish_command(self, command_id: int, status: str, result_json: str) -> None:
        """Record a pending command's outcome (done, failed or skipped); counts an attempt."""
        _check_choice("status", status, FINISHED_STATUSES)
        self._update_pending(command_id, status, result_json)

    def note_attempt(self, command_id: int, result_json: str) -> None:
        """A temporary failure: counts an attempt and keeps its error; the command stays pending."""
        self._update_pending(command_id, "pending", result_json)

    def finish_command_by_generation(self, generation: int, status: str, result_json: str) -> str:
        """Record the outcome of the pending command issued with `generation` (the fleet names commands
        by the generation they carry); its kind, or "" when no pending command has it (already done)."""
        _check_choice("status", status, FINISHED_STATUSES)
        return self._update_by_generation(generation, status, result_json)

    def note_attempt_by_generation(self, generation: int, result_json: str) -> str:
        """`note_attempt` for the pending command issued with `generation` ("" when none is pending)."""
        return self._update_by_generation(generation, "pending", result_json)

    def _update_by_generation(self, generation: int, status: str, result_json: str) -> str:
        with self._write() as conn:
            row = conn.execute(
                "SELECT id, kind FROM commands WHERE generation = ? AND status = 'pending'", (generation,)
            ).fetchone()
            if row is None:
                return ""
            conn.execute(
                "UPDATE commands SET status = ?, result_json = ?, attempts = attempts + 1, "
                "updated_unix_ns = ? WHERE id = ?",
                (status, result_json, self._now_ns(), row[0]),
            )
            return str(row[1])

    def list_commands(self, *, after_id: int = 0, limit: int = 100) -> list[CommandRow]:
        """Commands with id > after_id, oldest first (paging)."""
        _check_page(limit)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [_command(r) for r in rows]

    def command_counts(self) -> dict[tuple[str, str], int]:
        """(kind, status) -> number of commands kept."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT kind, status, COUNT(*) FROM commands GROUP BY kind, status"
            ).fetchall()
        return {(str(k), str(s)): int(n) for k, s, n in rows}

    # -------------------------------------------------------------------- decisions

    def list_decisions(
        self, *, since_unix_ns: int = 0, after_id: int = 0, level: str = "", limit: int = 100
    ) -> list[DecisionRow]:
        """Decisions with id > after_id (paging) taken at or after since_unix_ns, of `level` ("" any),
        oldest first."""
        if level:
            _check_choice("level", level, DECISION_LEVELS)
        _check_page(limit)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE id > ? AND ts_unix_ns >= ? "
                "AND (? = '' OR level = ?) ORDER BY id LIMIT ?",
                (after_id, since_unix_ns, level, level, limit),
            ).fetchall()
        return [_decision(r) for r in rows]

    def last_decision(self, level: str = "") -> DecisionRow | None:
        if level:
            _check_choice("level", level, DECISION_LEVELS)
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE (? = '' OR level = ?) "
                "ORDER BY id DESC LIMIT 1",
                (level, level),
            ).fetchone()
        return None if row is None else _decision(row)

    def decisions_from(self, first_id: int) -> list[DecisionRow]:
        """Every decision with id >= first_id, oldest first (e.g. the records behind the plan in force)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_DECISION_COLUMNS} FROM decisions WHERE id >= ? ORDER BY id", (first_id,)
            ).fetchall()
        return [_decision(r) for r in rows]

    # -------------------------------------------------------------------- audit

    def audit(self, *, caller: str, action: str, request_json: str, result: str) -> None:
        with self._write() as conn:
            self._insert_audit(conn, caller=caller, action=action, request_json=request_json, result=result)

    def list_audit(self, *, after_id: int = 0, limit: int = 100) -> list[AuditRow]:
        _check_page(limit)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [_audit(r) for r in rows]

    # -------------------------------------------------------------------- energy ledger

    def add_energy(self, rows: Sequence[EnergyRow]) -> None:
        for r in rows:
            _check_finite("interval_start_unix_s", r.interval_start_unix_s)
            if not (math.isfinite(r.interval_s) and r.interval_s > 0):
                raise InvalidArgumentError("interval_s", r.interval_s, "a finite number > 0")
            if not (math.isfinite(r.energy_j) and r.energy_j >= 0):
                raise InvalidArgumentError("energy_j", r.energy_j, "a finite number >= 0")
            if not r.node:
                raise InvalidArgumentError("node", r.node, "a node name")
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO energy (interval_start_unix_s, interval_s, node, pool, energy_j) "
                "VALUES (?, ?, ?, ?, ?)",
                [(r.interval_start_unix_s, r.interval_s, r.node, r.pool, r.energy_j) for r in rows],
            )

    def add_traffic(self, rows: Sequence[TrafficRow]) -> None:
        for r in rows:
            _check_finite("interval_start_unix_s", r.interval_start_unix_s)
            if not (math.isfinite(r.interval_s) and r.interval_s > 0):
                raise InvalidArgumentError("interval_s", r.interval_s, "a finite number > 0")
            if not r.class_name:
                # "" is class_energy's name for a pool's energy without traffic
                raise InvalidArgumentError("class_name", r.class_name, "a request class name")
            _check_non_negative("requests_count", r.requests_count)
            _check_non_negative("output_tokens", r.output_tokens)
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO traffic (interval_start_unix_s, interval_s, pool, class_name, requests_count, "
                "output_tokens) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.interval_start_unix_s,
                        r.interval_s,
                        r.pool,
                        r.class_name,
                        r.requests_count,
                        r.output_tokens,
                    )
                    for r in rows
                ],
            )

    def energy_by(self, key: str, *, since_unix_s: float = 0.0) -> dict[str, float]:
        """Energy (J) per node or per pool of the intervals starting at or after since_unix_s."""
        _check_choice("key", key, ENERGY_KEYS)
        column = "node" if key == "node" else "pool"  # a fixed column name, never caller text, in the SQL
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {column}, TOTAL(energy_j) FROM energy WHERE interval_start_unix_s >= ? "
                f"GROUP BY {column}",
                (since_unix_s,),
            ).fetchall()
        return {str(k): float(j) for k, j in rows}

    def energy_total_j(self, *, since_unix_s: float = 0.0) -> float:
        with self._read() as conn:
            row = conn.execute(
                "SELECT TOTAL(energy_j) FROM energy WHERE interval_start_unix_s >= ?", (since_unix_s,)
            ).fetchone()
        return float(row[0])

    def class_energy(self, *, since_unix_s: float = 0.0) -> list[ClassEnergy]:
        """Per (pool, class), over the intervals starting at or after since_unix_s: each pool interval's
        energy split over the pool's classes in proportion to their output tokens in that interval (by
        requests when no tokens were counted). A pool interval with energy but no traffic stays with the
        pool under class_name "". Sorted by pool, then class."""
        with self._read() as conn:
            rows = conn.execute(
                """
WITH e AS (
    SELECT pool, interval_start_unix_s AS t, SUM(energy_j) AS j
    FROM energy WHERE interval_start_unix_s >= :since GROUP BY pool, t
), c AS (
    SELECT pool, interval_start_unix_s AS t, class_name, SUM(requests_count) AS n, SUM(output_tokens) AS tok
    FROM traffic WHERE interval_start_unix_s >= :since GROUP BY pool, t, class_name
), tot AS (
    SELECT pool, t, SUM(n) AS n, SUM(tok) AS tok FROM c GROUP BY pool, t
)
SELECT c.pool, c.class_name,
       TOTAL(COALESCE(e.j, 0.0) * CASE WHEN tot.tok > 0 THEN CAST(c.tok AS REAL) / tot.tok
                                       WHEN tot.n > 0 THEN CAST(c.n AS REAL) / tot.n
                                       ELSE 0.0 END),
       SUM(c.n), SUM(c.tok)
FROM c JOIN tot ON tot.pool = c.pool AND tot.t = c.t
LEFT JOIN e ON e.pool = c.pool AND e.t = c.t
GROUP BY c.pool, c.class_name
UNION ALL
SELECT e.pool, '', TOTAL(e.j), 0, 0
FROM e LEFT JOIN tot ON tot.pool = e.pool AND tot.t = e.t
WHERE tot.pool IS NULL OR (tot.n = 0 AND tot.tok = 0)
GROUP BY e.pool
ORDER BY 1, 2
""",
                {"since": since_unix_s},
            ).fetchall()
        out: list[ClassEnergy] = []
        for pool, class_name, energy_j, n, tok in rows:
            j, n, tok = float(energy_j), int(n), int(tok)
            out.append(
                ClassEnergy(
                    str(pool), str(class_name), j, n, tok, j / n if n else None, j / tok if tok else None
                )
            )
        return out

    # -------------------------------------------------------------------- size

    def prune(self, *, keep_decisions: int, keep_commands: int, keep_audit: int) -> None:
        """Delete the oldest decisions, finished commands and audit rows beyond the newest `keep_*` of
        each; pending commands are never deleted (nor counted). Ids are never reused (AUTOINCREMENT), so
        paging with after_id stays correct across a prune."""
        _check_non_negative("keep_decisions", keep_decisions)
        _check_non_negative("keep_commands", keep_commands)
        _check_non_negative("keep_audit", keep_audit)
        with self._write() as conn:
            conn.execute(
                "DELETE FROM decisions WHERE id <= "
                "(SELECT id FROM decisions ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep_decisions,),
            )
            conn.execute(
                "DELETE FROM commands WHERE status != 'pending' AND id <= (SELECT id FROM commands "
                "WHERE status != 'pending' ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep_commands,),
            )
            conn.execute(
                "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep_audit,),
            )
