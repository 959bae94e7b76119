"""Configuration of `dynamollm-router`: TOML (`/etc/dynamollm/router.toml`), then `DYNAMOLLM_ROUTER_<KEY>`
environment overrides, then flags, merged once at start-up (the agent's machinery, `agent.api.config`).
A bad value stops the start with one line naming the key and the allowed values (exit 2). The routing
table comes from the controller's `WatchEvents` stream (`routes_source = "controller"`) or from the
retained MQTT topic the controller publishes it on (`"mqtt"`, with the `mqtt.*` keys; docs/mqtt.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.client import ClientTls
from agent.api.config import (
    ConfigKey,
    at_least,
    merge_values,
    one_of,
    parse_listen,
    positive,
    read_toml_config,
)
from agent.api.errors import InvalidArgumentError
from agent.api.mqtt import MQTT_KEYS, MqttSettings, load_mqtt_settings, process_client_id

ENV_PREFIX = "DYNAMOLLM_ROUTER_"
DEFAULT_CONFIG_PATH = Path("/etc/dynamollm/router.toml")
ROUTES_SOURCES = ("controller", "mqtt")

KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("listen", str, "127.0.0.1:8080", "HTTP address of the OpenAI-compatible API: HOST:PORT"),
    ConfigKey("controller", str, "127.0.0.1:50061", "the controller's admin gRPC address"),
    ConfigKey("controller_token_file", str, "", "bearer token for the controller (scope control), one line"),
    ConfigKey("controller_tls_ca", str, "", "CA (PEM) the controller's certificate must chain to; set: TLS"),
    ConfigKey("controller_tls_cert", str, "", "client certificate (PEM) for a controller requiring mTLS"),
    ConfigKey("controller_tls_key", str, "", "its private key (PEM)"),
    ConfigKey("controller_tls_server_name", str, "", "name checked against the controller's certificate"),
    ConfigKey("model", str, "llama2-70b", "the model name clients use (/v1/models)"),
    ConfigKey("engine_model", str, "", "the model name engines serve (default: model)"),
    ConfigKey(
        "context_tokens", int, 4096, "the model's context: prompt + max_tokens at most this", at_least(2)
    ),
    ConfigKey("profile.model", str, "llama2-70b", "profile of the SLO targets (model)"),
    ConfigKey("profile.gpu", str, "h100-sxm", "profile of the SLO targets (GPU type)"),
    ConfigKey("profile.path", str, "", "profile file (default: the embedded one)"),
    # vLLM's max_num_seqs: an engine runs at most this many at once, and the simulator sends every
    # request straight to its instance; a lower cap here would shrink batches below what plans assume.
    ConfigKey(
        "max_inflight", int, 256, "requests in flight per instance before others wait here", at_least(1)
    ),
    ConfigKey("max_body_bytes", int, 1 << 20, "largest request body", at_least(1024)),
    ConfigKey(
        "max_waiting", int, 10000, "requests waiting in all queues before new ones get 503", at_least(1)
    ),
    ConfigKey("report_interval_s", float, 0.5, "traffic report period to the controller", positive),
    ConfigKey("request_timeout_s", float, 600.0, "longest an engine may take for one request", positive),
    ConfigKey("drain_timeout_s", float, 30.0, "in-flight requests get this long at SIGTERM", at_least(0.0)),
    ConfigKey(
        "time_scale", float, 1.0, "engines' simulated seconds per wall second (simulated nodes)", positive
    ),
    ConfigKey("default_max_tokens", int, 16, "max_tokens of a completion request without one", at_least(1)),
    ConfigKey(
        "log_level", str, "info", "debug, info, warning, error", one_of(("debug", "info", "warning", "error"))
    ),
    ConfigKey("log_json", str, "auto", "true, false or auto", one_of(("true", "false", "auto"))),
    ConfigKey(
        "routes_source",
        str,
        "controller",
        "where the routing table comes from: controller (WatchEvents) or mqtt (the retained routes topic)",
        one_of(ROUTES_SOURCES),
    ),
    *MQTT_KEYS,
)


@dataclass(frozen=True, slots=True)
class RouterSettings:
    listen: str
    controller: str
    controller_token: str | None
    model: str
    engine_model: str
    context_tokens: int
    profile_model: str
    profile_gpu: str
    profile_path: Path | None
    max_inflight: int
    max_body_bytes: int
    max_waiting: int
    report_interval_s: float
    request_timeout_s: float
    drain_timeout_s: float
    time_scale: float
    default_max_tokens: int
    log_level: str = "info"
    log_json: bool | None = None
    routes_source: str = "controller"
    mqtt: MqttSettings = field(default_factory=MqttSettings)  # host empty: no MQTT
    controller_tls: ClientTls | None = None  # None: a plaintext channel to the controller


def _token(path: str) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError("controller_token_file", path, f"a readable file ({exc})") from None
    if len(token) < 16:
        raise InvalidArgumentError("controller_token_file", path, "a token of at least 16 characters")
    return token


def merge_settings(
    file_values: Mapping[str, Any], env: Mapping[str, str], cli_values: Mapping[str, Any]
) -> RouterSettings:
    v = merge_values(KEYS, file_values, env, cli_values, ENV_PREFIX)
    parse_listen(v["listen"])
    if v["routes_source"] == "mqtt" and not v["mqtt.host"]:
        raise InvalidArgumentError("mqtt.host", "", "a broker host name or address with routes_source = mqtt")
    return RouterSettings(
        listen=v["listen"],
        controller=v["controller"],
        controller_token=_token(v["controller_token_file"]),
        model=v["model"],
        engine_model=v["engine_model"] or v["model"],
        context_tokens=v["context_tokens"],
        profile_model=v["profile.model"],
        profile_gpu=v["profile.gpu"],
        profile_path=Path(v["profile.path"]) if v["profile.path"] else None,
        max_inflight=v["max_inflight"],
        max_body_bytes=v["max_body_bytes"],
        max_waiting=v["max_waiting"],
        report_interval_s=v["report_interval_s"],
        request_timeout_s=v["request_timeout_s"],
        drain_timeout_s=v["drain_timeout_s"],
        time_scale=v["time_scale"],
        default_max_tokens=v["default_max_tokens"],
        log_level=v["log_level"],
        log_json={"true": True, "false": False, "auto": None}[v["log_json"]],
        routes_source=v["routes_source"],
        mqtt=load_mqtt_settings(v, process_client_id("router")),
        controller_tls=_controller_tls(v),
    )


def _controller_tls(v: Mapping[str, Any]) -> ClientTls | None:
    """TLS to the controller when a CA or a client certificate is set (the files are read here, once)."""
    ca, cert, key = v["controller_tls_ca"], v["controller_tls_cert"], v["controller_tls_key"]
    if not (ca or cert or key):
        return None
    return ClientTls.from_files(
        ca_file=ca or None,
        cert_file=cert or None,
        key_file=key or None,
        server_name=v["controller_tls_server_name"] or None,
        names=("controller_tls_ca", "controller_tls_cert", "controller_tls_key"),
    )


def load_settings(config: Path | None, cli_values: Mapping[str, Any]) -> RouterSettings:
    return merge_settings(read_toml_config(config, DEFAULT_CONFIG_PATH), os.environ, cli_values)
