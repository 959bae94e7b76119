"""Configuration of `dynamollm-agent`: TOML file, then `DYNAMOLLM_AGENT_<KEY>` environment overrides, then
command-line flags, merged into one frozen `AgentSettings` before anything starts.

Every key lives in `KEYS` (dotted name, type, default, what it means); `docs/agent.md` and
`deploy/agent.toml` document the same table. The environment name of a key is its dotted name upper-cased
with dots turned into underscores: `telemetry.period_s` -> `DYNAMOLLM_AGENT_TELEMETRY_PERIOD_S`. An unknown
key, a value of the wrong type or out of range raises `InvalidArgumentError` naming the key and the allowed
values; `agent.app` prints it as one line and exits 2.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.errors import InvalidArgumentError
from agent.engine.driver import VLLM_COMMAND_TEMPLATE

ENV_PREFIX = "DYNAMOLLM_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/dynamollm/agent.toml")
BACKENDS = ("nvml", "simulated")
ENGINE_KINDS = ("vllm", "simulated")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Scopes of bearer tokens and client certificates (docs/agent.md, *Access*): read = NodeTelemetry;
# control = GPU clocks and power under the caller's own lease; admin = what preempts others or starts and
# stops processes: engine lifecycle, RestoreDefaults of every GPU, taking over another holder's lease.
TOKEN_SCOPES = ("read", "control", "admin")
# Format fields a command template may use; `agent.engine.driver` fills them per engine instance.
SIMULATED_ENGINE_COMMAND = (
    "{python} -m agent.sim.engine --model {model} --gpu {gpu} --tp {tp} --port {port} --gpus {gpus} "
    "--node-dir {node_dir}"
)
# What the simulated engine program serves: the models and TP degrees its physics model is fitted for
# (agent.sim.physics.specs MODEL_NAMES and TP_DEGREES; tests/unit/test_settings.py checks they agree).
# Spelled out here because the agent's production modules never import agent.sim.
SIMULATED_MODELS = ("llama2-70b", "llama3.1-8b", "llama3.1-70b")
SIMULATED_TP_DEGREES = (1, 2, 4, 8)
VLLM_ENGINE_OPTIONS = ("max-num-seqs", "max-num-batched-tokens", "gpu-memory-utilization", "max-model-len")
SIMULATED_ENGINE_OPTIONS = ("max-num-seqs", "max-num-batched-tokens", "max-model-len", "startup-s")


@dataclass(frozen=True, slots=True)
class BearerToken:
    """One accepted bearer token: who presents it (`name`: lease holder, audit identity) and its scopes."""

    name: str
    token: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The server's certificate chain and key (PEM), and the CA that client certificates must chain to
    (None: no client certificates asked for). Read once at start-up."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(repr=False)
    client_scopes: frozenset[str]  # what a verified client certificate alone grants
    cert_path: Path
    key_path: Path
    client_ca_path: Path | None


@dataclass(frozen=True, slots=True)
class SimulatedSettings:
    gpus: int
    gpu: str
    model: str
    node_dir: Path


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

    @property
    def state_file(self) -> Path:
        """The persisted applied configuration, generations and defaults snapshot (agent.safety)."""
        return self.runtime_dir / "state.json"


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class _Key:
    name: str
    kind: type  # str, int, float, bool or tuple (list of strings)
    default: Any  # None: derived from other keys after merging
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns the allowed values when the value is bad


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else ", ".join(choices)


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f">= {low:g}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "> 0"


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "0..65535 (0: a free port per engine)"


def _ratio(v: Any) -> str | None:
    return None if 0 < v < 1 else "0 < ratio < 1"


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"{low}..{high}"


def _file_mode(v: Any) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else "an octal file mode such as 0660 or 0600"


def _scopes(v: Any) -> str | None:
    return None if all(s in TOKEN_SCOPES for s in v) else "a list of " + ", ".join(TOKEN_SCOPES)


KEYS: tuple[_Key, ...] = (
    _Key(
        "listen",
        str,
        "127.0.0.1:50051",
        "gRPC address: HOST:PORT, [V6]:PORT or unix:/path; port 0 = any free",
    ),
    _Key("node_id", str, None, "stable node name in GetInventory (default: the hostname)"),
    _Key("runtime_dir", str, "/run/dynamollm-agent", "state file, engine logs, simulated node state"),
    _Key("gpu.backend", str, "nvml", "GPU backend", _one_of(BACKENDS)),
    _Key(
        "unix_socket_mode",
        str,
        "0660",
        "file mode of the socket with listen = unix:/path (who may connect)",
        _file_mode,
    ),
    _Key(
        "reflection",
        bool,
        None,
        "serve gRPC server reflection (default: off when tokens or TLS are configured, else on)",
    ),
    _Key("max_lease_s", float, 600.0, "longest lease ApplyGpuConfig / RenewLease may ask for", _positive),
    _Key(
        "auth.tokens_file",
        str,
        "",
        "TOML file of bearer tokens with scopes (readable by its owner only)",
    ),
    _Key(
        "auth.allow_unauthenticated_loopback",
        bool,
        None,
        "loopback/Unix-socket callers without a token get every scope (default: true with "
        "gpu.backend simulated and neither tokens nor TLS configured, else false)",
    ),
    _Key("tls.cert", str, "", "server certificate chain (PEM); with tls.key: serve TLS"),
    _Key("tls.key", str, "", "server private key (PEM; readable by its owner only)"),
    _Key("tls.client_ca", str, "", "CA (PEM) client certificates must chain to; set: mTLS required"),
    _Key(
        "tls.client_scopes",
        tuple,
        ("read",),
        "scopes a verified client certificate grants without a bearer token",
        _scopes,
    ),
    _Key("log_level", str, "info", "log level", _one_of(LOG_LEVELS)),
    _Key(
        "log_json",
        str,
        "auto",
        "JSON log lines: true, false or auto (JSON unless stderr is a TTY)",
        _one_of(("true", "false", "auto")),
    ),
    _Key("audit_log", str, None, "JSON-lines audit log of control calls (default: RUNTIME_DIR/audit.jsonl)"),
    _Key(
        "audit.max_bytes",
        int,
        8 * 2**20,
        "size at which the audit log is rotated",
        _between(4096, 2**40),
    ),
    _Key("audit.backups", int, 3, "rotated audit logs kept (audit_log.1 .. .N)", _between(0, 100)),
    _Key("simulated.gpus", int, 8, "number of simulated GPUs", _at_least(1)),
    _Key("simulated.gpu", str, "h100-sxm", "simulated GPU type (physics model)", _one_of(("h100-sxm",))),
    _Key(
        "simulated.model",
        str,
        "llama2-70b",
        "model whose power the simulated GPUs follow",
        _one_of(SIMULATED_MODELS),
    ),
    _Key(
        "simulated.node_dir",
        str,
        None,
        "shared state of simulated GPUs and engines (default RUNTIME_DIR/simnode)",
    ),
    _Key("telemetry.period_s", float, 1.0, "sampler period; stream periods are multiples of it", _positive),
    _Key(
        "telemetry.buffer",
        int,
        600,
        "samples kept in the ring buffer (energy cross-check window)",
        _at_least(2),
    ),
    _Key(
        "telemetry.subscriber_queue",
        int,
        64,
        "samples queued per slow subscriber before the oldest drop",
        _at_least(1),
    ),
    _Key("telemetry.min_period_s", float, 0.1, "shortest StreamTelemetry period accepted", _positive),
    _Key("telemetry.max_period_s", float, 60.0, "longest StreamTelemetry period accepted", _positive),
    _Key(
        "telemetry.energy_mismatch_ratio",
        float,
        0.05,
        "log energy_counter_mismatch when counter and integrated power differ by more",
        _ratio,
    ),
    _Key(
        "engine.kind",
        str,
        None,
        "engine program (default: simulated with the simulated backend, else vllm)",
        _one_of(ENGINE_KINDS),
    ),
    _Key(
        "engine.command",
        str,
        None,
        "command template with {model} {tp} {pp} {port} {gpus} {python} "
        "{node_dir} {gpu} (default per engine.kind)",
    ),
    _Key(
        "engine.models",
        tuple,
        None,
        "models ReconfigureEngine accepts (default: the simulated models for "
        "engine.kind simulated, none for vllm)",
    ),
    _Key(
        "engine.options_allowed",
        tuple,
        None,
        "engine_options keys ReconfigureEngine accepts (default per engine.kind)",
    ),
    _Key("engine.ready_timeout_s", float, 600.0, "default time for an engine to become READY", _positive),
    _Key("engine.stop_grace_s", float, 30.0, "SIGTERM-to-SIGKILL grace of an engine", _at_least(0.0)),
    _Key("engine.drain_timeout_s", float, 60.0, "drain time of engines at agent shutdown", _at_least(0.0)),
    _Key("engine.base_port", int, 8100, "first HTTP port handed to engines (0: any free port)", _port),
    _Key("engine.log_dir", str, None, "engine stdout/stderr logs (default RUNTIME_DIR/engines)"),
)
KEY_NAMES = tuple(k.name for k in KEYS)
_BY_NAME = {k.name: k for k in KEYS}


def env_name(key: str) -> str:
    """The environment variable overriding `key`."""
    return ENV_PREFIX + key.upper().replace(".", "_")


_BY_ENV = {env_name(k.name): k for k in KEYS}


# ------------------------------------------------------------------------------------------- parsing


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in KEY_NAMES):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _coerce(key: _Key, value: Any, *, from_text: bool) -> Any:
    """`value` as the key's type; text (environment, CLI) is parsed, TOML values must already fit."""
    what = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        tuple: "a list of strings",
    }[key.kind]
    if from_text and isinstance(value, str):
        text = value.strip()
        try:
            if key.kind is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return lowered in ("true", "1", "yes")
            if key.kind is int:
                return int(text)
            if key.kind is float:
                number = float(text)
                if not math.isfinite(number):
                    raise ValueError(text)
                return number
            if key.kind is tuple:
                return tuple(part.strip() for part in text.split(",") if part.strip())
            return text
        except ValueError:
            raise InvalidArgumentError(key.name, value, what) from None
    if key.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key.kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if key.kind is str and key.name == "log_json" and isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, key.kind) or (key.kind is int and isinstance(value, bool)):
        raise InvalidArgumentError(key.name, value, what)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(key.name, value, "a finite number")
    return value


