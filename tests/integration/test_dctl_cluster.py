"""`dctl cluster ...` against a fake ControllerAdmin served over real gRPC on loopback.

The fake answers with canned replies and records every request (and its metadata), so that a test
checks both what dctl printed and what it sent. It runs in an event loop of its own on a background
thread (dctl's handlers run `asyncio.run` in the test's thread, as from a shell); every command goes
through `controller.dctl.main.main`, so exit codes and the one-line errors are those an operator sees.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc import aio

from agent.api.errors import InvalidArgumentError
from controller.api.client import MODE_BY_NAME, AdminClient, mode_name
from controller.api.v1 import admin_pb2, admin_pb2_grpc
from controller.dctl import cmd_cluster
from controller.dctl.main import main
from tests.integration.tls_pki import Pki, make_pki, openssl_available

TOKEN = "a-controller-token-of-some-length"
NODES = ("gpu-node-1", "gpu-node-2", "gpu-node-3")
NOW_NS = time.time_ns()
T0_NS = 1_738_324_800_000_000_000  # 2025-01-31T12:00:00Z

CLUSTER_STEP = {
    "t_s": 3300.0, "level": "cluster", "horizon_s": 1800.0, "generation": 6, "forecast_kind": "rate",
    "class_forecast_rps": [4.0, 5.0, 0.5, 1.0, 2.0, 0.2, 0.1, 0.3, 0.05],
    "pools": [
        {
            "pool": "short", "classes": ["SS", "SM"], "gpu_budget": 16, "forecast_rps": 9.99,
            "solver_status": "optimal", "shortfall_rps": 0.0,
            "chosen": {"instances": [{"tp": 4, "clock_mhz": 1200, "count": 3}], "power_w": 1800.0},
            "runner_up": None, "guard_factor": 1.0, "clock_floor_mhz": 0,
        },
        {
            "pool": "long", "classes": ["SL", "MS", "MM", "ML", "LS", "LM", "LL"], "gpu_budget": 8,
            "forecast_rps": 3.7, "solver_status": "incumbent", "shortfall_rps": 0.4,
            "chosen": {"instances": [{"tp": 8, "clock_mhz": 1980, "count": 1}], "power_w": 3000.0},
            "runner_up": None, "guard_factor": 1.0, "clock_floor_mhz": 0,
        },
    ],
}  # fmt: skip
POOL_STEP = {
    "t_s": 3600.0, "level": "guard", "horizon_s": 300.0, "generation": 7, "forecast_kind": "rate",
    "class_forecast_rps": [5.0, 6.0, 0.5, 1.0, 2.0, 0.2, 0.1, 0.3, 0.05],
    "pools": [
        {
            "pool": "short", "classes": ["SS", "SM"], "gpu_budget": 16, "forecast_rps": 12.6,
            "solver_status": "optimal", "shortfall_rps": 0.0,
            "chosen": {"instances": [{"tp": 4, "clock_mhz": 1410, "count": 3}], "power_w": 2100.0},
            "runner_up": {"instances": [{"tp": 8, "clock_mhz": 1200, "count": 2}], "power_w": 2400.0},
            "guard_factor": 1.1, "clock_floor_mhz": 1200,
        }
    ],
}  # fmt: skip
CLOCK_RECORD = {"t_s": 3610.0, "instance_id": 3, "from_mhz": 1410, "to_mhz": 1980, "reason": "escalation"}


def _record(record_id: int, level: str, summary: str, detail: dict[str, Any]) -> admin_pb2.DecisionRecord:
    return admin_pb2.DecisionRecord(
        id=record_id,
        ts_unix_ns=T0_NS + record_id * 60 * 10**9,
        cycle_time_s=float(detail["t_s"]),
        level=level,
        summary=summary,
        detail_json=json.dumps(detail),
    )


RECORDS = [
    _record(11, "cluster", "cluster step: short 3x TP4@1200MHz, long 1x TP8@1980MHz", CLUSTER_STEP),
    _record(12, "guard", "guard step: short 3x TP4@1410MHz (load x1.10)", POOL_STEP),
    _record(13, "instance", "instance 3: 1410 -> 1980 MHz (escalation)", CLOCK_RECORD),
]

PLAN = admin_pb2.GetPlanResponse(
    generation=7,
    decided_unix_ns=T0_NS + 12 * 60 * 10**9,
    pools=[
        admin_pb2.PlannedPool(
            name="short",
            class_names=["SS", "SM"],
            instances=[admin_pb2.PlannedInstances(tp_degree=4, clock_mhz=1410, instances_count=3)],
        ),
        admin_pb2.PlannedPool(
            name="long",
            class_names=["SL", "MS", "MM", "ML", "LS", "LM", "LL"],
            instances=[admin_pb2.PlannedInstances(tp_degree=8, clock_mhz=1980, instances_count=1)],
        ),
    ],
)
CAPACITIES = [
    admin_pb2.PoolCapacity(
        pool="short",
        configs=[
            admin_pb2.ConfigCapacity(tp_degree=4, clock_mhz=1410, max_load_rps=4.5, power_w=700.0),
            admin_pb2.ConfigCapacity(tp_degree=8, clock_mhz=1200, max_load_rps=7.0, power_w=1200.0),
            admin_pb2.ConfigCapacity(tp_degree=8, clock_mhz=1980, max_load_rps=9.5, power_w=1500.0),
        ],
    ),
    admin_pb2.PoolCapacity(
        pool="long",
        configs=[admin_pb2.ConfigCapacity(tp_degree=8, clock_mhz=1980, max_load_rps=4.0, power_w=3000.0)],
    ),
]

STATUS = admin_pb2.ClusterStatusResponse(
    mode=admin_pb2.MODE_OBSERVE, policy="dynamollm", objective="energy", model="llama2-70b", gpu="H100",
    nodes_count=3, nodes_ready_count=2, gpus_count=16, gpus_held_count=12, instances_count=4, pools_count=2,
    power_w=5123.4, energy_j=7.2e7, desired_generation=7, observed_generation=6, cycle_time_s=3610.0,
    started_unix_ns=T0_NS, last_decision_unix_ns=NOW_NS - 30 * 10**9, controller_version="0.4.0",
    routes_version=5,
)  # fmt: skip
NODE_LIST = admin_pb2.ListNodesResponse(
    nodes=[
        admin_pb2.NodeStatus(
            name="gpu-node-1", address="10.0.0.1:50051", state=admin_pb2.NODE_STATE_READY, node_id="n1",
            gpus_count=8, gpus_held_count=8, power_w=3100.5, lease_remaining_s=241.0, lease_generation=9,
            engines=[
                admin_pb2.NodeEngine(engine_id="i1", instance_id=1, pool="short", gpu_indices=[0, 1, 2, 3],
                                     tp_degree=4, state="READY", clock_mhz=1410),
                admin_pb2.NodeEngine(engine_id="i2", instance_id=2, pool="short", gpu_indices=[4, 5, 6, 7],
                                     tp_degree=4, state="READY", clock_mhz=1410),
            ],
        ),
        admin_pb2.NodeStatus(
            name="gpu-node-2", address="10.0.0.2:50051", state=admin_pb2.NODE_STATE_READY, draining=True,
            gpus_count=8, gpus_held_count=4, power_w=2022.9, lease_remaining_s=238.0,
        ),
        admin_pb2.NodeStatus(
            name="gpu-node-3", address="10.0.0.3:50051", state=admin_pb2.NODE_STATE_UNAVAILABLE,
            last_error="GetInventory to agent 10.0.0.3:50051 failed: UNAVAILABLE: connection refused",
        ),
    ]
)  # fmt: skip
POOL_LIST = admin_pb2.ListPoolsResponse(
    pools=[
        admin_pb2.PoolStatus(
            name="short", class_names=["SS", "SM"], power_w=2100.0, guard_factor=1.1, clock_floor_mhz=1200,
            slo_attainment_ratio=0.9912,
            energy_per_output_token_j=0.75,
            instances=[
                admin_pb2.PoolInstance(instance_id=i, node="gpu-node-1", tp_degree=4, clock_mhz=1410,
                                       phase="ACTIVE")
                for i in (1, 2)
            ]
            + [admin_pb2.PoolInstance(instance_id=3, node="gpu-node-2", tp_degree=4, clock_mhz=1410,
                                      phase="STARTING")],
        ),
        admin_pb2.PoolStatus(
            name="long", class_names=["SL", "MS", "MM", "ML", "LS", "LM", "LL"], power_w=3000.0,
            guard_factor=1.0, slo_attainment_ratio=-1.0,
            instances=[admin_pb2.PoolInstance(instance_id=4, node="gpu-node-2", tp_degree=8, clock_mhz=1980,
                                              phase="ACTIVE")],
        ),
    ]
)  # fmt: skip
EVENTS = [
    admin_pb2.Event(
        seq=1, ts_unix_ns=T0_NS, kind="routes", summary="routing table v5: 9 classes",
        routes=admin_pb2.RoutingTable(version=5),
    ),
    admin_pb2.Event(
        seq=2, ts_unix_ns=T0_NS + 10**9, kind="decision", summary="guard step: short 3x TP4@1410MHz",
        detail_json=json.dumps(POOL_STEP),
    ),
    admin_pb2.Event(seq=3, ts_unix_ns=T0_NS + 2 * 10**9, kind="mode", summary="mode observe -> apply"),
]  # fmt: skip
PAGE_SIZE = 2  # the fake's pages are this short, so that three decisions take two pages


class FakeAdmin(admin_pb2_grpc.ControllerAdminServicer):
    """Canned replies; every call is recorded as (rpc, request, metadata). `token`: calls without
    "authorization: Bearer TOKEN" are refused UNAUTHENTICATED, as the controller does."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, Message, dict[str, str]]] = []
        self.mode = admin_pb2.MODE_OBSERVE
        self.watch_cancelled = threading.Event()

    async def _enter(self, rpc: str, request: Message, context: aio.ServicerContext[Any, Any]) -> None:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.calls.append((rpc, request, metadata))
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")

    def requests(self, rpc: str) -> list[Any]:
        return [request for name, request, _ in self.calls if name == rpc]

    async def ClusterStatus(self, request: Any, context: Any) -> admin_pb2.ClusterStatusResponse:
        await self._enter("ClusterStatus", request, context)
        return STATUS

    async def ListNodes(self, request: Any, context: Any) -> admin_pb2.ListNodesResponse:
        await self._enter("ListNodes", request, context)
        return NODE_LIST

    async def ListPools(self, request: Any, context: Any) -> admin_pb2.ListPoolsResponse:
        await self._enter("ListPools", request, context)
        return POOL_LIST

    async def GetPlan(self, request: Any, context: Any) -> admin_pb2.GetPlanResponse:
        await self._enter("GetPlan", request, context)
        reply = admin_pb2.GetPlanResponse()
        reply.CopyFrom(PLAN)
        if request.explain:
            reply.records.extend(RECORDS)
            reply.capacities.extend(CAPACITIES)
        return reply

    async def ListDecisions(self, request: Any, context: Any) -> admin_pb2.ListDecisionsResponse:
        await self._enter("ListDecisions", request, context)
        matching = [
            r for r in RECORDS if r.ts_unix_ns >= request.since_unix_ns and request.level in ("", r.level)
        ]
        start = int(request.page_token or "0")
        end = start + min(PAGE_SIZE, request.page_size or 100)
        token = str(end) if end < len(matching) else ""
        return admin_pb2.ListDecisionsResponse(decisions=matching[start:end], next_page_token=token)

    async def SetMode(self, request: Any, context: Any) -> admin_pb2.SetModeResponse:
        await self._enter("SetMode", request, context)
        if request.mode not in MODE_BY_NAME.values():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"mode: got {request.mode}; allowed: MODE_OBSERVE, MODE_APPLY, MODE_PAUSED",
            )
        previous, self.mode = self.mode, request.mode
        return admin_pb2.SetModeResponse(previous_mode=previous, mode=request.mode)

    async def DrainNode(self, request: Any, context: Any) -> admin_pb2.DrainNodeResponse:
        await self._enter("DrainNode", request, context)
        if request.node not in NODES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"node: got {request.node!r}; allowed: {', '.join(NODES)}"
            )
        return admin_pb2.DrainNodeResponse(node=request.node, draining=not request.undrain)

    async def WatchEvents(self, request: Any, context: Any) -> AsyncIterator[admin_pb2.Event]:
        await self._enter("WatchEvents", request, context)
        try:
            for event in EVENTS:
                if not request.kinds or event.kind in request.kinds:
                    yield event
            await asyncio.Event().wait()  # open-ended, as the controller's: only the caller ends it
        finally:
            self.watch_cancelled.set()

    async def ReportTraffic(self, request: Any, context: Any) -> admin_pb2.ReportTrafficResponse:
        await self._enter("ReportTraffic", request, context)
        return admin_pb2.ReportTrafficResponse(
            arrivals_count=len(request.arrivals), completions_count=len(request.completions)
        )


