"""`dctl top`: a live view of the cluster from the controller's admin API, redrawn in place.

Where it sits: beside `dctl cluster` (controller.dctl.cmd_cluster), over the same client, connection
flags and helpers; like it, it knows only the wire contract (proto/controller/api/v1/admin.proto). One
refresh reads ClusterStatus, ListNodes and ListPools, and the decisions recorded since the last refresh
(ListDecisions), into a frozen `TopSnapshot`. `render` turns a snapshot into the lines of a frame and
`frame_json` into a `dynamollm.top/v1` document: both pure, tested on snapshots. The loop around them
is thin: it refreshes every `--interval-s` and at once when the controller's WatchEvents stream reports
something (a decision, a command, a routing table, a mode or node change; at most one frame per
`MIN_FRAME_GAP_S`), and writes the frame:

* table output to a terminal: in place (cursor home, each line erased to its end, the rest of the screen
  cleared; no curses), lines cut to the terminal's width and the frame to its height;
* table output elsewhere (a pipe, a file): the frames one after the other, a blank line between;
* `--output json`: one `dynamollm.top/v1` document per refresh, one per line;
* `--once`: one frame (one JSON document), then exit: for scripts and tests.

Exit codes (controller/dctl/main.py): 0 after `--once` or Ctrl-C; 2 a bad flag; 3 the controller is
unreachable at the start, or goes away while watched (the message says so and which call failed); 4
internal error.

    dctl top [--interval-s 2] [--decisions 10] [--once] [--output table|json] [connection flags]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from agent.api.errors import InvalidArgumentError, UnavailableError
from controller.dctl.cmd_cluster import (
    CLASSES_NOTE,
    _ago,
    _common_parser,
    _Conn,
    _conn,
    _decisions,
    _kwh,
    _mix,
)
from controller.dctl.cmd_node import _count, _enum_short, _run, _table, _utc
from controller.dctl.output import echo, stdout

if TYPE_CHECKING:
    from controller.api.client import AdminClient
    from controller.api.v1 import admin_pb2

SCHEMA: Final = "dynamollm.top/v1"
DEFAULT_INTERVAL_S: Final = 2.0
MIN_INTERVAL_S: Final = 0.2
MIN_FRAME_GAP_S: Final = 0.2  # events come in bursts (a plan step's decisions and commands): one frame each
DEFAULT_DECISIONS: Final = 10
# The first refresh finds the last decisions by looking back from the newest one, this far first, then
# LOOK_BACK_GROWTH times further each time until enough are found or the look reaches 1970.
FIRST_LOOK_BACK_S: Final = 60.0
LOOK_BACK_GROWTH: Final = 8.0
BIN_WORDS: Final = {"S": "short", "M": "medium", "L": "long"}  # the class names' letters (CLASSES_NOTE)
HOME: Final = "\x1b[H"  # cursor to the top left
CLEAR_SCREEN: Final = "\x1b[2J"
CLEAR_LINE_END: Final = "\x1b[K"  # erase from the cursor to the end of its line
CLEAR_BELOW: Final = "\x1b[J"  # erase from the cursor to the end of the screen
CUT_MARK: Final = "..."
HELP: Final = (
    "a live view of the cluster: pools, instances, nodes, power, SLO attainment per class, decisions"
)
DETAILS: Final = (
    ". On a terminal the frame is redrawn in place; elsewhere frames follow each other. --output json: "
    f"one {SCHEMA} document per refresh, one per line. Ctrl-C ends it (exit 0); a controller that goes "
    "away ends it with exit 3."
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "top", parents=[_common_parser()], help=HELP, description=HELP + DETAILS, epilog=CLASSES_NOTE
    )
    parser.add_argument(
        "--interval-s",
        default=None,
        metavar="S",
        help=f"refresh at least every S seconds, and at once on the controller's events (default "
        f"{DEFAULT_INTERVAL_S:g}; at least {MIN_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--decisions",
        default=None,
        metavar="N",
        help=f"show the last N decisions of the control cycle (default {DEFAULT_DECISIONS})",
    )
    parser.add_argument(
        "--once", action="store_true", help="print one frame (with --output json: one document) and exit"
    )
    parser.set_defaults(func=top_cmd)


# ---------------------------------------------------------------- the snapshot (values only)


@dataclass(frozen=True, slots=True)
class InstanceView:
    instance_id: int
    pool: str
    node: str  # "" while not placed
    tp_degree: int
    clock_mhz: int  # 0: the driver's default clock
    phase: str  # STARTING, ACTIVE or DRAINING


@dataclass(frozen=True, slots=True)
class PoolView:
    name: str
    class_names: tuple[str, ...]
    power_w: float
    slo_attainment_ratio: float | None  # over the SLO guard's window; None: no completions in it
    instances: tuple[InstanceView, ...]


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    state: str  # CONNECTING, READY or UNAVAILABLE
    draining: bool
    gpus_count: int
    gpus_held_count: int
    power_w: float
    last_error: str  # "": none


@dataclass(frozen=True, slots=True)
class ClassView:
    class_name: str  # SS..LL
    meaning: str  # e.g. "long prompt, short answer" ("" for a name this dctl does not know)
    slo_met_count: int
    completions_count: int
    slo_attainment_ratio: float | None  # None: no completions in the window


@dataclass(frozen=True, slots=True)
class DecisionView:
    id: int
    ts_unix_ns: int
    level: str  # initial, cluster, pool, guard or instance
    summary: str  # the decision and its reason, one line


@dataclass(frozen=True, slots=True)
class TopSnapshot:
    """What one frame shows: the cluster as the controller's admin API answered at `taken_unix_ns`."""

    controller: str  # the address asked
    taken_unix_ns: int
    mode: str
    policy: str
    objective: str
    model: str
    gpu: str
    cycle_time_s: float
    power_w: float
    energy_j: float  # since the controller's store was created
    desired_generation: int
    observed_generation: int
    slo_window_s: float  # the SLO guard's window (cycle seconds) behind the attainment figures
    pools: tuple[PoolView, ...]
    nodes: tuple[NodeView, ...]
    classes: tuple[ClassView, ...]  # SS..LL; empty from a controller that does not report them
    decisions: tuple[DecisionView, ...]  # oldest first


