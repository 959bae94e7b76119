"""The MQTT fan-out client of all three daemons (docs/mqtt.md): the `mqtt.*` configuration keys and their
frozen `MqttSettings`, a `MqttPublisher` (agent: node status and telemetry digests; controller: events
and the routing table) and a `MqttSubscriber` (router: the routing table). gRPC stays the control path;
MQTT carries copies for dashboards and other consumers, so a broker that is down or slow never blocks or
fails a daemon.

Flow of a publish: the caller's `publish()` only appends to a bounded queue (the oldest message is
dropped and counted when it is full) or, for a retained topic, replaces the topic's last payload, and
returns. The publisher's own task (`start`) connects, sends retained topics' latest payloads then the
queue, and on any failure waits a backoff (0.5 s doubling to 30 s, jittered: daemons that lost the same
broker do not come back in lock-step) and connects again; after every (re)connect every retained topic's
last payload is sent again (a restarted broker without persistence has lost it). One warning per outage
(`mqtt_unavailable`, with the error) and one info when connected (`mqtt_connected`): a broker that stays
down never floods the log. The subscriber keeps its subscriptions up the same way and hands every message
to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from aiomqtt import Will as Will  # re-exported: the agent builds its will with it

from agent.api.config import ConfigKey, between, check_private_file
from agent.api.errors import InvalidArgumentError

log = structlog.get_logger("agent.api.mqtt")
# paho's and aiomqtt's own log lines (plain text, per packet or per retry) are dropped: the link's events
# say what an operator needs, once per outage, in the daemon's structured format.
_LIBRARY_LOG = logging.getLogger("agent.api.mqtt.library")
_LIBRARY_LOG.addHandler(logging.NullHandler())
_LIBRARY_LOG.propagate = False

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
QUEUE_SIZE = 1000  # messages waiting for the broker; older ones are dropped first
CALL_TIMEOUT_S = 10.0  # CONNACK, PUBACK and SUBACK waits
FLUSH_TIMEOUT_S = 2.0  # what `MqttPublisher.stop` gives the queue before it disconnects anyway
_TOPIC_WILDCARDS = ("+", "#")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and as whom a daemon talks MQTT; `host` empty: MQTT off. The password is read from
    `password_file` once, at start-up (`load_mqtt_settings`)."""

    host: str = ""
    port: int = 1883
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: Path | None = None
    tls_ca: Path | None = None  # set: TLS, the broker's certificate checked against this CA
    client_id: str = ""
    topic_prefix: str = "dynamollm"
    keepalive_s: int = 30  # a silent client is taken for dead (its will published) after 1.5 x this

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    def topic(self, *levels: str) -> str:
        """`<topic_prefix>/v1/<levels...>`: the version level moves when a payload changes
        incompatibly, so old and new consumers can run side by side."""
        return "/".join((self.topic_prefix, "v1", *levels))


# ---------------------------------------------------------------------------------------------- keys


def _host(v: Any) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9._:\-]*", v) else "a host name or IP address (empty: MQTT off)"


def _topic_prefix(v: Any) -> str | None:
    bad = not v or v.startswith("/") or v.endswith("/") or "//" in v or "\0" in v
    if bad or any(w in v for w in _TOPIC_WILDCARDS):
        return "topic levels separated by /, without + or # and without a leading or trailing /"
    return None


MQTT_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("mqtt.host", str, "", "MQTT broker host name or address (empty: no MQTT fan-out)", _host),
    ConfigKey("mqtt.port", int, 1883, "MQTT broker port (8883 is the usual TLS port)", between(1, 65535)),
    ConfigKey("mqtt.username", str, "", "user name at the broker (empty: anonymous)"),
    ConfigKey(
        "mqtt.password_file",
        str,
        "",
        "file holding the broker password on one line (readable by its owner only; needs mqtt.username)",
    ),
    ConfigKey("mqtt.tls_ca", str, "", "CA (PEM) the broker's certificate must chain to; set: TLS"),
    ConfigKey(
        "mqtt.topic_prefix", str, "dynamollm", "first level(s) of every topic: PREFIX/v1/...", _topic_prefix
    ),
)