class _ServerThread:
    """A grpc.aio server with the fake in an event loop of its own, for synchronous dctl calls to reach."""

    def __init__(self, fake: FakeAdmin, credentials: grpc.ServerCredentials | None = None) -> None:
        self.fake = fake
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-controller", daemon=True)
        self._thread.start()
        self._server, port = asyncio.run_coroutine_threadsafe(self._start(credentials), self._loop).result(30)
        self.addr = f"127.0.0.1:{port}"

    async def _start(self, credentials: grpc.ServerCredentials | None) -> tuple[aio.Server, int]:
        server = aio.server()
        admin_pb2_grpc.add_ControllerAdminServicer_to_server(self.fake, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0.5), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[_ServerThread]:
    running = _ServerThread(FakeAdmin())
    yield running
    running.close()


@pytest.fixture
def fake(server: _ServerThread) -> FakeAdmin:
    server.fake.calls.clear()
    server.fake.mode = admin_pb2.MODE_OBSERVE
    server.fake.watch_cancelled.clear()
    return server.fake


def _dctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["cluster", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _at(server: _ServerThread, command: str, *argv: str) -> list[str]:
    return [command, "--controller", server.addr, *argv]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dctl ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------- views


def test_status_table_shows_the_cluster_at_a_glance(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "status"))
    assert code == 0, err
    rows = {line.split("  ")[0]: " ".join(line.split()) for line in out.splitlines()}
    assert rows["mode"] == "mode observe"
    assert rows["model / GPU"] == "model / GPU llama2-70b / H100"
    assert "nodes ready/total 2/3" in rows["nodes ready/total"]
    assert "GPUs held/total 12/16" in rows["GPUs held/total"]
    assert "energy kWh 20.000" in rows["energy kWh"]  # 7.2e7 J
    assert "power W 5123.4" in rows["power W"]
    assert "7/6" in rows["generation desired/observed"] and "1 not yet applied" in out
    assert rows["routes version"] == "routes version 5"
    # The canned decision is 30 s older than the module's import: its age as the suite runs varies.
    assert re.search(r"\d+ (s|min|h) ago \(2\d{3}-", rows["last decision"])
    assert [name for name, _, _ in fake.calls] == ["ClusterStatus"]