def class_meaning(name: str) -> str:
    """ "LS" -> "long prompt, short answer" (CLASSES_NOTE); "" for a name of another form."""
    if len(name) != 2 or any(letter not in BIN_WORDS for letter in name):
        return ""
    return f"{BIN_WORDS[name[0]]} prompt, {BIN_WORDS[name[1]]} answer"


def _ratio(met: int, total: int) -> float | None:
    return met / total if total else None


def snapshot_of(
    controller: str,
    taken_unix_ns: int,
    status: admin_pb2.ClusterStatusResponse,
    nodes: admin_pb2.ListNodesResponse,
    pools: admin_pb2.ListPoolsResponse,
    decisions: Iterable[admin_pb2.DecisionRecord],
) -> TopSnapshot:
    """The replies of one refresh as a snapshot."""
    from controller.api.client import mode_name
    from controller.api.v1 import admin_pb2

    return TopSnapshot(
        controller=controller,
        taken_unix_ns=taken_unix_ns,
        mode=mode_name(status.mode),
        policy=status.policy,
        objective=status.objective,
        model=status.model,
        gpu=status.gpu,
        cycle_time_s=status.cycle_time_s,
        power_w=status.power_w,
        energy_j=status.energy_j,
        desired_generation=status.desired_generation,
        observed_generation=status.observed_generation,
        slo_window_s=status.slo_window_s,
        pools=tuple(
            PoolView(
                p.name,
                tuple(p.class_names),
                p.power_w,
                None if p.slo_attainment_ratio < 0 else p.slo_attainment_ratio,
                tuple(
                    InstanceView(i.instance_id, p.name, i.node, i.tp_degree, i.clock_mhz, i.phase)
                    for i in p.instances
                ),
            )
            for p in pools.pools
        ),
        nodes=tuple(
            NodeView(
                n.name,
                _enum_short(n.state, admin_pb2.NodeState, "NODE_STATE_"),
                n.draining,
                n.gpus_count,
                n.gpus_held_count,
                n.power_w,
                n.last_error + (" (permanent)" if n.last_error and n.last_error_permanent else ""),
            )
            for n in nodes.nodes
        ),
        classes=tuple(
            ClassView(
                c.class_name,
                class_meaning(c.class_name),
                c.slo_met_count,
                c.completions_count,
                _ratio(c.slo_met_count, c.completions_count),
            )
            for c in status.class_attainments
        ),
        decisions=tuple(DecisionView(d.id, d.ts_unix_ns, d.level, d.summary) for d in decisions),
    )


