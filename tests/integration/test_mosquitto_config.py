"""The example broker config (deploy/mosquitto/) run by the real Mosquitto, with only its paths and port
made local: TLS only, no anonymous or wrong-password logins, each user confined to its topics by the ACL;
the daemons' own MQTT client logs in over TLS with a password file and publishes through it; the
commented-out require_certificate line, uncommented, lets in only clients with a certificate of the CA."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.api.mqtt import MqttPublisher, load_mqtt_settings
from tests.conftest import _missing
from tests.integration.tls_pki import Pair, Pki, make_pki, openssl_available
from tests.mqtt_broker import (
    RECEIVE_TIMEOUT_S,
    MosquittoBroker,
    Received,
    mosquitto_path,
    next_payload,
    observe,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
USERS = ("gpu-01", "gpu-02", "controller", "router", "dashboard")
QUIET_S = 1.0  # how long a refused message is given to (wrongly) arrive
# A TLS refusal reaches aiomqtt only as a connect time-out; an accepted login on loopback takes ~10 ms.
REFUSED_S = 2.0


def _password(user: str) -> str:
    return f"{user}-secret-password"


def _local_config(tmp_path: Path, pki: Pki, port: int, *, require_certificate: bool) -> str:
    """The example config with its port and /etc paths replaced (nothing else changes), its
    require_certificate line uncommented if asked."""
    config = (DEPLOY / "dynamollm.conf").read_text()
    replacements = {
        "listener 8883": f"listener {port} 127.0.0.1",
        "/etc/mosquitto/certs/broker.pem": str(pki.server.cert),
        "/etc/mosquitto/certs/broker.key": str(pki.server.key),
        "/etc/mosquitto/certs/ca.pem": str(pki.ca.cert),
        "/etc/mosquitto/passwd": str(tmp_path / "passwd"),
        "/etc/mosquitto/dynamollm.acl": str(DEPLOY / "dynamollm.acl"),
    }
    if require_certificate:
        replacements["\n# require_certificate true\n"] = "\nrequire_certificate true\n"
    for old, new in replacements.items():
        assert old in config, old
        config = config.replace(old, new)
    # Started as root, mosquitto would drop to its own user, who cannot read the test's private folder.
    return config + f"persistence false\nlog_dest stderr\nuser {getpass.getuser()}\n"


@contextlib.contextmanager
def _running(tmp_path: Path, *, require_certificate: bool = False) -> Iterator[tuple[MosquittoBroker, Pki]]:
    program = mosquitto_path()
    passwd = shutil.which("mosquitto_passwd") or (
        str(Path(program).parent.parent / "bin" / "mosquitto_passwd") if program else None
    )
    if program is None or passwd is None or not Path(passwd).is_file():
        _missing("mosquitto and mosquitto_passwd not found (Debian: apt-get install mosquitto)")
    if not openssl_available():
        _missing("openssl not found")
    pki = make_pki(tmp_path / "pki")
    for i, user in enumerate(USERS):
        flags = ["-c"] if i == 0 else []
        subprocess.run(
            [passwd, *flags, "-b", str(tmp_path / "passwd"), user, _password(user)], check=True, timeout=30
        )
    b = MosquittoBroker(program, tmp_path)
    b.config_path.write_text(_local_config(tmp_path, pki, b.port, require_certificate=require_certificate))
    b.start()
    try:
        yield b, pki
    finally:
        b.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Pki]]:
    with _running(tmp_path) as running:
        yield running


def _tls(pki: Pki) -> aiomqtt.TLSParameters:
    return aiomqtt.TLSParameters(ca_certs=str(pki.ca.cert), cert_reqs=ssl.CERT_REQUIRED)


def _login(pki: Pki, user: str) -> dict[str, Any]:
    """aiomqtt.Client options: `user` with its password over TLS (a client id of its own)."""
    return {
        "username": user,
        "password": _password(user),
        "tls_params": _tls(pki),
        "identifier": f"{user}-{uuid.uuid4().hex[:8]}",
    }


def _client(broker: MosquittoBroker, pki: Pki, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, **_login(pki, user))


def _watch(
    broker: MosquittoBroker, pki: Pki, user: str, topic: str
) -> contextlib.AbstractAsyncContextManager[Received]:
    return observe(broker.host, broker.port, topic, **_login(pki, user))


def _drain(received: Received) -> list[tuple[str, bytes]]:
    out = []
    while not received.empty():
        out.append(received.get_nowait())
    return out


async def _up_to(received: Received, last: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    """Every message received up to and including `last`."""
    out: list[tuple[str, bytes]] = []
    while not out or out[-1] != last:
        out.append(await asyncio.wait_for(received.get(), RECEIVE_TIMEOUT_S))
    return out


async def test_each_user_publishes_only_its_own_topics(broker: tuple[MosquittoBroker, Pki]) -> None:
    b, pki = broker
    async with _watch(b, pki, "dashboard", "dynamollm/v1/#") as seen:
        async with _client(b, pki, "gpu-01") as node:
            await node.publish("dynamollm/v1/nodes/gpu-02/telemetry", b"forged", qos=1)  # another node's
            await node.publish("dynamollm/v1/controller/routes", b"forged", qos=1, retain=True)
            await node.publish("dynamollm/v1/nodes/gpu-01/telemetry", b"own", qos=1)  # after, in order
        got = await _up_to(seen, ("dynamollm/v1/nodes/gpu-01/telemetry", b"own"))
        async with _client(b, pki, "controller") as controller:
            await controller.publish("dynamollm/v1/controller/routes", b"table", qos=1, retain=True)
            await controller.publish("dynamollm/v1/nodes/gpu-01/status", b"forged", qos=1)
            await controller.publish("dynamollm/v1/controller/events", b"event", qos=1)
        got += await _up_to(seen, ("dynamollm/v1/controller/events", b"event"))
        async with _client(b, pki, "dashboard") as dashboard:  # read-only
            await dashboard.publish("dynamollm/v1/controller/events", b"forged", qos=1)
            # the agents' pattern covers every user name: posing as a node named after itself
            await dashboard.publish("dynamollm/v1/nodes/dashboard/status", b"forged", qos=1, retain=True)
        async with _client(b, pki, "router") as router:
            await router.publish("dynamollm/v1/nodes/router/telemetry", b"forged", qos=1)
        await asyncio.sleep(QUIET_S)
        got += _drain(seen)
    assert ("dynamollm/v1/controller/routes", b"table") in got
    assert not [m for m in got if m[1] == b"forged"], got


async def test_the_router_reads_the_routing_table_and_nothing_else(
    broker: tuple[MosquittoBroker, Pki],
) -> None:
    b, pki = broker
    async with _client(b, pki, "controller") as controller:
        await controller.publish("dynamollm/v1/controller/routes", b"table", qos=1, retain=True)
    async with _watch(b, pki, "router", "dynamollm/v1/controller/routes") as routes:
        assert await next_payload(routes, "dynamollm/v1/controller/routes") == b"table"  # retained
    async with _watch(b, pki, "router", "dynamollm/v1/#") as everything:
        async with _client(b, pki, "gpu-01") as node:
            await node.publish("dynamollm/v1/nodes/gpu-01/telemetry", b"digest", qos=1)
        await asyncio.sleep(QUIET_S)
        # through the wildcard only what the router may read: the (retained) table, not the digest
        assert _drain(everything) == [("dynamollm/v1/controller/routes", b"table")]


@pytest.mark.parametrize(
    ("user", "password", "tls"),
    [("gpu-01", "wrong-password", True), (None, None, True), ("gpu-01", _password("gpu-01"), False)],
    ids=["wrong-password", "anonymous", "no-tls"],
)
async def test_logins_without_the_right_password_or_tls_are_refused(
    broker: tuple[MosquittoBroker, Pki], user: str | None, password: str | None, tls: bool
) -> None:
    b, pki = broker
    client = aiomqtt.Client(
        b.host, b.port, username=user, password=password, tls_params=_tls(pki) if tls else None,
        timeout=REFUSED_S,
    )  # fmt: skip
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_the_daemons_client_logs_in_with_tls_and_a_password_file(
    broker: tuple[MosquittoBroker, Pki], tmp_path: Path
) -> None:
    b, pki = broker
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(_password("gpu-01") + "\n")
    password_file.chmod(0o600)
    values = {
        "mqtt.host": "127.0.0.1", "mqtt.port": b.port, "mqtt.username": "gpu-01",
        "mqtt.password_file": str(password_file), "mqtt.tls_ca": str(pki.ca.cert),
        "mqtt.topic_prefix": "dynamollm",
    }  # fmt: skip
    settings = load_mqtt_settings(values, "gpu-01")  # as every daemon loads its [mqtt] table
    publisher = MqttPublisher(settings)
    async with _watch(b, pki, "dashboard", "dynamollm/v1/nodes/#") as seen:
        publisher.start()
        try:
            publisher.publish("dynamollm/v1/nodes/gpu-01/telemetry", b"digest", qos=1)
            assert await next_payload(seen, "dynamollm/v1/nodes/gpu-01/telemetry") == b"digest"
        finally:
            await publisher.stop()


def _login_with(pki: Pki, user: str, pair: Pair | None) -> dict[str, Any]:
    """`_login`, presenting the client certificate `pair` (None: none) in the TLS handshake."""
    if pair is None:
        return _login(pki, user)
    tls = aiomqtt.TLSParameters(
        ca_certs=str(pki.ca.cert), certfile=str(pair.cert), keyfile=str(pair.key), cert_reqs=ssl.CERT_REQUIRED
    )
    return {**_login(pki, user), "tls_params": tls}


async def test_with_require_certificate_only_clients_with_a_certificate_of_the_ca_log_in(
    tmp_path: Path,
) -> None:
    with _running(tmp_path, require_certificate=True) as (b, pki):
        for pair in (None, pki.stranger):  # no certificate; one of another CA
            with pytest.raises(aiomqtt.MqttError):  # the client only times out, hence the log check
                async with aiomqtt.Client(
                    b.host, b.port, timeout=REFUSED_S, **_login_with(pki, "gpu-01", pair)
                ):
                    pass
        log = b.log_path.read_text(errors="replace")
        assert "did not return a certificate" in log and "certificate verify failed" in log, log
        watcher = _login_with(pki, "dashboard", pki.client)
        async with observe(b.host, b.port, "dynamollm/v1/nodes/#", **watcher) as seen:
            # the certificate comes on top of the password, which still names the user for the ACL
            async with aiomqtt.Client(b.host, b.port, **_login_with(pki, "gpu-01", pki.client)) as node:
                await node.publish("dynamollm/v1/nodes/gpu-01/telemetry", b"digest", qos=1)
            assert await next_payload(seen, "dynamollm/v1/nodes/gpu-01/telemetry") == b"digest"