def test_nodes_table_has_a_row_per_node(server: _ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dctl(capsys, *_at(server, "nodes"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ADDRESS", "STATE"] and "LAST ERROR" in lines[0]
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_name["gpu-node-1"][2:8] == ["READY", "no", "8/8", "3100.5", "241", "2"]
    assert by_name["gpu-node-2"][2:4] == ["READY", "yes"]
    assert by_name["gpu-node-3"][2] == "UNAVAILABLE" and "connection refused" in lines[3]


def test_pools_table_groups_instances_by_configuration(
    server: _ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "pools"))
    assert code == 0, err
    short = next(line for line in out.splitlines() if line.startswith("short"))
    assert "2x TP4@1410MHz, 1x TP4@1410MHz starting" in short
    assert short.split()[-5:] == ["2100.0", "1.10", "1200", "99.12", "0.750"]
    long = next(line for line in out.splitlines() if line.startswith("long"))
    assert (
        "SL,MS,MM,ML,LS,LM,LL" in long and "1x TP8@1980MHz" in long and long.split()[-3:] == ["-", "-", "-"]
    )
    assert out.rstrip().endswith(cmd_cluster.CLASSES_NOTE)  # the class names, explained once


def test_plan_table(server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dctl(capsys, *_at(server, "plan"))
    assert code == 0, err
    assert out.startswith("plan generation 7, decided 2025-01-31T12:12:00.000Z")
    short = next(line for line in out.splitlines() if line.startswith("short"))
    assert short.split() == ["short", "SS,SM", "3x", "TP4@1410MHz", "12"]
    assert "because" not in out and fake.requests("GetPlan")[0].explain is False


def test_plan_explain_answers_why_each_pool_looks_as_it_does(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "plan", "--explain"))
    assert code == 0, err
    assert fake.requests("GetPlan")[0].explain is True
    short = out.split("pool short (SS,SM): 3x TP4@1410MHz, because")[1].split("pool long")[0]
    # the newest record deciding the pool (the guard step, not the older cluster step nor the clock record)
    assert "decided by the guard step at 2025-01-31T12:12:00.000Z (record 12" in short
    assert "horizon 300 s" in short
    assert "forecast 12.60 rps planned" in short and "SS 5.00, SM 6.00 rps" in short
    assert "GPU budget 16, solver optimal, shortfall 0.00 rps" in short
    # energy = power x horizon: 2100 W x 300 s = 0.175 kWh; 2400 W x 300 s = 0.2 kWh
    assert "chosen: 3x TP4@1410MHz: 2100.0 W, 0.175 kWh over 300 s, serves up to 13.50 rps" in short
    assert "runner-up: 2x TP8@1200MHz: 2400.0 W, 0.2 kWh over 300 s, serves up to 14.00 rps" in short
    assert "+300.0 W (+14.3%) against the chosen mix" in short
    assert "SLO guard: load factor 1.10, clock floor 1200 MHz" in short
    table = [line.split() for line in short.splitlines() if line.startswith("    ")]
    assert table[0] == ["TP", "CLOCK", "MHZ", "MAX", "LOAD", "RPS", "POWER", "W", "USED", "BY"]
    assert table[1] == ["4", "1410", "4.50", "700.0", "chosen", "3x"]
    assert table[2] == ["8", "1200", "7.00", "1200.0", "runner-up", "2x"]
    assert table[3] == ["8", "1980", "9.50", "1500.0"]
    long = out.split("pool long (SL,MS,MM,ML,LS,LM,LL): 1x TP8@1980MHz, because")[1]
    assert "decided by the cluster step" in long and "horizon 1800 s" in long
    assert "solver incumbent, shortfall 0.40 rps" in long and "runner-up: none" in long
    assert "chosen: 1x TP8@1980MHz: 3000.0 W, 1.5 kWh over 1800 s" in long
    assert "SLO guard: none" in long


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["status"], "mode"),
        (["nodes"], "nodes"),
        (["pools"], "pools"),
        (["plan", "--explain"], "records"),
        (["decisions"], "decisions"),
        (["mode", "apply"], "previous_mode"),
        (["drain", "gpu-node-2"], "draining"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else v,
)
def test_json_output_parses(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str], argv: list[str], key: str
) -> None:
    code, out, err = _dctl(capsys, *_at(server, *argv, "--output", "json"))
    assert code == 0, err
    doc = json.loads(out)
    assert key in doc