def json_payload(doc: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON: every payload of the fan-out (each with a versioned `schema` field)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def check_topic_level(key: str, value: str) -> None:
    """`value` (a node id) becomes one topic level: InvalidArgumentError naming `key` when it cannot."""
    if not value or "/" in value or "\0" in value or any(w in value for w in _TOPIC_WILDCARDS):
        raise InvalidArgumentError(
            key, value, "a non-empty name without /, + or # (it is an MQTT topic level)"
        )


def process_client_id(daemon: str) -> str:
    """A client id unique to this process: two clients with one id would take the connection from each
    other in turn."""
    return f"dynamollm-{daemon}-{os.uname().nodename}-{os.getpid()}"


def _read_password(path: Path) -> str:
    key = "mqtt.password_file"
    check_private_file(key, path)
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(key, str(path), f"a readable UTF-8 file ({exc})") from None
    if not password or "\n" in password:
        raise InvalidArgumentError(key, str(path), "a file holding the password on one line")
    return password


def _check_ca(path: str) -> None:
    """Parse the CA now, so that a bad file stops the start naming its key (not a warning per retry)."""
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise InvalidArgumentError("mqtt.tls_ca", path, f"PEM CA certificates ({str(exc)[:120]})") from None


def load_mqtt_settings(
    values: Mapping[str, Any], client_id: str, *, load_secrets: bool = True
) -> MqttSettings:
    """The `MQTT_KEYS` of merged config `values` as settings; the password file is read here, once
    (`load_secrets=False`: not read, for a command that publishes nothing)."""
    password_file, username = values["mqtt.password_file"], values["mqtt.username"]
    if password_file and not username:
        raise InvalidArgumentError("mqtt.username", "", "a user name when mqtt.password_file is set")
    tls_ca = values["mqtt.tls_ca"]
    if tls_ca and load_secrets:
        _check_ca(tls_ca)
    return MqttSettings(
        host=values["mqtt.host"],
        port=values["mqtt.port"],
        username=username,
        password=_read_password(Path(password_file)) if password_file and load_secrets else "",
        password_file=Path(password_file) if password_file else None,
        tls_ca=Path(tls_ca) if tls_ca else None,
        client_id=client_id,
        topic_prefix=values["mqtt.topic_prefix"],
    )


# ------------------------------------------------------------------------------------------- backoff


class Backoff:
    """Delays between connection attempts: FIRST_RETRY_S doubling up to MAX_RETRY_S, each drawn in
    [d/2, d] with the injected `random` (a float in [0, 1))."""

    def __init__(self, random: Callable[[], float]) -> None:
        self._random = random
        self._next_s = FIRST_RETRY_S

    def next_s(self) -> float:
        delay_s = self._next_s
        self._next_s = min(MAX_RETRY_S, delay_s * 2)
        return delay_s * (0.5 + 0.5 * self._random())

    def reset(self) -> None:
        self._next_s = FIRST_RETRY_S


# ------------------------------------------------------------------------------------------ the link

Session = Callable[[aiomqtt.Client], Awaitable[None]]


class _Link:
    """A broker connection kept up while `run` runs: connect, hand the client to the session, and after
    any failure wait the backoff and connect again (module docstring: what is logged)."""

    def __init__(self, settings: MqttSettings, will: Will | None, rng: Callable[[], float]) -> None:
        self.connected = False
        self._settings = settings
        self._will = will
        self._rng = rng
        # Built once: the CA file is read at start-up, not at every reconnect.
        self._tls = ssl.create_default_context(cafile=str(settings.tls_ca)) if settings.tls_ca else None
        self.stopping = asyncio.Event()  # set: no reconnect any more; a publisher's session flushes and ends
        self._log = log.bind(host=settings.host, port=settings.port, client_id=settings.client_id)

    def _client(self) -> aiomqtt.Client:
        s = self._settings
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username or None,
            password=s.password or None,
            identifier=s.client_id or None,
            will=self._will,
            keepalive=s.keepalive_s,
            timeout=CALL_TIMEOUT_S,
            tls_context=self._tls,
            logger=_LIBRARY_LOG,
        )

    async def run(self, session: Session) -> None:
        """Until the session returns (a publisher asked to stop) or the task is cancelled."""
        backoff = Backoff(self._rng)
        down = False
        while not self.stopping.is_set():
            try:
                async with self._client() as client:
                    self.connected, down = True, False
                    backoff.reset()
                    self._log.info("mqtt_connected")
                    await session(client)
                    return
            except Exception as exc:  # never let the fan-out take the daemon down
                if not down:
                    self._log.warning("mqtt_unavailable", error=_describe(exc))
                    down = True
            finally:
                self.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff.next_s())


