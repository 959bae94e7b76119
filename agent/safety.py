"""Safe state of the node's GPUs (GEOPM style): a defaults snapshot taken once per GPU, write-ahead
intents, and restoration on demand, on lease expiry, on shutdown, and at start-up after a crash.

Flow: `agent.node.NodeAgent` validates a request (agent.control) and, inside the operation that
`agent.scopes` runs for it (shielded from the caller), arms the lease and calls `GpuSafety.apply` /
`restore`; `GpuSafety` saves the whole `AgentStateDoc` (through the `persist` callback, which ends in
`StateStore.save`) BEFORE its first hardware write, and the scope saves it again with the outcome. The
next start (or `dynamollm-agent restore-defaults` from systemd's ExecStopPost) puts back what a dead
agent left (`recover`). The document and its JSON encoding are pure; `StateStore` does the atomic file
I/O (tmp + fsync + rename + directory fsync), one save at a time.

Invariants:
1. Defaults, once per GPU. Before the agent's first write to a GPU, the GPU's power limit (clocks are
   unlocked by default) is read and kept under its UUID (`AgentStateDoc.defaults`), on disk before the
   write. It is never read again from a GPU the agent has touched — not after a restore, not after a
   restart — so a setting of the agent's own can never become "the default". It is valid until the
   driver reloads: the agent tells by the host's boot id (/proc/sys/kernel/random/boot_id; the GPU
   backend offers no identity of a driver load, so reloading the driver without a reboot is not seen).
   The GPU part of a state file of an earlier boot (snapshot, settings, pending writes) is discarded:
   the driver reset every GPU. Restoring writes exactly the snapshot, both knobs. To take a new snapshot
   (after changing a limit by hand, or reloading the driver), stop the agent (it restores) and delete
   the `defaults` entries in state.json (deleting the file also forgets the generations).
2. Write-ahead. Before the first hardware write of a control call, the file names every GPU the call
   may modify (`applied`, by UUID, already holding the targets), what the call will write and under
   which generation (`pending`), and the lease the call armed. So at any kill -9 the file covers every
   GPU that may differ from its snapshot.
3. Recovery restores; it never completes an interrupted call. Every GPU in `applied` or in a pending
   write gets its clock lock reset and its power limit set to the snapshot (whatever the file says was
   written), and the interrupted call's generation is recorded as ABORTED ("interrupted"), so a retry
   of it answers that instead of acting again on a node whose state its caller has not seen.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from agent.api.errors import DataFileError, DynamoError
from agent.api.files import replace_file
from agent.api.generations import Outcome, ScopeRecord
from agent.control import GpuPlan
from agent.gpu.worker import GpuWorkers

log = structlog.get_logger("agent.safety")

STATE_FORMAT = "dynamollm.agent-state/v2"
STATE_FORMAT_V1 = "dynamollm.agent-state/v1"  # read (defaults and applied keyed by index), never written
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
GPU_SCOPE_KEY = "gpu"  # key of the GPU scope in `AgentStateDoc.pending`; engines: ENGINE_SCOPE_PREFIX + id
ENGINE_SCOPE_PREFIX = "engine:"


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """The host's boot id (changes at every boot, hence at every driver load by boot); "" if unknown."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class GpuDefault:
    """A GPU's settings before the agent's first write: power limit (clocks are unlocked by default)."""

    uuid: str
    power_limit_w: float


@dataclass(frozen=True, slots=True)
class GpuApplied:
    """What the agent set on a GPU; None fields are at their default."""

    sm_clock_lock: tuple[int, int] | None
    power_limit_w: float | None

    @property
    def modified(self) -> bool:
        return self.sm_clock_lock is not None or self.power_limit_w is not None


UNMODIFIED = GpuApplied(None, None)