def test_json_keeps_numbers_and_enum_names_and_parses_details(
    server: _ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _dctl(capsys, *_at(server, "status", "--output", "json"))
    status = json.loads(out)
    assert status["mode"] == "MODE_OBSERVE" and status["desired_generation"] == 7
    assert isinstance(status["started_unix_ns"], int)
    code, out, err = _dctl(capsys, *_at(server, "plan", "--explain", "--output", "json"))
    assert code == 0, err
    plan = json.loads(out)
    assert [r["detail"] for r in plan["records"]] == [CLUSTER_STEP, POOL_STEP, CLOCK_RECORD]
    assert plan["capacities"][0]["configs"][0] == {
        "tp_degree": 4,
        "clock_mhz": 1410,
        "max_load_rps": 4.5,
        "power_w": 700.0,
    }
    code, out, _ = _dctl(capsys, *_at(server, "nodes", "--output", "json"))
    assert json.loads(out)["nodes"][2]["state"] == "NODE_STATE_UNAVAILABLE"


# ---------------------------------------------------------------------------------------- decisions


def test_decisions_page_through_every_page(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "decisions"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "UTC", "LEVEL", "SUMMARY"]
    assert [line.split()[1] for line in lines[1:]] == ["cluster", "guard", "instance"]
    assert lines[1].split()[:4] == ["2025-01-31T12:11:00.000Z", "cluster", "cluster", "step:"]
    pages = fake.requests("ListDecisions")
    assert [(p.page_size, p.page_token, p.since_unix_ns, p.level) for p in pages] == [
        (1000, "", 0, ""),
        (1000, "2", 0, ""),
    ]


def test_decisions_limit_level_and_since(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "decisions", "--limit", "1", "--output", "json"))
    assert code == 0, err
    assert [d["id"] for d in json.loads(out)["decisions"]] == [11]
    assert json.loads(out)["decisions"][0]["detail"] == CLUSTER_STEP
    assert fake.requests("ListDecisions")[-1].page_size == 1

    code, out, err = _dctl(capsys, *_at(server, "decisions", "--level", "guard"))
    assert code == 0, err
    assert len(out.splitlines()) == 2 and fake.requests("ListDecisions")[-1].level == "guard"

    code, out, err = _dctl(capsys, *_at(server, "decisions", "--since", "2025-01-31T12:12:00Z"))
    assert code == 0, err
    assert fake.requests("ListDecisions")[-1].since_unix_ns == T0_NS + 12 * 60 * 10**9
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["guard", "instance"]

    before = time.time_ns()
    code, out, err = _dctl(capsys, *_at(server, "decisions", "--since", "10m"))
    assert code == 0, err
    since = fake.requests("ListDecisions")[-1].since_unix_ns
    assert before - 600 * 10**9 <= since <= time.time_ns() - 600 * 10**9
    assert out.strip() == "no decisions"


