"""Entry point of `dynamollm-agent` (and `python -m agent.app`): settings, GPU backend, crash recovery,
the grpc.aio server with NodeTelemetry, NodeControl, health and reflection, Prometheus `/metrics`
(`agent.metrics`), background tasks (telemetry sampler, lease watcher, the MQTT fan-out of
`agent.fanout`, systemd watchdog), and graceful stop. Security set-up lives here too: TLS / mTLS
credentials, the Unix socket's file mode, the authorizer and the audit log (docs/agent.md, *Access*); the
daemon plumbing a second daemon reuses (binding with TLS and the socket mode, authorization, serving
`/metrics`, systemd notices) comes from `agent.api.serving`, `agent.api.auth`, `agent.api.metrics_http`
and `agent.api.systemd`.

    dynamollm-agent [--config F] [--simulated --gpus N [--time-scale X]] [--listen HOST:PORT]
        [--metrics-listen HOST:PORT] [--runtime-dir D]
    dynamollm-agent restore-defaults [--config F] [...]     # systemd ExecStopPost: no server

The first line on stdout is a JSON `agent_listening` event with the bound port and the Prometheus
`/metrics` port (`metrics_port`, 0 when `metrics_listen` is empty; tests start the agent on port 0 and
read them). SIGTERM / SIGINT: health NOT_SERVING, stop accepting calls, restore GPU defaults,
drain and stop engines, exit 0. `start_agent` is the same server in-process (tests, dctl, benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from agent.api.auth import Authorizer
from agent.api.clock import Clock, SystemClock
from agent.api.errors import DataFileError, DynamoError, InvalidArgumentError
from agent.api.log import configure_logging
from agent.api.metrics_http import serve_metrics
from agent.api.serving import bind, unix_path
from agent.api.systemd import notify_ready, sd_notify
from agent.api.v1 import control_pb2, telemetry_pb2
from agent.audit import AuditLog
from agent.engine.driver import EngineDriver
from agent.engine.ownership import gpu_process_lister
from agent.fanout import NodeFanout
from agent.gpu.base import GpuBackend
from agent.gpu.worker import GpuWorkers
from agent.metrics import AgentMetrics
from agent.node import NodeAgent
from agent.safety import AgentStateDoc, GpuSafety, StateStore, after_recovery, pending_gpu_writes
from agent.service import ControlServicer, TelemetryServicer, add_services
from agent.settings import AgentSettings, load_settings

log = structlog.get_logger("agent.app")

SERVICE_NAMES = (
    telemetry_pb2.DESCRIPTOR.services_by_name["NodeTelemetry"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["NodeControl"].full_name,
)
STOP_GRACE_S = 1.0  # in-flight RPCs (telemetry streams never end by themselves) get this long at stop
# Requests are a few hundred bytes; 1 MiB leaves room for any legitimate one and bounds what a single
# call can make the agent parse (larger: RESOURCE_EXHAUSTED from gRPC before any code of ours runs).
MAX_REQUEST_BYTES = 1 << 20


def make_backend(settings: AgentSettings) -> GpuBackend:
    """The configured backend (blocking: NVML initialises here)."""
    if settings.gpu_backend == "simulated":
        # The one reference to agent.sim in the agent's production code, on purpose and lazy: the
        # composition root plugs the simulated node in only when the configuration asks for it, so a
        # real node never imports the simulation (nor numpy and the fitted physics behind it).
        from agent.sim.gpu import SimulatedGpuBackend

        sim = settings.simulated
        return SimulatedGpuBackend(
            sim.node_dir, gpus=sim.gpus, gpu=sim.gpu, model=sim.model, time_scale=sim.time_scale
        )
    from agent.gpu.nvml import NvmlBackend

    return NvmlBackend()


def make_driver(settings: AgentSettings, clock: Clock, workers: GpuWorkers | None = None) -> EngineDriver:
    """The engine driver: its record file in the runtime directory (adopted or stopped at start-up), and
    the GPU workers' process lists to refuse GPUs held by processes it does not own."""
    sim = settings.simulated
    template_vars = (
        {"node_dir": str(sim.node_dir), "gpu": sim.gpu, "time_scale": repr(float(sim.time_scale))}
        if settings.engine.kind == "simulated"
        else {}
    )
    return EngineDriver(
        settings.engine.command,
        ready_timeout_s=settings.engine.ready_timeout_s,
        stop_grace_s=settings.engine.stop_grace_s,
        clock=clock,
        log_dir=settings.engine.log_dir,
        template_vars=template_vars,
        record_path=settings.runtime_dir / "engines.json",
        gpu_processes=gpu_process_lister(workers) if workers is not None else None,
    )


