"""The MQTT client's pure parts (agent.api.mqtt): the `mqtt.*` keys in all three daemons' settings with
errors naming the key, the password file read once, the reconnect backoff with an injected random, and
the publisher's bounded queue (no broker: nothing here connects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.api.config import merge_values
from agent.api.errors import InvalidArgumentError
from agent.api.mqtt import MQTT_KEYS, Backoff, MqttPublisher, MqttSettings, load_mqtt_settings
from agent.settings import merge_settings as merge_agent
from controller.router.settings import merge_settings as merge_router
from controller.settings import merge_settings as merge_controller

PREFIX = "DYNAMOLLM_TEST_"


def _load(file_values: dict[str, Any], client_id: str = "c") -> MqttSettings:
    return load_mqtt_settings(merge_values(MQTT_KEYS, file_values, {}, {}, PREFIX), client_id)


def _secret(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_defaults_mean_mqtt_off_and_topics_are_versioned() -> None:
    s = _load({})
    assert not s.enabled and s.port == 1883 and s.topic_prefix == "dynamollm"
    assert _load({"mqtt": {"host": "b", "topic_prefix": "site/a"}}).topic("nodes", "n1", "status") == (
        "site/a/v1/nodes/n1/status"
    )


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"host": "bad host"}, "mqtt.host"),
        ({"port": 0}, "mqtt.port"),
        ({"port": 70000}, "mqtt.port"),
        ({"port": "1883"}, "mqtt.port"),
        ({"topic_prefix": "a/#"}, "mqtt.topic_prefix"),
        ({"topic_prefix": "a/+/b"}, "mqtt.topic_prefix"),
        ({"topic_prefix": "/a"}, "mqtt.topic_prefix"),
        ({"topic_prefix": ""}, "mqtt.topic_prefix"),
        ({"password_file": "/nonexistent"}, "mqtt.username"),
        ({"username": "u", "password_file": "/nonexistent"}, "mqtt.password_file"),
        ({"tls_ca": "/nonexistent.pem"}, "mqtt.tls_ca"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _load({"mqtt": values})
    assert info.value.field == key


def test_the_password_is_read_once_and_never_shown(tmp_path: Path) -> None:
    path = _secret(tmp_path, "s3cret-pass\n")
    s = _load({"mqtt": {"host": "b", "username": "agent", "password_file": str(path)}})
    path.write_text("changed", encoding="utf-8")
    assert s.password == "s3cret-pass" and s.password_file == path
    assert "s3cret" not in repr(s)


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = _secret(tmp_path, "pw", mode=0o644)
    with pytest.raises(InvalidArgumentError) as info:
        _load({"mqtt": {"host": "b", "username": "u", "password_file": str(path)}})
    assert info.value.field == "mqtt.password_file" and "0644" in str(info.value)


def test_the_agent_reads_its_mqtt_keys_from_the_environment() -> None:
    env = {"DYNAMOLLM_AGENT_MQTT_HOST": "broker", "DYNAMOLLM_AGENT_MQTT_DIGEST_PERIOD_S": "2.5"}
    s = merge_agent({}, env, {}, hostname="gpu-01")
    assert s.mqtt.host == "broker" and s.mqtt_digest_period_s == 2.5
    assert s.mqtt.client_id == "dynamollm-agent-gpu-01"  # stable across restarts: takes over the session
    with pytest.raises(InvalidArgumentError) as info:
        merge_agent({}, {**env, "DYNAMOLLM_AGENT_MQTT_DIGEST_PERIOD_S": "0"}, {}, hostname="gpu-01")
    assert info.value.field == "mqtt.digest_period_s"


def test_the_agents_node_id_must_be_a_topic_level_when_mqtt_is_on() -> None:
    assert merge_agent({"node_id": "a/b"}, {}, {}, hostname="h").node_id == "a/b"  # MQTT off: no matter
    with pytest.raises(InvalidArgumentError) as info:
        merge_agent({"node_id": "a/b", "mqtt": {"host": "broker"}}, {}, {}, hostname="h")
    assert info.value.field == "node_id"


def test_the_controller_and_the_router_read_the_mqtt_keys() -> None:
    nodes = {"nodes": [{"name": "a", "address": "h:1"}]}
    controller = merge_controller({**nodes, "mqtt": {"host": "broker", "port": 8883}}, {}, {})
    assert (controller.mqtt.host, controller.mqtt.port) == ("broker", 8883)
    assert controller.mqtt.client_id.startswith("dynamollm-controller-")
    router = merge_router(
        {}, {"DYNAMOLLM_ROUTER_ROUTES_SOURCE": "mqtt", "DYNAMOLLM_ROUTER_MQTT_HOST": "b"}, {}
    )
    assert router.routes_source == "mqtt" and router.mqtt.host == "b"
    assert merge_router({}, {}, {}).routes_source == "controller"


@pytest.mark.parametrize(
    ("values", "key"),
    [({"routes_source": "mqtt"}, "mqtt.host"), ({"routes_source": "broker"}, "routes_source")],
)
def test_the_routers_routes_source_is_checked(values: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        merge_router(values, {}, {})
    assert info.value.field == key


def test_backoff_doubles_to_30_s_with_jitter_from_the_injected_random() -> None:
    low = Backoff(lambda: 0.0)
    assert [low.next_s() for _ in range(9)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    high = Backoff(lambda: 0.999999)
    delays = [high.next_s() for _ in range(8)]
    assert delays[0] == pytest.approx(0.5, rel=1e-5) and delays[-1] == pytest.approx(30.0, rel=1e-5)
    high.reset()
    assert high.next_s() == pytest.approx(0.5, rel=1e-5)


async def test_publish_queues_without_a_connection_and_drops_the_oldest() -> None:
    publisher = MqttPublisher(MqttSettings(host="unused"), queue_size=3)
    for i in range(5):
        publisher.publish("t/events", str(i).encode(), qos=1)
    for version in range(3):  # a retained topic keeps only its latest payload
        publisher.publish("t/routes", str(version).encode(), qos=1, retain=True)
    assert publisher.dropped_count == 2 and publisher.pending_count == 3 + 1
    assert not publisher.connected