@pytest.mark.parametrize("since", ["yesterday", "10", "-5m", "0m", "10 m", "2h30m", "31/01/2025"])
def test_a_bad_since_exits_2_naming_the_flag_and_the_forms(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "decisions", f"--since={since}"))
    assert code == 2 and out == ""
    line = _error_line(err)
    assert line.startswith("dctl cluster: error: --since: got ")
    assert "10m" in line and "ISO-8601" in line
    assert fake.calls == []  # refused before any RPC


@pytest.mark.parametrize(
    ("argv", "flag"), [(["--level", "pool,guard"], "--level"), (["--limit", "0"], "--limit")]
)
def test_bad_decisions_flags_exit_2(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "decisions", *argv))
    assert code == 2 and out == "" and _error_line(err).startswith(f"dctl cluster: error: {flag}: got ")
    assert fake.calls == []


def test_since_forms() -> None:
    now = T0_NS + 10**12
    assert cmd_cluster.since_unix_ns("2h", now) == now - 7200 * 10**9
    assert cmd_cluster.since_unix_ns("1d", now) == now - 86400 * 10**9
    assert cmd_cluster.since_unix_ns("2025-01-31T12:00:00", now) == T0_NS  # naive: UTC
    assert cmd_cluster.since_unix_ns("2025-01-31T13:00:00+01:00", now) == T0_NS


