"""The agent's audit log: one JSON line per control call, accepted, refused or cancelled.

Where it sits: `agent.app` builds one `AuditLog` from the settings (`audit_log`, `audit.max_bytes`,
`audit.backups`); the NodeControl servicer (`agent.service`) calls `record` once per call, after the
reply or the error is known — including calls refused before anything ran (no credentials, no scope,
an undecodable or invalid request) and calls whose caller went away (`CANCELLED`). The operation of a
cancelled call goes on without its caller (`agent.scopes`); when it ends, a second line with
`"detached": true` records its outcome.

A line (docs/agent.md, *Audit log*, documents every field; every line has every key):

    {"auth": "token", "detached": false, "duration_s": 0.0031, "error": "", "generation": 42,
     "peer": "ipv4:10.0.0.7:53422", "replayed": false,
     "request": {"dry_run": false, "gpus": [{"gpu_index": 0, ...}], "lease_s": 120.0},
     "result": "OK", "rpc": "ApplyGpuConfig", "scope": "control", "ts_unix_ns": 1764662400000000000,
     "who": "controller"}

Values a caller sent are bounded before they are written: strings cut to 200 characters
(`agent.api.errors.echo` rules), repeated fields and maps to their first `MAX_ITEMS` entries (the rest
counted in `<field>_omitted_count`), non-finite numbers written as the strings "nan", "inf", "-inf" so
that every line is strict JSON. The file is rotated at `max_bytes` (`audit.jsonl` -> `audit.jsonl.1` ->
... -> `.N`, the oldest dropped), so the log never holds more than (backups + 1) x max_bytes. A write
that fails is logged (`audit_log_write_failed`) and never fails the call.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from google.protobuf.message import Message

from agent.api.clock import Clock
from agent.api.errors import ECHO_LIMIT_CHARS, clip

log = structlog.get_logger("agent.audit")

MAX_ITEMS: Final = 16  # entries of a repeated field or map written per call
FILE_MODE: Final = 0o640


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _scalar(field: Any, value: Any) -> Any:  # a FieldDescriptor (python or upb)
    if field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return clip(value, ECHO_LIMIT_CHARS)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def request_summary(message: Message, *, skip: tuple[str, ...] = ("generation",)) -> dict[str, Any]:
    """Every field of a request as bounded JSON values (see module docstring)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            keys = sorted(value)
            out[field.name] = {
                clip(str(k), ECHO_LIMIT_CHARS): clip(str(value[k]), ECHO_LIMIT_CHARS)
                for k in keys[:MAX_ITEMS]
            }
            if len(keys) > MAX_ITEMS:
                out[f"{field.name}_omitted_count"] = len(keys) - MAX_ITEMS
        elif field.is_repeated:
            items = list(value[:MAX_ITEMS])
            if field.message_type is not None:
                out[field.name] = [request_summary(v, skip=()) for v in items]
            else:
                out[field.name] = [_scalar(field, v) for v in items]
            if len(value) > MAX_ITEMS:
                out[f"{field.name}_omitted_count"] = len(value) - MAX_ITEMS
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        elif field.message_type is not None:
            out[field.name] = request_summary(value, skip=())
        else:
            out[field.name] = _scalar(field, value)
    return out


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One control call: who asked what, and what came of it."""

    rpc: str
    who: str
    auth: str  # how `who` was established: token, certificate, loopback or none
    peer: str
    scope: str  # the scope the call needed ("" when refused before it was known)
    generation: int | None  # None: the request could not be decoded
    request: Mapping[str, Any]
    result: str  # "OK" or the gRPC status code name (CANCELLED: the caller went away)
    duration_s: float
    replayed: bool = False
    error: str = ""
    detached: bool = False  # the outcome of an operation whose caller had gone away


class AuditLog:
    """Appends `AuditEntry` lines to `path`, rotating at `max_bytes` and keeping `backups` old files."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int, clock: Clock) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._clock = clock
        self.write_failures_count = 0

    def record(self, entry: AuditEntry) -> None:
        doc: dict[str, Any] = {
            "ts_unix_ns": self._clock.wall_ns(),
            "rpc": entry.rpc,
            "who": clip(entry.who, ECHO_LIMIT_CHARS),
            "auth": entry.auth,
            "peer": clip(entry.peer, ECHO_LIMIT_CHARS),
            "scope": entry.scope,
            "generation": entry.generation,
            "request": dict(entry.request),
            "result": entry.result,
            "replayed": entry.replayed,
            "detached": entry.detached,
            "error": clip(entry.error, 2 * ECHO_LIMIT_CHARS + 200),
            "duration_s": _number(round(entry.duration_s, 6)),
        }
        log.info(
            "control_call",
            rpc=entry.rpc,
            who=doc["who"],
            generation=entry.generation,
            result=entry.result,
            duration_s=doc["duration_s"],
            **({"detached": True} if entry.detached else {}),
            **({"error": doc["error"]} if entry.error else {}),
        )
        try:
            text = json.dumps(doc, sort_keys=True, ensure_ascii=True, allow_nan=False, default=str)
        except ValueError:  # a non-finite number slipped through: never lose the line for it
            doc["request"] = {"unencodable": True}
            text = json.dumps(doc, sort_keys=True, ensure_ascii=True, default=str)
        line = (text + "\n").encode()
        try:
            self._write(line)
        except OSError as exc:
            self.write_failures_count += 1
            log.error("audit_log_write_failed", path=str(self.path), error=str(exc))

    def files(self) -> list[Path]:
        """The current file and the rotated ones that exist, newest first."""
        candidates = [self.path, *(self._backup(i) for i in range(1, self.backups + 1))]
        return [p for p in candidates if p.exists()]

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _write(self, line: bytes) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if size and size + len(line) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        self._backup(self.backups).unlink(missing_ok=True)
        for i in range(self.backups - 1, 0, -1):
            if self._backup(i).exists():
                self._backup(i).replace(self._backup(i + 1))
        self.path.replace(self._backup(1))
