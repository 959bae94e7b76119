"""The controller's MQTT fan-out (docs/mqtt.md) and the payloads it shares with the router.

Flow: `fan_out` subscribes to the controller's `EventBus` as a `WatchEvents` caller does (so the control
loop publishes nothing itself and never waits for MQTT) and hands every event to the publisher
(`agent.api.mqtt.MqttPublisher`, which never blocks): decisions, commands, mode and node changes to
`PREFIX/v1/controller/events` (QoS 1, not retained: a stream), the routing table to
`PREFIX/v1/controller/routes` (QoS 1, retained: a router or dashboard that joins late gets the latest
table at once). The table goes out as `WatchEvents` delivers it (`ControllerCore.routes_pb`: endpoints
with host and engine port), so `routes_from_payload` rebuilds the same `admin_pb2.RoutingTable` the
router's `Routes.from_pb` takes either way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import structlog

from agent.api.errors import InvalidArgumentError
from agent.api.mqtt import MqttPublisher, MqttSettings, json_payload
from controller.api.v1 import admin_pb2
from controller.loops.events import Event, EventBus
from controller.model.fleet import RoutingTable

log = structlog.get_logger("controller.fanout")

EVENT_SCHEMA = "dynamollm.event/v1"
ROUTES_SCHEMA = "dynamollm.routes/v1"
EVENT_KINDS = ("decision", "command", "mode", "node")  # what goes to the events topic
RoutesPb = Callable[[RoutingTable], admin_pb2.RoutingTable]


def events_topic(settings: MqttSettings) -> str:
    return settings.topic("controller", "events")


def routes_topic(settings: MqttSettings) -> str:
    return settings.topic("controller", "routes")


def event_payload(event: Event) -> bytes:
    return json_payload(
        {
            "schema": EVENT_SCHEMA,
            "seq": event.seq,
            "ts_unix_ns": event.ts_unix_ns,
            "kind": event.kind,
            "summary": event.summary,
            "detail": json.loads(event.detail_json),
        }
    )


def _endpoint_doc(e: admin_pb2.RouteEndpoint) -> dict[str, Any]:
    return {
        "instance_id": e.instance_id,
        "node": e.node,
        "host": e.host,
        "http_port": e.http_port,
        "weight_s": e.weight_s,
    }


def routes_payload(table: admin_pb2.RoutingTable, ts_unix_ns: int) -> bytes:
    classes = [
        {
            "class_name": route.class_name,
            "pool": route.pool,
            "primary": [_endpoint_doc(e) for e in route.primary],
            "fallback": [_endpoint_doc(e) for e in route.fallback],
        }
        for route in table.classes
    ]
    return json_payload(
        {"schema": ROUTES_SCHEMA, "version": table.version, "ts_unix_ns": ts_unix_ns, "classes": classes}
    )


# ------------------------------------------------------------------------------------------ decoding


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _port(v: Any) -> bool:
    return _uint(v) and v <= 65535


def _seconds(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _list(v: Any) -> bool:
    return isinstance(v, list)


def _get(doc: dict[str, Any], where: str, name: str, ok: Callable[[Any], bool], allowed: str) -> Any:
    value = doc.get(name)
    if not ok(value):
        raise InvalidArgumentError(f"{where}{name}", value, allowed)
    return value


def _object(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidArgumentError(where, doc, "a JSON object")
    return doc


def _endpoints(route: dict[str, Any], where: str, name: str) -> list[admin_pb2.RouteEndpoint]:
    out = []
    for j, item in enumerate(_get(route, where, name, _list, "a list of endpoints")):
        d = _object(item, f"{where}{name}[{j}]")
        at = f"{where}{name}[{j}]."
        out.append(
            admin_pb2.RouteEndpoint(
                instance_id=_get(d, at, "instance_id", _uint, "an instance id >= 0"),
                node=_get(d, at, "node", _str, "a node name"),
                host=_get(d, at, "host", _str, "the node's address without the port"),
                http_port=_get(d, at, "http_port", _port, "a port 0..65535 (0: not known yet)"),
                weight_s=_get(d, at, "weight_s", _seconds, "a finite number of seconds >= 0"),
            )
        )
    return out


def routes_from_payload(payload: bytes) -> admin_pb2.RoutingTable:
    """The routing table of a `routes_payload`; InvalidArgumentError naming the first bad field."""
    try:
        doc = _object(json.loads(payload), "payload")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError("payload", payload[:80], f"UTF-8 JSON ({exc})") from None
    _get(doc, "", "schema", lambda v: v == ROUTES_SCHEMA, ROUTES_SCHEMA)
    table = admin_pb2.RoutingTable(version=_get(doc, "", "version", _uint, "a version >= 0"))
    for i, item in enumerate(_get(doc, "", "classes", _list, "a list of class routes")):
        route = _object(item, f"classes[{i}]")
        at = f"classes[{i}]."
        table.classes.append(
            admin_pb2.ClassRoute(
                class_name=_get(route, at, "class_name", _str, "a class name (SS..LL)"),
                pool=_get(route, at, "pool", _str, "a pool name"),
                primary=_endpoints(route, at, "primary"),
                fallback=_endpoints(route, at, "fallback"),
            )
        )
    return table


# ------------------------------------------------------------------------------------------ fan-out


async def fan_out(
    bus: EventBus, publisher: MqttPublisher, settings: MqttSettings, routes_pb: RoutesPb
) -> None:
    """Every event of the bus to its topic, until cancelled (module docstring). Never ends with an
    error: the controller's stop awaits this task."""
    events, routes = events_topic(settings), routes_topic(settings)
    async for event in bus.subscribe(frozenset()):
        try:
            if event.routes is not None:
                payload = routes_payload(routes_pb(event.routes), event.ts_unix_ns)
                publisher.publish(routes, payload, qos=1, retain=True)
            elif event.kind in EVENT_KINDS:
                publisher.publish(events, event_payload(event), qos=1)
        except Exception:
            log.exception("mqtt_event_not_published", kind=event.kind, seq=event.seq)
