"""The MQTT publisher and subscriber of agent.api.mqtt against a real Mosquitto on loopback: messages
arrive, a late subscriber gets the retained routing table; a broker restart costs one warning per client,
publishing resumes within the backoff, the retained table is published again and the router (its
`on_routes_message` behind a subscriber) gets the next table; a broker that is down from the start
never makes `publish` block or raise, and what was queued goes out when it comes up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.api.mqtt import MqttPublisher, MqttSettings, MqttSubscriber
from controller.profiles import default_profile
from controller.router.app import Router
from controller.router.settings import merge_settings as merge_router
from tests.mqtt_broker import MosquittoBroker, Received, next_payload, observe
from tests.unit.test_mqtt_payloads import routes_of_version

WAIT_S = 15.0  # generous: the backoff after a restart is at most a few seconds


def _settings(broker: MosquittoBroker, client_id: str) -> MqttSettings:
    return MqttSettings(host=broker.host, port=broker.port, client_id=client_id, topic_prefix="test")


async def _until(what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


async def _take(queue: Received, count: int) -> dict[str, list[bytes]]:
    """The next `count` messages by topic (retained topics go out before queued messages)."""
    by_topic: dict[str, list[bytes]] = {}
    for _ in range(count):
        topic, payload = await asyncio.wait_for(queue.get(), WAIT_S)
        by_topic.setdefault(topic, []).append(payload)
    return by_topic


def _events(logs: Sequence[Mapping[str, Any]], event: str, client_id: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == event and e.get("client_id") == client_id]


@pytest.fixture
async def publisher(mqtt_broker: MosquittoBroker) -> AsyncIterator[MqttPublisher]:
    pub = MqttPublisher(_settings(mqtt_broker, "test-pub"))
    pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


async def test_messages_arrive_and_a_late_subscriber_gets_the_retained_routes(
    mqtt_broker: MosquittoBroker, publisher: MqttPublisher
) -> None:
    await _until("the publisher to connect", lambda: publisher.connected)
    async with observe(mqtt_broker.host, mqtt_broker.port, "test/v1/#") as seen:
        publisher.publish("test/v1/nodes/n0/telemetry", b"digest", qos=0)
        publisher.publish("test/v1/controller/events", b"event", qos=1)
        publisher.publish("test/v1/controller/routes", b"routes-1", qos=1, retain=True)
        assert await _take(seen, 3) == {
            "test/v1/nodes/n0/telemetry": [b"digest"],
            "test/v1/controller/events": [b"event"],
            "test/v1/controller/routes": [b"routes-1"],
        }
        publisher.publish("test/v1/controller/routes", b"routes-2", qos=1, retain=True)
        assert await next_payload(seen, "test/v1/controller/routes") == b"routes-2"

    async with observe(mqtt_broker.host, mqtt_broker.port, "test/v1/controller/routes") as late:
        assert await next_payload(late, "test/v1/controller/routes") == b"routes-2"  # the latest, retained
    assert publisher.dropped_count == 0


async def test_a_broker_restart_costs_one_warning_and_publishing_resumes(
    mqtt_broker: MosquittoBroker, publisher: MqttPublisher
) -> None:
    router = Router(merge_router({}, {}, {}), default_profile("llama2-70b", "h100-sxm"))
    routes = "test/v1/controller/routes"
    versions: list[int] = []  # each table the router installed

    def on_message(topic: str, payload: bytes) -> None:
        router.on_routes_message(topic, payload)
        versions.append(router.routes.version if router.routes else 0)

    subscriber = MqttSubscriber(_settings(mqtt_broker, "test-router"), [routes], on_message)
    with capture_logs() as logs:
        sub_task = asyncio.create_task(subscriber.run())
        try:
            await _until("both clients to connect", lambda: publisher.connected and subscriber.connected)
            publisher.publish(routes, routes_of_version(1), qos=1, retain=True)
            await _until("the router to get the first table", lambda: versions == [1])

            mqtt_broker.stop()
            await _until(
                "both clients to see the broker gone",
                lambda: not (publisher.connected or subscriber.connected),
            )
            for i in range(40):  # publishing goes on through the outage: never blocks, never raises
                publisher.publish("test/v1/nodes/n0/telemetry", f"digest-{i}".encode())
                publisher.publish("test/v1/controller/events", f"event-{i}".encode(), qos=1)
                await asyncio.sleep(0.05)  # 2 s: several failed reconnects of each client

            mqtt_broker.start()  # same port; without persistence it has lost the retained table
            await _until("both clients to reconnect", lambda: publisher.connected and subscriber.connected)
            for client_id in ("test-pub", "test-router"):
                assert len(_events(logs, "mqtt_unavailable", client_id)) == 1, client_id
                assert len(_events(logs, "mqtt_connected", client_id)) == 2, client_id
            warning = _events(logs, "mqtt_unavailable", "test-pub")[0]
            assert warning["log_level"] == "warning" and warning["error"]

            await _until("what was queued in the outage to go out", lambda: publisher.pending_count == 0)
            async with observe(mqtt_broker.host, mqtt_broker.port, routes) as late:
                # published again after the reconnect
                assert await next_payload(late, routes) == routes_of_version(1)
            # The router sees the table again (retained at its re-subscribe, or as the re-publish).
            await _until("the router to get the table again", lambda: versions[1:] == [1])
            async with observe(mqtt_broker.host, mqtt_broker.port, "test/v1/#") as seen:
                publisher.publish("test/v1/nodes/n0/telemetry", b"after", qos=0)
                publisher.publish(routes, routes_of_version(2), qos=1, retain=True)
                assert await next_payload(seen, "test/v1/nodes/n0/telemetry") == b"after"
            await _until("the router to get the next table", lambda: versions[1:] == [1, 2])
            assert router.routes is not None and router.routes.by_class["SS"].primary
        finally:
            sub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub_task


async def test_with_the_broker_down_from_the_start_publish_returns_and_the_queue_goes_out_later(
    mqtt_broker: MosquittoBroker,
) -> None:
    mqtt_broker.stop()
    retries = 0

    def counting_random() -> float:  # one call per backoff: the test knows when the publisher sleeps long
        nonlocal retries
        retries += 1
        return 0.999

    publisher = MqttPublisher(_settings(mqtt_broker, "test-pub"), queue_size=3, rng=counting_random)
    with capture_logs() as logs:
        publisher.start()
        try:
            for i in range(5):
                publisher.publish("test/v1/controller/events", f"event-{i}".encode(), qos=1)
            publisher.publish("test/v1/controller/routes", b"routes-1", qos=1, retain=True)
            assert publisher.dropped_count == 2  # the two oldest
            # Three failed attempts (0.5 s, 1 s of backoff): the next one is about 2 s away, time enough
            # for the broker and an observer to be up before the publisher connects.
            await _until("three failed connection attempts", lambda: retries >= 3)
            assert len(_events(logs, "mqtt_unavailable", "test-pub")) == 1
            mqtt_broker.start()
            async with observe(mqtt_broker.host, mqtt_broker.port, "test/v1/#") as seen:
                assert not publisher.connected
                assert await _take(seen, 4) == {
                    "test/v1/controller/events": [b"event-2", b"event-3", b"event-4"],
                    "test/v1/controller/routes": [b"routes-1"],
                }
            assert len(_events(logs, "mqtt_unavailable", "test-pub")) == 1
            assert len(_events(logs, "mqtt_connected", "test-pub")) == 1
        finally:
            await publisher.stop()


async def test_stop_without_a_broker_returns_within_the_flush_timeout(mqtt_broker: MosquittoBroker) -> None:
    mqtt_broker.stop()
    publisher = MqttPublisher(_settings(mqtt_broker, "test-pub"))
    publisher.start()
    publisher.publish("test/v1/controller/events", b"never sent", qos=1)
    await asyncio.wait_for(publisher.stop(flush_timeout_s=0.5), 5)
