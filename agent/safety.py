"""Safe state of the node's GPUs (GEOPM style): defaults snapshotted before the first write, every applied
setting persisted before and after it reaches the hardware, and restoration on demand, on lease expiry,
on shutdown, and at start-up after a crash.

Flow: `agent.node.NodeAgent` validates a request (agent.control), then calls `GpuSafety.apply` /
`restore`, and persists the whole `AgentStateDoc` (defaults, applied settings, generations, lease)
through `StateStore` after each call. `GpuSafety` persists on its own before the first write that makes
a GPU modified, so a kill -9 at any point leaves a file naming every GPU that may differ from its
defaults; the next start (or `dynamollm-agent restore-defaults` from systemd's ExecStopPost) puts them
back (`recover`).
The document and its JSON encoding are pure; `StateStore` does the atomic file I/O
(tmp + fsync + rename + directory fsync).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.api.errors import DataFileError, DynamoError
from agent.api.generations import Outcome, ScopeRecord
from agent.control import GpuPlan
from agent.gpu.worker import GpuWorkers

log = structlog.get_logger("agent.safety")

STATE_FORMAT = "dynamollm.agent-state/v1"


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
class AgentStateDoc:
    """Everything the agent must remember across a restart."""

    defaults: Mapping[int, GpuDefault] = field(default_factory=dict)
    applied: Mapping[int, GpuApplied] = field(default_factory=dict)  # modified GPUs only
    gpu_scope: ScopeRecord | None = None
    engine_scopes: Mapping[str, ScopeRecord] = field(default_factory=dict)
    lease_holder: str = ""
    lease_generation: int = 0
    lease_expires_unix_ns: int = 0  # 0: not active


# ------------------------------------------------------------------------------------ JSON (pure)


def _encode_record(record: ScopeRecord) -> dict[str, Any]:
    assert record.outcome is not None  # only finished calls are persisted
    out = record.outcome
    return {
        "generation": record.generation,
        "fingerprint": record.fingerprint,
        "reply": base64.b64encode(out.reply).decode() if out.reply is not None else None,
        "code": out.code,
        "message": out.message,
    }


def _decode_record(doc: Mapping[str, Any]) -> ScopeRecord:
    reply = doc["reply"]
    return ScopeRecord(
        generation=int(doc["generation"]),
        fingerprint=str(doc["fingerprint"]),
        outcome=Outcome(
            reply=base64.b64decode(reply) if reply is not None else None,
            code=str(doc["code"]),
            message=str(doc["message"]),
        ),
    )


def encode_state(state: AgentStateDoc) -> str:
    doc = {
        "format": STATE_FORMAT,
        "defaults": {
            str(i): {"uuid": d.uuid, "power_limit_w": d.power_limit_w} for i, d in state.defaults.items()
        },
        "applied": {
            str(i): {
                "sm_clock_lock": list(a.sm_clock_lock) if a.sm_clock_lock is not None else None,
                "power_limit_w": a.power_limit_w,
            }
            for i, a in state.applied.items()
        },
        "gpu_scope": _encode_record(state.gpu_scope)
        if state.gpu_scope is not None and state.gpu_scope.outcome
        else None,
        "engine_scopes": {
            k: _encode_record(r) for k, r in state.engine_scopes.items() if r.outcome is not None
        },
        "lease": {
            "holder": state.lease_holder,
            "generation": state.lease_generation,
            "expires_unix_ns": state.lease_expires_unix_ns,
        },
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def decode_state(text: str, *, source: str) -> AgentStateDoc:
    """Inverse of `encode_state`; DataFileError naming the file and the field on anything malformed."""
    where = "document"
    try:
        doc = json.loads(text)
        where = "format"
        if doc.get("format") != STATE_FORMAT:
            raise DataFileError(
                source, None, "format", f"expected {STATE_FORMAT!r}, got {doc.get('format')!r}"
            )
        where = "defaults"
        defaults = {
            int(i): GpuDefault(str(d["uuid"]), float(d["power_limit_w"])) for i, d in doc["defaults"].items()
        }
        where = "applied"
        applied = {}
        for i, a in doc["applied"].items():
            lock = a["sm_clock_lock"]
            power = a["power_limit_w"]
            applied[int(i)] = GpuApplied(
                (int(lock[0]), int(lock[1])) if lock is not None else None,
                float(power) if power is not None else None,
            )
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
        )
    except DataFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise DataFileError(source, None, where, f"malformed ({exc!r})") from None


class StateStore:
    """The state file in the runtime directory, replaced atomically on every save."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentStateDoc:
        """The persisted state; an empty one if there is no file (first start)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return AgentStateDoc()
        return decode_state(text, source=str(self.path))

    def save(self, state: AgentStateDoc) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(encode_state(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ------------------------------------------------------------------------------------ hardware


class GpuSafety:
    """The GPU settings the agent is responsible for, and the only code that writes them.

    `persist` saves the agent's whole state document (the service builds it from this object, the lease
    and the generation records); it is awaited before the first write that makes a GPU modified.
    Calls must be serialised by the caller (the service's GPU-scope lock).
    """

    def __init__(
        self,
        workers: GpuWorkers,
        persist: Callable[[], Awaitable[None]],
        *,
        defaults: Mapping[int, GpuDefault] | None = None,
        applied: Mapping[int, GpuApplied] | None = None,
    ) -> None:
        self._workers = workers
        self._persist = persist
        self.defaults: dict[int, GpuDefault] = dict(defaults or {})
        self.applied: dict[int, GpuApplied] = {i: a for i, a in (applied or {}).items() if a.modified}

    def setting(self, index: int) -> GpuApplied:
        return self.applied.get(index, UNMODIFIED)

    def modified_indices(self) -> tuple[int, ...]:
        return tuple(sorted(self.applied))

    def default_power_limit_w(self, index: int) -> float:
        """The snapshot, or the driver default before any write (the limit a reset would give)."""
        found = self.defaults.get(index)
        return found.power_limit_w if found is not None else self._workers.infos[index].default_power_limit_w

    async def _snapshot(self) -> None:
        """Read every GPU's power limit before the first write (not only the GPUs about to change: a
        later call may change the others, and by then a crash must still know their originals)."""
        if self.defaults:
            return
        limits = await asyncio.gather(*(self._workers.power_limit_w(i) for i in range(self._workers.count)))
        self.defaults = {
            info.index: GpuDefault(info.uuid, limit)
            for info, limit in zip(self._workers.infos, limits, strict=True)
        }
        log.info("gpu_defaults_snapshotted", power_limits_w=[d.power_limit_w for d in self.defaults.values()])

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

    async def apply(self, plans: Sequence[GpuPlan]) -> None:
        """Bring the planned GPUs to their settings; on any failure undo the writes already made (NVML
        setters are all-or-nothing, so the failed one needs no undo) and re-raise: nothing half-applied."""
        await self._snapshot()
        before = {p.index: self.setting(p.index) for p in plans}
        targets = {p.index: self._target(p) for p in plans}
        newly_modified = [i for i in targets if not before[i].modified]
        self.applied.update(targets)  # a crash from here on restores these GPUs
        if newly_modified:
            await self._persist()
        done: list[tuple[int, str]] = []

        async def bring(index: int) -> None:
            # GPUs in parallel (each has its own serial worker), the knobs of one GPU in order
            for knob in self._knobs(before[index], targets[index]):
                await self._write(index, knob, targets[index])
                done.append((index, knob))

        results = await asyncio.gather(*(bring(p.index) for p in plans), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self._roll_back(done, before, failure)
            raise failure

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
        for index, old in before.items():
            if index in failed:
                continue  # unknown state: keep it marked modified so a restore still resets it
            if old.modified:
                self.applied[index] = old
            else:
                self.applied.pop(index, None)
        log.warning(
            "gpu_config_rolled_back",
            undone=[f"{i}:{k}" for i, k in done],
            error=str(cause),
            failed=sorted(failed),
        )
        await self._persist()

    async def restore(self, indices: Sequence[int]) -> list[int]:
        """Reset the modified GPUs among `indices` to their defaults; tries them all and re-raises the
        first error after. Returns the indices that were reset."""
        restored: list[int] = []
        first_error: BaseException | None = None
        for index in indices:
            old = self.applied.get(index)
            if old is None:
                continue
            try:
                await self._workers.reset_locked_clocks(index)
                if old.power_limit_w is not None:
                    await self._workers.set_power_limit(index, self.default_power_limit_w(index))
            except Exception as exc:
                log.exception("gpu_restore_failed", gpu_index=index)
                first_error = first_error or exc
                continue
            del self.applied[index]
            restored.append(index)
        if first_error is not None:
            raise first_error
        return restored

    async def recover(self, state: AgentStateDoc) -> list[int]:
        """Start-up: restore the GPUs a previous run left modified (it crashed or was killed) from the
        defaults it snapshotted, matching GPUs by UUID in case indices changed. Returns the indices."""
        by_uuid = {info.uuid: info.index for info in self._workers.infos}
        self.defaults = {}
        self.applied = {}
        for old_index, applied in state.applied.items():
            default = state.defaults.get(old_index)
            index = by_uuid.get(default.uuid) if default is not None else old_index
            if index is None or not 0 <= index < self._workers.count:
                log.error(
                    "gpu_missing_after_crash", gpu_index=old_index, uuid=default.uuid if default else None
                )
                continue
            if default is not None:
                self.defaults[index] = default
            self.applied[index] = applied
        restored = await self.restore(sorted(self.applied))
        self.defaults = {}  # nothing is modified: the next first write snapshots afresh
        if restored:
            log.warning("gpu_defaults_restored_after_crash", gpu_indices=restored)
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