# ---------------------------------------------------------------------------------------- mode, drain


def test_mode_apply_sends_mode_apply(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "mode", "apply", "--reason", "trial over"))
    assert code == 0, err
    assert out.strip() == "mode observe -> apply"
    (request,) = fake.requests("SetMode")
    assert request.mode == admin_pb2.MODE_APPLY and request.reason == "trial over"


def test_an_unknown_mode_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["cluster", "mode", "apply-now"])
    assert exited.value.code == 2 and "invalid choice: 'apply-now'" in capsys.readouterr().err
    assert tuple(MODE_BY_NAME) == cmd_cluster.MODES  # dctl's choices are the client's names


def test_drain_and_undrain(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "drain", "gpu-node-2", "--reason", "DIMM swap"))
    assert code == 0, err
    assert out.startswith("node gpu-node-2: draining")
    code, out, err = _dctl(capsys, *_at(server, "drain", "gpu-node-2", "--undrain"))
    assert code == 0, err
    assert out.startswith("node gpu-node-2: in service")
    assert [(r.node, r.undrain, r.reason) for r in fake.requests("DrainNode")] == [
        ("gpu-node-2", False, "DIMM swap"),
        ("gpu-node-2", True, ""),
    ]


def test_the_controllers_invalid_argument_is_one_line_naming_the_field(
    server: _ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "drain", "ghost"))
    assert code == 2 and out == ""
    assert _error_line(err) == (
        "dctl cluster: error: node: got 'ghost'; allowed: gpu-node-1, gpu-node-2, gpu-node-3"
    )