async def load_state(store: StateStore, safety: GpuSafety) -> AgentStateDoc:
    """The persisted state; an unreadable file means nothing is known, so every GPU is reset."""
    try:
        return await asyncio.to_thread(store.load)
    except DataFileError as exc:
        log.error("state_file_unreadable", path=str(store.path), error=str(exc))
        await safety.reset_all_unknown()
        return AgentStateDoc()


@dataclass
class RunningAgent:
    """An agent serving on `address` (`port` 0 for a Unix socket) and its metrics on `metrics_port` (0:
    none); `stop()` is the graceful stop."""

    agent: NodeAgent
    server: grpc.aio.Server
    health: HealthServicer
    address: str
    port: int
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics_port: int = 0
    metrics_runner: web.AppRunner | None = None
    fanout: NodeFanout | None = None  # MQTT status and digests (mqtt.host set)
    _stopped: bool = False

    async def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """Health NOT_SERVING, stop accepting, restore GPU defaults, stop engines, release the backend."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self.metrics_runner is not None:  # before the GPU workers close: a scrape may read them
            await self.metrics_runner.cleanup()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.agent.shutdown(drain_timeout_s=self.agent.settings.engine.drain_timeout_s)
        if self.fanout is not None:  # after the GPUs are restored: "offline, stopped", a clean disconnect
            await self.fanout.stop()
        await asyncio.to_thread(self.agent.workers.close)
        log.info("agent_stopped")


async def start_agent(
    settings: AgentSettings,
    *,
    backend: GpuBackend | None = None,
    driver: EngineDriver | None = None,
    clock: Clock | None = None,
) -> RunningAgent:
    """Start a complete agent in this event loop: recovery first, then the server and background tasks."""
    clock = clock or SystemClock()
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    if backend is None:
        backend = await asyncio.to_thread(make_backend, settings)
    workers = await GpuWorkers.create(backend)
    store = StateStore(settings.state_file)
    driver = driver or make_driver(settings, clock, workers)
    doc = await load_state(store, GpuSafety(workers, _no_persist))
    agent = NodeAgent(settings, workers, driver, clock, store, doc)
    await agent.recover(doc)
    # Engines a previous agent left running (it died without stopping them): adopted when still the same
    # process and healthy, else their process groups are killed. Before the server accepts any call.
    await driver.adopt_or_stop()

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    tls = settings.tls
    auth = Authorizer(
        settings.tokens,
        allow_unauthenticated_loopback=settings.allow_unauthenticated_loopback,
        client_cert_scopes=tls.client_scopes if tls is not None and tls.client_ca is not None else None,
    )
    audit = AuditLog(
        settings.audit_log, max_bytes=settings.audit_max_bytes, backups=settings.audit_backups, clock=clock
    )
    metrics = AgentMetrics(agent)
    add_services(server, TelemetryServicer(agent, auth), ControlServicer(agent, auth, audit, clock, metrics))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, "grpc.health.v1.Health", reflection.SERVICE_NAME), server
        )
    try:
        port = bind(server, settings.listen, settings.tls, settings.unix_socket_mode)
        metrics_runner, metrics_port = await serve_metrics(settings.metrics_listen, metrics.exposition)
    except InvalidArgumentError:
        await server.stop(None)  # the gRPC port bound before a metrics bind failed
        await driver.close()
        await asyncio.to_thread(workers.close)
        raise
    await server.start()
    _warn_about_access(settings)
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    tasks = [
        asyncio.create_task(agent.sampler.run(), name="telemetry-sampler"),
        asyncio.create_task(agent.watcher.run(), name="lease-watcher"),
    ]
    fanout = None
    if settings.mqtt.enabled:  # never blocks: the publisher connects (and reconnects) in its own task
        fanout = NodeFanout(agent, settings.mqtt, settings.mqtt_digest_period_s, clock)
        fanout.start()
        tasks.append(asyncio.create_task(fanout.run(), name="mqtt-digest"))
    running = RunningAgent(
        agent, server, health, settings.listen, port, tasks, metrics_port, metrics_runner, fanout
    )
    log.info(
        "agent_started",
        listen=settings.listen,
        port=port,
        metrics_port=metrics_port,
        gpus=workers.count,
        backend=workers.kind,
    )
    return running


async def _no_persist() -> None:
    """Start-up reset before the state is known: there is nothing to save yet."""


def _warn_about_access(settings: AgentSettings) -> None:
    """One warning per way the configuration leaves a node more open than secure by default."""
    if settings.allow_unauthenticated_loopback:
        log.warning(
            "unauthenticated_loopback_control_allowed",
            reason="auth.allow_unauthenticated_loopback"
            if settings.gpu_backend != "simulated"
            else "auth.allow_unauthenticated_loopback (on by default for gpu.backend simulated)",
            hint="any local process may change GPUs and engines; set it false and use tokens in production",
        )
    cert_control = settings.tls is not None and settings.tls.client_ca is not None
    if not (settings.tokens or cert_control or settings.allow_unauthenticated_loopback):
        log.warning(
            "control_calls_refused_without_credentials",
            hint="no tokens (auth.tokens_file), client certificates (tls.client_ca) or loopback opt-in "
            "(auth.allow_unauthenticated_loopback): every control call will be refused",
        )
    host = settings.listen.rsplit(":", 1)[0].strip("[]")
    local = unix_path(settings.listen) is not None or host in ("localhost", "::1") or host.startswith("127.")
    if settings.tokens and settings.tls is None and not local:
        log.warning(
            "bearer_tokens_over_plaintext",
            listen=settings.listen,
            hint="tokens travel in clear text: set tls.cert and tls.key, or listen on a Unix socket",
        )


# -------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamollm-agent",
        description="dynamollm node agent: GPU clocks under a lease, telemetry and engines over gRPC.",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=("serve", "restore-defaults"),
        default="serve",
        help="serve (default), or restore-defaults: put back GPUs a dead agent left modified, then exit",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="TOML config (default /etc/dynamollm/agent.toml)"
    )
    p.add_argument(
        "--simulated", action="store_true", help="simulated GPUs and engines (gpu.backend=simulated)"
    )
    p.add_argument("--gpus", default=None, help="number of simulated GPUs (simulated.gpus)")
    p.add_argument(
        "--time-scale",
        default=None,
        help="simulated seconds per wall second of simulated engines and GPUs (simulated.time_scale)",
    )
    p.add_argument("--listen", default=None, help="HOST:PORT or unix:/path (listen)")
    p.add_argument("--metrics-listen", default=None, help="Prometheus HOST:PORT, empty: off (metrics_listen)")
    p.add_argument("--runtime-dir", default=None, help="state, logs, simulated node (runtime_dir)")
    return p


def _cli_values(ns: argparse.Namespace) -> dict[str, object]:
    values: dict[str, object] = {}
    if ns.simulated:
        values["gpu.backend"] = "simulated"
    if ns.gpus is not None:
        values["simulated.gpus"] = ns.gpus
    if ns.time_scale is not None:
        values["simulated.time_scale"] = ns.time_scale
    if ns.listen is not None:
        values["listen"] = ns.listen
    if ns.metrics_listen is not None:
        values["metrics_listen"] = ns.metrics_listen
    if ns.runtime_dir is not None:
        values["runtime_dir"] = ns.runtime_dir
    return values


async def _serve(settings: AgentSettings) -> int:
    running = await start_agent(settings)
    listening = {"listen": settings.listen, "port": running.port, "metrics_port": running.metrics_port}
    print(json.dumps({"event": "agent_listening", **listening}), flush=True)
    log.info("agent_listening", **listening)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notify_ready(running.tasks)
    await stop.wait()
    log.info("agent_stopping")
    sd_notify("STOPPING=1")
    await running.stop()
    return 0


async def _restore_defaults(settings: AgentSettings) -> int:
    """ExecStopPost: restore what the persisted state says is modified, without serving."""
    backend = await asyncio.to_thread(make_backend, settings)
    workers = await GpuWorkers.create(backend)
    try:
        store = StateStore(settings.state_file)
        safety = GpuSafety(workers, _no_persist)
        doc = await load_state(store, safety)
        modified = bool(doc.applied or pending_gpu_writes(doc))
        restored = await safety.recover(doc) if modified else []
        if modified or doc.pending:
            # The snapshot and the interrupted calls' outcomes are kept: the next start must not
            # re-read defaults from GPUs the agent touched, and a retry must learn the call was cut.
            await asyncio.to_thread(
                store.save, after_recovery(doc, boot_id=safety.boot_id, absent=safety.absent)
            )
        print(json.dumps({"event": "gpu_defaults_restored", "gpu_indices": restored}), flush=True)
        return 0
    finally:
        await asyncio.to_thread(workers.close)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        # restore-defaults serves nothing: it must put GPUs back even when a secret would stop a server
        serving = ns.command != "restore-defaults"
        settings = load_settings(ns.config, cli_values=_cli_values(ns), load_secrets=serving)
    except InvalidArgumentError as exc:
        print(f"dynamollm-agent: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        if ns.command == "restore-defaults":
            return asyncio.run(_restore_defaults(settings))
        return asyncio.run(_serve(settings))
    except InvalidArgumentError as exc:
        print(f"dynamollm-agent: error: {exc}", file=sys.stderr)
        return 2
    except (DynamoError, OSError) as exc:
        print(f"dynamollm-agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
