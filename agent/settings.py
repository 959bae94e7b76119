"""Configuration of `dynamollm-agent`: TOML file, then `DYNAMOLLM_AGENT_<KEY>` environment overrides, then
command-line flags, merged into one frozen `AgentSettings` before anything starts.

Every key lives in `KEYS` (dotted name, type, default, what it means); `docs/agent.md` and
`deploy/agent.toml` document the same table. The environment name of a key is its dotted name upper-cased
with dots turned into underscores: `telemetry.period_s` -> `DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S`. An unknown
key, a value of the wrong type or out of range raises `InvalidArgumentError` naming the key and the allowed
values; `agent.app` prints it as one line and exits 2.

This module holds what is the agent's own: its key table, derived defaults and `AgentSettings`. The
machinery under it (key type and checks, merging, tokens file, TLS material) is `agent.api.config`,
shared with the controller's daemon.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.auth import BearerToken
from agent.api.config import (
    ConfigKey,
    TlsSettings,
    at_least,
    between,
    env_var,
    file_mode,
    load_tls,
    load_tokens,
    merge_values,
    one_of,
    parse_listen,
    port,
    positive,
    ratio,
    read_toml_config,
    scopes,
)
from agent.api.errors import InvalidArgumentError
from agent.api.mqtt import MQTT_KEYS, MqttSettings, check_topic_level, load_mqtt_settings
from agent.engine.driver import VLLM_COMMAND_TEMPLATE

ENV_PREFIX = "DYNAMOLLM_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/dynamollm/agent.toml")
BACKENDS = ("nvml", "simulated")
ENGINE_KINDS = ("vllm", "simulated")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Format fields a command template may use; `agent.engine.driver` fills them per engine instance
# ({node_dir} {gpu} {time_scale}: `agent.app.make_driver` from the simulated settings).
SIMULATED_ENGINE_COMMAND = (
    "{python} -m agent.sim.engine --model {model} --gpu {gpu} --tp {tp} --port {port} --gpus {gpus} "
    "--node-dir {node_dir} --time-scale {time_scale}"
)
# Largest simulated.time_scale (the simulated engine program's --time-scale has the same bound).
MAX_TIME_SCALE = 1e6
# What the simulated engine program serves: the models and TP degrees its physics model is fitted for
# (agent.sim.physics.specs MODEL_NAMES and TP_DEGREES; tests/unit/test_settings.py checks they agree).
# Spelled out here because the agent's production modules never import agent.sim.
SIMULATED_MODELS = ("llama2-70b", "llama3.1-8b", "llama3.1-70b")
SIMULATED_TP_DEGREES = (1, 2, 4, 8)
VLLM_ENGINE_OPTIONS = ("max-num-seqs", "max-num-batched-tokens", "gpu-memory-utilization", "max-model-len")
SIMULATED_ENGINE_OPTIONS = ("max-num-seqs", "max-num-batched-tokens", "max-model-len", "startup-s")


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    gpus: int
    gpu: str
    model: str
    node_dir: Path
    # Simulated seconds per wall second of the simulated GPUs and engines (1: real time).
    time_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    period_s: float
    buffer: int
    subscriber_queue: int
    min_period_s: float
    max_period_s: float
    energy_mismatch_ratio: float


@dataclass(frozen=True, slots=True)
class EngineSettings:
    kind: str
    command: str
    models: tuple[str, ...]
    options_allowed: tuple[str, ...]
    tp_degrees: tuple[int, ...] | None  # the TP degrees ReconfigureEngine accepts; None: any that fits
    ready_timeout_s: float
    stop_grace_s: float
    drain_timeout_s: float
    base_port: int
    log_dir: Path


@dataclass(frozen=True, slots=True)
class AgentSettings:
    listen: str
    metrics_listen: str  # Prometheus /metrics HOST:PORT; empty: not served
    node_id: str
    runtime_dir: Path
    gpu_backend: str
    reflection: bool
    max_lease_s: float
    tokens: tuple[BearerToken, ...]
    log_level: str
    log_json: bool | None
    audit_log: Path
    simulated: SimulatedSettings
    telemetry: TelemetrySettings
    engine: EngineSettings
    allow_unauthenticated_loopback: bool = False
    unix_socket_mode: int = 0o660
    tls: TlsSettings | None = None
    audit_max_bytes: int = 8 * 2**20
    audit_backups: int = 3
    mqtt: MqttSettings = field(default_factory=MqttSettings)  # host empty: no MQTT fan-out (agent.fanout)
    mqtt_digest_period_s: float = 10.0

    @property
    def state_file(self) -> Path:
        """The persisted applied configuration, generations and defaults snapshot (agent.safety)."""
        return self.runtime_dir / "state.json"


# ---------------------------------------------------------------------------------------------- keys


def _time_scale(v: Any) -> str | None:
    return None if 0 < v <= MAX_TIME_SCALE else f"> 0 and <= {MAX_TIME_SCALE:g}"


def _metrics_listen(v: Any) -> str | None:
    """Empty (off) or a TCP address: /metrics is plain HTTP on a port, never on a Unix socket."""
    allowed = "HOST:PORT or [IPV6]:PORT (port 0..65535), or empty for none"
    if v == "":
        return None
    try:
        parse_listen(v)
    except InvalidArgumentError:
        return allowed
    return allowed if v.startswith("unix:") else None


KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "listen",
        str,
        "127.0.0.1:50051",
        "gRPC address: HOST:PORT, [V6]:PORT or unix:/path; port 0 = any free",
    ),
    ConfigKey(
        "metrics_listen",
        str,
        "127.0.0.1:9460",
        "Prometheus /metrics HOST:PORT or [V6]:PORT (empty: not served); port 0 = any free",
        _metrics_listen,
    ),
    ConfigKey("node_id", str, None, "stable node name in GetInventory (default: the hostname)"),
    ConfigKey("runtime_dir", str, "/run/dynamollm-agent", "state file, engine logs, simulated node state"),
    ConfigKey("gpu.backend", str, "nvml", "GPU backend", one_of(BACKENDS)),
    ConfigKey(
        "unix_socket_mode",
        str,
        "0660",
        "file mode of the socket with listen = unix:/path (who may connect)",
        file_mode,
    ),
    ConfigKey(
        "reflection",
        bool,
        None,
        "serve gRPC server reflection (default: off when tokens or TLS are configured, else on)",
    ),
    ConfigKey("max_lease_s", float, 600.0, "longest lease ApplyGpuConfig / RenewLease may ask for", positive),
    ConfigKey(
        "auth.tokens_file",
        str,
        "",
        "TOML file of bearer tokens with scopes (readable by its owner only)",
    ),
    ConfigKey(
        "auth.allow_unauthenticated_loopback",
        bool,
        None,
        "loopback/Unix-socket callers without a token get every scope (default: true with "
        "gpu.backend simulated and neither tokens nor TLS configured, else false)",
    ),
    ConfigKey("tls.cert", str, "", "server certificate chain (PEM); with tls.key: serve TLS"),
    ConfigKey("tls.key", str, "", "server private key (PEM; readable by its owner only)"),
    ConfigKey("tls.client_ca", str, "", "CA (PEM) client certificates must chain to; set: mTLS required"),
    ConfigKey(
        "tls.client_scopes",
        tuple,
        ("read",),
        "scopes a verified client certificate grants without a bearer token",
        scopes,
    ),
    ConfigKey("log_level", str, "info", "log level", one_of(LOG_LEVELS)),
    ConfigKey(
        "log_json",
        str,
        "auto",
        "JSON log lines: true, false or auto (JSON unless stderr is a TTY)",
        one_of(("true", "false", "auto")),
    ),
    ConfigKey(
        "audit_log", str, None, "JSON-lines audit log of control calls (default: RUNTIME_DIR/audit.jsonl)"
    ),
    ConfigKey(
        "audit.max_bytes",
        int,
        8 * 2**20,
        "size at which the audit log is rotated",
        between(4096, 2**40),
    ),
    ConfigKey("audit.backups", int, 3, "rotated audit logs kept (audit_log.1 .. .N)", between(0, 100)),
    ConfigKey("simulated.gpus", int, 8, "number of simulated GPUs", at_least(1)),
    ConfigKey("simulated.gpu", str, "h100-sxm", "simulated GPU type (physics model)", one_of(("h100-sxm",))),
    ConfigKey(
        "simulated.model",
        str,
        "llama2-70b",
        "model whose power the simulated GPUs follow",
        one_of(SIMULATED_MODELS),
    ),
    ConfigKey(
        "simulated.node_dir",
        str,
        None,
        "shared state of simulated GPUs and engines (default RUNTIME_DIR/simnode)",
    ),
    ConfigKey(
        "simulated.time_scale",
        float,
        1.0,
        "simulated seconds per wall second: engines, their start-up and the energy counters run this "
        "many times faster than real time (leases, telemetry and timers stay wall-clock)",
        _time_scale,
    ),
    ConfigKey(
        "telemetry.period_s", float, 1.0, "sampler period; stream periods are multiples of it", positive
    ),
    ConfigKey(
        "telemetry.buffer",
        int,
        600,
        "samples kept in the ring buffer (energy cross-check window)",
        at_least(2),
    ),
    ConfigKey(
        "telemetry.subscriber_queue",
        int,
        64,
        "samples queued per slow subscriber before the oldest drop",
        at_least(1),
    ),
    ConfigKey("telemetry.min_period_s", float, 0.1, "shortest StreamTelemetry period accepted", positive),
    ConfigKey("telemetry.max_period_s", float, 60.0, "longest StreamTelemetry period accepted", positive),
    ConfigKey(
        "telemetry.energy_mismatch_ratio",
        float,
        0.05,
        "log energy_counter_mismatch when counter and integrated power differ by more",
        ratio,
    ),
    ConfigKey(
        "engine.kind",
        str,
        None,
        "engine program (default: simulated with the simulated backend, else vllm)",
        one_of(ENGINE_KINDS),
    ),
    ConfigKey(
        "engine.command",
        str,
        None,
        "command template with {model} {tp} {pp} {port} {gpus} {python} "
        "{node_dir} {gpu} {time_scale} (default per engine.kind)",
    ),
    ConfigKey(
        "engine.models",
        tuple,
        None,
        "models ReconfigureEngine accepts (default: the simulated models for "
        "engine.kind simulated, none for vllm)",
    ),
    ConfigKey(
        "engine.options_allowed",
        tuple,
        None,
        "engine_options keys ReconfigureEngine accepts (default per engine.kind)",
    ),
    ConfigKey("engine.ready_timeout_s", float, 600.0, "default time for an engine to become READY", positive),
    ConfigKey("engine.stop_grace_s", float, 30.0, "SIGTERM-to-SIGKILL grace of an engine", at_least(0.0)),
    ConfigKey(
        "engine.drain_timeout_s", float, 60.0, "drain time of engines at agent shutdown", at_least(0.0)
    ),
    ConfigKey("engine.base_port", int, 8100, "first HTTP port handed to engines (0: any free port)", port),
    ConfigKey("engine.log_dir", str, None, "engine stdout/stderr logs (default RUNTIME_DIR/engines)"),
    *MQTT_KEYS,
    ConfigKey("mqtt.digest_period_s", float, 10.0, "period of the MQTT telemetry digest", positive),
)
KEY_NAMES = tuple(k.name for k in KEYS)


def env_name(key: str) -> str:
    """The environment variable overriding `key`."""
    return env_var(ENV_PREFIX, key)


def merge_settings(
    file_values: Mapping[str, Any],
    env: Mapping[str, str],
    cli_values: Mapping[str, Any],
    *,
    hostname: str,
    load_secrets: bool = True,
) -> AgentSettings:
    """Pure merge: TOML table < environment < CLI, validated and with derived defaults filled in.

    `load_secrets=False` leaves the tokens file and the TLS files unread (no tokens, no TLS): for
    `dynamollm-agent restore-defaults`, which serves nothing and must restore GPUs even when a secret's
    file mode would stop the server from starting."""
    values = merge_values(KEYS, file_values, env, cli_values, ENV_PREFIX)
    parse_listen(values["listen"])
    if values["telemetry.min_period_s"] > values["telemetry.max_period_s"]:
        raise InvalidArgumentError(
            "telemetry.min_period_s",
            values["telemetry.min_period_s"],
            f"<= telemetry.max_period_s ({values['telemetry.max_period_s']:g})",
        )
    if values["telemetry.period_s"] > values["telemetry.max_period_s"]:
        raise InvalidArgumentError(
            "telemetry.period_s",
            values["telemetry.period_s"],
            f"<= telemetry.max_period_s ({values['telemetry.max_period_s']:g})",
        )

    runtime_dir = Path(values["runtime_dir"])
    backend = values["gpu.backend"]
    engine_kind = values["engine.kind"] or ("simulated" if backend == "simulated" else "vllm")
    if engine_kind == "simulated" and backend != "simulated":
        raise InvalidArgumentError("engine.kind", engine_kind, "vllm with gpu.backend nvml")
    time_scale = values["simulated.time_scale"]
    if time_scale != 1.0 and backend != "simulated":
        raise InvalidArgumentError("simulated.time_scale", time_scale, "1 unless gpu.backend = simulated")
    command = values["engine.command"] or (
        SIMULATED_ENGINE_COMMAND if engine_kind == "simulated" else VLLM_COMMAND_TEMPLATE
    )
    if time_scale != 1.0 and "{time_scale}" not in command:
        # the engines would run at real time beside GPUs whose counters run time_scale times faster
        raise InvalidArgumentError("engine.command", command, "a command passing --time-scale {time_scale}")
    models = values["engine.models"]
    if models is None:
        models = SIMULATED_MODELS if engine_kind == "simulated" else ()
    if engine_kind == "simulated" and any(m not in SIMULATED_MODELS for m in models):
        raise InvalidArgumentError("engine.models", list(models), SIMULATED_MODELS)
    options_allowed = values["engine.options_allowed"]
    if options_allowed is None:
        options_allowed = SIMULATED_ENGINE_OPTIONS if engine_kind == "simulated" else VLLM_ENGINE_OPTIONS
    tokens_file = values["auth.tokens_file"]
    tokens = load_tokens(Path(tokens_file)) if tokens_file and load_secrets else ()
    tls = load_tls(values) if load_secrets else None
    log_json = {"true": True, "false": False, "auto": None}[values["log_json"]]
    reflection = values["reflection"]
    if reflection is None:  # an API map for anyone who can connect: only where nobody else can
        reflection = not tokens and tls is None
    allow_loopback = values["auth.allow_unauthenticated_loopback"]
    if allow_loopback is None:  # a simulated node with no credentials configured is a local demo
        allow_loopback = backend == "simulated" and not tokens and tls is None
    return AgentSettings(
        listen=values["listen"],
        metrics_listen=values["metrics_listen"],
        node_id=values["node_id"] or hostname,
        runtime_dir=runtime_dir,
        gpu_backend=backend,
        reflection=reflection,
        max_lease_s=values["max_lease_s"],
        tokens=tokens,
        log_level=values["log_level"],
        log_json=log_json,
        audit_log=Path(values["audit_log"]) if values["audit_log"] else runtime_dir / "audit.jsonl",
        simulated=SimulatedSettings(
            gpus=values["simulated.gpus"],
            gpu=values["simulated.gpu"],
            model=values["simulated.model"],
            node_dir=Path(values["simulated.node_dir"])
            if values["simulated.node_dir"]
            else runtime_dir / "simnode",
            time_scale=time_scale,
        ),
        telemetry=TelemetrySettings(
            period_s=values["telemetry.period_s"],
            buffer=values["telemetry.buffer"],
            subscriber_queue=values["telemetry.subscriber_queue"],
            min_period_s=values["telemetry.min_period_s"],
            max_period_s=values["telemetry.max_period_s"],
            energy_mismatch_ratio=values["telemetry.energy_mismatch_ratio"],
        ),
        engine=EngineSettings(
            kind=engine_kind,
            command=command,
            models=tuple(models),
            options_allowed=tuple(options_allowed),
            tp_degrees=SIMULATED_TP_DEGREES if engine_kind == "simulated" else None,
            ready_timeout_s=values["engine.ready_timeout_s"],
            stop_grace_s=values["engine.stop_grace_s"],
            drain_timeout_s=values["engine.drain_timeout_s"],
            base_port=values["engine.base_port"],
            log_dir=Path(values["engine.log_dir"]) if values["engine.log_dir"] else runtime_dir / "engines",
        ),
        allow_unauthenticated_loopback=allow_loopback,
        unix_socket_mode=int(values["unix_socket_mode"], 8),
        tls=tls,
        audit_max_bytes=values["audit.max_bytes"],
        audit_backups=values["audit.backups"],
        mqtt=_mqtt(values, values["node_id"] or hostname, load_secrets=load_secrets),
        mqtt_digest_period_s=values["mqtt.digest_period_s"],
    )


def _mqtt(values: Mapping[str, Any], node_id: str, *, load_secrets: bool) -> MqttSettings:
    """The node id is a level of the agent's topics; the client id stays the same across restarts
    (agent.fanout: why)."""
    if values["mqtt.host"]:
        check_topic_level("node_id", node_id)
    return load_mqtt_settings(values, f"dynamollm-agent-{node_id}", load_secrets=load_secrets)


def load_settings(
    config_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cli_values: Mapping[str, Any] | None = None,
    load_secrets: bool = True,
) -> AgentSettings:
    """Read the TOML file (the default path only if it exists), then merge environment and CLI values."""
    return merge_settings(
        read_toml_config(config_path, DEFAULT_CONFIG_PATH),
        os.environ if env is None else env,
        cli_values or {},
        hostname=os.uname().nodename,
        load_secrets=load_secrets,
    )
