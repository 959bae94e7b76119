"""`dctl top`'s pure parts: frames rendered from snapshots (sections, class names explained, cut to the
terminal's width and height), the in-place drawing sequence, the `dynamollm.top/v1` document, the
snapshot built from admin API replies, and the merge of the decision tail. The loop around them runs
against the real stack in tests/system/test_dctl_top.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from controller.api.v1 import admin_pb2
from controller.dctl.cmd_top import (
    CUT_MARK,
    SCHEMA,
    ClassView,
    DecisionView,
    InstanceView,
    NodeView,
    PoolView,
    TopSnapshot,
    ansi_frame,
    class_meaning,
    cut,
    frame_json,
    newest,
    render,
    snapshot_of,
)

T0_NS = 1_738_324_800_000_000_000  # 2025-01-31T12:00:00Z
CLASS_NAMES = ("SS", "SM", "SL", "MS", "MM", "ML", "LS", "LM", "LL")


def _classes(done: dict[str, tuple[int, int]]) -> tuple[ClassView, ...]:
    """Every class, with (met, total) from `done` and no completions otherwise."""
    out = []
    for name in CLASS_NAMES:
        met, total = done.get(name, (0, 0))
        out.append(ClassView(name, class_meaning(name), met, total, met / total if total else None))
    return tuple(out)


SNAP = TopSnapshot(
    controller="10.0.0.9:50061",
    taken_unix_ns=T0_NS,
    mode="apply",
    policy="dynamollm",
    objective="energy",
    model="llama2-70b",
    gpu="h100-sxm",
    cycle_time_s=3610.0,
    power_w=5123.4,
    energy_j=7.2e7,
    desired_generation=9,
    observed_generation=7,
    slo_window_s=300.0,
    pools=(
        PoolView(
            "short",
            ("SS", "SM"),
            2100.0,
            0.995,
            (
                InstanceView(1, "short", "gpu-node-1", 4, 1410, "ACTIVE"),
                InstanceView(2, "short", "gpu-node-1", 4, 1410, "ACTIVE"),
                InstanceView(5, "short", "", 8, 0, "STARTING"),
            ),
        ),
        PoolView("long", ("LL",), 0.0, None, (InstanceView(3, "long", "gpu-node-2", 8, 1980, "DRAINING"),)),
    ),
    nodes=(
        NodeView("gpu-node-1", "READY", False, 8, 8, 3100.5, ""),
        NodeView("gpu-node-2", "UNAVAILABLE", True, 8, 8, 0.0, "deadline exceeded (permanent)"),
    ),
    classes=_classes({"SS": (995, 1000), "SM": (98, 100)}),
    decisions=(
        DecisionView(11, T0_NS - 600 * 10**9, "pool", "pool step: short: 2x TP4@1410 (optimal)"),
        DecisionView(12, T0_NS - 5 * 10**9, "instance", "instance 3: 1410 -> 1980 MHz (escalation)"),
    ),
)


def _section(lines: list[str], title: str) -> list[str]:
    """The lines of the section whose title starts with `title`, up to the blank line after it."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def test_header_has_controller_mode_power_energy_and_generations() -> None:
    lines = render(SNAP)
    assert lines[0] == "dctl top  controller 10.0.0.9:50061  2025-01-31T12:00:00.000Z"
    assert lines[1].startswith(
        "mode apply  policy dynamollm (objective energy)  model llama2-70b on h100-sxm"
    )
    assert "power 5123.4 W  energy 20 kWh" in lines[2]
    assert "generation 9 (2 not yet confirmed)" in lines[2]


def test_pools_show_instances_mix_power_and_slo() -> None:
    pools = _section(render(SNAP), "POOLS")
    assert pools[0] == "POOLS (2)"
    assert pools[1].split() == ["POOL", "CLASSES", "INSTANCES", "TP", "x", "CLOCK", "POWER", "W", "SLO", "%"]
    assert pools[2].split() == [
        "short",
        "SS,SM",
        "3",
        "(1",
        "starting)",
        "2x",
        "TP4@1410MHz,",
        "1x",
        "TP8@default",
        "2100.0",
        "99.50",
    ]
    assert pools[3].split() == ["long", "LL", "1", "(1", "draining)", "1x", "TP8@1980MHz", "0.0", "-"]