def test_a_too_long_reason_is_refused_before_any_rpc(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "mode", "paused", "--reason", "x" * 501))
    assert code == 2 and out == "" and _error_line(err).startswith("dctl cluster: error: --reason: got ")
    assert fake.calls == []


# ---------------------------------------------------------------------------------------- watch


def test_watch_count_2_prints_two_events_and_cancels_the_stream(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "watch", "--count", "2"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "UTC", "KIND", "SUMMARY"] and len(lines) == 3
    assert lines[1].split()[1:3] == ["routes", "routing"]
    assert lines[2].split()[1] == "decision" and "guard step" in lines[2]
    assert fake.watch_cancelled.wait(10)


def test_watch_json_lines_with_kinds(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _at(server, "watch", "--kinds", "decision,mode", "--count", "2", "--output", "json")
    code, out, err = _dctl(capsys, *argv)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in events] == ["decision", "mode"]
    assert events[0]["detail"] == POOL_STEP and "detail" not in events[1]
    assert list(fake.requests("WatchEvents")[0].kinds) == ["decision", "mode"]


@pytest.mark.parametrize(
    ("argv", "flag"), [(["--kinds", "decision,bogus"], "--kinds"), (["--count", "0"], "--count")]
)
def test_bad_watch_flags_exit_2(
    server: _ServerThread, fake: FakeAdmin, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    code, out, err = _dctl(capsys, *_at(server, "watch", *argv))
    assert code == 2 and out == "" and _error_line(err).startswith(f"dctl cluster: error: {flag}: got ")
    assert fake.calls == []


# ---------------------------------------------------------------------------------------- reachability


UNREACHABLE_COMMANDS = [
    ["status"],
    ["nodes"],
    ["pools"],
    ["plan", "--explain"],
    ["decisions"],
    ["mode", "apply"],
    ["drain", "gpu-node-1"],
    ["watch", "--count", "1"],
]


@pytest.mark.parametrize("argv", UNREACHABLE_COMMANDS, ids=lambda argv: argv[0])
def test_an_unreachable_controller_exits_3_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    started = time.monotonic()
    code, out, err = _dctl(capsys, argv[0], "--controller", "127.0.0.1:1", *argv[1:], "--timeout-s", "5")
    assert code == 3 and time.monotonic() - started < 5
    if argv[0] != "watch":  # watch prints its table header before the stream fails
        assert out == ""
    line = _error_line(err)
    assert line.startswith("dctl cluster: error: ") and "to controller 127.0.0.1:1" in line
    assert "UNAVAILABLE" in line


def test_a_silent_controller_exits_3_at_the_deadline(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that accepts connections but never speaks HTTP/2: the call's deadline ends the wait."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, out, err = _dctl(capsys, "status", "--controller", addr, "--timeout-s", "1")
        elapsed = time.monotonic() - started
    assert code == 3 and out == "" and 0.9 <= elapsed < 4
    assert "no reply before the deadline" in _error_line(err)


@pytest.mark.parametrize("addr", ["no-port-here", "host:0", "host:http"])
def test_a_bad_controller_address_exits_2(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, err = _dctl(capsys, "status", "--controller", addr)
    assert code == 2 and out == "" and _error_line(err).startswith("dctl cluster: error: --controller: got ")


def test_the_address_comes_from_the_environment(
    server: _ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNAMOLLM_CONTROLLER", server.addr)
    code, out, err = _dctl(capsys, "status", "--output", "json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "dynamollm"


# ---------------------------------------------------------------------------------------- tokens, TLS


def test_tokens_reach_a_controller_that_requires_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = _ServerThread(FakeAdmin(token=TOKEN))
    try:
        code, _, err = _dctl(capsys, "status", "--controller", running.addr)
        line = _error_line(err)
        assert code == 2 and "ClusterStatus to controller" in line and "UNAUTHENTICATED" in line
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        code, _, err = _dctl(capsys, "status", "--controller", running.addr, "--token-file", str(token_file))
        assert code == 0, err
        code, _, err = _dctl(capsys, "mode", "paused", "--controller", running.addr, "--token", TOKEN)
        assert code == 0, err
        monkeypatch.setenv("DYNAMOLLM_TOKEN", TOKEN)
        code, _, err = _dctl(capsys, "nodes", "--controller", running.addr)
        assert code == 0, err
        seen = {metadata.get("authorization") for _, _, metadata in running.fake.calls}
        assert seen == {None, f"Bearer {TOKEN}"}
        code, out, err = _dctl(capsys, "nodes", "--token-file", str(tmp_path / "absent"))
        assert (
            code == 2 and out == "" and _error_line(err).startswith("dctl cluster: error: --token-file: got ")
        )
    finally:
        running.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        pytest.skip("the openssl command is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_dctl_cluster_over_mtls(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.cert.read_bytes(),
        require_client_auth=True,
    )
    running = _ServerThread(FakeAdmin(), credentials)
    ca = ("--tls-ca", str(pki.ca.cert))
    client = ("--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    try:
        code, out, err = _dctl(
            capsys, "status", "--controller", running.addr, *ca, *client, "--output", "json"
        )
        assert code == 0, err
        assert json.loads(out)["model"] == "llama2-70b"
        code, _, err = _dctl(capsys, "status", "--controller", running.addr, *ca, "--timeout-s", "5")
        assert code == 3 and "UNAVAILABLE" in _error_line(err)
    finally:
        running.close()


# ---------------------------------------------------------------------------------------- the client


async def test_the_client_maps_modes_and_refuses_an_unknown_one_before_any_rpc(server: _ServerThread) -> None:
    fake = server.fake
    fake.calls.clear()
    async with AdminClient(server.addr, timeout_s=5) as client:
        with pytest.raises(InvalidArgumentError) as refused:
            await client.set_mode("fast")
        assert refused.value.field == "mode" and fake.calls == []
        reply = await client.set_mode("paused")
        assert mode_name(reply.mode) == "paused" and mode_name(0) == "unknown (0)"
        traffic = await client.report_traffic(
            [admin_pb2.TrafficArrival(arrival_unix_ns=T0_NS, class_name="SS", input_tokens=100)], []
        )
        assert (traffic.arrivals_count, traffic.completions_count) == (1, 0)
    fake.mode = admin_pb2.MODE_OBSERVE
