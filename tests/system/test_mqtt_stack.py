"""The MQTT fan-out of the whole stack, real processes on loopback with a real Mosquitto: the agents'
status and digests, the controller's events and retained routing table arrive on the broker; a router
with `routes_source = "mqtt"` takes its table from the retained topic and routes a request to an engine;
an agent killed with SIGKILL shows as offline through its last will."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.mqtt_broker import MosquittoBroker, Received, observe
from tests.system.stack import Stack, stop, wait_for
from tests.system.test_controller_stack import node_addresses, wait_converged
from tests.system.test_router_stack import _start_router

PREFIX = "dynamollm/v1"
AGENTS = 2


class Seen:
    """Every JSON payload an observer of `PREFIX/#` got, by topic."""

    def __init__(self) -> None:
        self.by_topic: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)

    async def pump(self, received: Received) -> None:
        while True:
            topic, payload = await received.get()
            self.by_topic[topic].append(json.loads(payload))

    def last(self, topic: str) -> dict[str, Any] | None:
        docs = self.by_topic.get(topic)
        return docs[-1] if docs else None

    async def wait_last(self, topic: str, timeout_s: float = 10.0) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            return self.last(topic)

        return await wait_for(f"a message on {topic}", probe, timeout_s)


@contextlib.asynccontextmanager
async def _seen(broker: MosquittoBroker) -> AsyncIterator[Seen]:
    seen = Seen()
    async with observe(broker.host, broker.port, f"{PREFIX}/#") as received:
        task = asyncio.create_task(seen.pump(received))
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_digests_events_and_routes_on_the_broker_and_a_router_routing_from_mqtt(
    mqtt_broker: MosquittoBroker, stack: Stack, tmp_path: Path
) -> None:
    # The broker comes first, so that it goes last: the daemons see no outage at the end.
    broker = {"MQTT_HOST": mqtt_broker.host, "MQTT_PORT": str(mqtt_broker.port)}

    def agent_env(index: int) -> dict[str, str]:
        return {
            **{f"DYNAMOLLM_AGENT_{k}": v for k, v in broker.items()},
            "DYNAMOLLM_AGENT_NODE_ID": f"n{index}",
            "DYNAMOLLM_AGENT_MQTT_DIGEST_PERIOD_S": "0.5",
        }

    async def scenario() -> None:
        async with _seen(mqtt_broker) as seen:
            agents = await stack.start_agents(AGENTS, env=agent_env)
            ctl = await stack.start_controller(
                node_addresses(agents), env={f"DYNAMOLLM_CONTROLLER_{k}": v for k, v in broker.items()}
            )
            async with ctl.admin() as admin:
                await wait_converged(admin, agents)

            for agent in agents:
                status = seen.last(f"{PREFIX}/nodes/{agent.name}/status")
                assert status is not None and status["state"] == "online", status
                digest = await seen.wait_last(f"{PREFIX}/nodes/{agent.name}/telemetry")
                assert digest["schema"] == "dynamollm.telemetry_digest/v1" and digest["node"]["gpus"] == 8
            kinds = {e["kind"] for e in seen.by_topic[f"{PREFIX}/controller/events"]}
            assert {"decision", "command", "node"} <= kinds, kinds
            table = await seen.wait_last(f"{PREFIX}/controller/routes")
            assert table["schema"] == "dynamollm.routes/v1"
            assert any(e["http_port"] for c in table["classes"] for e in c["primary"]), table

            router_env = {
                "DYNAMOLLM_ROUTER_ROUTES_SOURCE": "mqtt",
                "DYNAMOLLM_ROUTER_MQTT_HOST": mqtt_broker.host,
                "DYNAMOLLM_ROUTER_MQTT_PORT": str(mqtt_broker.port),
                "DYNAMOLLM_ROUTER_LOG_JSON": "true",
            }
            router, url = await _start_router(tmp_path, ctl.address, env=router_env)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

                    async def routed() -> bool | None:
                        body = {"model": "llama2-70b", "prompt": "hi", "max_tokens": 3}
                        async with session.post(url + "/v1/completions", json=body) as resp:
                            return True if resp.status == 200 else None

                    await wait_for("the router to route from the retained table", routed, 20)
                    async with session.get(url + "/health") as resp:
                        assert (await resp.json())["routes_version"] >= 1
            finally:
                assert await stop(router, signal.SIGTERM, 40) == 0
            log = (tmp_path / "router.log").read_text()
            assert "routes_updated" in log and "controller_unreachable" not in log

            victim = agents[-1]
            victim.proc.kill()  # no clean disconnect: the broker publishes the agent's will
            await victim.proc.wait()

            async def offline() -> dict[str, Any] | None:
                status = seen.last(f"{PREFIX}/nodes/{victim.name}/status")
                return status if status and status["state"] == "offline" else None

            status = await wait_for("the killed agent's will", offline, 10)
            assert status["reason"] == "connection_lost"

    await asyncio.wait_for(scenario(), 90)
