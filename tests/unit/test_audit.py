"""agent.audit: bounded, strict-JSON request summaries and the size-capped, rotated audit log; the echo
helpers of agent.api.errors; the scope rule of agent.service.control_scope."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent.api.auth import ALL_SCOPES, Caller
from agent.api.errors import ECHO_LIMIT_CHARS, InvalidArgumentError, clip, echo
from agent.api.v1 import control_pb2
from agent.audit import MAX_ITEMS, AuditEntry, AuditLog, request_summary
from agent.lease import LeaseView
from agent.service import control_scope


class FixedClock:
    def monotonic_s(self) -> float:
        return 1.0

    def wall_ns(self) -> int:
        return 1_764_662_400_000_000_000


def _strict(line: str) -> dict[str, object]:
    def refuse(name: str) -> None:
        raise ValueError(name)

    doc: dict[str, object] = json.loads(line, parse_constant=refuse)
    return doc


def entry(i: int, **extra: object) -> AuditEntry:
    fields: dict[str, object] = dict(
        rpc="ApplyGpuConfig", who="controller", auth="token", peer="ipv4:10.0.0.7:1", scope="control",
        generation=i, request={"lease_s": 1.0}, result="OK", duration_s=0.001,
    )  # fmt: skip
    fields.update(extra)
    return AuditEntry(**fields)  # type: ignore[arg-type]


def test_request_summary_is_bounded_and_strict_json() -> None:
    request = control_pb2.ReconfigureEngineRequest(
        generation=7,
        engine_id="e" * 100_000,
        model="m",
        gpu_indices=list(range(5000)),
        tp_degree=3,
        engine_options={f"k{i}": "v" * 1000 for i in range(40)},
        drain_timeout_s=math.nan,
        ready_timeout_s=-math.inf,
    )
    summary = request_summary(request)
    assert "generation" not in summary  # its own field in the line
    assert isinstance(summary["engine_id"], str) and len(summary["engine_id"]) < ECHO_LIMIT_CHARS + 40
    assert (
        summary["gpu_indices"] == list(range(MAX_ITEMS))
        and summary["gpu_indices_omitted_count"] == 5000 - MAX_ITEMS
    )
    assert (
        len(summary["engine_options"]) == MAX_ITEMS
        and summary["engine_options_omitted_count"] == 40 - MAX_ITEMS
    )
    assert (summary["drain_timeout_s"], summary["ready_timeout_s"]) == ("nan", "-inf")
    line = json.dumps(summary, allow_nan=False)
    assert len(line) < 8000
    apply = control_pb2.ApplyGpuConfigRequest(
        generation=1, lease_s=30, gpus=[control_pb2.GpuSetting(gpu_index=0, min_clock_mhz=1, max_clock_mhz=2)]
    )
    assert request_summary(apply) == {
        "lease_s": 30.0,
        "gpus": [{"gpu_index": 0, "min_clock_mhz": 1, "max_clock_mhz": 2, "power_limit_w": None}],
        "dry_run": False,
    }


def test_every_line_has_every_key(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "audit.jsonl", max_bytes=1 << 20, backups=1, clock=FixedClock())
    log.record(entry(1))
    log.record(entry(2, result="CANCELLED", error="gone", duration_s=math.inf))
    log.record(entry(2, result="OK", detached=True, who="x" * 10_000))
    lines = [_strict(line) for line in (tmp_path / "a" / "audit.jsonl").read_text().splitlines()]
    keys = {"ts_unix_ns", "rpc", "who", "auth", "peer", "scope", "generation", "request", "result",
            "replayed", "detached", "error", "duration_s"}  # fmt: skip
    assert all(set(line) == keys for line in lines)
    assert [(line["result"], line["detached"]) for line in lines] == [
        ("OK", False),
        ("CANCELLED", False),
        ("OK", True),
    ]
    assert lines[0]["ts_unix_ns"] == FixedClock().wall_ns() and lines[1]["error"] == "gone"
    assert len(str(lines[2]["who"])) < ECHO_LIMIT_CHARS + 40
    assert ((tmp_path / "a" / "audit.jsonl").stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_rotation_caps_the_size(tmp_path: Path, backups: int) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=4096, backups=backups, clock=FixedClock())
    for i in range(1, 401):
        log.record(entry(i))
    files = log.files()
    assert files[0] == path and len(files) == backups + 1
    assert not path.with_name(f"audit.jsonl.{backups + 1}").exists()
    assert all(p.stat().st_size <= 4096 for p in files)
    # the newest lines are in the current file, older ones in .1, .2, ... in order
    generations = [
        [_strict(line)["generation"] for line in p.read_text().splitlines()] for p in reversed(files)
    ]
    flat = [g for chunk in generations for g in chunk]
    assert flat == sorted(flat) and flat[-1] == 400


def test_a_failed_write_is_logged_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.jsonl", max_bytes=4096, backups=1, clock=FixedClock())
    log.record(entry(1))
    assert log.write_failures_count == 1


def test_echo_cuts_long_values() -> None:
    assert echo("abc") == "'abc'"
    long = echo("e" * 100_000)
    assert long.endswith("... (100000 characters)") and len(long) < ECHO_LIMIT_CHARS + 40
    assert echo(b"\xff" * 1000).endswith("(1000 bytes)")
    assert clip("x" * 10, 4) == "xxxx... (10 characters)"
    err = InvalidArgumentError("engine_options['" + "k" * 5000 + "']", "v" * 5000, "a, b")
    assert len(str(err)) < 3 * ECHO_LIMIT_CHARS + 100 and str(err).endswith("; allowed: a, b")


def _lease(holder: str, active: bool = True) -> LeaseView:
    return LeaseView(active=active, holder=holder, expires_unix_ns=0, remaining_s=10.0, generation=1)


@pytest.mark.parametrize(
    ("rpc", "request_", "holder", "active", "scope"),
    [
        ("ApplyGpuConfig", control_pb2.ApplyGpuConfigRequest(), "me", True, "control"),
        ("ApplyGpuConfig", control_pb2.ApplyGpuConfigRequest(), "other", False, "control"),
        ("ApplyGpuConfig", control_pb2.ApplyGpuConfigRequest(), "other", True, "admin"),
        ("ApplyGpuConfig", control_pb2.ApplyGpuConfigRequest(dry_run=True), "other", True, "control"),
        ("RenewLease", control_pb2.RenewLeaseRequest(), "me", True, "control"),
        ("RenewLease", control_pb2.RenewLeaseRequest(), "other", True, "admin"),
        ("RestoreDefaults", control_pb2.RestoreDefaultsRequest(gpu_indices=[1]), "me", True, "control"),
        ("RestoreDefaults", control_pb2.RestoreDefaultsRequest(gpu_indices=[1]), "other", True, "admin"),
        ("RestoreDefaults", control_pb2.RestoreDefaultsRequest(), "me", True, "admin"),
        ("RestoreDefaults", control_pb2.RestoreDefaultsRequest(gpu_indices=[3, 2, 1, 0]), "", False, "admin"),
        ("ReconfigureEngine", control_pb2.ReconfigureEngineRequest(), "", False, "admin"),
        ("StopEngine", control_pb2.StopEngineRequest(), "me", True, "admin"),
    ],
)
def test_control_scope(
    rpc: str, request_: control_pb2.ApplyGpuConfigRequest, holder: str, active: bool, scope: str
) -> None:
    caller = Caller("me", ALL_SCOPES, "token", "ipv4:127.0.0.1:1")
    needed, why = control_scope(rpc, request_, caller, _lease(holder, active), gpu_count=4)
    assert needed == scope
    assert (why != "") == (scope == "admin")
