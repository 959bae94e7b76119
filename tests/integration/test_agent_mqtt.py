"""The agent's MQTT fan-out (agent.fanout) in-process with the simulated backend and a real Mosquitto: it
says online, publishes digests made of the sampler's readings, says offline at a clean stop; with no
broker at all it starts, serves gRPC and stops as usual, with one warning."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

from structlog.testing import capture_logs

from agent.api.client import AgentClient
from agent.app import start_agent
from agent.fanout import DIGEST_SCHEMA, STATUS_SCHEMA
from tests.integration.test_agent_service import GPUS, make_settings
from tests.mqtt_broker import MosquittoBroker, free_port, next_payload, observe

NODE = "test-node"  # make_settings' hostname, the default node id
STATUS = f"dynamollm/v1/nodes/{NODE}/status"
TELEMETRY = f"dynamollm/v1/nodes/{NODE}/telemetry"


async def test_status_digests_and_offline_at_a_clean_stop(
    tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    settings = make_settings(
        tmp_path, mqtt={"host": mqtt_broker.host, "port": mqtt_broker.port, "digest_period_s": 0.2}
    )
    async with observe(mqtt_broker.host, mqtt_broker.port, f"dynamollm/v1/nodes/{NODE}/#") as seen:
        running = await start_agent(settings)
        try:
            status = json.loads(await next_payload(seen, STATUS))
            assert status["schema"] == STATUS_SCHEMA and status["node_id"] == NODE
            assert (status["state"], status["reason"], status["gpus"]) == ("online", "started", GPUS)
            digest = json.loads(await next_payload(seen, TELEMETRY))
            assert digest["schema"] == DIGEST_SCHEMA and digest["node_id"] == NODE
            assert [g["index"] for g in digest["gpus"]] == list(range(GPUS))
            sample = next(s for s in running.agent.sampler.ring if s.ts_unix_ns == digest["ts_unix_ns"])
            for gpu, (index, reading) in zip(digest["gpus"], sample.readings, strict=True):
                assert gpu["index"] == index and gpu["sm_clock_mhz"] == reading.sm_clock_mhz
                assert math.isclose(gpu["power_w"], reading.power_w, abs_tol=1e-3)
                assert math.isclose(gpu["energy_j"], reading.energy_j, abs_tol=1e-3)
            node = digest["node"]
            assert node["gpus"] == GPUS and node["power_w"] > 0
            assert math.isclose(node["power_w"], sum(g["power_w"] for g in digest["gpus"]), abs_tol=0.01)
            assert math.isclose(node["energy_j"], sum(g["energy_j"] for g in digest["gpus"]), abs_tol=0.01)
            later = json.loads(await next_payload(seen, TELEMETRY))
            assert later["ts_unix_ns"] > digest["ts_unix_ns"]
        finally:
            await running.stop()
        status = json.loads(await next_payload(seen, STATUS))
        assert (status["state"], status["reason"]) == ("offline", "stopped")
    async with observe(mqtt_broker.host, mqtt_broker.port, STATUS) as late:  # retained for late joiners
        assert json.loads(await next_payload(late, STATUS))["state"] == "offline"


async def test_without_a_broker_the_agent_serves_grpc_and_warns_once(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, mqtt={"host": "127.0.0.1", "port": free_port(), "digest_period_s": 0.1}
    )
    with capture_logs() as logs:
        running = await start_agent(settings)
        try:
            async with AgentClient(f"127.0.0.1:{running.port}", timeout_s=5.0) as client:
                inventory = await client.inventory()
            assert len(inventory.gpus) == GPUS
            await asyncio.sleep(1.0)  # digests queue up, reconnects fail
        finally:
            await asyncio.wait_for(running.stop(), 30)
    warnings = [e for e in logs if e["event"] == "mqtt_unavailable"]
    assert len(warnings) == 1 and warnings[0]["client_id"] == f"dynamollm-agent-{NODE}"
