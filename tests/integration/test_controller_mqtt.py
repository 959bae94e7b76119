"""The controller's and the router's MQTT sides in-process, with a real Mosquitto or none: the controller's
events reach the broker as it streams them to WatchEvents callers; with the broker down from the start
the controller and a router with `routes_source = "mqtt"` start, serve their APIs and stop as usual, each
with one warning."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from controller.api.client import AdminClient
from controller.app import RunningController, start_controller
from controller.fanout import EVENT_SCHEMA
from controller.router.app import start_router
from controller.router.settings import merge_settings as merge_router
from controller.settings import merge_settings as merge_controller
from tests.mqtt_broker import MosquittoBroker, free_port, next_payload, observe

EVENTS = "dynamollm/v1/controller/events"


async def _controller(tmp_path: Path, mqtt: dict[str, Any]) -> RunningController:
    """A controller of one node nobody serves (its agent is never reached): the admin API still works."""
    settings = merge_controller(
        {
            "listen": "127.0.0.1:0",
            "metrics_listen": "",
            "store_path": str(tmp_path / "controller.db"),
            "nodes": [{"name": "n0", "address": f"127.0.0.1:{free_port()}"}],
            "fleet": {"call_timeout_s": 2.0},
            "mqtt": mqtt,
        },
        {},
        {},
    )
    return await start_controller(settings)


async def test_the_controllers_events_reach_the_broker(tmp_path: Path, mqtt_broker: MosquittoBroker) -> None:
    running = await _controller(tmp_path, {"host": mqtt_broker.host, "port": mqtt_broker.port})
    try:
        async with observe(mqtt_broker.host, mqtt_broker.port, EVENTS) as seen:
            async with AdminClient(f"127.0.0.1:{running.port}", timeout_s=5.0) as admin:
                await admin.set_mode("paused", reason="maintenance")

            async def mode_event() -> dict[str, Any]:
                while True:
                    event: dict[str, Any] = json.loads(await next_payload(seen, EVENTS))
                    if event["kind"] == "mode":
                        return event

            event = await asyncio.wait_for(mode_event(), 15)
        assert event["schema"] == EVENT_SCHEMA and event["detail"] == {
            "mode": "paused",
            "reason": "maintenance",
        }
        assert event["seq"] > 0 and event["ts_unix_ns"] > 0 and "paused" in event["summary"]
    finally:
        await running.stop()


async def test_with_the_broker_down_the_controller_serves_and_stops(tmp_path: Path) -> None:
    with capture_logs() as logs:
        running = await _controller(tmp_path, {"host": "127.0.0.1", "port": free_port()})
        try:
            async with AdminClient(f"127.0.0.1:{running.port}", timeout_s=5.0) as admin:
                await admin.set_mode("paused", reason="broker down")
                assert (await admin.cluster_status()).mode
            await asyncio.sleep(1.0)  # events queue up, reconnects fail
        finally:
            await asyncio.wait_for(running.stop(), 30)
    assert len([e for e in logs if e["event"] == "mqtt_unavailable"]) == 1


async def test_with_the_broker_down_a_router_on_mqtt_routes_serves_and_stops(tmp_path: Path) -> None:
    settings = merge_router(
        {
            "listen": "127.0.0.1:0",
            "controller": f"127.0.0.1:{free_port()}",
            "routes_source": "mqtt",
            "mqtt": {"host": "127.0.0.1", "port": free_port()},
        },
        {},
        {},
    )
    with capture_logs() as logs:
        running = await start_router(settings)
        try:
            url = f"http://127.0.0.1:{running.port}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.get(url + "/health") as resp:
                    assert resp.status == 200 and (await resp.json())["routes_version"] == 0
                body = {"model": "llama2-70b", "prompt": "hi", "max_tokens": 2}
                async with session.post(url + "/v1/completions", json=body) as resp:
                    assert resp.status == 503 and "routing table" in (await resp.json())["error"]["message"]
            await asyncio.sleep(1.0)
        finally:
            await asyncio.wait_for(running.stop(), 30)
    assert len([e for e in logs if e["event"] == "mqtt_unavailable"]) == 1
