"""The agent's MQTT fan-out (docs/mqtt.md): the node's status, retained, and a telemetry digest every
`mqtt.digest_period_s`, published through `agent.api.mqtt.MqttPublisher`, which never blocks the agent.

The digest is made of the telemetry sampler's latest sample (`agent.telemetry`: the ring buffer's newest
`NodeSample`); nothing is read from the GPUs for it, and a sample already published is not published
again (a sampler that stalls shows as digests that stop, not as repeated ones). The status says
`online` once connected; a clean stop says `offline` (reason `stopped`); an agent that dies, or loses its
network, gets the same `offline` (reason `connection_lost`) from the broker, which holds it as the
connection's last will. The client id is stable per node (`dynamollm-agent-<node_id>`): a restarted
agent takes over the session of its predecessor, so the predecessor's will goes out before the new
`online`, never after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from agent.api.clock import Clock
from agent.api.mqtt import MqttPublisher, MqttSettings, Will, json_payload
from agent.node import AGENT_VERSION, NodeAgent
from agent.telemetry import NodeSample

log = structlog.get_logger("agent.fanout")

DIGEST_SCHEMA = "dynamollm.telemetry_digest/v1"
STATUS_SCHEMA = "dynamollm.node_status/v1"


def digest_payload(node_id: str, sample: NodeSample, period_s: float) -> dict[str, Any]:
    """Per GPU read: power, energy counter, SM clock; the node's totals over those GPUs."""
    gpus = [
        {
            "index": index,
            "power_w": round(r.power_w, 3),
            "energy_j": round(r.energy_j, 3),
            "sm_clock_mhz": r.sm_clock_mhz,
        }
        for index, r in sample.readings
    ]
    return {
        "schema": DIGEST_SCHEMA,
        "node_id": node_id,
        "ts_unix_ns": sample.ts_unix_ns,
        "period_s": period_s,
        "gpus": gpus,
        "node": {
            "gpus": len(gpus),
            "power_w": round(sum(r.power_w for _, r in sample.readings), 3),
            "energy_j": round(sum(r.energy_j for _, r in sample.readings), 3),
        },
    }


def status_payload(agent: NodeAgent, state: str, reason: str, ts_unix_ns: int) -> dict[str, Any]:
    return {
        "schema": STATUS_SCHEMA,
        "node_id": agent.settings.node_id,
        "state": state,
        "reason": reason,
        "ts_unix_ns": ts_unix_ns,
        "agent_version": AGENT_VERSION,
        "gpus": agent.workers.count,
        "gpu_backend": agent.workers.kind,
    }


class NodeFanout:
    """`start()` connects and says online, `run()` publishes the digests until cancelled, `stop()` says
    offline and disconnects."""

    def __init__(
        self, agent: NodeAgent, settings: MqttSettings, digest_period_s: float, clock: Clock
    ) -> None:
        node_id = agent.settings.node_id
        self._agent = agent
        self._clock = clock
        self._period_s = digest_period_s
        self._status_topic = settings.topic("nodes", node_id, "status")
        self._digest_topic = settings.topic("nodes", node_id, "telemetry")
        # The will's time is when it was registered; a consumer learns the outage time on receipt.
        will = status_payload(agent, "offline", "connection_lost", clock.wall_ns())
        self.publisher = MqttPublisher(
            settings, will=Will(self._status_topic, json_payload(will), qos=1, retain=True)
        )
        self._last_seq = 0

    def start(self) -> None:
        self.publisher.start()
        self._status("online", "started")

    async def run(self) -> None:
        """Until cancelled. Never ends with an error: the agent's stop awaits this task before it
        restores the GPUs."""
        while True:
            await asyncio.sleep(self._period_s)
            try:
                self._publish_digest()
            except Exception:
                log.exception("mqtt_digest_failed")

    def _publish_digest(self) -> None:
        ring = self._agent.sampler.ring
        if not ring or ring[-1].seq == self._last_seq:
            return
        sample = ring[-1]
        self._last_seq = sample.seq
        payload = digest_payload(self._agent.settings.node_id, sample, self._period_s)
        self.publisher.publish(self._digest_topic, json_payload(payload), qos=0)

    async def stop(self) -> None:
        self._status("offline", "stopped")
        await self.publisher.stop()

    def _status(self, state: str, reason: str) -> None:
        payload = status_payload(self._agent, state, reason, self._clock.wall_ns())
        self.publisher.publish(self._status_topic, json_payload(payload), qos=1, retain=True)