def frame_json(snap: TopSnapshot) -> dict[str, Any]:
    """The `dynamollm.top/v1` document of a snapshot: its fields as they are, numbers as numbers."""
    return {"schema": SCHEMA, **asdict(snap)}


# ---------------------------------------------------------------- rendering (pure)


def render(snap: TopSnapshot, width: int | None = None, height: int | None = None) -> list[str]:
    """The lines of one frame. `width`: every line cut to it; `height`: the frame too, its last line
    then saying how many lines did not fit (instances come last: the longest part, cut first)."""
    sections = (_header, _pools, _nodes, _classes, _decisions_part, _instances)
    lines: list[str] = []
    for section in sections:
        lines += [*([""] if lines else []), *section(snap)]
    if height is not None and len(lines) > height:
        hidden = len(lines) - height + 1
        lines = [*lines[: height - 1], f"{CUT_MARK} {hidden} more lines: a taller terminal shows them"]
    return lines if width is None else [cut(line, width) for line in lines]


def cut(line: str, width: int) -> str:
    """`line` in at most `width` characters, ending in CUT_MARK when shortened."""
    if len(line) <= width:
        return line
    if width <= len(CUT_MARK):
        return line[: max(width, 0)]
    return line[: width - len(CUT_MARK)] + CUT_MARK


def ansi_frame(lines: Sequence[str], *, first: bool) -> str:
    """A frame drawn over the previous one: cursor home, every line erased to its end, the screen below
    the last line cleared (the first frame clears the whole screen: the shell's lines go). Written with
    a newline after it, the cursor ends below the frame."""
    body = (CLEAR_LINE_END + "\n").join(lines) + CLEAR_BELOW
    return (CLEAR_SCREEN if first else "") + HOME + body


def _header(s: TopSnapshot) -> list[str]:
    behind = s.desired_generation - s.observed_generation
    applied = f"{behind} not yet confirmed" if behind > 0 else "all confirmed"
    return [
        f"dctl top  controller {s.controller}  {_utc(s.taken_unix_ns)}",
        f"mode {s.mode}  policy {s.policy} (objective {s.objective})  model {s.model} on {s.gpu}  "
        f"cycle time {s.cycle_time_s:.0f} s",
        f"power {s.power_w:.1f} W  energy {_kwh(s.energy_j)} since the store was created  "
        f"generation {s.desired_generation} ({applied})",
    ]


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.2f}"


def _instance_count(instances: Sequence[InstanceView]) -> str:
    """ "3" or "3 (1 starting)": phases other than ACTIVE named."""
    phases = Counter(i.phase for i in instances if i.phase != "ACTIVE")
    if not phases:
        return str(len(instances))
    return f"{len(instances)} ({', '.join(f'{n} {phase.lower()}' for phase, n in sorted(phases.items()))})"


def _pools(s: TopSnapshot) -> list[str]:
    if not s.pools:
        return ["POOLS: none"]
    rows = []
    for p in s.pools:
        configs = Counter((i.tp_degree, i.clock_mhz) for i in p.instances)
        mix = _mix((tp, mhz, n) for (tp, mhz), n in sorted(configs.items()))
        rows.append(
            [
                p.name,
                ",".join(p.class_names),
                _instance_count(p.instances),
                mix,
                f"{p.power_w:.1f}",
                _percent(p.slo_attainment_ratio),
            ]
        )
    header = ["POOL", "CLASSES", "INSTANCES", "TP x CLOCK", "POWER W", "SLO %"]
    return [f"POOLS ({len(s.pools)})", *_table(header, rows).splitlines()]


def _nodes(s: TopSnapshot) -> list[str]:
    if not s.nodes:
        return ["NODES: none configured"]
    ready = sum(n.state == "READY" for n in s.nodes)
    rows = [
        [
            n.name,
            n.state,
            "yes" if n.draining else "no",
            f"{n.gpus_held_count}/{n.gpus_count}",
            f"{n.power_w:.1f}",
            n.last_error or "-",
        ]
        for n in s.nodes
    ]
    header = ["NODE", "STATE", "DRAINING", "GPUS HELD/TOTAL", "POWER W", "LAST ERROR"]
    return [f"NODES ({ready} of {len(s.nodes)} ready)", *_table(header, rows).splitlines()]


