"""Entry point of `dynamollm-controller`: settings, store, profile, the control loop and the fleet, the
admin gRPC server (ControllerAdmin, health, reflection), Prometheus `/metrics`, the MQTT fan-out of its
events (`controller.fanout`, with `mqtt.host` set), graceful stop.

    dynamollm-controller [--config F] [--listen HOST:PORT] [--store PATH] [--node NAME=ADDR ...] [--mode M]

The first line on stdout is a JSON `controller_listening` event with the bound admin and metrics ports
(tests start the controller on port 0 and read them). SIGTERM / SIGINT: health NOT_SERVING, stop
accepting calls, stop the loop, commit a last snapshot and the energy ledger, close the agent channels,
exit 0. The agents keep the applied clocks for the rest of their lease: a controller restarted within
it carries on without touching them; one that stays away lets every GPU return to its defaults.
`start_controller` is the same controller in-process (tests, benchmarks).

Start-up (restart safety): the store's snapshot of (cycle, desired state) is loaded when its version
matches this code, else the cycle starts afresh from the policy's plan for `control.initial_rate_rps`;
the reachable agents' inventories are read once before anything is decided (a node whose GPUs are not
the profile's type stops the start with a message naming both); then, in apply mode, every node is
reconciled with the desired state: engines the controller does not know are stopped, missing ones
started, calls interrupted by a crash repeated with their recorded generations (the agents answer them
as replays).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pickle
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import structlog
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from agent.api.auth import Authorizer
from agent.api.client import AgentClient
from agent.api.clock import Clock, SystemClock
from agent.api.errors import DataFileError, DynamoError, InvalidArgumentError, NotFoundError
from agent.api.log import configure_logging
from agent.api.metrics_http import serve_metrics
from agent.api.mqtt import MqttPublisher
from agent.api.serving import bind
from agent.api.systemd import notify_ready, sd_notify
from controller.admin.service import SERVICE, AdminServicer, add_admin_service
from controller.admin.views import ControllerCore
from controller.control.cycle import ControlCycle, CycleConfig, FixedPlan
from controller.dctl.output import echo, reserved_stdout
from controller.fanout import fan_out
from controller.fleet.desired import DesiredState
from controller.fleet.grpc_fleet import FleetSettings, GrpcFleet, NodeConfig, check_gpu_type
from controller.loops.control import ControlLoop, LoopSettings, snapshot_version
from controller.loops.events import EventBus
from controller.metrics import ControllerMetrics
from controller.model.classes import REQUEST_CLASSES
from controller.model.cluster import GPUS_PER_SERVER, ClusterPlan
from controller.model.profile import Profile
from controller.policy.base import ArrivalStats, DynamicPolicy, SimPolicy, SizablePolicy
from controller.policy.registry import make_policy
from controller.profiles import default_profile, load_profile
from controller.settings import ControllerSettings, load_settings, nodes_from_text
from controller.store import Store

log = structlog.get_logger("controller.app")

CONTROLLER_VERSION = "0.1.0"  # the distribution's version; a snapshot of another version is not loaded
STOP_GRACE_S = 1.0
MAX_REQUEST_BYTES = 16 << 20  # ReportTraffic batches: 100,000 items of ~40 bytes
# How a GPU name from NVML reads for each GPU type of the profiles.
GPU_NAMES = {"h100-sxm": ("H100 80GB HBM3", "H100 SXM")}


def load_fleet_profile(settings: ControllerSettings) -> Profile:
    """The profile of the fleet's model and GPU type; any other is refused, naming both."""
    try:
        profile = (
            load_profile(settings.profile_path)
            if settings.profile_path is not None
            else default_profile(settings.model, settings.gpu)
        )
    except NotFoundError as exc:
        key = "profile.path" if settings.profile_path is not None else "profile.model"
        raise InvalidArgumentError(
            key, str(settings.profile_path or settings.model), f"an existing profile ({exc})"
        ) from None
    if (profile.model, profile.gpu) != (settings.model, settings.gpu):
        raise InvalidArgumentError(
            "profile.path",
            f"{settings.profile_path}: a profile of {profile.model} on {profile.gpu}",
            f"a profile of the fleet's model {settings.model} on {settings.gpu} (profile.model, profile.gpu)",
        )
    return profile


