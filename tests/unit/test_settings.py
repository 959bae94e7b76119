"""agent.settings: TOML < environment < CLI, every key's validation, and the one-line exit 2 of the app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.api.errors import InvalidArgumentError
from agent.app import main
from agent.settings import (
    KEYS,
    SIMULATED_ENGINE_OPTIONS,
    SIMULATED_MODELS,
    SIMULATED_TP_DEGREES,
    VLLM_ENGINE_OPTIONS,
    env_name,
    load_settings,
    merge_settings,
)
from tests.integration.tls_pki import make_pki, openssl_available


def _merge(
    file_values: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    cli: dict[str, Any] | None = None,
) -> Any:
    return merge_settings(file_values or {}, env or {}, cli or {}, hostname="node-a")


def test_defaults() -> None:
    s = _merge()
    assert s.listen == "127.0.0.1:50051"
    assert s.node_id == "node-a"
    assert s.runtime_dir == Path("/run/dynamollm-agent")
    assert s.state_file == Path("/run/dynamollm-agent/state.json")
    assert s.gpu_backend == "nvml"
    assert s.reflection is True
    assert s.max_lease_s == 600.0
    assert s.tokens == ()
    assert s.log_json is None
    assert (
        s.telemetry.period_s == 1.0 and s.telemetry.min_period_s == 0.1 and s.telemetry.max_period_s == 60.0
    )
    assert s.engine.kind == "vllm"
    assert s.engine.models == ()
    assert s.engine.options_allowed == VLLM_ENGINE_OPTIONS
    assert s.engine.tp_degrees is None  # vLLM: any TP dividing the GPU set
    assert "{pp}" in s.engine.command
    assert s.simulated.node_dir == Path("/run/dynamollm-agent/simnode")
    assert s.audit_log == Path("/run/dynamollm-agent/audit.jsonl")
    assert (s.audit_max_bytes, s.audit_backups) == (8 * 2**20, 3)
    # secure by default: no unauthenticated control on a real node, no TLS unless configured
    assert s.allow_unauthenticated_loopback is False and s.tls is None
    assert s.unix_socket_mode == 0o660


def test_simulated_backend_derives_engine_defaults() -> None:
    s = _merge({"gpu": {"backend": "simulated"}, "runtime_dir": "/tmp/x"})
    assert s.engine.kind == "simulated"
    assert "agent.sim.engine" in s.engine.command
    assert "llama2-70b" in s.engine.models
    assert s.engine.options_allowed == SIMULATED_ENGINE_OPTIONS
    assert s.engine.tp_degrees == SIMULATED_TP_DEGREES
    assert s.simulated.node_dir == Path("/tmp/x/simnode")
    assert s.engine.log_dir == Path("/tmp/x/engines")
    assert s.allow_unauthenticated_loopback is True  # the local demo default of a simulated node


def test_simulated_engine_facts_match_the_physics_model() -> None:
    # Spelled out in agent.settings because the agent's production modules never import agent.sim.
    from agent.sim.physics.specs import MODEL_NAMES, TP_DEGREES

    assert SIMULATED_MODELS == MODEL_NAMES
    assert SIMULATED_TP_DEGREES == TP_DEGREES


def test_precedence_file_env_cli() -> None:
    file_values = {"listen": "127.0.0.1:1", "telemetry": {"period_s": 2}, "simulated": {"gpus": 2}}
    env = {env_name("listen"): "127.0.0.1:2", env_name("telemetry.period_s"): "0.5", "OTHER": "x"}
    s = _merge(file_values, env, {"listen": "127.0.0.1:3"})
    assert s.listen == "127.0.0.1:3"  # CLI beats env beats file
    assert s.telemetry.period_s == 0.5  # env beats file
    assert s.simulated.gpus == 2  # file beats default
    assert env_name("telemetry.period_s") == "DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S"


def test_every_key_has_an_env_override() -> None:
    names = {env_name(k.name) for k in KEYS}
    assert len(names) == len(KEYS)
    s = _merge(env={env_name("reflection"): "false", env_name("engine.options_allowed"): "a, b"})
    assert s.reflection is False
    assert s.engine.options_allowed == ("a", "b")


@pytest.mark.parametrize(
    ("file_values", "env", "field", "allowed_part"),
    [
        ({"nope": 1}, {}, "nope", "listen"),
        ({"gpu": {"backend": "cuda"}}, {}, "gpu.backend", "nvml, simulated"),
        ({"telemetry": {"period_s": 0}}, {}, "telemetry.period_s", "> 0"),
        ({"telemetry": {"period_s": "fast"}}, {}, "telemetry.period_s", "a number"),
        ({"simulated": {"gpus": 0}}, {}, "simulated.gpus", ">= 1"),
        ({"simulated": {"gpus": True}}, {}, "simulated.gpus", "an integer"),
        ({"listen": "localhost"}, {}, "listen", "HOST:PORT"),
        ({"listen": "127.0.0.1:70000"}, {}, "listen", "0..65535"),
        ({"log_level": "loud"}, {}, "log_level", "debug, info"),
        ({"engine": {"base_port": 70000}}, {}, "engine.base_port", "0..65535"),
        ({"telemetry": {"energy_mismatch_ratio": 2}}, {}, "telemetry.energy_mismatch_ratio", "0 < ratio < 1"),
        ({"telemetry": {"min_period_s": 5, "max_period_s": 1}}, {}, "telemetry.min_period_s", "<= telemetry"),
        ({"engine": {"kind": "simulated"}}, {}, "engine.kind", "vllm with gpu.backend nvml"),
        ({}, {"DYNAMOLLM_AGENT_NOPE": "1"}, "DYNAMOLLM_AGENT_NOPE", "DYNAMOLLM_AGENT_LISTEN"),
        ({}, {"DYNAMOLLM_AGENT_REFLECTION": "maybe"}, "reflection", "true or false"),
        ({}, {"DYNAMOLLM_AGENT_MAX_LEASE_S": "nan"}, "max_lease_s", "a number"),
        ({"unix_socket_mode": "0999"}, {}, "unix_socket_mode", "octal"),
        ({"audit": {"max_bytes": 100}}, {}, "audit.max_bytes", "4096.."),
        ({"audit": {"backups": -1}}, {}, "audit.backups", "0..100"),
        ({"tls": {"client_scopes": ["root"]}}, {}, "tls.client_scopes", "read, control, admin"),
        ({"tls": {"cert": "/x.pem"}}, {}, "tls.key", "go together"),
        ({"tls": {"client_ca": "/ca.pem"}}, {}, "tls.client_ca", "tls.cert and tls.key"),
        (
            {},
            {"DYNAMOLLM_AGENT_AUTH_ALLOW_UNAUTHENTICATED_LOOPBACK": "sure"},
            "auth.allow_unauthenticated_loopback",
            "true or false",
        ),
        (
            {"gpu": {"backend": "simulated"}, "engine": {"models": ["gpt-5"]}},
            {},
            "engine.models",
            "llama2-70b",
        ),
    ],
)
def test_bad_values_name_the_key_and_allowed(
    file_values: dict[str, Any], env: dict[str, str], field: str, allowed_part: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _merge(file_values, env)
    assert info.value.field == field
    assert allowed_part in info.value.allowed


def test_listen_forms() -> None:
    for listen in ("0.0.0.0:0", "[::1]:50051", "unix:/run/agent.sock", "node-1.example:8000"):
        assert _merge({"listen": listen}).listen == listen


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(
        '[[tokens]]\nname = "controller"\ntoken = "0123456789abcdef0"\nscopes = ["read", "control"]\n'
        '[[tokens]]\nname = "grafana"\ntoken = "fedcba98765432100"\nscopes = ["read"]\n'
        '[[tokens]]\nname = "ops"\ntoken = "fedcba98765432199"\nscopes = ["read", "control", "admin"]\n'
    )
    path.chmod(0o600)
    s = _merge({"auth": {"tokens_file": str(path)}})
    assert [(t.name, sorted(t.scopes)) for t in s.tokens] == [
        ("controller", ["control", "read"]),
        ("grafana", ["read"]),
        ("ops", ["admin", "control", "read"]),
    ]
    assert s.reflection is False  # tokens configured: no API map for whoever connects
    assert s.allow_unauthenticated_loopback is False
    path.write_text('[[tokens]]\nname = "x"\ntoken = "0123456789abcdef0"\nscopes = ["root"]\n')
    with pytest.raises(InvalidArgumentError, match=r"tokens\[0\]\.scopes"):
        _merge({"auth": {"tokens_file": str(path)}})
    path.write_text('[[tokens]]\nname = "x"\ntoken = "short"\nscopes = ["read"]\n')
    with pytest.raises(InvalidArgumentError, match=r"tokens\[0\]\.token") as info:
        _merge({"auth": {"tokens_file": str(path)}})
    assert "short" not in str(info.value)  # secrets never echoed
    with pytest.raises(InvalidArgumentError, match=r"auth\.tokens_file"):
        _merge({"auth": {"tokens_file": str(tmp_path / "missing.toml")}})


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_tokens_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[tokens]]\nname = "x"\ntoken = "0123456789abcdef0"\nscopes = ["read"]\n')
    path.chmod(mode)
    with pytest.raises(InvalidArgumentError) as info:
        _merge({"auth": {"tokens_file": str(path)}})
    assert info.value.field == "auth.tokens_file"
    assert f"(mode {mode:04o})" in str(info.value) and "chmod 600" in str(info.value)
    for private in (0o600, 0o400):
        path.chmod(private)
        assert _merge({"auth": {"tokens_file": str(path)}}).tokens[0].name == "x"


def test_tls_settings(tmp_path: Path) -> None:
    if not openssl_available():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but the openssl command is not installed")
        pytest.skip("the openssl command is not installed")
    pki = make_pki(tmp_path / "pki")
    cert, key, ca = pki.server.cert, pki.server.key, pki.ca.cert
    key.chmod(0o600)
    s = _merge({"tls": {"cert": str(cert), "key": str(key), "client_ca": str(ca), "client_scopes": []}})
    assert s.tls is not None and s.tls.client_ca is not None and s.tls.client_scopes == frozenset()
    assert s.reflection is False
    assert "BEGIN" not in repr(s.tls)  # key material never in a repr (logs, tracebacks)
    key.chmod(0o644)
    with pytest.raises(InvalidArgumentError, match=r"tls\.key.*mode 0644"):
        _merge({"tls": {"cert": str(cert), "key": str(key)}})
    key.chmod(0o600)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(InvalidArgumentError, match=r"tls\.cert.*PEM"):
        _merge({"tls": {"cert": str(bad), "key": str(key)}})
    explicit = _merge({"reflection": True, "tls": {"cert": str(cert), "key": str(key)}})
    assert explicit.reflection is True  # an explicit setting wins


def test_the_loopback_opt_in(tmp_path: Path) -> None:
    simulated = {"gpu": {"backend": "simulated"}}
    assert _merge(simulated).allow_unauthenticated_loopback is True
    assert (
        _merge(
            {**simulated, "auth": {"allow_unauthenticated_loopback": False}}
        ).allow_unauthenticated_loopback
        is False
    )
    assert _merge({"auth": {"allow_unauthenticated_loopback": True}}).allow_unauthenticated_loopback is True
    env = {env_name("auth.allow_unauthenticated_loopback"): "true"}
    assert (
        env_name("auth.allow_unauthenticated_loopback")
        == "DYNAMOLLM_AGENT_AUTH_ALLOW_UNAUTHENTICATED_LOOPBACK"
    )
    assert _merge(env=env).allow_unauthenticated_loopback is True


def test_load_settings_reads_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('node_id = "gpu-07"\n[gpu]\nbackend = "simulated"\n[simulated]\ngpus = 4\n')
    s = load_settings(path, env={}, cli_values={"listen": "127.0.0.1:0"})
    assert (s.node_id, s.gpu_backend, s.simulated.gpus, s.listen) == ("gpu-07", "simulated", 4, "127.0.0.1:0")
    path.write_text("node_id = \n")
    with pytest.raises(InvalidArgumentError, match="--config"):
        load_settings(path, env={})


def test_app_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S", "-1")
    assert main(["--simulated", "--runtime-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dynamollm-agent: error: telemetry.period_s: got -1.0; allowed: > 0"]
    monkeypatch.delenv("DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S")
    assert main(["--gpus", "two", "--simulated", "--runtime-dir", str(tmp_path)]) == 2
    assert "simulated.gpus: got 'two'" in capsys.readouterr().err