@dataclass(frozen=True, slots=True)
class PendingCall:
    """The write-ahead record (journal entry) of a control call in progress: on disk before the call's
    first hardware write or engine change, replaced by the recorded outcome when the call ends."""

    rpc: str
    generation: int
    fingerprint: str
    started_unix_ns: int
    gpu_writes: Mapping[str, GpuApplied] = field(default_factory=dict)  # by GPU UUID: what it will write
    engine: str = ""  # engine scopes: the configuration it brings the engine to, for a reader

    def interrupted(self) -> Outcome:
        """The outcome recorded for this call when a restart finds it still pending."""
        what = (
            "every GPU it may have changed was restored to its defaults"
            if self.gpu_writes or not self.engine
            else "the engine is as GetInventory shows it"
        )
        return Outcome(
            None,
            "ABORTED",
            f"generation {self.generation} ({self.rpc}) was interrupted: the agent stopped before the call "
            f"finished (crash or kill); at start-up {what}; re-read GetInventory and use a new generation",
        )


@dataclass(frozen=True, slots=True)
class AgentStateDoc:
    """Everything the agent must remember across a restart."""

    defaults: Mapping[str, GpuDefault] = field(default_factory=dict)  # by GPU UUID, for `boot_id`
    applied: Mapping[str, GpuApplied] = field(default_factory=dict)  # by GPU UUID: may differ from defaults
    gpu_scope: ScopeRecord | None = None
    engine_scopes: Mapping[str, ScopeRecord] = field(default_factory=dict)
    lease_holder: str = ""
    lease_generation: int = 0
    lease_expires_unix_ns: int = 0  # 0: not active
    pending: Mapping[str, PendingCall] = field(default_factory=dict)  # GPU_SCOPE_KEY, "engine:<id>"
    boot_id: str = ""  # the boot the snapshot and the GPU settings belong to ("" unknown: this one)


def pending_gpu_writes(state: AgentStateDoc) -> dict[str, GpuApplied]:
    """Every GPU (by UUID) a pending call was about to write, with what it would write."""
    return {uuid: w for call in state.pending.values() for uuid, w in call.gpu_writes.items()}


def state_for_boot(state: AgentStateDoc, boot_id: str) -> AgentStateDoc:
    """`state` if it belongs to boot `boot_id`; otherwise without its GPU part (snapshot, settings,
    pending writes), which the driver's reload made void. Unknown boot ids count as this boot."""
    if not state.boot_id or not boot_id or state.boot_id == boot_id:
        return replace(state, boot_id=boot_id or state.boot_id)
    log.warning(
        "gpu_state_of_earlier_boot_discarded",
        state_boot_id=state.boot_id,
        boot_id=boot_id,
        gpu_uuids=sorted({*state.applied, *pending_gpu_writes(state)}),
    )
    return replace(
        state,
        defaults={},
        applied={},
        pending={k: replace(p, gpu_writes={}) for k, p in state.pending.items()},
        lease_expires_unix_ns=0,
        boot_id=boot_id,
    )


def settle_interrupted(state: AgentStateDoc) -> AgentStateDoc:
    """The pending calls of a dead agent, recorded as interrupted (ABORTED) under their generations."""
    gpu_scope = state.gpu_scope
    engine_scopes = dict(state.engine_scopes)
    for key, call in state.pending.items():
        record = ScopeRecord(call.generation, call.fingerprint, call.interrupted())
        if key == GPU_SCOPE_KEY:
            gpu_scope = record
        elif key.startswith(ENGINE_SCOPE_PREFIX):
            engine_scopes[key[len(ENGINE_SCOPE_PREFIX) :]] = record
    return replace(state, gpu_scope=gpu_scope, engine_scopes=engine_scopes, pending={})


def after_recovery(
    state: AgentStateDoc, *, boot_id: str, absent: Mapping[str, GpuApplied] | None = None
) -> AgentStateDoc:
    """What to save once `GpuSafety.recover(state)` has restored every GPU it found: nothing modified
    but the `absent` GPUs (modified ones not enumerated now, restored when they are back), no lease,
    interrupted calls recorded, the snapshot kept (for this boot)."""
    settled = settle_interrupted(state_for_boot(state, boot_id))
    return replace(settled, applied=dict(absent or {}), lease_expires_unix_ns=0)


# ------------------------------------------------------------------------------------ JSON (pure)