async def check_gpu_types(nodes: Sequence[NodeConfig], gpu: str, timeout_s: float) -> None:
    """Every reachable node's GPUs must be of the profile's type (unreachable ones are checked when they
    answer: the fleet refuses them then, `FleetSettings.gpu_names`)."""
    names = GPU_NAMES.get(gpu, (gpu,))

    async def one(node: NodeConfig) -> None:
        async with AgentClient(node.address, token=node.token, tls=node.tls, timeout_s=timeout_s) as client:
            try:
                inventory = await client.inventory()
            except DynamoError as exc:
                log.warning("node_not_checked", node=node.name, error=str(exc))
                return
        check_gpu_type(node.name, inventory, names)

    await asyncio.gather(*(one(n) for n in nodes))


def even_workload(rate_rps: float) -> ArrivalStats:
    """An hour at `rate_rps` spread evenly over the classes (the cycle re-plans from what it observes at
    its first steps)."""
    n = len(REQUEST_CLASSES)
    hour_s = 3600.0
    return ArrivalStats(
        duration_s=hour_s,
        window_s=60.0,
        requests_by_class=tuple([round(rate_rps * hour_s / n)] * n),
        peak_rate_rps=rate_rps,
        peak_rate_rps_by_class=tuple([rate_rps / n] * n),
    )


def initial_plan(policy: SimPolicy, profile: Profile, settings: ControllerSettings) -> ClusterPlan:
    """The first plan: the policy's for `control.initial_workload` (else an even `initial_rate_rps`), or
    a policy with a size pinned to `control.instances`, as `dctl simulate` plans from a trace."""
    if settings.instances:
        if not isinstance(policy, SizablePolicy):
            raise InvalidArgumentError(
                "control.instances", settings.instances, f"0 for policy {policy.name} (it sizes itself)"
            )
        return policy.plan_with(settings.instances, profile)  # scalefreq, scaleshard: their first fleet
    return policy.initial_plan(settings.initial_workload or even_workload(settings.initial_rate_rps), profile)


def new_cycle(settings: ControllerSettings, profile: Profile, origin_unix_s: float) -> ControlCycle:
    policy = make_policy(settings.policy_name, settings.policy)
    plan = initial_plan(policy, profile, settings)
    total_gpus = GPUS_PER_SERVER * len(settings.nodes)
    if plan.gpus > total_gpus:
        key, value = (
            ("control.instances", settings.instances)
            if settings.instances
            else ("control.initial_workload", "the workload's first plan")
            if settings.initial_workload
            else ("control.initial_rate_rps", settings.initial_rate_rps)
        )
        raise InvalidArgumentError(
            key,
            value,
            f"a first plan that fits the {len(settings.nodes)} nodes ({plan.gpus} GPUs > {total_gpus})",
        )
    driven = policy if isinstance(policy, DynamicPolicy) else FixedPlan(policy.name)
    config = CycleConfig(total_gpus=total_gpus, max_nodes=len(settings.nodes), start_unix_s=origin_unix_s)
    return ControlCycle(driven, profile, plan, config)


def restore(store: Store, settings: ControllerSettings) -> tuple[ControlCycle, DesiredState] | None:
    """The snapshot's (cycle, desired state) when it was written by this code for this fleet."""
    snapshot = store.load_snapshot()
    if snapshot is None:
        return None
    blob, cycle_time_s, version = snapshot
    if version != snapshot_version(CONTROLLER_VERSION):
        log.warning("snapshot_discarded", reason="written by another version", version=version)
        return None
    try:
        cycle, desired = pickle.loads(blob)
    except Exception as exc:  # a snapshot that does not load is not worth a crash loop
        log.error("snapshot_discarded", reason=f"unreadable: {type(exc).__name__}: {exc}")
        return None
    if not isinstance(cycle, ControlCycle) or not isinstance(desired, DesiredState):
        return None
    if len(desired.nodes) != len(settings.nodes) or cycle.policy.name != settings.policy_name:
        log.warning("snapshot_discarded", reason="the nodes or the policy changed since it was written")
        return None
    log.info("snapshot_restored", cycle_time_s=round(cycle_time_s, 3), generation=store.current_generation())
    return cycle, desired