def test_instances_by_id_with_tp_clock_phase_and_node() -> None:
    rows = [line.split() for line in _section(render(SNAP), "INSTANCES")]
    assert rows[0] == ["INSTANCES", "(4)"]
    assert rows[2:] == [
        ["1", "short", "gpu-node-1", "4", "1410", "ACTIVE"],
        ["2", "short", "gpu-node-1", "4", "1410", "ACTIVE"],
        ["3", "long", "gpu-node-2", "8", "1980", "DRAINING"],
        ["5", "short", "-", "8", "default", "STARTING"],
    ]


def test_nodes_with_state_draining_gpus_power_and_error() -> None:
    nodes = _section(render(SNAP), "NODES")
    assert nodes[0] == "NODES (1 of 2 ready)"
    assert nodes[2].split() == ["gpu-node-1", "READY", "no", "8/8", "3100.5", "-"]
    assert nodes[3].split()[:5] == ["gpu-node-2", "UNAVAILABLE", "yes", "8/8", "0.0"]
    assert nodes[3].endswith("deadline exceeded (permanent)")


def test_class_grid_explains_the_names_and_shows_attainment() -> None:
    grid = _section(render(SNAP), "SLO ATTAINMENT")
    assert grid[0] == "SLO ATTAINMENT per request class, last 300 s of cycle time"
    assert grid[1].split() == ["short", "answer", "medium", "answer", "long", "answer"]
    # each class sits in the row of its prompt length, the column of its answer length
    assert grid[2].startswith("short prompt   SS 99.50% of 1000  SM 98.00% of 100  SL no requests")
    assert grid[3].split()[:2] == ["medium", "prompt"] and "MS no requests" in grid[3]
    assert grid[4].split()[:2] == ["long", "prompt"] and grid[4].rstrip().endswith("LL no requests")
    columns = [grid[1].index(f"{word} answer") for word in ("short", "medium", "long")]
    assert [grid[2].index(name) for name in ("SS", "SM", "SL")] == columns


def test_class_names_explained() -> None:
    assert class_meaning("LS") == "long prompt, short answer"
    assert class_meaning("MM") == "medium prompt, medium answer"
    assert class_meaning("XL") == "" and class_meaning("SSS") == ""


def test_classes_a_controller_does_not_report_and_unknown_names() -> None:
    silent = render(dataclasses.replace(SNAP, classes=()))
    assert _section(silent, "SLO ATTAINMENT")[1] == "not reported by this controller"
    odd = dataclasses.replace(SNAP, classes=(*SNAP.classes, ClassView("XX", "", 1, 1, 1.0)))
    assert _section(render(odd), "SLO ATTAINMENT")[-1] == "other classes: XX"


def test_decisions_newest_first_with_age_level_and_reason() -> None:
    rows = _section(render(SNAP), "LAST")
    assert rows[0] == "LAST 2 DECISIONS, newest first"
    assert rows[2].split()[:4] == ["5", "s", "ago", "instance"]
    assert rows[2].endswith("instance 3: 1410 -> 1980 MHz (escalation)")
    assert rows[3].split()[:4] == ["10", "min", "ago", "pool"]


def test_empty_cluster() -> None:
    empty = dataclasses.replace(SNAP, pools=(), nodes=(), decisions=())
    lines = render(empty)
    for line in ("POOLS: none", "NODES: none configured", "DECISIONS: none yet", "INSTANCES: none"):
        assert line in lines


@pytest.mark.parametrize("width", [20, 41, 80])
def test_every_line_is_cut_to_the_width(width: int) -> None:
    whole = render(SNAP)
    lines = render(SNAP, width=width)
    assert len(lines) == len(whole)
    assert all(len(line) <= width for line in lines)
    for full, shown in zip(whole, lines, strict=True):
        assert shown == full if len(full) <= width else shown == full[: width - len(CUT_MARK)] + CUT_MARK


def test_the_frame_is_cut_to_the_height_saying_what_is_hidden() -> None:
    whole = render(SNAP)
    lines = render(SNAP, width=60, height=12)
    assert len(lines) == 12 and lines[:11] == [cut(line, 60) for line in whole[:11]]
    assert lines[11] == f"{CUT_MARK} {len(whole) - 11} more lines: a taller terminal shows them"
    assert render(SNAP, height=len(whole)) == whole


def test_cut() -> None:
    assert cut("abcdef", 6) == "abcdef"
    assert cut("abcdefg", 6) == "abc..."
    assert cut("abcdefg", 3) == "abc"
    assert cut("abc", 0) == ""


