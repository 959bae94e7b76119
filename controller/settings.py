"""Configuration of `dynamollm-controller`: TOML file (`/etc/dynamollm/controller.toml`), then
`DYNAMOLLM_CONTROLLER_<KEY>` environment overrides, then command-line flags, merged once at start-up into
one frozen `ControllerSettings`. An unknown key or a bad value raises `InvalidArgumentError` naming the key
and the allowed values; `controller.app` prints it as one line and exits 2.

Scalar keys live in `KEYS` (the machinery is the agent's, `agent.api.config`); two tables are read
apart: `[policy]` (the policy's knobs, `[policy.periods]`, `[policy.costs]`: the same document as
`dctl simulate --policy-file`) and `[[nodes]]` (name, address and optional per-node credentials), which
the environment can replace as `DYNAMOLLM_CONTROLLER_NODES="gpu1=10.0.0.1:50051,gpu2=10.0.0.2:50051"`.
`deploy/controller.toml` shows every key with its default; docs/controller.md explains them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.api.auth import BearerToken
from agent.api.client import ClientTls
from agent.api.config import (
    ConfigKey,
    TlsSettings,
    at_least,
    check_private_file,
    file_mode,
    load_tls,
    load_tokens,
    merge_values,
    one_of,
    parse_listen,
    positive,
    read_toml_config,
    scopes,
)
from agent.api.errors import InvalidArgumentError
from agent.api.mqtt import MQTT_KEYS, MqttSettings, load_mqtt_settings, process_client_id
from controller.fleet.grpc_fleet import NodeConfig
from controller.policy.base import WORKLOAD_SCHEMA, ArrivalStats, arrival_stats_from_json
from controller.policy.registry import POLICIES, PolicySettings, policy_settings_from_doc

ENV_PREFIX = "DYNAMOLLM_CONTROLLER_"
DEFAULT_CONFIG_PATH = Path("/etc/dynamollm/controller.toml")
MODES = ("observe", "apply", "paused")
LOG_LEVELS = ("debug", "info", "warning", "error")
_NODE_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{0,62}")
MAX_NODES = 512


def _ratio_open(v: Any) -> str | None:
    return None if 0.0 < v < 1.0 else "a share in (0, 1)"


KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("listen", str, "127.0.0.1:50061", "admin gRPC address: HOST:PORT, [IPV6]:PORT or unix:/path"),
    ConfigKey(
        "unix_socket_mode", str, "0660", "file mode of the admin socket with listen = unix:/path", file_mode
    ),
    ConfigKey("metrics_listen", str, "127.0.0.1:9461", "Prometheus /metrics HOST:PORT (empty: off)"),
    ConfigKey("store_path", str, "/var/lib/dynamollm-controller/controller.db", "SQLite store"),
    ConfigKey("mode", str, "observe", "mode of a new store: observe, apply or paused", one_of(MODES)),
    ConfigKey("reflection", bool, None, "serve gRPC reflection (default: only without tokens and TLS)"),
    ConfigKey("log_level", str, "info", "debug, info, warning, error", one_of(LOG_LEVELS)),
    ConfigKey(
        "log_json",
        str,
        "auto",
        "true, false or auto (JSON unless stderr is a terminal)",
        one_of(("true", "false", "auto")),
    ),
    ConfigKey("control.policy", str, "dynamollm", "the policy the cycle runs", one_of(tuple(POLICIES))),
    ConfigKey("control.time_scale", float, 1.0, "cycle seconds per wall second (simulated demos)", positive),
    ConfigKey("control.initial_rate_rps", float, 1.0, "load the first plan is sized for", at_least(0.0)),
    ConfigKey(
        "control.initial_workload",
        str,
        "",
        "dynamollm.workloadstats/v1 file the first plan is sized for (dctl simulate --workload-stats); "
        "replaces control.initial_rate_rps",
    ),
    ConfigKey(
        "control.origin_unix_s",
        float,
        0.0,
        "the cycle's time 0 for a new store, Unix seconds (0: when the store is created); a controller "
        "started before it brings up the first plan and waits",
        at_least(0.0),
    ),
    ConfigKey(
        "control.instances", int, 0, "instance count of a policy with a size (0: its own sizing)", at_least(0)
    ),
    ConfigKey(
        "control.snapshot_interval_s", float, 30.0, "snapshot period when nothing else is stored", positive
    ),
    ConfigKey("control.ledger_interval_s", float, 60.0, "energy ledger interval (wall seconds)", positive),
    ConfigKey("profile.path", str, "", "profile file (default: the embedded one of profile.model/gpu)"),
    ConfigKey("profile.model", str, "llama2-70b", "the model the fleet serves (profile naming)"),
    ConfigKey("profile.gpu", str, "h100-sxm", "the fleet's GPU type (profile naming)"),
    ConfigKey("engine.model", str, "", "model name sent to agents (default: profile.model)"),
    ConfigKey("engine.options", tuple, (), "engine options as KEY=VALUE (agent allow-list applies)"),
    ConfigKey("fleet.lease_s", float, 60.0, "lease of applied GPU settings", positive),
    ConfigKey(
        "fleet.renew_fraction", float, 1.0 / 3.0, "renew the lease after this share of it", _ratio_open
    ),
    ConfigKey("fleet.telemetry_period_s", float, 1.0, "telemetry stream period", positive),
    ConfigKey("fleet.call_timeout_s", float, 10.0, "deadline of one agent call", positive),
    ConfigKey(
        "fleet.unavailable_after_s", float, 10.0, "silence after which a node is unavailable", positive
    ),
    ConfigKey(
        "fleet.reconcile_period_s", float, 0.5, "how often a node is compared with its target", positive
    ),
    ConfigKey(
        "fleet.drain_timeout_s",
        float,
        60.0,
        "time in-flight requests get when an engine stops",
        at_least(0.0),
    ),
    ConfigKey(
        "fleet.ready_timeout_s", float, 0.0, "engine start limit (0: the agent's default)", at_least(0.0)
    ),
    ConfigKey("agents.token_file", str, "", "bearer token file (one line) for every agent"),
    ConfigKey("agents.ca_file", str, "", "CA of the agents' certificates (PEM): TLS to agents"),
    ConfigKey("agents.cert_file", str, "", "client certificate for agents requiring mTLS (PEM)"),
    ConfigKey("agents.key_file", str, "", "its private key (PEM, owner-only)"),
    ConfigKey("agents.server_name", str, "", "name checked against the agents' certificates"),
    ConfigKey("auth.tokens_file", str, "", "admin API bearer tokens (TOML [[tokens]], owner-only)"),
    ConfigKey(
        "auth.allow_unauthenticated_loopback",
        bool,
        None,
        "loopback callers get every scope (default: only with no tokens, TLS or agent credentials)",
    ),
    ConfigKey("tls.cert", str, "", "admin API certificate chain (PEM)"),
    ConfigKey("tls.key", str, "", "its private key (PEM, owner-only)"),
    ConfigKey("tls.client_ca", str, "", "CA client certificates must chain to (mTLS)"),
    ConfigKey("tls.client_scopes", tuple, ("read",), "scopes a verified client certificate grants", scopes),
    *MQTT_KEYS,
)


@dataclass(frozen=True, slots=True)
class FleetKnobs:
    lease_s: float
    renew_fraction: float
    telemetry_period_s: float
    call_timeout_s: float
    unavailable_after_s: float
    reconcile_period_s: float
    drain_timeout_s: float
    ready_timeout_s: float


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    listen: str
    unix_socket_mode: int
    metrics_listen: str
    store_path: Path
    mode: str
    reflection: bool
    log_level: str
    log_json: bool | None
    policy_name: str
    policy: PolicySettings
    time_scale: float
    initial_rate_rps: float
    initial_workload: ArrivalStats | None
    instances: int
    origin_unix_s: float
    snapshot_interval_s: float
    ledger_interval_s: float
    profile_path: Path | None
    model: str
    gpu: str
    engine_model: str
    engine_options: Mapping[str, str]
    fleet: FleetKnobs
    nodes: tuple[NodeConfig, ...]
    tokens: tuple[BearerToken, ...]
    allow_unauthenticated_loopback: bool
    tls: TlsSettings | None
    mqtt: MqttSettings  # host empty: no MQTT fan-out (controller.fanout)


def _read_workload(path: str) -> ArrivalStats | None:
    if not path:
        return None
    key = "control.initial_workload"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError(key, path, f"a readable JSON file ({exc})") from None
    try:
        return arrival_stats_from_json(doc)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(key, path, f"a {WORKLOAD_SCHEMA} document: {exc}") from None


def _read_token(key: str, path: str) -> str:
    check_private_file(key, Path(path))
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(key, path, f"a readable UTF-8 file ({exc})") from None
    if len(token) < 16 or "\n" in token:
        raise InvalidArgumentError(key, path, "a file holding one token of at least 16 characters")
    return token


def _agent_tls(entry: Mapping[str, Any], where: str) -> ClientTls | None:
    ca, cert, key = (str(entry.get(k) or "") for k in ("ca_file", "cert_file", "key_file"))
    if not (ca or cert or key):
        return None
    if key:
        check_private_file(f"{where}.key_file", Path(key))
    return ClientTls.from_files(
        ca_file=ca or None,
        cert_file=cert or None,
        key_file=key or None,
        server_name=str(entry.get("server_name") or "") or None,
        names=(f"{where}.ca_file", f"{where}.cert_file", f"{where}.key_file"),
    )


_NODE_KEYS = ("name", "address", "token_file", "ca_file", "cert_file", "key_file", "server_name")


def _nodes(entries: Any, defaults: Mapping[str, Any], *, load_secrets: bool) -> tuple[NodeConfig, ...]:
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError("nodes", entries, "a non-empty [[nodes]] array of {name, address}")
    if len(entries) > MAX_NODES:
        raise InvalidArgumentError("nodes", f"{len(entries)} nodes", f"at most {MAX_NODES}")
    nodes: list[NodeConfig] = []
    for i, entry in enumerate(entries):
        where = f"nodes[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgumentError(where, entry, "a table {name, address}")
        unknown = sorted(set(entry) - set(_NODE_KEYS))
        if unknown:
            raise InvalidArgumentError(f"{where}.{unknown[0]}", entry[unknown[0]], ", ".join(_NODE_KEYS))
        name, address = entry.get("name"), entry.get("address")
        if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"{where}.name", name, "1-63 characters of [a-z0-9.-], starting alphanumeric"
            )
        if not isinstance(address, str) or not address:
            raise InvalidArgumentError(
                f"{where}.address", address, "HOST:PORT or unix:/path of the node's agent"
            )
        parse_listen_as(f"{where}.address", address)
        merged = {**defaults, **{k: v for k, v in entry.items() if v not in (None, "")}}
        token_file = str(merged.get("token_file") or "")
        nodes.append(
            NodeConfig(
                name=name,
                address=address,
                token=_read_token(f"{where}.token_file", token_file) if token_file and load_secrets else None,
                tls=_agent_tls(merged, where) if load_secrets else None,
            )
        )
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("nodes", names, "distinct node names")
    return tuple(nodes)


def parse_listen_as(field: str, address: str) -> None:
    try:
        parse_listen(address)
    except InvalidArgumentError:
        raise InvalidArgumentError(field, address, "HOST:PORT, [IPV6]:PORT or unix:/path") from None


def nodes_from_text(text: str, field: str) -> list[dict[str, str]]:
    """`name=address,name=address` (the environment's and the CLI's form of [[nodes]])."""
    out: list[dict[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, address = part.partition("=")
        if not sep:
            raise InvalidArgumentError(field, part, "NAME=HOST:PORT, comma-separated")
        out.append({"name": name.strip(), "address": address.strip()})
    return out


def merge_settings(
    file_values: Mapping[str, Any],
    env: Mapping[str, str],
    cli_values: Mapping[str, Any],
    *,
    cli_nodes: Sequence[dict[str, str]] = (),
    load_secrets: bool = True,
) -> ControllerSettings:
    """Pure merge: TOML < environment < CLI, validated (module docstring)."""
    table = dict(file_values)
    policy_doc = table.pop("policy", {})
    node_entries: Any = table.pop("nodes", None)
    if not isinstance(policy_doc, Mapping):
        raise InvalidArgumentError("policy", policy_doc, "a table of policy knobs")
    env_nodes = env.get(ENV_PREFIX + "NODES")
    scalar_env = {k: v for k, v in env.items() if k != ENV_PREFIX + "NODES"}
    values = merge_values(KEYS, table, scalar_env, cli_values, ENV_PREFIX)
    parse_listen(values["listen"])
    if values["metrics_listen"]:
        parse_listen_as("metrics_listen", values["metrics_listen"])
    if env_nodes is not None:
        node_entries = nodes_from_text(env_nodes, ENV_PREFIX + "NODES")
    if cli_nodes:
        node_entries = list(cli_nodes)
    agent_defaults = {k.split(".", 1)[1]: values[k] for k in values if k.startswith("agents.")}
    nodes = _nodes(node_entries, agent_defaults, load_secrets=load_secrets)
    tokens_file = values["auth.tokens_file"]
    tokens = load_tokens(Path(tokens_file)) if tokens_file and load_secrets else ()
    tls = load_tls(values) if load_secrets else None
    reflection = values["reflection"]
    if reflection is None:
        reflection = not tokens and tls is None
    allow_loopback = values["auth.allow_unauthenticated_loopback"]
    if allow_loopback is None:  # a controller of simulated nodes with no credentials: a local demo
        allow_loopback = not tokens and tls is None and all(n.token is None and n.tls is None for n in nodes)
    options: dict[str, str] = {}
    for item in values["engine.options"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError("engine.options", item, "KEY=VALUE items")
        options[key] = value
    return ControllerSettings(
        listen=values["listen"],
        unix_socket_mode=int(values["unix_socket_mode"], 8),
        metrics_listen=values["metrics_listen"],
        store_path=Path(values["store_path"]),
        mode=values["mode"],
        reflection=reflection,
        log_level=values["log_level"],
        log_json={"true": True, "false": False, "auto": None}[values["log_json"]],
        policy_name=values["control.policy"],
        policy=policy_settings_from_doc(policy_doc),
        time_scale=values["control.time_scale"],
        initial_rate_rps=values["control.initial_rate_rps"],
        initial_workload=_read_workload(values["control.initial_workload"]),
        instances=values["control.instances"],
        origin_unix_s=values["control.origin_unix_s"],
        snapshot_interval_s=values["control.snapshot_interval_s"],
        ledger_interval_s=values["control.ledger_interval_s"],
        profile_path=Path(values["profile.path"]) if values["profile.path"] else None,
        model=values["profile.model"],
        gpu=values["profile.gpu"],
        engine_model=values["engine.model"] or values["profile.model"],
        engine_options=options,
        fleet=FleetKnobs(
            lease_s=values["fleet.lease_s"],
            renew_fraction=values["fleet.renew_fraction"],
            telemetry_period_s=values["fleet.telemetry_period_s"],
            call_timeout_s=values["fleet.call_timeout_s"],
            unavailable_after_s=values["fleet.unavailable_after_s"],
            reconcile_period_s=values["fleet.reconcile_period_s"],
            drain_timeout_s=values["fleet.drain_timeout_s"],
            ready_timeout_s=values["fleet.ready_timeout_s"],
        ),
        nodes=nodes,
        tokens=tokens,
        allow_unauthenticated_loopback=allow_loopback,
        tls=tls,
        mqtt=load_mqtt_settings(values, process_client_id("controller"), load_secrets=load_secrets),
    )


def load_settings(
    config_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cli_values: Mapping[str, Any] | None = None,
    cli_nodes: Sequence[dict[str, str]] = (),
) -> ControllerSettings:
    return merge_settings(
        read_toml_config(config_path, DEFAULT_CONFIG_PATH),
        os.environ if env is None else env,
        cli_values or {},
        cli_nodes=cli_nodes,
    )