@dataclass
class RunningController:
    """A controller serving its admin API on `port` (0 for a Unix socket) and metrics on `metrics_port`."""

    core: ControllerCore
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    metrics_port: int
    runner: web.AppRunner | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    mqtt: MqttPublisher | None = None  # events and routing tables to MQTT (mqtt.host set)
    _stopped: bool = False

    async def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.runner is not None:
            await self.runner.cleanup()
        if self.mqtt is not None:  # after the fan-out task: what it queued still goes out
            await self.mqtt.stop()
        await self.core.close()
        log.info("controller_stopped")


async def start_controller(settings: ControllerSettings, *, clock: Clock | None = None) -> RunningController:
    """Start a complete controller in this event loop (module docstring)."""
    clock = clock or SystemClock()
    profile = load_fleet_profile(settings)
    await check_gpu_types(settings.nodes, settings.gpu, settings.fleet.call_timeout_s)
    settings.store_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(settings.store_path, clock_ns=clock.wall_ns)
    try:
        return await _start(settings, store, profile, clock)
    except BaseException:
        store.close()
        raise


async def _start(
    settings: ControllerSettings, store: Store, profile: Profile, clock: Clock
) -> RunningController:
    origin = store.get_meta("origin_unix_s")
    if origin is None:
        origin = repr(settings.origin_unix_s or clock.wall_ns() / 1e9)
        store.set_meta("origin_unix_s", origin)
        store.set_mode(settings.mode, caller="config", reason="new store")
    restored = restore(store, settings)
    if restored is None:
        cycle = new_cycle(settings, profile, float(origin))
        desired = DesiredState(len(settings.nodes), drain_timeout_s=settings.fleet.drain_timeout_s)
    else:
        cycle, desired = restored
        # The policy's knobs come from the config; its periods and costs stay the snapshot's (the
        # cycle's epochs and the executor's timings were laid out with them).
        policy = make_policy(settings.policy_name, settings.policy)
        if isinstance(policy, DynamicPolicy):
            cycle.policy = replace(policy, periods=cycle.periods, costs=cycle.costs)  # type: ignore[type-var]
    metrics = ControllerMetrics()
    events = EventBus(clock_ns=clock.wall_ns)
    loop = ControlLoop(
        cycle,
        desired,
        store,
        LoopSettings(
            node_names=tuple(n.name for n in settings.nodes),
            code_version=CONTROLLER_VERSION,
            time_scale=settings.time_scale,
            snapshot_interval_s=settings.snapshot_interval_s,
            ledger_interval_s=settings.ledger_interval_s,
        ),
        origin_unix_s=float(origin),
        clock=clock,
        metrics=metrics,
        events=events,
    )
    if restored is None:
        loop.start()
    k = settings.fleet
    fleet = GrpcFleet(
        settings.nodes,
        FleetSettings(
            model=settings.engine_model,
            lease_s=k.lease_s,
            renew_fraction=k.renew_fraction,
            telemetry_period_s=k.telemetry_period_s,
            call_timeout_s=k.call_timeout_s,
            unavailable_after_s=k.unavailable_after_s,
            reconcile_period_s=k.reconcile_period_s,
            engine_options=dict(settings.engine_options),
            ready_timeout_s=k.ready_timeout_s,
            time_scale=settings.time_scale,
            gpu_names=GPU_NAMES.get(settings.gpu, (settings.gpu,)),
        ),
        lambda: loop.desired,
        loop,
    )
    loop.fleet = fleet
    core = ControllerCore(settings, store, profile, loop, fleet, events, metrics, clock)
    server, health = _server(settings, core)

    async def metrics_text() -> bytes:
        core.refresh_metrics()  # the gauges read off the fleet and the store, as of this scrape
        return metrics.exposition()

    try:  # both addresses bound before anything serves: a bad one stops start-up with nothing running
        port = bind(server, settings.listen, settings.tls, settings.unix_socket_mode)
        runner, metrics_port = await serve_metrics(settings.metrics_listen, metrics_text)
    except InvalidArgumentError:
        await server.stop(None)
        await core.close()
        raise
    await server.start()
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    tasks = []
    mqtt = None
    if settings.mqtt.enabled:  # subscribed to the bus before the loop runs; never blocks it
        mqtt = MqttPublisher(settings.mqtt)
        mqtt.start()
        fanning = fan_out(events, mqtt, settings.mqtt, core.routes_pb)
        tasks.append(asyncio.create_task(fanning, name="mqtt-fan-out"))
    fleet.start()
    tasks.append(asyncio.create_task(loop.run(), name="control-loop"))
    log.info(
        "controller_started", listen=settings.listen, port=port, nodes=len(settings.nodes), mode=loop.mode
    )
    return RunningController(core, server, health, port, metrics_port, runner, tasks, mqtt)