def test_ansi_frame_draws_over_the_previous_one() -> None:
    assert ansi_frame(["a", "bb"], first=True) == "\x1b[2J\x1b[Ha\x1b[K\nbb\x1b[J"
    assert ansi_frame(["a", "bb"], first=False) == "\x1b[Ha\x1b[K\nbb\x1b[J"


def test_frame_json_is_the_snapshot_under_the_schema() -> None:
    doc = json.loads(json.dumps(frame_json(SNAP)))
    assert doc["schema"] == SCHEMA == "dynamollm.top/v1"
    assert doc["mode"] == "apply" and doc["power_w"] == 5123.4
    assert doc["pools"][1] == {
        "name": "long",
        "class_names": ["LL"],
        "power_w": 0.0,
        "slo_attainment_ratio": None,
        "instances": [
            {
                "instance_id": 3,
                "pool": "long",
                "node": "gpu-node-2",
                "tp_degree": 8,
                "clock_mhz": 1980,
                "phase": "DRAINING",
            }
        ],
    }
    assert doc["classes"][0] == {
        "class_name": "SS",
        "meaning": "short prompt, short answer",
        "slo_met_count": 995,
        "completions_count": 1000,
        "slo_attainment_ratio": 0.995,
    }
    assert [d["id"] for d in doc["decisions"]] == [11, 12]


def test_snapshot_of_the_admin_replies() -> None:
    status = admin_pb2.ClusterStatusResponse(
        mode=admin_pb2.MODE_OBSERVE,
        policy="dynamollm",
        power_w=600.0,
        slo_window_s=300.0,
        class_attainments=[
            admin_pb2.ClassAttainment(class_name="SS", slo_met_count=9, completions_count=10),
            admin_pb2.ClassAttainment(class_name="SM"),
        ],
    )
    nodes = admin_pb2.ListNodesResponse(
        nodes=[
            admin_pb2.NodeStatus(
                name="n0",
                state=admin_pb2.NODE_STATE_CONNECTING,
                last_error="no such GPU",
                last_error_permanent=True,
            )
        ]
    )
    pools = admin_pb2.ListPoolsResponse(
        pools=[
            admin_pb2.PoolStatus(
                name="SL",
                class_names=["SS", "SL"],
                slo_attainment_ratio=-1.0,
                instances=[admin_pb2.PoolInstance(instance_id=4, node="n0", tp_degree=2, phase="ACTIVE")],
            ),
            admin_pb2.PoolStatus(name="LL", slo_attainment_ratio=0.5),
        ]
    )
    record = admin_pb2.DecisionRecord(id=3, ts_unix_ns=T0_NS, level="initial", summary="initial step: ...")
    snap = snapshot_of("c:1", T0_NS, status, nodes, pools, [record])
    assert (snap.mode, snap.policy, snap.power_w, snap.slo_window_s) == ("observe", "dynamollm", 600.0, 300.0)
    assert snap.classes == (
        ClassView("SS", "short prompt, short answer", 9, 10, 0.9),
        ClassView("SM", "short prompt, medium answer", 0, 0, None),
    )
    assert snap.nodes == (NodeView("n0", "CONNECTING", False, 0, 0, 0.0, "no such GPU (permanent)"),)
    assert snap.pools[0].slo_attainment_ratio is None and snap.pools[1].slo_attainment_ratio == 0.5
    assert snap.pools[0].instances == (InstanceView(4, "SL", "n0", 2, 0, "ACTIVE"),)
    assert snap.decisions == (DecisionView(3, T0_NS, "initial", "initial step: ..."),)


def _rec(record_id: int) -> admin_pb2.DecisionRecord:
    return admin_pb2.DecisionRecord(id=record_id, ts_unix_ns=T0_NS + record_id, summary=f"d{record_id}")


def test_newest_keeps_the_last_decisions_once_each_oldest_first() -> None:
    have = (_rec(1), _rec(2), _rec(3))
    merged = newest(
        have, [_rec(3), _rec(5), _rec(4)], 4
    )  # the newest known comes again: ListDecisions "since"
    assert [r.id for r in merged] == [2, 3, 4, 5]
    assert [r.id for r in newest((), [_rec(7), _rec(6)], 10)] == [6, 7]
    assert newest(have, [], 3) == have