def _classes(s: TopSnapshot) -> list[str]:
    """SLO attainment as a grid, prompt length down, answer length across: each class where its name
    says (SM: short prompt, medium answer), so that the grid explains the names (CLASSES_NOTE) that the
    pools' lines use too."""
    title = f"SLO ATTAINMENT per request class, last {s.slo_window_s:.0f} s of cycle time"
    if not s.classes:
        return [title, "not reported by this controller"]
    by_name = {c.class_name: c for c in s.classes}
    letters = tuple(BIN_WORDS)
    rows = []
    for row in letters:
        cells: list[object] = [f"{BIN_WORDS[row]} prompt"]
        for column in letters:
            c = by_name.get(row + column)
            cells.append(f"{row + column} " + ("-" if c is None else _attainment(c)))
        rows.append(cells)
    header = ["", *(f"{BIN_WORDS[column]} answer" for column in letters)]
    unknown = [c.class_name for c in s.classes if not c.meaning]
    extra = [f"other classes: {', '.join(unknown)}"] if unknown else []
    return [title, *_table(header, rows).splitlines(), *extra]


def _attainment(c: ClassView) -> str:
    if c.slo_attainment_ratio is None:
        return "no requests"
    return f"{c.slo_attainment_ratio * 100:.2f}% of {c.completions_count}"


def _decisions_part(s: TopSnapshot) -> list[str]:
    if not s.decisions:
        return ["DECISIONS: none yet"]
    rows = [[_ago(d.ts_unix_ns, s.taken_unix_ns), d.level, d.summary] for d in reversed(s.decisions)]
    title = f"LAST {len(s.decisions)} DECISIONS, newest first"
    return [title, *_table(["WHEN", "LEVEL", "DECISION AND REASON"], rows).splitlines()]


def _instances(s: TopSnapshot) -> list[str]:
    instances = [i for p in s.pools for i in p.instances]
    if not instances:
        return ["INSTANCES: none"]
    rows = [
        [i.instance_id, i.pool, i.node or "-", i.tp_degree, i.clock_mhz or "default", i.phase]
        for i in sorted(instances, key=lambda i: i.instance_id)
    ]
    header = ["ID", "POOL", "NODE", "TP", "CLOCK MHZ", "PHASE"]
    return [f"INSTANCES ({len(instances)})", *_table(header, rows).splitlines()]


# ---------------------------------------------------------------- the loop (I/O)


@dataclass(frozen=True, slots=True)
class _Options:
    interval_s: float
    decisions: int
    once: bool
    output: str  # table or json


def top_cmd(args: argparse.Namespace) -> int:
    options = _Options(
        interval_s=DEFAULT_INTERVAL_S if args.interval_s is None else _interval_s(args.interval_s),
        decisions=(
            DEFAULT_DECISIONS if args.decisions is None else _count("--decisions", args.decisions, minimum=1)
        ),
        once=args.once,
        output=args.output,
    )
    _run(_top(_conn(args), options))
    return 0


def _interval_s(text: str) -> float:
    allowed = f"a finite number of seconds >= {MIN_INTERVAL_S:g}"
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError("--interval-s", text, allowed) from None
    if not (math.isfinite(value) and value >= MIN_INTERVAL_S):
        raise InvalidArgumentError("--interval-s", text, allowed)
    return value


