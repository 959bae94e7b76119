"""The controller driving real agents: `dynamollm-controller` and three `dynamollm-agent --simulated`
processes (8 simulated GPUs each, real engine subprocesses) talking gRPC on loopback.

What the tests prove, end to end through the processes' public interfaces (admin API, agent API, the
agents' audit logs, the simulated GPUs' control files, the controller's store and /metrics):

1. observe mode decides and records but calls no control RPC on any agent; switching to apply (audited in
   the store) makes the agents run exactly the controller's instances, READY, with their GPUs locked at
   the pools' clocks;
2. a controller SIGKILLed while its ReconfigureEngine calls are in flight restarts from its store and
   converges to the same instances, and no agent ever acted twice on one (scope, generation): a repeat
   is a replay;
3. an agent restarted under the controller (SIGTERM stops its engines) is seen UNAVAILABLE, then READY:
   its lost instances start again elsewhere and are not restarted beside their replacements when it
   comes back, and it is in the fleet again (with the other nodes drained, the controller starts the
   instances on it); an engine that crashes under a live agent is started again under a new generation
   (the old one would only be replayed), without a storm of calls;
4. an agent cut off from the controller (a TCP proxy closed) is marked UNAVAILABLE and, left without
   lease renewals, restores its GPUs' default clocks by itself;
5. bad admin input (API and command line) is refused with INVALID_ARGUMENT / exit 2 naming the field,
   and the controller keeps serving;
6. /metrics exposes the decision, command, pool, energy and mode series, and the fleet gauges (node
   states, power) are current at every scrape.

Timings come from `tests.system.stack.FAST_CONTROLLER_ENV` (4-s lease, unavailable after 3 s, cycle
30x faster than the wall clock). Every test is bounded by `asyncio.wait_for` and ends every process it
started (`Stack.close`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from agent.api.errors import InvalidArgumentError
from agent.api.v1 import common_pb2
from controller.api.client import AdminClient
from controller.api.v1 import admin_pb2
from tests.system.stack import (
    REFUSED,
    Agent,
    Controller,
    Pending,
    Stack,
    TcpProxy,
    run_to_end,
    stop,
    wait_for,
)

TEST_LIMIT_S = 55.0  # every test body; the stack's own teardown comes on top
CONVERGE_S = 20.0
ADMIN_SERVICE = "/dynamollm.controller.v1.ControllerAdmin"
_LIVE_ENGINE = (
    common_pb2.ENGINE_STATE_STARTING,
    common_pb2.ENGINE_STATE_READY,
    common_pb2.ENGINE_STATE_DRAINING,
)


def bounded(body: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """The test body under `TEST_LIMIT_S` (the fixture's teardown then kills what it started)."""

    @functools.wraps(body)
    async def run(*args: Any, **kwargs: Any) -> None:
        await asyncio.wait_for(body(*args, **kwargs), TEST_LIMIT_S)

    return run


def node_addresses(agents: Sequence[Agent]) -> list[tuple[str, str]]:
    return [(a.name, a.address) for a in agents]


def snap(clock_mhz: int, supported: Sequence[int]) -> int:
    """The clock the controller locks for a pool clock (`controller.fleet.grpc_fleet._snap`)."""
    above = [c for c in supported if c >= clock_mhz]
    return min(above) if above else (max(supported) if supported else clock_mhz)


async def pool_instances(admin: AdminClient) -> dict[str, admin_pb2.PoolInstance]:
    """The controller's instances (ListPools) by engine id."""
    pools = await admin.list_pools()
    return {f"i{i.instance_id}": i for p in pools.pools for i in p.instances}


async def converged(
    admin: AdminClient, agents: Sequence[Agent]
) -> dict[str, admin_pb2.PoolInstance] | Pending:
    """The controller's instances when every one is ACTIVE and every agent runs exactly them (READY, the
    listed GPUs and TP degree, as the agent and ListNodes report it) with their GPUs locked at the
    pools' clocks under an active lease; otherwise what is not there yet."""
    want = await pool_instances(admin)
    phases = {eid: i.phase for eid, i in want.items()}
    if not want or set(phases.values()) != {"ACTIVE"}:
        return Pending(f"instance phases {phases}")
    nodes = {n.name: n for n in (await admin.list_nodes()).nodes}
    for agent in agents:
        node = nodes[agent.name]
        if node.state != admin_pb2.NODE_STATE_READY:
            return Pending(f"{agent.name} is {admin_pb2.NodeState.Name(node.state)}")
        mine = {eid: i for eid, i in want.items() if i.node == agent.name}
        inventory = await agent.inventory()
        live = {
            e.engine_id: (common_pb2.EngineState.Name(e.state), e.tp_degree, list(e.gpu_indices))
            for e in inventory.engines
            if e.state in _LIVE_ENGINE
        }
        wanted = {eid: ("ENGINE_STATE_READY", i.tp_degree, list(i.gpu_indices)) for eid, i in mine.items()}
        if live != wanted:
            return Pending(f"{agent.name} runs {live}, the controller wants {wanted}")
        listed = {(e.engine_id, e.tp_degree) for e in node.engines if e.state == "READY"}
        if listed != {(eid, i.tp_degree) for eid, i in mine.items()}:
            return Pending(f"ListNodes shows {listed} READY on {agent.name}")
        supported = {g.gpu_index: list(g.supported_sm_clocks_mhz) for g in inventory.gpus}
        locked = agent.locked_clocks()
        clocks = {g: snap(i.clock_mhz, supported[g]) for i in mine.values() for g in i.gpu_indices}
        if any(locked.get(g) != clock for g, clock in clocks.items()):
            return Pending(f"{agent.name} GPU clocks {locked}, the controller wants {clocks}")
        if mine and not inventory.lease.active:
            return Pending(f"{agent.name} holds no lease")
    return want


async def wait_converged(
    admin: AdminClient, agents: Sequence[Agent], timeout_s: float = CONVERGE_S
) -> dict[str, admin_pb2.PoolInstance]:
    return await wait_for(
        "agents running the controller's instances", lambda: converged(admin, agents), timeout_s
    )


async def node_state(admin: AdminClient, name: str) -> int:
    nodes = await admin.list_nodes()
    return next(n.state for n in nodes.nodes if n.name == name)


def repeated_actions(agents: Sequence[Agent]) -> dict[tuple[str, str, int], int]:
    """(node, scope, generation) acted on more than once: audit lines of ApplyGpuConfig,
    ReconfigureEngine and StopEngine that are neither replays, nor the detached outcome of a cancelled
    call, nor refusals (nothing was done). Scope: the engine id, or "gpus" for the node's GPU scope."""
    acted: Counter[tuple[str, str, int]] = Counter()
    for agent in agents:
        for line in agent.control_calls():
            if line["replayed"] or line["detached"] or line["result"] in REFUSED:
                continue
            scope = "gpus" if line["rpc"] == "ApplyGpuConfig" else str(line["request"]["engine_id"])
            acted[(agent.name, scope, int(line["generation"]))] += 1
    return {key: n for key, n in acted.items() if n > 1}


def call_storms(agents: Sequence[Agent], limit: int = 3) -> dict[tuple[str, str, str, int], int]:
    """(node, rpc, scope, generation) called more than `limit` times: a controller repeating a call the
    agent only answers as a replay, in a loop."""
    calls: Counter[tuple[str, str, str, int]] = Counter()
    for agent in agents:
        for line in agent.control_calls():
            scope = "gpus" if line["rpc"] == "ApplyGpuConfig" else str(line["request"]["engine_id"])
            calls[(agent.name, line["rpc"], scope, int(line["generation"]))] += 1
    return {key: n for key, n in calls.items() if n > limit}


def started_engines(agents: Sequence[Agent]) -> set[str]:
    """Every engine id a ReconfigureEngine call was accepted for, on any agent."""
    return {
        str(line["request"]["engine_id"])
        for agent in agents
        for line in agent.control_calls(("ReconfigureEngine",))
        if line["result"] not in REFUSED
    }


# ---------------------------------------------------------------------------------------------- 1


@bounded
async def test_observe_changes_nothing_then_apply_acts(stack: Stack) -> None:
    agents = await stack.start_agents(3)
    ctl = await stack.start_controller(node_addresses(agents), mode="observe")
    async with ctl.admin() as admin:
        # A few seconds of observe: ~100 cycle-seconds, some 20 instance ticks.
        await wait_for("3 nodes ready", lambda: _ready_count(admin, 3), 10)
        await asyncio.sleep(3)
        status = await admin.cluster_status()
        assert status.mode == admin_pb2.MODE_OBSERVE
        assert status.instances_count > 0 and status.pools_count > 0
        assert (await admin.list_decisions()).decisions, "observe mode records its decisions"
        assert await pool_instances(admin), "ListPools shows the planned instances"
        statuses = {row[0] for row in ctl.store_rows("SELECT status FROM commands")}
        assert statuses == {"skipped"}, statuses
        for agent in agents:
            assert agent.control_calls() == [], f"{agent.name} was called in observe mode"
            inventory = await agent.inventory()
            assert not inventory.engines and not inventory.lease.active
            assert agent.locked_clocks() == {}

        reply = await admin.set_mode("apply", reason="system test")
        assert reply.previous_mode == admin_pb2.MODE_OBSERVE and reply.mode == admin_pb2.MODE_APPLY
        want = await wait_converged(admin, agents)

        assert (await admin.cluster_status()).mode == admin_pb2.MODE_APPLY
        assert started_engines(agents) == set(want)
        applied = [line for a in agents for line in a.control_calls(("ApplyGpuConfig",))]
        assert any(line["result"] == "OK" for line in applied)
        assert repeated_actions(agents) == {}
        assert call_storms(agents) == {}
        audit = ctl.store_rows(
            "SELECT caller, action, request_json, result FROM audit WHERE action = 'SetMode'"
        )
        assert any('"mode": "apply"' in req and caller != "config" for caller, _, req, _ in audit), audit


async def _ready_count(admin: AdminClient, n: int) -> bool:
    return (await admin.cluster_status()).nodes_ready_count == n


# ---------------------------------------------------------------------------------------------- 2


@bounded
async def test_kill_9_mid_reconfiguration_restart_converges_without_repeats(stack: Stack) -> None:
    agents = await stack.start_agents(3)
    slow = {"DYNAMOLLM_CONTROLLER_ENGINE_OPTIONS": "startup-s=3"}  # engines take 3 s to become READY
    ctl = await stack.start_controller(node_addresses(agents), mode="apply", env=slow)
    async with ctl.admin() as admin:
        before = await pool_instances(admin)
    assert before

    async def starting() -> list[str] | None:
        engines = [
            e.engine_id
            for a in agents
            for e in (await a.inventory()).engines
            if e.state == common_pb2.ENGINE_STATE_STARTING
        ]
        return engines or None

    in_flight = await wait_for("an engine STARTING", starting, 15, period_s=0.05)
    ctl.proc.send_signal(signal.SIGKILL)
    await ctl.proc.wait()

    async def cut_off() -> set[str] | Pending:
        """The engines' ReconfigureEngine calls were in flight: the agents saw them CANCELLED (the
        operations themselves run on to their end, `detached`)."""
        cancelled = {
            str(line["request"]["engine_id"])
            for a in agents
            for line in a.control_calls(("ReconfigureEngine",))
            if line["result"] == "CANCELLED"
        }
        return cancelled if set(in_flight) <= cancelled else Pending(f"cancelled: {cancelled}")

    await wait_for("the in-flight calls cancelled", cut_off, 5)

    ctl2 = await stack.start_controller(node_addresses(agents), mode="apply", env=slow, store=ctl.store_path)
    async with ctl2.admin() as admin:
        want = await wait_converged(admin, agents, 30)
        assert set(want) == set(before), "the restarted controller kept its instances"
        status = await wait_for("every command confirmed", lambda: _confirmed(admin), 10)
        assert status.desired_generation == status.observed_generation
    assert repeated_actions(agents) == {}
    assert call_storms(agents) == {}
    assert started_engines(agents) <= set(want), "an engine the controller does not list was started"
    stored = {row[0] for row in ctl2.store_rows("SELECT target FROM commands WHERE kind = 'start'")}
    assert started_engines(agents) <= stored


async def _confirmed(admin: AdminClient) -> admin_pb2.ClusterStatusResponse | None:
    status = await admin.cluster_status()
    return status if status.desired_generation == status.observed_generation else None


# ---------------------------------------------------------------------------------------------- 3


@bounded
async def test_agent_restarted_under_the_controller_is_readopted(stack: Stack) -> None:
    agents = await stack.start_agents(3)
    ctl = await stack.start_controller(node_addresses(agents), mode="apply")
    async with ctl.admin() as admin:
        before = await wait_converged(admin, agents)
        busiest = Counter(i.node for i in before.values()).most_common(1)[0][0]
        victim = next(a for a in agents if a.name == busiest)

        assert await stop(victim.proc, signal.SIGTERM, 20) == 0  # the agent stops its engines
        await wait_for(
            f"{victim.name} UNAVAILABLE",
            lambda: _is(node_state(admin, victim.name), admin_pb2.NODE_STATE_UNAVAILABLE),
            3 + 5,
        )
        calls_before = len(victim.audit())
        restarted = await stack.start_agent(victim.index, port=victim.port)
        agents = [restarted if a is victim else a for a in agents]
        await wait_for(
            f"{victim.name} READY again",
            lambda: _is(node_state(admin, victim.name), admin_pb2.NODE_STATE_READY),
            25,  # the fleet reconnects with backoff (0.5 s doubling), on top of gRPC's own
        )
        # Its instances were lost with it and started elsewhere: the old engines stay stopped.
        moved = await wait_converged(admin, agents)
        assert not set(moved) & set(before)
        assert all(i.node != victim.name for i in moved.values())

        # The node is back in the fleet: with the others drained, the controller starts everything on it.
        for other in agents:
            if other is not restarted:
                await admin.drain_node(other.name)
        after = await wait_converged(admin, agents, 30)
        assert {i.node for i in after.values()} == {victim.name}
    started_on_victim = {
        str(line["request"]["engine_id"])
        for line in restarted.audit()[calls_before:]
        if line["rpc"] == "ReconfigureEngine" and line["result"] not in REFUSED
    }
    assert started_on_victim == set(after), "the restarted agent runs the controller's instances, only them"
    assert repeated_actions(agents) == {}
    assert call_storms(agents) == {}


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@bounded
async def test_crashed_engine_is_started_again_under_a_new_generation(stack: Stack) -> None:
    agents = await stack.start_agents(1)
    agent = agents[0]
    ctl = await stack.start_controller(node_addresses(agents), mode="apply")
    async with ctl.admin() as admin:
        before = await wait_converged(admin, agents)
        eid, instance = min(before.items())
        first = next(e for e in (await agent.inventory()).engines if e.engine_id == eid)
        pid = agent.node_dir.read_activity(instance.gpu_indices[0]).pid
        assert pid > 0
        os.killpg(pid, signal.SIGKILL)  # the engine dies under the agent: FAILED, same generation

        async def started_again() -> common_pb2.EngineInfo | Pending:
            engines = {e.engine_id: e for e in (await agent.inventory()).engines}
            now = engines[eid]
            if now.generation > first.generation and now.state == common_pb2.ENGINE_STATE_READY:
                return now
            return Pending(f"{eid} {common_pb2.EngineState.Name(now.state)} generation {now.generation}")

        await wait_for(f"{eid} READY under a new generation", started_again, CONVERGE_S)
        after = await wait_converged(admin, agents)
        assert after.keys() == before.keys()
    starts = [
        line for line in agent.control_calls(("ReconfigureEngine",)) if line["request"]["engine_id"] == eid
    ]
    assert [(line["replayed"], line["result"]) for line in starts] == [(False, "OK"), (False, "OK")], starts
    assert call_storms(agents) == {}
    assert repeated_actions(agents) == {}


# ---------------------------------------------------------------------------------------------- 4


@bounded
async def test_unreachable_agent_is_unavailable_and_restores_its_gpus(stack: Stack) -> None:
    agents = await stack.start_agents(3)
    proxy = await TcpProxy(agents[0].port).start()
    try:
        nodes = [(agents[0].name, proxy.address), *node_addresses(agents[1:])]
        ctl = await stack.start_controller(nodes, mode="apply")
        async with ctl.admin() as admin:
            want = await wait_converged(admin, agents)
            cut_off = agents[0]
            held = {g for i in want.values() if i.node == cut_off.name for g in i.gpu_indices}
            assert held, f"the test needs instances on {cut_off.name}: {want}"
            assert set(cut_off.locked_clocks()) >= held
            assert (await admin.cluster_status()).nodes_ready_count == 3

            await proxy.cut()
            await wait_for(
                f"{cut_off.name} UNAVAILABLE",
                lambda: _is(node_state(admin, cut_off.name), admin_pb2.NODE_STATE_UNAVAILABLE),
                3 + 4,
            )
            await wait_for("nodes_ready_count 2", lambda: _ready_count(admin, 2), 2)
        # The agent, alive, heard no renewal: at the lease's end (4 s) its GPUs are back to defaults.
        await wait_for("the cut-off agent's GPUs unlocked", lambda: _unlocked(cut_off), 4 + 5)
        inventory = await cut_off.inventory()
        assert not inventory.lease.active
        assert not any(g.HasField("sm_clock_lock") for g in inventory.gpus)
    finally:
        await proxy.cut()


async def _unlocked(agent: Agent) -> bool:
    return agent.locked_clocks() == {}


# ---------------------------------------------------------------------------------------------- 5


@bounded
async def test_bad_admin_input_is_refused_naming_the_field(stack: Stack) -> None:
    agents = await stack.start_agents(1)
    ctl = await stack.start_controller(node_addresses(agents), mode="observe")
    now_ns = time.time_ns()
    async with ctl.admin() as admin:
        cases: list[tuple[str, Awaitable[Any]]] = [
            ("node", admin.drain_node("nope")),
            ("page_size", admin.list_decisions(page_size=5000)),
            ("page_token", admin.list_decisions(page_token="x")),
            (
                "arrivals[0].class_name",
                admin.report_traffic([admin_pb2.TrafficArrival(arrival_unix_ns=now_ns, class_name="ZZ")], []),
            ),
            (
                "arrivals[0].arrival_unix_ns",
                admin.report_traffic([admin_pb2.TrafficArrival(arrival_unix_ns=0, class_name="SS")], []),
            ),
        ]
        for field, call in cases:
            with pytest.raises(InvalidArgumentError) as refused:
                await call
            assert refused.value.field == field, str(refused.value)
            assert str(refused.value).startswith(f"{field}: "), str(refused.value)
        # AdminClient refuses an unknown mode before sending it: the raw call carries MODE_UNSPECIFIED, and
        # bytes that are no SetModeRequest (a length running past the end).
        unspecified = admin_pb2.SetModeRequest(mode=admin_pb2.MODE_UNSPECIFIED).SerializeToString()
        for payload, field in ((unspecified, "mode"), (b"\x12\x50garbage", "request")):
            code, details = await _raw_call(ctl, "SetMode", payload)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert details.startswith(f"{field}: "), details

        status = await admin.cluster_status()  # still serving, nothing changed
        assert status.mode == admin_pb2.MODE_OBSERVE
        assert not any(n.draining for n in (await admin.list_nodes()).nodes)
    refused_modes = ctl.store_rows("SELECT result FROM audit WHERE action = 'SetMode' AND caller != 'config'")
    assert refused_modes and all(r[0].startswith("INVALID_ARGUMENT") for r in refused_modes), refused_modes


async def _raw_call(ctl: Controller, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(ctl.address) as channel:
        call = channel.unary_unary(
            f"{ADMIN_SERVICE}/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            await call(payload, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("args", "toml", "field"),
    [
        (["--node", "bad"], None, "--node"),
        (["--node", "n0=127.0.0.1:1"], 'listen = "127.0.0.1:0"\nbogus_key = 1\n', "bogus_key"),
        (["--node", "n0=127.0.0.1:1"], "[fleet]\nlease_zz = 4\n", "fleet.lease_zz"),
    ],
)
async def test_bad_command_line_and_config_exit_2_naming_the_field(
    tmp_path: Path, args: list[str], toml: str | None, field: str
) -> None:
    if toml is not None:
        (tmp_path / "controller.toml").write_text(toml)
        args = ["--config", str(tmp_path / "controller.toml"), *args]
    code, out, err = await run_to_end("-m", "controller.app", "--store", str(tmp_path / "c.db"), *args)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith(f"dynamollm-controller: error: {field}: "), lines[0]
    assert not (tmp_path / "c.db").exists()


async def test_a_taken_metrics_port_stops_start_up_with_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        code, out, err = await run_to_end(
            "-m", "controller.app", "--store", str(tmp_path / "c.db"), "--node", "n0=127.0.0.1:1",
            "--listen", "127.0.0.1:0", "--metrics-listen", metrics,
        )  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and out == ""  # no controller_listening line: nothing served
    assert lines[-1].startswith(f"dynamollm-controller: error: metrics_listen: got '{metrics}'"), lines
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------- 6


@bounded
async def test_metrics_expose_decisions_commands_pools_energy_reconfigurations_guard_mode(
    stack: Stack,
) -> None:
    agents = await stack.start_agents(1)
    ctl = await stack.start_controller(node_addresses(agents), mode="apply")
    series = (  # each the start of at least one sample line
        'dynamollm_decision_duration_seconds_bucket{le="+Inf",level="instance"}',
        'dynamollm_decision_duration_seconds_count{level="instance"}',
        'dynamollm_commands_total{kind="start",result="done"}',
        "dynamollm_pool_instances{",
        "dynamollm_pool_energy_joules_total{",
        'dynamollm_controller_mode{mode="apply"} 1.0',
        'dynamollm_controller_mode{mode="observe"} 0.0',
        'dynamollm_reconfigurations_total{kind="start"}',
        'dynamollm_reconfiguration_duration_seconds_count{kind="start"}',  # timed: issue to engine ready
        "dynamollm_guard_factor{",
        "dynamollm_guard_active{",
        # Gauges read off the fleet, current at every scrape without any admin call.
        'dynamollm_nodes{state="READY"} 1.0',
        "dynamollm_cluster_power_watts ",
    )
    url = f"http://127.0.0.1:{ctl.metrics_port}/metrics"

    async with aiohttp.ClientSession() as session:

        async def samples() -> list[str] | Pending:
            async with session.get(url) as reply:
                assert reply.status == 200
                assert reply.content_type == "text/plain"
                text = await reply.text()
            lines = [line for line in text.splitlines() if not line.startswith("#")]
            missing = [s for s in series if not any(line.startswith(s) for line in lines)]
            return Pending(f"no sample for {missing}") if missing else lines

        lines = await wait_for("every metric with samples", samples, 20, period_s=0.5)
    pools = [line for line in lines if line.startswith("dynamollm_pool_instances{")]
    assert all('phase="ACTIVE"' in line or 'phase="STARTING"' in line for line in pools), pools
    power = next(line for line in lines if line.startswith("dynamollm_cluster_power_watts "))
    assert float(power.split()[1]) > 0
