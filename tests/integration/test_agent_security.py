"""Security of the agent over real gRPC on loopback (simulated backend): mTLS with certificates made for
the test (no certificate, another CA's, a valid one), bearer-token scopes on every RPC (read / control /
admin, lease takeover), the secure default without tokens, the Unix socket's file mode, refusal of
secrets readable by others, reflection defaults, undecodable and oversized input, and the audit log of
accepted, refused and cancelled calls."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.api.client import AgentClient, ClientTls
from agent.api.errors import InvalidArgumentError, PermissionDeniedError, UnavailableError
from agent.api.v1 import control_pb2, control_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc
from agent.app import RunningAgent, main, start_agent
from agent.settings import AgentSettings
from tests.integration.test_agent_service import GPUS, apply_request, expect_error, gpu, make_settings, stable
from tests.integration.tls_pki import Pki, make_pki, openssl_available

READ = "read-token-0123456789"
CONTROL = "control-token-0123456789"
ADMIN = "admin-token-0123456789"
CONTROL_B = "control-b-token-0123456789"


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write_tokens(path: Path) -> Path:
    path.write_text(
        f'[[tokens]]\nname = "grafana"\ntoken = "{READ}"\nscopes = ["read"]\n'
        f'[[tokens]]\nname = "tuner"\ntoken = "{CONTROL}"\nscopes = ["read", "control"]\n'
        f'[[tokens]]\nname = "tuner-b"\ntoken = "{CONTROL_B}"\nscopes = ["read", "control"]\n'
        f'[[tokens]]\nname = "controller"\ntoken = "{ADMIN}"\nscopes = ["read", "control", "admin"]\n'
    )
    path.chmod(0o600)
    return path


def audit_lines(settings: AgentSettings) -> list[dict[str, Any]]:
    path = settings.audit_log
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.tel = telemetry_pb2_grpc.NodeTelemetryStub(channel)
        self.ctl = control_pb2_grpc.NodeControlStub(channel)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but the openssl command is not installed")
        pytest.skip("the openssl command is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _started(settings: AgentSettings) -> RunningAgent:
    return await start_agent(settings)


@pytest.fixture
async def tokens_agent(tmp_path: Path) -> AsyncIterator[tuple[RunningAgent, Stubs]]:
    settings = make_settings(
        tmp_path,
        auth={
            "tokens_file": str(write_tokens(tmp_path / "tokens.toml")),
            "allow_unauthenticated_loopback": False,
        },
    )
    running = await start_agent(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        try:
            yield running, Stubs(channel)
        finally:
            await running.stop()


# ------------------------------------------------------------------------------------------------ mTLS


def _tls_settings(tmp_path: Path, pki: Pki, **extra: Any) -> AgentSettings:
    return make_settings(
        tmp_path,
        tls={"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca.cert)},
        **extra,
    )


def _channel(port: int, pki: Pki, client: Any = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=None if client is None else client.key.read_bytes(),
        certificate_chain=None if client is None else client.cert.read_bytes(),
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def test_mtls_refuses_no_certificate_another_ca_and_plaintext(tmp_path: Path, pki: Pki) -> None:
    running = await start_agent(_tls_settings(tmp_path, pki))
    try:
        request = telemetry_pb2.GetInventoryRequest()
        for channel in (
            _channel(running.port, pki),  # TLS, but no client certificate
            _channel(running.port, pki, pki.stranger),  # a certificate from another CA
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"),  # no TLS at all
        ):
            async with channel:
                stub = telemetry_pb2_grpc.NodeTelemetryStub(channel)
                await expect_error(stub.GetInventory(request, timeout=5), grpc.StatusCode.UNAVAILABLE)
        # the typed client: a client without a certificate fails the same way
        tls = ClientTls.from_files(ca_file=pki.ca.cert)
        async with AgentClient(f"127.0.0.1:{running.port}", tls=tls, timeout_s=5) as client:
            with pytest.raises(UnavailableError):
                await client.inventory()
    finally:
        await running.stop()


async def test_mtls_valid_certificate_reads_and_needs_a_token_to_control(tmp_path: Path, pki: Pki) -> None:
    settings = _tls_settings(
        tmp_path,
        pki,
        auth={
            "tokens_file": str(write_tokens(tmp_path / "tokens.toml")),
            "allow_unauthenticated_loopback": False,
        },
    )
    assert settings.reflection is False  # off by default once TLS or tokens are configured
    running = await start_agent(settings)
    try:
        async with _channel(running.port, pki, pki.client) as channel:
            stubs = Stubs(channel)
            inv = await stubs.tel.GetInventory(telemetry_pb2.GetInventoryRequest())  # tls.client_scopes: read
            assert len(inv.gpus) == GPUS
            request = apply_request(1, gpu(0, 1200, 1200))
            details = await expect_error(stubs.ctl.ApplyGpuConfig(request), grpc.StatusCode.PERMISSION_DENIED)
            assert "cert:controller" in details and "'control'" in details
            reply = await stubs.ctl.ApplyGpuConfig(request, metadata=md(ADMIN))
            assert reply.lease.holder == "controller" and reply.lease.active
            reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in reflection_stub.ServerReflectionInfo(ask()):
                    pass
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # the typed client with certificate files and a token
        tls = ClientTls.from_files(ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key)
        async with AgentClient(f"127.0.0.1:{running.port}", tls=tls, token=READ) as client:
            assert (await client.inventory()).lease.holder == "controller"
            with pytest.raises(PermissionDeniedError, match="grafana"):
                await client.renew_lease(1, lease_s=10)
        audit = audit_lines(settings)
        assert [(a["who"], a["auth"], a["result"]) for a in audit] == [
            ("cert:controller", "certificate", "PERMISSION_DENIED"),
            ("controller", "token", "OK"),
            ("grafana", "token", "PERMISSION_DENIED"),
        ]
    finally:
        await running.stop()


def test_client_tls_options_are_checked(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(InvalidArgumentError, match="key_file"):
        ClientTls.from_files(ca_file=pki.ca.cert, cert_file=pki.client.cert)
    with pytest.raises(InvalidArgumentError, match=r"ca_file.*readable"):
        ClientTls.from_files(ca_file=tmp_path / "missing.pem")
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(InvalidArgumentError, match="PEM"):
        ClientTls.from_files(ca_file=not_pem)


# ---------------------------------------------------------------------------------------------- scopes


async def test_every_rpc_needs_its_scope(tokens_agent: tuple[RunningAgent, Stubs]) -> None:
    running, s = tokens_agent
    inv_request = telemetry_pb2.GetInventoryRequest()
    stream_request = telemetry_pb2.StreamTelemetryRequest()
    # reads: any token with read; none without a token
    await expect_error(s.tel.GetInventory(inv_request), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(s.tel.StreamTelemetry(stream_request).read(), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(
        s.tel.GetInventory(inv_request, metadata=md("x" * 20)), grpc.StatusCode.UNAUTHENTICATED
    )
    for token in (READ, CONTROL, ADMIN):
        await s.tel.GetInventory(inv_request, metadata=md(token))
        stream = s.tel.StreamTelemetry(stream_request, metadata=md(token))
        assert len((await stream.read()).gpus) == GPUS
        stream.cancel()

    apply = apply_request(1, gpu(0, 1200, 1200), gpu(1, 1200, 1200))
    renew = control_pb2.RenewLeaseRequest(generation=1, lease_s=20)
    restore_some = control_pb2.RestoreDefaultsRequest(generation=2, gpu_indices=[0])
    restore_all = control_pb2.RestoreDefaultsRequest(generation=3)
    reconf = control_pb2.ReconfigureEngineRequest(
        generation=1, engine_id="e1", model="nope", gpu_indices=[0], tp_degree=1
    )
    stop = control_pb2.StopEngineRequest(generation=1, engine_id="e1")
    calls = [
        (s.ctl.ApplyGpuConfig, apply),
        (s.ctl.RenewLease, renew),
        (s.ctl.RestoreDefaults, restore_some),
        (s.ctl.RestoreDefaults, restore_all),
        (s.ctl.ReconfigureEngine, reconf),
        (s.ctl.StopEngine, stop),
    ]
    before = stable(await s.tel.GetInventory(inv_request, metadata=md(READ)))
    # a read token controls nothing; without a token nothing at all
    for method, request in calls:
        details = await expect_error(method(request, metadata=md(READ)), grpc.StatusCode.PERMISSION_DENIED)
        assert "'grafana'" in details
        await expect_error(method(request), grpc.StatusCode.UNAUTHENTICATED)
    # a control token: no engine lifecycle, no RestoreDefaults of every GPU
    for method, request in calls[3:]:
        details = await expect_error(method(request, metadata=md(CONTROL)), grpc.StatusCode.PERMISSION_DENIED)
        assert "'admin'" in details and "'tuner'" in details
    assert stable(await s.tel.GetInventory(inv_request, metadata=md(READ))) == before

    # ...but clocks under its own lease
    assert (await s.ctl.ApplyGpuConfig(apply, metadata=md(CONTROL))).lease.holder == "tuner"
    assert (await s.ctl.RenewLease(renew, metadata=md(CONTROL))).lease.holder == "tuner"
    # another control token may not take the lease over: not by applying, renewing or restoring
    details = await expect_error(
        s.ctl.ApplyGpuConfig(apply_request(2, gpu(1, 1200, 1200)), metadata=md(CONTROL_B)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "taking over the lease held by 'tuner'" in details
    await expect_error(s.ctl.RenewLease(renew, metadata=md(CONTROL_B)), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(
        s.ctl.RestoreDefaults(restore_some, metadata=md(CONTROL_B)), grpc.StatusCode.PERMISSION_DENIED
    )
    # a dry run takes nothing over
    dry = apply_request(2, gpu(1, 1200, 1200))
    dry.dry_run = True
    assert (await s.ctl.ApplyGpuConfig(dry, metadata=md(CONTROL_B))).dry_run
    restored = await s.ctl.RestoreDefaults(restore_some, metadata=md(CONTROL))
    assert restored.lease.holder == "tuner" and restored.lease.active  # GPU 1 is still held

    # admin: takeover, every GPU, engines
    taken = await s.ctl.ApplyGpuConfig(apply_request(3, gpu(1, 1200, 1200)), metadata=md(ADMIN))
    assert taken.lease.holder == "controller"
    await s.ctl.RestoreDefaults(control_pb2.RestoreDefaultsRequest(generation=4), metadata=md(ADMIN))
    await expect_error(s.ctl.ReconfigureEngine(reconf, metadata=md(ADMIN)), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_error(s.ctl.StopEngine(stop, metadata=md(ADMIN)), grpc.StatusCode.NOT_FOUND)

    audit = audit_lines(running.agent.settings)
    assert len(audit) == 2 * 6 + 3 + 2 + 3 + 2 + 4
    assert all(a["scope"] in ("control", "admin") for a in audit)
    refused = [a for a in audit if a["result"] in ("PERMISSION_DENIED", "UNAUTHENTICATED")]
    assert len(refused) == 2 * 6 + 3 + 3


async def test_without_tokens_control_needs_the_loopback_opt_in(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, auth={"allow_unauthenticated_loopback": False})
    assert settings.reflection is True  # nothing configured: local/dev defaults
    running = await start_agent(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            s = Stubs(channel)
            inv = await s.tel.GetInventory(telemetry_pb2.GetInventoryRequest())  # reads: local peers
            for method, request in (
                (s.ctl.ApplyGpuConfig, apply_request(1, gpu(0, 1200, 1200))),
                (s.ctl.RenewLease, control_pb2.RenewLeaseRequest(generation=1, lease_s=5)),
                (s.ctl.RestoreDefaults, control_pb2.RestoreDefaultsRequest(generation=1, gpu_indices=[0])),
                (s.ctl.StopEngine, control_pb2.StopEngineRequest(generation=1, engine_id="e1")),
            ):
                details = await expect_error(method(request), grpc.StatusCode.UNAUTHENTICATED)
                assert "auth.allow_unauthenticated_loopback = true" in details
                assert "auth.tokens_file" in details
            assert stable(await s.tel.GetInventory(telemetry_pb2.GetInventoryRequest())) == stable(inv)
        assert [a["result"] for a in audit_lines(settings)] == ["UNAUTHENTICATED"] * 4
    finally:
        await running.stop()


# ----------------------------------------------------------------------------------------- Unix socket


@pytest.mark.parametrize("mode", [None, "0600"])
async def test_unix_socket_listener_has_the_configured_mode(tmp_path: Path, mode: str | None) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)  # a socket file left by a dead agent is replaced
    stale.bind(str(path))
    stale.close()
    extra: dict[str, Any] = {"listen": f"unix:{path}"}
    if mode is not None:
        extra["unix_socket_mode"] = mode
    running = await start_agent(make_settings(tmp_path, **extra))
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == (0o660 if mode is None else 0o600)
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            s = Stubs(channel)
            reply = await s.ctl.ApplyGpuConfig(apply_request(1, gpu(0, 1200, 1200)))
            assert reply.lease.holder.startswith("peer:unix")
        # a second agent on the same path is refused, not allowed to steal the socket
        with pytest.raises(InvalidArgumentError, match="no other process listens"):
            await start_agent(make_settings(tmp_path / "second", **extra))
    finally:
        await running.stop()


def test_unix_socket_mode_is_validated(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"unix_socket_mode.*octal"):
        make_settings(tmp_path, unix_socket_mode="rw-rw----")


# --------------------------------------------------------------------------------------------- secrets


def test_secrets_readable_by_others_stop_the_agent_with_exit_2(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = write_tokens(tmp_path / "tokens.toml")
    tokens.chmod(0o644)
    argv = ["--simulated", "--runtime-dir", str(tmp_path / "run"), "--listen", "127.0.0.1:0"]
    monkeypatch.setenv("DYNAMOLLM_AGENT_AUTH_TOKENS_FILE", str(tokens))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynamollm-agent: error: auth.tokens_file: got ")
    assert "(mode 0644)" in err[0] and "chmod 600" in err[0]
    tokens.chmod(0o640)
    assert main(argv) == 2
    assert "(mode 0640)" in capsys.readouterr().err
    # ExecStopPost's restore-defaults still runs: it serves nothing and must put GPUs back
    assert main(["restore-defaults", *argv[:3]]) == 0
    assert '"gpu_defaults_restored"' in capsys.readouterr().out
    monkeypatch.delenv("DYNAMOLLM_AGENT_AUTH_TOKENS_FILE")

    key = tmp_path / "server.key"
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(0o640)
    monkeypatch.setenv("DYNAMOLLM_AGENT_TLS_CERT", str(pki.server.cert))
    monkeypatch.setenv("DYNAMOLLM_AGENT_TLS_KEY", str(key))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("dynamollm-agent: error: tls.key: got ")
        and "(mode 0640)" in err[0]
    )
    monkeypatch.delenv("DYNAMOLLM_AGENT_TLS_KEY")
    assert main(argv) == 2
    assert "tls.key: got ''" in capsys.readouterr().err  # a certificate needs its key


# ----------------------------------------------------------------------------------- bad input, audit


async def test_undecodable_payloads_are_invalid_argument_on_every_rpc(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    running = await start_agent(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for service, rpc in [
                ("NodeTelemetry", "GetInventory"),
                ("NodeControl", "ApplyGpuConfig"),
                ("NodeControl", "ReconfigureEngine"),
                ("NodeControl", "StopEngine"),
                ("NodeControl", "RenewLease"),
                ("NodeControl", "RestoreDefaults"),
            ]:
                call = channel.unary_unary(f"/dynamollm.agent.v1.{service}/{rpc}")
                details = await expect_error(call(b"\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT)
                assert details.startswith("request: got '3 bytes that do not parse")
                assert f"a serialized dynamollm.agent.v1.{rpc}Request" in details
            stream = channel.unary_stream("/dynamollm.agent.v1.NodeTelemetry/StreamTelemetry")
            await expect_error(stream(b"\x0a\x05ab").read(), grpc.StatusCode.INVALID_ARGUMENT)
        audit = audit_lines(settings)
        assert [(a["rpc"], a["result"], a["generation"], a["request"]) for a in audit] == [
            (rpc, "INVALID_ARGUMENT", None, {"undecodable_bytes": 3})
            for rpc in ("ApplyGpuConfig", "ReconfigureEngine", "StopEngine", "RenewLease", "RestoreDefaults")
        ]
    finally:
        await running.stop()


async def test_long_values_are_bounded_and_echoed_cut(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    running = await start_agent(settings)
    huge = "e" * 100_000
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            s = Stubs(channel)
            cases: list[tuple[Any, str]] = [
                (control_pb2.StopEngineRequest(generation=1, engine_id=huge), "engine_id: got 'eeee"),
                (
                    control_pb2.ReconfigureEngineRequest(
                        generation=1, engine_id="e1", model="m" * 100_000, gpu_indices=[0], tp_degree=1
                    ),
                    "model: got 'mmm",
                ),
                (
                    control_pb2.ReconfigureEngineRequest(
                        generation=1, engine_id="e1", model="llama2-70b", gpu_indices=[0], tp_degree=1,
                        engine_options={"max-num-seqs": "9" * 300},
                    ),
                    "engine_options['max-num-seqs']: got '999",
                ),
                (
                    control_pb2.ReconfigureEngineRequest(
                        generation=1, engine_id="e1", model="llama2-70b", gpu_indices=[0], tp_degree=1,
                        engine_options={huge: "1"},
                    ),
                    "engine_options['eee",
                ),
                (
                    control_pb2.ReconfigureEngineRequest(
                        generation=1, engine_id="e1", model="llama2-70b", gpu_indices=[0] * 5000, tp_degree=1
                    ),
                    "gpu_indices: got '5000 entries'; allowed: at most 4 entries",
                ),
                (
                    control_pb2.StopEngineRequest(generation=2**63, engine_id="e1"),
                    "generation: got 9223372036854775808",
                ),
                (
                    control_pb2.StopEngineRequest(generation=1, engine_id="e1", drain_timeout_s=1e300),
                    "drain_timeout_s: got 1e+300; allowed: 0..86400 seconds",
                ),
            ]  # fmt: skip
            for request, start in cases:
                method = (
                    s.ctl.StopEngine
                    if isinstance(request, control_pb2.StopEngineRequest)
                    else (s.ctl.ReconfigureEngine)
                )
                details = await expect_error(method(request), grpc.StatusCode.INVALID_ARGUMENT)
                assert details.startswith(start), details
                assert len(details) < 1000, len(details)
            details = await expect_error(
                s.ctl.ReconfigureEngine(
                    control_pb2.ReconfigureEngineRequest(
                        generation=1, engine_id="e1", model="m" * 300, gpu_indices=[0], tp_degree=1
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert "at most 256 characters" in details and "(300 characters)" in details
        lines = settings.audit_log.read_text().splitlines()
        assert len(lines) == len(cases) + 1
        assert max(len(line) for line in lines) < 4000
        assert all(json.loads(line)["result"] == "INVALID_ARGUMENT" for line in lines)
    finally:
        await running.stop()


async def test_a_cancelled_call_is_audited_and_so_is_its_outcome(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    running = await start_agent(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            s = Stubs(channel)
            slow = control_pb2.ReconfigureEngineRequest(
                generation=1, engine_id="slow", model="llama3.1-8b", gpu_indices=[0], tp_degree=1,
                engine_options={"startup-s": "1.5"},
            )  # fmt: skip
            await expect_error(s.ctl.ReconfigureEngine(slow, timeout=0.4), grpc.StatusCode.DEADLINE_EXCEEDED)
            for _ in range(200):  # the operation goes on without its caller and ends READY
                lines = audit_lines(settings)
                if len(lines) == 2:
                    break
                await asyncio.sleep(0.05)
        cancelled, detached = lines
        assert (cancelled["result"], cancelled["detached"]) == ("CANCELLED", False)
        assert cancelled["rpc"] == "ReconfigureEngine" and cancelled["generation"] == 1
        assert cancelled["scope"] == "admin" and "cancelled" in cancelled["error"]
        assert cancelled["request"]["engine_id"] == "slow"
        assert cancelled["request"]["engine_options"] == {"startup-s": "1.5"}
        assert (detached["result"], detached["detached"], detached["generation"]) == ("OK", True, 1)
        assert detached["who"] == cancelled["who"] and detached["request"] == cancelled["request"]
        # The caller gave up after its 0.4 s deadline; the operation ran on to the engine's 1.5 s start.
        assert 0.2 < cancelled["duration_s"] < detached["duration_s"] and detached["duration_s"] > 1.0
    finally:
        await running.stop()