def _parse_listen(listen: str) -> None:
    if listen.startswith("unix:"):
        if len(listen) > len("unix:"):
            return
    else:
        match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", listen)
        if match and int(match.group(2)) <= 65535:
            return
    raise InvalidArgumentError("listen", listen, "HOST:PORT, [IPV6]:PORT or unix:/path, port 0..65535")


def check_private_file(key: str, path: Path) -> None:
    """A secret (tokens file, TLS key) must exist, be owned by the agent's user (or root) and be readable
    by its owner only: InvalidArgumentError naming the key, the mode or owner and the fix otherwise (the
    agent refuses to start, exit status 2). Another owner could rewrite the tokens."""
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidArgumentError(key, str(path), f"a readable file ({exc.strerror})") from None
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (0, os.geteuid()):
        raise InvalidArgumentError(
            key,
            f"{path} (owner uid {info.st_uid})",
            f"a file owned by the agent's user (uid {os.geteuid()}) or root",
        )
    if mode & 0o077:
        raise InvalidArgumentError(
            key, f"{path} (mode {mode:04o})", "a file only its owner can read or write: chmod 600 (or 400) it"
        )


def _read_pem(key: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(key, str(path), f"a readable PEM file ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(key, str(path), "a PEM file (-----BEGIN ...)")
    return data


def _check_tls_material(cert: str, key: str, client_ca: str) -> None:
    """Parse the certificate, its key and the client CA now, so a mismatch or a bad file is reported
    under its own key at start-up (gRPC would only fail to bind, blaming `listen`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise InvalidArgumentError(
            "tls.cert", cert, f"a PEM certificate chain matching tls.key ({str(exc)[:120]})"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise InvalidArgumentError(
                "tls.client_ca", client_ca, f"PEM CA certificates ({str(exc)[:120]})"
            ) from None


def load_tls(values: Mapping[str, Any]) -> TlsSettings | None:
    """The [tls] keys: certificate and key together (or neither); a client CA needs both."""
    cert, key, client_ca = values["tls.cert"], values["tls.key"], values["tls.client_ca"]
    if not cert and not key:
        if client_ca:
            raise InvalidArgumentError(
                "tls.client_ca", client_ca, "empty unless tls.cert and tls.key are set"
            )
        return None
    if not cert or not key:
        missing = "tls.cert" if not cert else "tls.key"
        raise InvalidArgumentError(missing, "", "a PEM file path: tls.cert and tls.key go together")
    check_private_file("tls.key", Path(key))
    _check_tls_material(cert, key, client_ca)
    if not client_ca and set(values["tls.client_scopes"]) != {"read"}:
        raise InvalidArgumentError(
            "tls.client_scopes",
            values["tls.client_scopes"],
            "the default ['read'] unless tls.client_ca is set (without it no client certificate is verified)",
        )
    return TlsSettings(
        cert_chain=_read_pem("tls.cert", Path(cert)),
        private_key=_read_pem("tls.key", Path(key)),
        client_ca=_read_pem("tls.client_ca", Path(client_ca)) if client_ca else None,
        client_scopes=frozenset(values["tls.client_scopes"]),
        cert_path=Path(cert),
        key_path=Path(key),
        client_ca_path=Path(client_ca) if client_ca else None,
    )


def load_tokens(path: Path) -> tuple[BearerToken, ...]:
    """Bearer tokens from a TOML file of `[[tokens]]` tables with `name`, `token` and `scopes`; the file
    must be readable by its owner only (`check_private_file`)."""
    field = "auth.tokens_file"
    check_private_file(field, path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgumentError(field, str(path), f"a readable file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError(field, str(path), "a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(field, str(path), f"valid TOML ({exc})") from None
    entries = data.get("tokens")
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError(field, str(path), "a non-empty [[tokens]] array of {name, token, scopes}")
    tokens: list[BearerToken] = []
    for i, entry in enumerate(entries):
        where = f"{field}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgumentError(where, entry, "a table {name, token, scopes}")
        name, token, scopes = entry.get("name"), entry.get("token"), entry.get("scopes")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"{where}.name", name, "a non-empty string")
        if not isinstance(token, str) or len(token) < 16:
            raise InvalidArgumentError(f"{where}.token", "<hidden>", "a string of at least 16 characters")
        if not isinstance(scopes, list) or not scopes or any(s not in TOKEN_SCOPES for s in scopes):
            raise InvalidArgumentError(
                f"{where}.scopes", scopes, "a non-empty list of " + ", ".join(TOKEN_SCOPES)
            )
        tokens.append(BearerToken(name=name, token=token, scopes=frozenset(scopes)))
    if len({t.token for t in tokens}) != len(tokens):
        raise InvalidArgumentError(field, str(path), "distinct token values")
    return tuple(tokens)


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
    values: dict[str, Any] = {k.name: k.default for k in KEYS}
    for name, value in _flatten(file_values).items():
        if name not in _BY_NAME:
            raise InvalidArgumentError(name, value, "the keys " + ", ".join(KEY_NAMES))
        values[name] = _coerce(_BY_NAME[name], value, from_text=False)
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var not in _BY_ENV:
            raise InvalidArgumentError(var, text, ", ".join(sorted(_BY_ENV)))
        values[_BY_ENV[var].name] = _coerce(_BY_ENV[var], text, from_text=True)
    for name, value in cli_values.items():
        values[name] = _coerce(_BY_NAME[name], value, from_text=True)
    for key in KEYS:
        value = values[key.name]
        if value is not None and key.check is not None and (allowed := key.check(value)) is not None:
            raise InvalidArgumentError(key.name, value, allowed)
    _parse_listen(values["listen"])
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
    command = values["engine.command"] or (
        SIMULATED_ENGINE_COMMAND if engine_kind == "simulated" else VLLM_COMMAND_TEMPLATE
    )
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
    )


def load_settings(
    config_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    cli_values: Mapping[str, Any] | None = None,
    load_secrets: bool = True,
) -> AgentSettings:
    """Read the TOML file (the default path only if it exists), then merge environment and CLI values."""
    file_values: dict[str, Any] = {}
    path = config_path
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidArgumentError(
                "--config", str(path), f"a readable TOML file ({exc.strerror})"
            ) from None
        except UnicodeDecodeError:
            raise InvalidArgumentError("--config", str(path), "a UTF-8 TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgumentError("--config", str(path), f"valid TOML ({exc})") from None
    return merge_settings(
        file_values,
        os.environ if env is None else env,
        cli_values or {},
        hostname=os.uname().nodename,
        load_secrets=load_secrets,
    )