def _server(settings: ControllerSettings, core: ControllerCore) -> tuple[grpc.aio.Server, HealthServicer]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    tls = settings.tls
    auth = Authorizer(
        settings.tokens,
        allow_unauthenticated_loopback=settings.allow_unauthenticated_loopback,
        client_cert_scopes=tls.client_scopes if tls is not None and tls.client_ca is not None else None,
    )
    add_admin_service(server, AdminServicer(core, auth))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME), server
        )
    return server, health


# -------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamollm-controller",
        description="dynamollm controller: the control cycle driving the node agents (observe / apply).",
    )
    p.add_argument("--config", default=None, help="TOML config (default /etc/dynamollm/controller.toml)")
    p.add_argument("--listen", default=None, help="admin gRPC HOST:PORT or unix:/path (listen)")
    p.add_argument("--metrics-listen", default=None, help="Prometheus HOST:PORT, empty for none")
    p.add_argument("--store", default=None, help="SQLite store path (store_path)")
    p.add_argument("--mode", default=None, help="mode of a new store: observe, apply, paused")
    p.add_argument("--policy", default=None, help="the policy the cycle runs (control.policy)")
    p.add_argument("--time-scale", default=None, help="cycle seconds per wall second (control.time_scale)")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="a node's agent (repeat; replaces [[nodes]])",
    )
    return p


def _cli_values(ns: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "listen": ns.listen,
        "metrics_listen": ns.metrics_listen,
        "store_path": ns.store,
        "mode": ns.mode,
        "control.policy": ns.policy,
        "control.time_scale": ns.time_scale,
    }
    return {k: v for k, v in pairs.items() if v is not None}


async def _serve(settings: ControllerSettings) -> int:
    running = await start_controller(settings)
    echo(
        json.dumps(
            {"event": "controller_listening", "port": running.port, "metrics_port": running.metrics_port}
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notify_ready(running.tasks)
    await stop.wait()
    log.info("controller_stopping")
    sd_notify("STOPPING=1")
    await running.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        nodes = [n for text in ns.node for n in nodes_from_text(text, "--node")]
        settings = load_settings(
            Path(ns.config) if ns.config else None, cli_values=_cli_values(ns), cli_nodes=nodes
        )
    except (InvalidArgumentError, DataFileError) as exc:
        print(f"dynamollm-controller: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        # stdout carries the listening line only: the solver's banner and other C-level chatter go to stderr
        with reserved_stdout():
            return asyncio.run(_serve(settings))
    except (InvalidArgumentError, DataFileError) as exc:
        print(f"dynamollm-controller: error: {exc}", file=sys.stderr)
        return 2
    except (DynamoError, OSError) as exc:
        print(f"dynamollm-controller: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