async def _top(conn: _Conn, options: _Options) -> None:
    """The views until they end (--once) or fail, or until Ctrl-C, which ends them quietly (exit 0)."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        views = asyncio.create_task(_views(conn, options))
        quit_ = asyncio.create_task(interrupted.wait())
        done, _ = await asyncio.wait({views, quit_}, return_when=asyncio.FIRST_COMPLETED)
        for task in (views, quit_):
            task.cancel()
        await asyncio.gather(views, quit_, return_exceptions=True)
        if views in done:
            views.result()  # the views' own end: an error (controller gone) is raised here
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _views(conn: _Conn, options: _Options) -> None:
    screen = _Screen(options)
    tail = _DecisionTail(conn, options.decisions)
    async with conn.client() as client:
        screen.show(await _snapshot(conn, client, tail))
        if options.once:
            return
        wake = asyncio.Event()
        watcher = asyncio.create_task(_watch(client, wake))
        try:
            while True:
                await _next_refresh(wake, watcher, options.interval_s)
                wake.clear()
                try:
                    snap = await _snapshot(conn, client, tail)
                except UnavailableError as err:
                    raise _gone(err) from None
                screen.show(snap)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def _gone(err: Exception) -> UnavailableError:
    return UnavailableError(f"the controller went away: {err}")


async def _watch(client: AdminClient, wake: asyncio.Event) -> None:
    """Every event of the controller wakes the loop; the stream ending means the controller went."""
    stream = client.watch_events()
    async with contextlib.aclosing(stream):
        async for _event in stream:
            wake.set()


async def _next_refresh(wake: asyncio.Event, watcher: asyncio.Task[None], interval_s: float) -> None:
    """Until the interval has passed or an event came (then at least MIN_FRAME_GAP_S after the last
    frame); the watcher's failure or end as an error."""
    loop = asyncio.get_running_loop()
    since = loop.time()
    woken = asyncio.create_task(wake.wait())
    try:
        await asyncio.wait({woken, watcher}, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
    if watcher.done():
        try:
            watcher.result()
        except UnavailableError as err:
            raise _gone(err) from None
        raise UnavailableError("the controller went away: it ended its WatchEvents stream")
    await asyncio.sleep(max(0.0, MIN_FRAME_GAP_S - (loop.time() - since)))


async def _snapshot(conn: _Conn, client: AdminClient, tail: _DecisionTail) -> TopSnapshot:
    status, nodes, pools = await asyncio.gather(
        client.cluster_status(), client.list_nodes(), client.list_pools()
    )
    decisions = await tail.refresh(status.last_decision_unix_ns or time.time_ns())
    return snapshot_of(conn.addr, time.time_ns(), status, nodes, pools, decisions)


def newest(
    have: Sequence[admin_pb2.DecisionRecord], new: Iterable[admin_pb2.DecisionRecord], keep: int
) -> tuple[admin_pb2.DecisionRecord, ...]:
    """The `keep` newest of both, oldest first, each once (ids are the store's, increasing)."""
    by_id = {r.id: r for r in (*have, *new)}
    return tuple(by_id[i] for i in sorted(by_id)[-keep:])


class _DecisionTail:
    """The last `keep` decisions: found once by looking back from the newest, then only what is new
    (ListDecisions pages oldest first, from a time)."""

    def __init__(self, conn: _Conn, keep: int) -> None:
        self._conn = conn
        self.keep = keep
        self.records: tuple[admin_pb2.DecisionRecord, ...] = ()

    async def refresh(self, newest_unix_ns: int) -> tuple[admin_pb2.DecisionRecord, ...]:
        """`newest_unix_ns`: when the newest decision was taken (or now), on the controller's clock."""
        if self.records:
            new = await _decisions(self._conn, self.records[-1].ts_unix_ns, "", None)
        else:
            new = await self._look_back(newest_unix_ns)
        self.records = newest(self.records, new, self.keep)
        return self.records

    async def _look_back(self, newest_unix_ns: int) -> list[admin_pb2.DecisionRecord]:
        back_s = FIRST_LOOK_BACK_S
        while True:
            since = max(0, newest_unix_ns - int(back_s * 1e9))
            records = await _decisions(self._conn, since, "", None)
            if len(records) >= self.keep or since == 0:
                return records
            back_s *= LOOK_BACK_GROWTH


class _Screen:
    """Writes frames as the module docstring says, by output and by what stdout is."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        self.terminal = options.output == "table" and stdout().isatty()
        self.frames = 0

    def show(self, snap: TopSnapshot) -> None:
        if self.options.output == "json":
            echo(json.dumps(frame_json(snap)), flush=True)
        elif not self.terminal:
            if self.frames:
                echo()
            echo("\n".join(render(snap)), flush=True)
        elif self.options.once:
            columns, _ = _terminal_size()
            echo("\n".join(render(snap, width=columns - 1)), flush=True)
        else:
            # one column and one line to spare: a full last column or line would wrap or scroll
            columns, lines = _terminal_size()
            frame = render(snap, width=columns - 1, height=lines - 1)
            echo(ansi_frame(frame, first=self.frames == 0), flush=True)
        self.frames += 1


def _terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal stdout writes to, read at every frame (it may be resized)."""
    try:
        size = os.get_terminal_size(stdout().fileno())
    except (OSError, ValueError):
        return 80, 24
    return max(size.columns, 20), max(size.lines, 5)
