"""Configuration machinery shared by both daemons' entry points (`dynamollm-agent`, and the controller's
daemon): a table of `ConfigKey`s, a TOML file read once (`read_toml_config`), `<PREFIX><KEY>` environment
overrides and command-line values merged over the keys' defaults and checked per key (`merge_values`),
then the secrets every daemon serves with: bearer tokens (`load_tokens`) and TLS material (`load_tls`).

Each daemon keeps its own key table, derived defaults and frozen settings (the agent's: `agent.settings`)
and builds them on this module. Every error is an `InvalidArgumentError` naming the key and the allowed
values; the entry point prints it as one line and exits 2.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.auth import TOKEN_SCOPES, BearerToken
from agent.api.errors import InvalidArgumentError


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


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class ConfigKey:
    name: str
    kind: type  # str, int, float, bool or tuple (list of strings)
    default: Any  # None: derived from other keys after merging
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns the allowed values when the value is bad


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else ", ".join(choices)


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f">= {low:g}"


def positive(v: Any) -> str | None:
    return None if v > 0 else "> 0"


def port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "0..65535 (0: a free port per engine)"


def ratio(v: Any) -> str | None:
    return None if 0 < v < 1 else "0 < ratio < 1"


def between(low: int, high: int) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"{low}..{high}"


def file_mode(v: Any) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else "an octal file mode such as 0660 or 0600"


def scopes(v: Any) -> str | None:
    return None if all(s in TOKEN_SCOPES for s in v) else "a list of " + ", ".join(TOKEN_SCOPES)


def env_var(env_prefix: str, key: str) -> str:
    """The environment variable overriding `key`: its dotted name upper-cased, dots turned into
    underscores, after the daemon's prefix."""
    return env_prefix + key.upper().replace(".", "_")


# ------------------------------------------------------------------------------------------- parsing


def _flatten(table: Mapping[str, Any], key_names: Collection[str], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in key_names):
            out.update(_flatten(value, key_names, dotted + "."))
        else:
            out[dotted] = value
    return out


def _coerce(key: ConfigKey, value: Any, *, from_text: bool) -> Any:
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


def parse_listen(listen: str) -> None:
    """`listen` is HOST:PORT, [IPV6]:PORT or unix:/path: InvalidArgumentError naming `listen` otherwise."""
    if listen.startswith("unix:"):
        if len(listen) > len("unix:"):
            return
    else:
        match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})", listen)
        if match and int(match.group(2)) <= 65535:
            return
    raise InvalidArgumentError("listen", listen, "HOST:PORT, [IPV6]:PORT or unix:/path, port 0..65535")


def read_toml_config(path: Path | None, default_path: Path) -> dict[str, Any]:
    """The TOML table of `path` (`--config`); without one, of `default_path` if that file exists, else an
    empty table."""
    if path is None and default_path.is_file():
        path = default_path
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgumentError("--config", str(path), f"a readable TOML file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError("--config", str(path), "a UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError("--config", str(path), f"valid TOML ({exc})") from None


def merge_values(
    keys: Sequence[ConfigKey],
    file_values: Mapping[str, Any],
    env: Mapping[str, str],
    cli_values: Mapping[str, Any],
    env_prefix: str,
) -> dict[str, Any]:
    """Every key's value by dotted name: its default < the TOML table < `<env_prefix><KEY>` environment
    variables < CLI values, each coerced to the key's type and passed through the key's check. An unknown
    key in the file, or an unknown variable with the prefix, is an error; derived defaults stay None."""
    by_name = {k.name: k for k in keys}
    by_env = {env_var(env_prefix, k.name): k for k in keys}
    values: dict[str, Any] = {k.name: k.default for k in keys}
    for name, value in _flatten(file_values, by_name).items():
        if name not in by_name:
            raise InvalidArgumentError(name, value, "the keys " + ", ".join(by_name))
        values[name] = _coerce(by_name[name], value, from_text=False)
    for var, text in env.items():
        if not var.startswith(env_prefix):
            continue
        if var not in by_env:
            raise InvalidArgumentError(var, text, ", ".join(sorted(by_env)))
        values[by_env[var].name] = _coerce(by_env[var], text, from_text=True)
    for name, value in cli_values.items():
        values[name] = _coerce(by_name[name], value, from_text=True)
    for key in keys:
        value = values[key.name]
        if value is not None and key.check is not None and (allowed := key.check(value)) is not None:
            raise InvalidArgumentError(key.name, value, allowed)
    return values


# ------------------------------------------------------------------------------------------- secrets


def check_private_file(key: str, path: Path) -> None:
    """A secret (tokens file, TLS key) must exist, be owned by the daemon's user (or root) and be readable
    by its owner only: InvalidArgumentError naming the key, the mode or owner and the fix otherwise (the
    daemon refuses to start, exit status 2). Another owner could rewrite the tokens."""
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