def _encode_record(record: ScopeRecord) -> dict[str, Any]:
    assert record.outcome is not None  # only finished calls are persisted
    out = record.outcome
    return {
        "generation": record.generation,
        "fingerprint": record.fingerprint,
        "reply": base64.b64encode(out.reply).decode() if out.reply is not None else None,
        "code": out.code if out.reply is None else "OK",
        "message": out.message,
    }


def _decode_record(doc: Mapping[str, Any]) -> ScopeRecord:
    reply = doc["reply"]
    return ScopeRecord(
        generation=int(doc["generation"]),
        fingerprint=str(doc["fingerprint"]),
        outcome=Outcome(
            reply=base64.b64decode(reply) if reply is not None else None,
            code=str(doc["code"]) if reply is None else "",
            message=str(doc["message"]),
        ),
    )


def _encode_applied(a: GpuApplied) -> dict[str, Any]:
    return {
        "sm_clock_lock": list(a.sm_clock_lock) if a.sm_clock_lock is not None else None,
        "power_limit_w": a.power_limit_w,
    }


def _decode_applied(a: Mapping[str, Any]) -> GpuApplied:
    lock = a["sm_clock_lock"]
    power = a["power_limit_w"]
    return GpuApplied(
        (int(lock[0]), int(lock[1])) if lock is not None else None,
        float(power) if power is not None else None,
    )