def _describe(exc: BaseException) -> str:
    """The error and what caused it: aiomqtt reports a lost connection as a generic error whose cause is
    paho's reason code."""
    text = str(exc) or type(exc).__name__
    return f"{text}: {exc.__cause__}" if exc.__cause__ is not None else text


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Returns never; raises MqttError when the connection is lost (a client that subscribed nothing gets
    no messages, only the end of the iteration)."""
    async for _ in client.messages:
        pass


# ------------------------------------------------------------------------------------------ publisher


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    qos: int


class MqttPublisher:
    """Publishes for its daemon without ever blocking it (module docstring). `will`: what the broker
    publishes for this client when its connection dies without a clean disconnect."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: Will | None = None,
        queue_size: int = QUEUE_SIZE,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """`rng`: floats in [0, 1) for the backoff's jitter."""
        self.dropped_count = 0  # messages dropped from the full queue
        self._link = _Link(settings, will, rng)
        self._queue: deque[_Message] = deque(maxlen=queue_size)
        self._retained: dict[str, tuple[bytes, int]] = {}  # topic -> last payload, QoS
        self._dirty: dict[str, None] = {}  # retained topics to send (ordered set)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def pending_count(self) -> int:
        """Messages not sent yet: queued ones and retained topics waiting for their latest payload."""
        return len(self._queue) + len(self._dirty)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        """Queue one message and return at once; a retained topic keeps only its latest payload."""
        if retain:
            self._retained[topic] = (payload, qos)
            self._dirty[topic] = None
        else:
            self.dropped_count += len(self._queue) == self._queue.maxlen  # the deque drops the oldest
            self._queue.append(_Message(topic, payload, qos))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._link.run(self._session), name="mqtt-publisher")

    async def stop(self, *, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send what is queued (for up to `flush_timeout_s` while connected), disconnect cleanly (the
        broker does not publish the will), end the task."""
        if self._task is None:
            return
        self._link.stopping.set()
        self._wake.set()
        await asyncio.wait({self._task}, timeout=flush_timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _session(self, client: aiomqtt.Client) -> None:
        self._dirty.update(dict.fromkeys(self._retained))  # the broker may have lost them
        watcher = asyncio.create_task(_until_disconnected(client))
        sender = asyncio.create_task(self._send(client))
        try:
            done, _ = await asyncio.wait({watcher, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, sender):
                task.cancel()
            await asyncio.gather(watcher, sender, return_exceptions=True)
        for task in done:
            task.result()  # the MqttError of a lost connection, or None: asked to stop, all sent

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            while self._dirty or self._queue:
                if self._dirty:
                    await self._send_retained(client, next(iter(self._dirty)))
                else:
                    await self._send_queued(client)
            if self._link.stopping.is_set():
                return
            await self._wake.wait()

    async def _send_retained(self, client: aiomqtt.Client, topic: str) -> None:
        sent = self._retained[topic]
        await client.publish(topic, sent[0], qos=sent[1], retain=True)
        if self._retained[topic] is sent:  # not replaced while it was on its way
            del self._dirty[topic]

    async def _send_queued(self, client: aiomqtt.Client) -> None:
        """The oldest message; it leaves the queue once sent (a lost connection: it goes out first after
        the reconnect; QoS 1: at least once)."""
        message = self._queue[0]
        await client.publish(message.topic, message.payload, qos=message.qos)
        if self._queue and self._queue[0] is message:  # not dropped by an overflow while on its way
            self._queue.popleft()


# ----------------------------------------------------------------------------------------- subscriber


class MqttSubscriber:
    """Subscribes to `topics` (QoS 1: every message at least once) for as long as `run` runs,
    re-subscribing after every reconnect; `on_message(topic, payload)` gets every message (a retained one
    first, right after a subscribe). A callback that raises is logged and the next message still
    arrives."""

    def __init__(
        self,
        settings: MqttSettings,
        topics: Sequence[str],
        on_message: Callable[[str, bytes], None],
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._link = _Link(settings, None, rng)
        self._topics = tuple(topics)
        self._on_message = on_message

    @property
    def connected(self) -> bool:
        return self._link.connected

    async def run(self) -> None:
        """Until cancelled."""
        await self._link.run(self._session)

    async def _session(self, client: aiomqtt.Client) -> None:
        for topic in self._topics:
            await client.subscribe(topic, qos=1)
        async for message in client.messages:
            payload = message.payload  # bytes as received (the type also covers what may be sent)
            data = payload if isinstance(payload, bytes) else b""
            try:
                self._on_message(message.topic.value, data)
            except Exception:
                log.exception("mqtt_message_handler_failed", topic=message.topic.value)
