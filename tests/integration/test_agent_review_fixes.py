"""Regressions found by a review of the agent's safety work, each reproduced before its fix: a GPU left
modified with no lease after a failed rollback, a modified GPU forgotten while absent, a state file or
tokens file that is not what it should be crashing start-up, TLS material blamed on `listen`, and the
audit of a replayed failure."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.api.config import load_tokens
from agent.api.errors import InvalidArgumentError, UnavailableError
from agent.api.v1 import control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import start_agent
from agent.safety import STATE_FORMAT, read_boot_id
from agent.settings import AgentSettings, merge_settings
from tests.integration.test_agent_service import gpu
from tests.integration.tls_pki import make_pki, openssl_available
from tests.unit.test_safety import FakeBackend


def _settings(tmp: Path, **extra: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(tmp / "run"),
        "max_lease_s": 60.0,
        "log_level": "warning",
        "gpu": {"backend": "simulated"},
        "simulated": {"gpus": 2},
        "auth": {"allow_unauthenticated_loopback": True},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return merge_settings(values, {}, {}, hostname="n")


async def test_a_failed_rollback_still_leaves_the_gpu_under_a_lease_that_restores_it(tmp_path: Path) -> None:
    backend = FakeBackend(2)
    running = await start_agent(_settings(tmp_path), backend=backend)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            control = control_pb2_grpc.NodeControlStub(channel)
            backend.fail[("set_locked_clocks", 1)] = UnavailableError("NVML gone on GPU 1")
            backend.fail[("reset_locked_clocks", 0)] = UnavailableError("NVML gone on GPU 0")  # the undo
            request = control_pb2.ApplyGpuConfigRequest(
                generation=1, lease_s=30.0, gpus=[gpu(0, 990, 990), gpu(1, 990, 990)]
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await control.ApplyGpuConfig(request)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            # GPU 0 could not be put back; a lease ending at once makes the watcher restore it.
            for _ in range(50):
                if backend.locks[0] is None:
                    break
                await asyncio.sleep(0.1)
            assert backend.locks[0] is None and backend.locks[1] is None
    finally:
        await running.stop()


async def test_a_modified_gpu_absent_at_start_stays_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    state = {
        "format": STATE_FORMAT,
        "boot_id": read_boot_id(),
        "defaults": {"GPU-0": {"power_limit_w": 650.0}, "GPU-7": {"power_limit_w": 700.0}},
        "applied": {"GPU-7": {"sm_clock_lock": [990, 990], "power_limit_w": 300.0}},
        "pending": {},
        "gpu_scope": None,
        "engine_scopes": {},
        "lease": {"holder": "c", "generation": 3, "expires_unix_ns": 0},
    }
    (run / "state.json").write_text(json.dumps(state))
    running = await start_agent(_settings(tmp_path), backend=FakeBackend(2))  # GPU-7 is not there now
    await running.stop()
    saved = json.loads((run / "state.json").read_text())
    assert saved["applied"]["GPU-7"]["sm_clock_lock"] == [990, 990]
    assert saved["defaults"]["GPU-7"]["power_limit_w"] == 700.0


async def test_a_state_file_that_is_not_text_resets_every_gpu(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_bytes(b'{"format": "\xff"}')
    backend = FakeBackend(2)
    backend.locks[0] = (990, 990)  # left by a crashed agent; the file cannot tell
    running = await start_agent(_settings(tmp_path), backend=backend)
    await running.stop()
    assert backend.locks[0] is None


@pytest.mark.parametrize(
    ("content", "named"),
    [(b"tokens = [1]\n", r"tokens\[0\]: got 1"), (b'tokens = "\xff"\n', "UTF-8")],
)
def test_a_malformed_tokens_file_is_one_clear_error(tmp_path: Path, content: bytes, named: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(InvalidArgumentError, match=named):
        load_tokens(path)


@pytest.mark.skipif(not openssl_available(), reason="the openssl command is not installed")
def test_bad_tls_material_is_named_by_its_own_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnotbase64\n-----END CERTIFICATE-----\n")
    cases = [
        ({"cert": str(pki.server.cert), "key": str(pki.client.key)}, "tls.cert"),  # key of another cert
        ({"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(bad)}, "tls.client_ca"),
        (
            {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_scopes": ["control"]},
            "tls.client_scopes",
        ),
    ]
    for tls, named in cases:
        with pytest.raises(InvalidArgumentError) as refused:
            _settings(tmp_path, tls=tls)
        assert refused.value.field == named


async def test_the_audit_of_a_replayed_failure_says_replayed(tmp_path: Path) -> None:
    backend = FakeBackend(2)
    running = await start_agent(_settings(tmp_path), backend=backend)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            control = control_pb2_grpc.NodeControlStub(channel)
            backend.fail[("set_locked_clocks", 0)] = UnavailableError("NVML hiccup")
            request = control_pb2.ApplyGpuConfigRequest(generation=1, lease_s=10.0, gpus=[gpu(0, 990, 990)])
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError):
                    await control.ApplyGpuConfig(request)
            await telemetry_pb2_grpc.NodeTelemetryStub(channel).GetInventory(
                telemetry_pb2.GetInventoryRequest()
            )
    finally:
        await running.stop()
    lines = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    applies = [(d["result"], d["replayed"]) for d in lines if d["rpc"] == "ApplyGpuConfig"]
    assert applies == [("UNAVAILABLE", False), ("UNAVAILABLE", True)]


def test_a_tokens_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[tokens]]\nname = "c"\ntoken = "0123456789abcdef0123"\nscopes = ["read"]\n')
    path.chmod(0o600)
    import os

    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(path, 4242, 4242)
    with pytest.raises(InvalidArgumentError, match="owner uid 4242"):
        load_tokens(path)