def encode_state(state: AgentStateDoc) -> str:
    doc = {
        "format": STATE_FORMAT,
        "boot_id": state.boot_id,
        "defaults": {u: {"power_limit_w": d.power_limit_w} for u, d in sorted(state.defaults.items())},
        "applied": {u: _encode_applied(a) for u, a in sorted(state.applied.items())},
        "pending": {
            key: {
                "rpc": p.rpc,
                "generation": p.generation,
                "fingerprint": p.fingerprint,
                "started_unix_ns": p.started_unix_ns,
                "gpu_writes": {u: _encode_applied(w) for u, w in sorted(p.gpu_writes.items())},
                "engine": p.engine,
            }
            for key, p in sorted(state.pending.items())
        },
        "gpu_scope": _encode_record(state.gpu_scope)
        if state.gpu_scope is not None and state.gpu_scope.outcome
        else None,
        "engine_scopes": {
            k: _encode_record(r) for k, r in sorted(state.engine_scopes.items()) if r.outcome is not None
        },
        "lease": {
            "holder": state.lease_holder,
            "generation": state.lease_generation,
            "expires_unix_ns": state.lease_expires_unix_ns,
        },
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _decode_gpu_part_v1(doc: Mapping[str, Any]) -> tuple[dict[str, GpuDefault], dict[str, GpuApplied]]:
    """v1 kept both by GPU index, the UUID inside the defaults (always snapshotted before any write)."""
    by_index = {
        int(i): GpuDefault(str(d["uuid"]), float(d["power_limit_w"])) for i, d in doc["defaults"].items()
    }
    applied = {
        by_index[int(i)].uuid: _decode_applied(a) for i, a in doc["applied"].items() if int(i) in by_index
    }
    return {d.uuid: d for d in by_index.values()}, applied


def decode_state(text: str, *, source: str) -> AgentStateDoc:
    """Inverse of `encode_state` (and reader of v1 files); DataFileError naming the file and the field on
    anything malformed."""
    where = "document"
    try:
        doc = json.loads(text)
        where = "format"
        version = doc.get("format")
        if version not in (STATE_FORMAT, STATE_FORMAT_V1):
            raise DataFileError(source, None, "format", f"expected {STATE_FORMAT!r}, got {version!r}")
        pending: dict[str, PendingCall] = {}
        boot_id = ""
        if version == STATE_FORMAT_V1:
            where = "defaults"
            defaults, applied = _decode_gpu_part_v1(doc)
        else:
            where = "boot_id"
            boot_id = str(doc["boot_id"])
            where = "defaults"
            defaults = {
                str(u): GpuDefault(str(u), float(d["power_limit_w"])) for u, d in doc["defaults"].items()
            }
            where = "applied"
            applied = {str(u): _decode_applied(a) for u, a in doc["applied"].items()}
            where = "pending"
            pending = {
                str(key): PendingCall(
                    rpc=str(p["rpc"]),
                    generation=int(p["generation"]),
                    fingerprint=str(p["fingerprint"]),
                    started_unix_ns=int(p["started_unix_ns"]),
                    gpu_writes={str(u): _decode_applied(w) for u, w in p["gpu_writes"].items()},
                    engine=str(p["engine"]),
                )
                for key, p in doc["pending"].items()
            }
        where = "gpu_scope"
        gpu_scope = _decode_record(doc["gpu_scope"]) if doc["gpu_scope"] is not None else None
        where = "engine_scopes"
        engine_scopes = {str(k): _decode_record(r) for k, r in doc["engine_scopes"].items()}
        where = "lease"
        lease = doc["lease"]
        return AgentStateDoc(
            defaults=defaults,
            applied=applied,
            gpu_scope=gpu_scope,
            engine_scopes=engine_scopes,
            lease_holder=str(lease["holder"]),
            lease_generation=int(lease["generation"]),
            lease_expires_unix_ns=int(lease["expires_unix_ns"]),
            pending=pending,
            boot_id=boot_id,
        )
    except DataFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise DataFileError(source, None, where, f"malformed ({exc!r})") from None


class StateStore:
    """The state file in the runtime directory, replaced atomically on every save.

    Saves are serialised by a lock held from writing the temporary file to the directory fsync: a save
    whose caller was cancelled keeps running in its thread, and two renames of one temporary name must
    never interleave. A save carrying a `version` older than the last one written is skipped, so a
    document built earlier can never overwrite a newer one, whatever order the threads run in.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._saved_version = -1

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")

    def load(self) -> AgentStateDoc:
        """The persisted state; an empty one if there is no file (first start). Temporary files a killed
        process left behind are removed."""
        for stale in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return AgentStateDoc()
        except (OSError, UnicodeDecodeError) as exc:
            # Unreadable or not text: the caller treats it like a corrupt file (reset every GPU).
            raise DataFileError(str(self.path), None, None, f"cannot read the agent state: {exc}") from None
        return decode_state(text, source=str(self.path))

    def save(self, state: AgentStateDoc, *, version: int | None = None) -> bool:
        """Write `state` (tmp + fsync + rename + directory fsync); False when skipped as older."""
        text = encode_state(state)
        with self._lock:
            if version is not None and version <= self._saved_version:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(self.path, text, tmp=self._tmp)
            if version is not None:
                self._saved_version = version
            return True


# ------------------------------------------------------------------------------------ hardware


class GpuSafety:
    """The GPU settings the agent is responsible for, and the only code that writes them.

    `persist` saves the agent's whole state document (the node agent builds it from this object, the
    lease and the generation records); it is awaited before the first hardware write of every `apply`
    (and of a `restore(write_ahead=True)`), with `writing` holding what is about to be written.
    Calls must be serialised by the caller (the GPU scope's lock). In memory GPUs are keyed by index,
    on disk by UUID (`applied_by_uuid`, `writing_by_uuid`).
    """

    def __init__(
        self,
        workers: GpuWorkers,
        persist: Callable[[], Awaitable[None]],
        *,
        defaults: Mapping[str, GpuDefault] | None = None,
        applied: Mapping[str, GpuApplied] | None = None,
        boot_id: str | None = None,
    ) -> None:
        self._workers = workers
        self._persist = persist
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.defaults: dict[str, GpuDefault] = dict(defaults or {})  # by UUID
        # Modified GPUs the node does not enumerate now (pulled, or failed to come up): kept on disk, so a
        # later start that finds them again still restores them.
        self.absent: dict[str, GpuApplied] = {}
        self.applied: dict[int, GpuApplied] = self._by_index(applied or {}, "gpu_missing_at_start")
        self.writing: dict[int, GpuApplied] = {}  # the write in progress (write-ahead), by index

    def _by_index(self, by_uuid: Mapping[str, GpuApplied], missing_event: str) -> dict[int, GpuApplied]:
        index_of = {info.uuid: info.index for info in self._workers.infos}
        out: dict[int, GpuApplied] = {}
        for uuid, setting in by_uuid.items():
            index = index_of.get(uuid)
            if index is None:
                log.error(missing_event, uuid=uuid, sm_clock_lock=setting.sm_clock_lock)
                self.absent[uuid] = setting
                continue
            out[index] = setting
        return out

    def _uuid(self, index: int) -> str:
        return self._workers.infos[index].uuid

    def applied_by_uuid(self) -> dict[str, GpuApplied]:
        """Every GPU that may differ from its snapshot, by UUID, absent ones included."""
        return {**self.absent, **{self._uuid(i): a for i, a in self.applied.items()}}

    def writing_by_uuid(self) -> dict[str, GpuApplied]:
        return {self._uuid(i): w for i, w in self.writing.items()}

    def setting(self, index: int) -> GpuApplied:
        return self.applied.get(index, UNMODIFIED)

    def modified_indices(self) -> tuple[int, ...]:
        return tuple(sorted(self.applied))

    def default_power_limit_w(self, index: int) -> float:
        """The snapshot, or the driver default before any write (the limit a reset would give)."""
        found = self.defaults.get(self._uuid(index))
        return found.power_limit_w if found is not None else self._workers.infos[index].default_power_limit_w

    async def _snapshot(self) -> None:
        """Read the power limit of every GPU that has no snapshot yet, before the first write (all GPUs,
        not only the ones about to change: a later call may change the others, and by then a crash must
        still know their originals). A GPU with a snapshot is never read for it again."""
        missing = [info for info in self._workers.infos if info.uuid not in self.defaults]
        if not missing:
            return
        limits = await asyncio.gather(*(self._workers.power_limit_w(info.index) for info in missing))
        for info, limit in zip(missing, limits, strict=True):
            self.defaults[info.uuid] = GpuDefault(info.uuid, limit)
        log.info(
            "gpu_defaults_snapshotted",
            gpu_uuids=[info.uuid for info in missing],
            power_limits_w=list(limits),
            boot_id=self.boot_id,
        )

    def _target(self, plan: GpuPlan) -> GpuApplied:
        power = plan.power_limit_w
        if power is not None and power == self.default_power_limit_w(plan.index):
            power = None
        return GpuApplied((plan.min_clock_mhz, plan.max_clock_mhz), power)

    async def _write(self, index: int, knob: str, setting: GpuApplied) -> None:
        """Set one knob ("clocks" or "power") of a GPU to its value in `setting` (None: the default)."""
        if knob == "clocks":
            if setting.sm_clock_lock is not None:
                await self._workers.set_locked_clocks(index, *setting.sm_clock_lock)
            else:
                await self._workers.reset_locked_clocks(index)
        else:
            limit = setting.power_limit_w
            await self._workers.set_power_limit(
                index, limit if limit is not None else self.default_power_limit_w(index)
            )

    @staticmethod
    def _knobs(old: GpuApplied, new: GpuApplied) -> list[str]:
        """The writes that move a GPU from `old` to `new`: clocks first (always re-locked: the wanted
        state is written even if the record says it is there), then the power limit if it changes."""
        knobs = ["clocks"] if new.sm_clock_lock is not None or old.sm_clock_lock is not None else []
        if new.power_limit_w != old.power_limit_w:
            knobs.append("power")
        return knobs

    def _put_back(self, before: Mapping[int, GpuApplied], skip: set[int] | None = None) -> None:
        for index, old in before.items():
            if skip and index in skip:
                continue  # unknown state: keep it marked modified so a restore still resets it
            if old.modified:
                self.applied[index] = old
            else:
                self.applied.pop(index, None)

    async def apply(self, plans: Sequence[GpuPlan]) -> None:
        """Bring the planned GPUs to their settings. Write-ahead: the snapshot, the targets (in `applied`
        and `writing`) and whatever else the document holds (the armed lease, the pending call) are saved
        before the first write. On a failure the writes already made are undone (NVML setters are
        all-or-nothing, so the failed one needs no undo) and the error re-raised: nothing half-applied."""
        await self._snapshot()
        before = {p.index: self.setting(p.index) for p in plans}
        targets = {p.index: self._target(p) for p in plans}
        self.writing = dict(targets)
        self.applied.update(targets)  # a crash from here on restores these GPUs
        try:
            await self._persist()
        except BaseException:
            self._put_back(before)  # nothing was written
            self.writing = {}
            raise
        done: list[tuple[int, str]] = []

        async def bring(index: int) -> None:
            # GPUs in parallel (each has its own serial worker), the knobs of one GPU in order
            for knob in self._knobs(before[index], targets[index]):
                await self._write(index, knob, targets[index])
                done.append((index, knob))

        try:
            results = await asyncio.gather(*(bring(p.index) for p in plans), return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                await self._roll_back(done, before, failure)
                raise failure
        finally:
            self.writing = {}

    async def _roll_back(
        self, done: Sequence[tuple[int, str]], before: Mapping[int, GpuApplied], cause: BaseException
    ) -> None:
        failed: set[int] = set()
        for index, knob in reversed(done):
            try:
                await self._write(index, knob, before[index])
            except Exception:
                failed.add(index)
                log.exception("gpu_rollback_failed", gpu_index=index, knob=knob)
        self._put_back(before, skip=failed)
        log.warning(
            "gpu_config_rolled_back",
            undone=[f"{i}:{k}" for i, k in done],
            error=str(cause),
            failed=sorted(failed),
        )
        await self._persist()

    async def restore(self, indices: Sequence[int], *, write_ahead: bool = False) -> list[int]:
        """Reset the modified GPUs among `indices` to exactly their snapshot: clock lock reset and power
        limit set, both whatever the record says. With `write_ahead`, what is about to be written is
        saved first (RestoreDefaults). Tries every GPU and re-raises the first error after. Returns the
        indices that were reset."""
        targets = [i for i in indices if i in self.applied]
        if not targets:
            return []
        if write_ahead:
            self.writing = dict.fromkeys(targets, UNMODIFIED)
            try:
                await self._persist()
            except BaseException:
                self.writing = {}
                raise
        restored: list[int] = []
        first_error: BaseException | None = None
        try:
            for index in targets:
                if self._uuid(index) not in self.defaults:
                    log.warning("gpu_restored_without_snapshot", gpu_index=index, uuid=self._uuid(index))
                try:
                    await self._workers.reset_locked_clocks(index)
                    await self._workers.set_power_limit(index, self.default_power_limit_w(index))
                except Exception as exc:
                    log.exception("gpu_restore_failed", gpu_index=index)
                    first_error = first_error or exc
                    continue
                del self.applied[index]
                restored.append(index)
        finally:
            self.writing = {}
        if first_error is not None:
            raise first_error
        return restored

    async def recover(self, state: AgentStateDoc) -> list[int]:
        """Start-up after a crash: restore every GPU the previous run may have left modified (`applied`
        and pending writes, matched by UUID: indices may have changed) to the snapshot it persisted.
        The snapshot is kept (it stays valid for this boot). Returns the restored indices."""
        state = state_for_boot(state, self.boot_id)
        self.defaults = dict(state.defaults)
        self.applied = self._by_index(
            {**pending_gpu_writes(state), **state.applied}, "gpu_missing_after_crash"
        )
        restored = await self.restore(sorted(self.applied))
        if restored:
            log.warning(
                "gpu_defaults_restored_after_crash",
                gpu_indices=restored,
                power_limits_w=[self.default_power_limit_w(i) for i in restored],
            )
        return restored

    async def reset_all_unknown(self) -> None:
        """The state file was unreadable: nothing is known, so reset every GPU to driver defaults."""
        first_error: BaseException | None = None
        for info in self._workers.infos:
            try:
                await self._workers.reset_locked_clocks(info.index)
                await self._workers.set_power_limit(info.index, info.default_power_limit_w)
            except DynamoError as exc:
                first_error = first_error or exc
        self.defaults = {}
        self.applied = {}
        if first_error is not None:
            raise first_error
        log.warning("gpu_defaults_restored_after_crash", gpu_indices=[i.index for i in self._workers.infos])
