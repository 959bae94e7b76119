"""The fan-out's payloads (controller.fanout, agent.fanout): the routing table survives its JSON round trip
with everything the router's `Routes` needs; a malformed table names the bad field, and the router logs
it once per topic and keeps its last good table; events and digests carry their schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.api.errors import InvalidArgumentError
from agent.fanout import DIGEST_SCHEMA, digest_payload
from agent.gpu.base import GpuReading
from agent.telemetry import NodeSample
from controller.api.v1 import admin_pb2
from controller.fanout import EVENT_SCHEMA, ROUTES_SCHEMA, event_payload, routes_from_payload, routes_payload
from controller.loops.events import Event
from controller.profiles import default_profile
from controller.router.app import Router
from controller.router.routes import Routes
from controller.router.settings import merge_settings

TOPIC = "dynamollm/v1/controller/routes"


def _endpoint(instance_id: int, port: int, weight_s: float) -> admin_pb2.RouteEndpoint:
    return admin_pb2.RouteEndpoint(
        instance_id=instance_id, node=f"n{instance_id}", host="10.0.0.7", http_port=port, weight_s=weight_s
    )


def _table(version: int = 7) -> admin_pb2.RoutingTable:
    return admin_pb2.RoutingTable(
        version=version,
        classes=[
            admin_pb2.ClassRoute(
                class_name="SS",
                pool="S",
                primary=[_endpoint(1, 8101, 0.0123456789), _endpoint(2, 0, 0.5)],  # port 0: not known yet
                fallback=[_endpoint(3, 8103, 1 / 3)],
            ),
            admin_pb2.ClassRoute(class_name="LL", pool="", primary=[], fallback=[]),
        ],
    )


def routes_of_version(version: int) -> bytes:
    """A routes payload as the controller publishes it."""
    return routes_payload(_table(version), ts_unix_ns=version)


def test_the_routing_table_round_trips_with_everything_routes_needs() -> None:
    table = _table()
    payload = routes_payload(table, ts_unix_ns=1_700_000_000_000_000_000)
    doc = json.loads(payload)
    assert (
        doc["schema"] == ROUTES_SCHEMA
        and doc["version"] == 7
        and doc["ts_unix_ns"] == 1_700_000_000_000_000_000
    )
    back = routes_from_payload(payload)
    assert back == table
    assert Routes.from_pb(back) == Routes.from_pb(table)
    ss = Routes.from_pb(back).by_class["SS"]
    assert [e.url for e in ss.primary] == ["http://10.0.0.7:8101"] and ss.fallback[0].weight_s == 1 / 3


def _bad(mutate: Callable[[dict[str, Any]], object]) -> bytes:
    """A good payload with one change."""
    doc = json.loads(routes_payload(_table(), 1))
    mutate(doc)
    return json.dumps(doc).encode()


def _endpoint_of(doc: dict[str, Any], side: str, j: int) -> dict[str, Any]:
    endpoint: dict[str, Any] = doc["classes"][0][side][j]
    return endpoint


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"", "payload"),
        (b"{not json", "payload"),
        (b"\xff\xfe", "payload"),
        (b"[]", "payload"),
        (_bad(lambda d: d.update(schema="dynamollm.routes/v2")), "schema"),
        (_bad(lambda d: d.pop("schema")), "schema"),
        (_bad(lambda d: d.update(version=-1)), "version"),
        (_bad(lambda d: d.update(version=True)), "version"),
        (_bad(lambda d: d.update(classes={})), "classes"),
        (_bad(lambda d: d["classes"].__setitem__(1, "LL")), "classes[1]"),
        (_bad(lambda d: d["classes"][0].update(class_name=3)), "classes[0].class_name"),
        (_bad(lambda d: d["classes"][0].pop("fallback")), "classes[0].fallback"),
        (
            _bad(lambda d: _endpoint_of(d, "primary", 0).update(http_port=70000)),
            "classes[0].primary[0].http_port",
        ),
        (
            _bad(lambda d: _endpoint_of(d, "primary", 1).update(instance_id=1.5)),
            "classes[0].primary[1].instance_id",
        ),
        (
            _bad(lambda d: _endpoint_of(d, "fallback", 0).update(weight_s="fast")),
            "classes[0].fallback[0].weight_s",
        ),
        (_bad(lambda d: _endpoint_of(d, "fallback", 0).update(host=None)), "classes[0].fallback[0].host"),
    ],
)
def test_a_malformed_table_names_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        routes_from_payload(payload)
    assert info.value.field == field, info.value


def test_the_router_logs_a_malformed_table_once_per_topic_and_keeps_the_last_good_one() -> None:
    router = Router(merge_settings({}, {}, {}), default_profile("llama2-70b", "h100-sxm"))
    with capture_logs() as logs:
        router.on_routes_message(TOPIC, routes_payload(_table(7), 1))
        for _ in range(3):
            router.on_routes_message(TOPIC, b"{broken")
            router.on_routes_message("other/v1/controller/routes", b"[]")
        assert router.routes is not None and router.routes.version == 7
        router.on_routes_message(TOPIC, routes_payload(_table(8), 2))
        router.on_routes_message(TOPIC, b"{broken again")
    assert router.routes.version == 8
    invalid = [(e["topic"], e["log_level"]) for e in logs if e["event"] == "mqtt_payload_invalid"]
    assert invalid == [(TOPIC, "warning"), ("other/v1/controller/routes", "warning"), (TOPIC, "warning")]


def test_an_event_carries_its_schema_and_its_detail_as_json() -> None:
    event = Event(4, 123, "mode", "mode observe -> apply by ops", json.dumps({"mode": "apply"}))
    assert json.loads(event_payload(event)) == {
        "schema": EVENT_SCHEMA,
        "seq": 4,
        "ts_unix_ns": 123,
        "kind": "mode",
        "summary": "mode observe -> apply by ops",
        "detail": {"mode": "apply"},
    }


def test_a_digest_has_per_gpu_readings_and_node_totals() -> None:
    def reading(power_w: float, energy_j: float, clock_mhz: int) -> GpuReading:
        return GpuReading(power_w, energy_j, clock_mhz, 2619, 0.5, 0.1, 1 << 30, 55.0, 700.0, 0)

    sample = NodeSample(
        9, 1_000, 5.0, ((0, reading(300.5, 1000.0, 1980)), (2, reading(99.5, 20.25, 1410))), ()
    )
    doc = digest_payload("gpu-01", sample, 10.0)
    assert doc == {
        "schema": DIGEST_SCHEMA,
        "node_id": "gpu-01",
        "ts_unix_ns": 1_000,
        "period_s": 10.0,
        "gpus": [
            {"index": 0, "power_w": 300.5, "energy_j": 1000.0, "sm_clock_mhz": 1980},
            {"index": 2, "power_w": 99.5, "energy_j": 20.25, "sm_clock_mhz": 1410},
        ],
        "node": {"gpus": 2, "power_w": 400.0, "energy_j": 1020.25},
    }
