"""`dctl cluster`: look at and steer the whole cluster through the controller's admin API
(proto/controller/api/v1/admin.proto; the decision records are documented in docs/controller.md).

Where it sits: the operator's shell over `controller.api.client.AdminClient`; like `dctl node` it knows
only the wire contract and its client, never the controller's own modules. Every flag is validated
before the first RPC; the controller validates values against its state (node names, levels, scopes)
and its INVALID_ARGUMENT message is printed as it came.

    dctl cluster status
    dctl cluster nodes
    dctl cluster pools
    dctl cluster plan [--explain]
    dctl cluster decisions [--since 10m|2h|1d|ISO-8601] [--level L] [--limit N]
    dctl cluster mode observe|apply|paused [--reason TEXT]
    dctl cluster drain NODE [--undrain] [--reason TEXT]
    dctl cluster watch [--kinds decision,command,routes,mode,node] [--count N]
  common: --controller HOST:PORT (or DYNAMOLLM_CONTROLLER; default 127.0.0.1:50061), --output table|json,
          --token T (or DYNAMOLLM_TOKEN) or --token-file F, --timeout-s S,
          --tls-ca F --tls-cert F --tls-key F --tls-server-name N (or DYNAMOLLM_TLS_CA/_CERT/_KEY)
Exit codes (controller/dctl/main.py): 2 bad flag or refused by the controller (invalid value, unknown
node, missing scope), 3 controller unreachable or temporarily unable (UNAVAILABLE, deadline), 4 internal
error. JSON output is the reply as `dctl node` prints replies (numbers stay numbers, enums by name), with
each `detail_json` also parsed into `detail`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from agent.api.errors import InvalidArgumentError

# dctl's shared flag parsing and rendering live in cmd_node (the first command group over gRPC); reused
# rather than copied so that both groups parse and print alike.
from controller.dctl.cmd_node import (
    _count,
    _enum_short,
    _print_json,
    _run,
    _seconds,
    _table,
    _tls,
    _utc,
    message_dict,
)
from controller.dctl.output import echo

if TYPE_CHECKING:
    from controller.api.client import AdminClient, ClientTls
    from controller.api.v1 import admin_pb2

_T = TypeVar("_T")

DEFAULT_CONTROLLER: Final = "127.0.0.1:50061"
DEFAULT_TIMEOUT_S: Final = 10.0
CONTROLLER_ENV: Final = "DYNAMOLLM_CONTROLLER"
TOKEN_ENV: Final = "DYNAMOLLM_TOKEN"
TLS_CA_ENV: Final = "DYNAMOLLM_TLS_CA"
TLS_CERT_ENV: Final = "DYNAMOLLM_TLS_CERT"
TLS_KEY_ENV: Final = "DYNAMOLLM_TLS_KEY"
ADDR_FORMS: Final = "HOST:PORT, [IPV6]:PORT or unix:/path"
# controller.api.client.MODE_BY_NAME's keys, spelled out so that `dctl --help` does not import gRPC.
MODES: Final = ("observe", "apply", "paused")
# The wire contract's values (admin.proto: DecisionRecord.level, WatchEventsRequest.kinds).
LEVELS: Final = ("initial", "cluster", "pool", "guard", "instance")
KINDS: Final = ("decision", "command", "routes", "mode", "node")
MAX_PAGE_SIZE: Final = 1000  # ListDecisions' largest page
MAX_REASON_CHARS: Final = 500  # SetMode / DrainNode reason, as the controller accepts it
SINCE_FORMS: Final = (
    "a duration back from now (a number then s, m, h or d: 30s, 10m, 2h, 1d) or an ISO-8601 time "
    "(2025-01-31T12:00:00Z; UTC unless it has an offset)"
)
CLASSES_NOTE: Final = (
    "classes: input-length bin then output-length bin, S/M/L = short/medium/long "
    "(e.g. LS: long prompt, short answer)"
)
_DURATION_RE: Final = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd])$")
_UNIT_S: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _common_parser()
    cluster = subparsers.add_parser(
        "cluster",
        help="inspect and steer the cluster through the controller (plan, decisions, mode, drain)",
        epilog=CLASSES_NOTE,
    )
    sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    _add(sub, common, "status", status_cmd, "the cluster at a glance: mode, nodes, GPUs, power, generations")
    _add(sub, common, "nodes", nodes_cmd, "every configured node: state, GPUs, power, lease, engines")
    _add(sub, common, "pools", pools_cmd, "the pools in force: instances, power, SLO guard, SLO attainment")
    plan = _add(
        sub, common, "plan", plan_cmd, "the plan in force; --explain: why each pool looks like it does"
    )
    plan.add_argument(
        "--explain",
        action="store_true",
        help="per pool: the forecast, GPU budget, solver, chosen and runner-up mixes with their power and "
        "energy, the SLO guard, and the capacity of each configuration",
    )
    decisions = _add(sub, common, "decisions", decisions_cmd, "decisions of the control cycle, oldest first")
    decisions.add_argument(
        "--since", default=None, metavar="WHEN", help=f"only decisions since: {SINCE_FORMS}"
    )
    decisions.add_argument("--level", default=None, metavar="L", help=f"only this level: {', '.join(LEVELS)}")
    decisions.add_argument("--limit", default=None, metavar="N", help="at most N decisions (default: all)")
    mode = _add(sub, common, "mode", mode_cmd, "switch between observe, apply and paused (scope admin)")
    mode.add_argument(
        "mode",
        choices=MODES,
        help="observe: decide and record, change nothing; apply: carry decisions out; paused: decide "
        "nothing new (leases are still renewed)",
    )
    mode.add_argument("--reason", default="", metavar="TEXT", help="why, for the controller's audit")
    drain = _add(
        sub, common, "drain", drain_cmd, "cordon a node: its instances move elsewhere (scope control)"
    )
    drain.add_argument("node", metavar="NODE", help="a node name from the controller's config")
    drain.add_argument("--undrain", action="store_true", help="put the node back into service")
    drain.add_argument("--reason", default="", metavar="TEXT", help="why, for the controller's audit")
    watch = _add(sub, common, "watch", watch_cmd, "print events as they happen until Ctrl-C or --count")
    watch.add_argument("--kinds", default=None, metavar="K,..", help=f"only these: {','.join(KINDS)}")
    watch.add_argument("--count", default=None, metavar="N", help="stop after N events (default: never)")


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    # the class names (SS..LL) appear in the pools' and the plan's output: explained in their help
    epilog = CLASSES_NOTE if name in ("pools", "plan") else None
    parser = sub.add_parser(name, parents=[common], help=help_text, description=help_text, epilog=epilog)
    parser.set_defaults(func=func)
    return parser


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--controller",
        default=os.environ.get(CONTROLLER_ENV) or DEFAULT_CONTROLLER,
        metavar="ADDR",
        help=f"the controller's gRPC address: {ADDR_FORMS} (default: ${CONTROLLER_ENV}, else "
        f"{DEFAULT_CONTROLLER})",
    )
    common.add_argument("--output", choices=["table", "json"], default="table")
    common.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token for the controller (default: ${TOKEN_ENV}; none when unset)",
    )
    common.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="read the bearer token from FILE (keeps it out of the process list); wins over --token",
    )
    common.add_argument(
        "--tls-ca",
        default=os.environ.get(TLS_CA_ENV),
        metavar="FILE",
        help=f"TLS: CA (PEM) that signed the controller's certificate (default: ${TLS_CA_ENV}; with only "
        "--tls-cert/--tls-key: the system's roots). Any --tls-* flag makes the channel TLS",
    )
    common.add_argument(
        "--tls-cert",
        default=os.environ.get(TLS_CERT_ENV),
        metavar="FILE",
        help=f"TLS: client certificate chain (PEM) for a controller requiring mTLS "
        f"(default: ${TLS_CERT_ENV})",
    )
    common.add_argument(
        "--tls-key",
        default=os.environ.get(TLS_KEY_ENV),
        metavar="FILE",
        help=f"TLS: the client certificate's private key (PEM) (default: ${TLS_KEY_ENV})",
    )
    common.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="TLS: host name to check the controller's certificate against "
        "(default: the one in --controller)",
    )
    common.add_argument(
        "--timeout-s",
        default=None,
        metavar="S",
        help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    return common


# ---------------------------------------------------------------- flag parsing (before any RPC)


def _controller_addr(text: str) -> str:
    if text.startswith("unix:") and len(text) > len("unix:"):
        return text
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and 1 <= int(port) <= 65535:
        return text
    raise InvalidArgumentError("--controller", text, ADDR_FORMS)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return args.token or None
    try:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidArgumentError(
            "--token-file", args.token_file, f"a readable token file ({reason})"
        ) from None
    if not token:
        raise InvalidArgumentError(
            "--token-file", args.token_file, "a file holding the token (this one is empty)"
        )
    return token


def _reason(text: str) -> str:
    if len(text) > MAX_REASON_CHARS:
        raise InvalidArgumentError("--reason", text, f"at most {MAX_REASON_CHARS} characters")
    return text


def since_unix_ns(text: str, now_unix_ns: int) -> int:
    """`--since`: a duration back from `now_unix_ns` ("10m") or an ISO-8601 time (naive: UTC)."""
    match = _DURATION_RE.match(text)
    if match is not None:
        back_s = float(match["n"]) * _UNIT_S[match["unit"]]
        if back_s <= 0:
            raise InvalidArgumentError("--since", text, SINCE_FORMS)
        return now_unix_ns - int(back_s * 1e9)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError("--since", text, SINCE_FORMS) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    since = int(when.timestamp() * 1e9)
    if not 0 <= since < 2**63:  # the wire's int64 nanoseconds since the epoch
        raise InvalidArgumentError("--since", text, "a time between 1970 and 2262")
    return since


def _level(text: str) -> str:
    if text not in LEVELS:
        raise InvalidArgumentError("--level", text, LEVELS)
    return text


def _choices(flag: str, text: str, allowed: Sequence[str]) -> list[str]:
    """A comma-separated subset of `allowed` (e.g. --kinds decision,mode)."""
    values = [v.strip() for v in text.split(",")]
    for value in values:
        if value not in allowed:
            raise InvalidArgumentError(flag, value, allowed)
    return values


@dataclass(frozen=True, slots=True)
class _Conn:
    """Where and how to call, validated before any RPC; the channel is opened inside the event loop
    that uses it (`client()` in a coroutine)."""

    addr: str
    token: str | None
    timeout_s: float
    tls: ClientTls | None = None

    def client(self) -> AdminClient:
        from controller.api.client import AdminClient

        return AdminClient(self.addr, token=self.token, timeout_s=self.timeout_s, tls=self.tls)


def _conn(args: argparse.Namespace) -> _Conn:
    timeout_s = (
        DEFAULT_TIMEOUT_S
        if args.timeout_s is None
        else _seconds("--timeout-s", args.timeout_s, zero_ok=False)
    )
    return _Conn(_controller_addr(args.controller), _token(args), timeout_s, _tls(args))


def _call(conn: _Conn, rpc: Callable[[AdminClient], Awaitable[_T]]) -> _T:
    """One RPC on a fresh channel (dctl runs one command per process)."""

    async def run() -> _T:
        async with conn.client() as client:
            return await rpc(client)

    return _run(run())


# ---------------------------------------------------------------- rendering helpers


def with_details(doc: Any) -> Any:
    """`doc` (message_dict output) with every non-empty `detail_json` string also parsed into `detail`
    (null when it is not JSON: a broken record is shown, not fatal)."""
    if isinstance(doc, list):
        return [with_details(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {k: with_details(v) for k, v in doc.items()}
    if isinstance(doc.get("detail_json"), str) and doc["detail_json"]:
        out["detail"] = _parse_json(doc["detail_json"])
    return out


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _key_values(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _ago(ts_unix_ns: int, now_unix_ns: int) -> str:
    age_s = max(0.0, (now_unix_ns - ts_unix_ns) / 1e9)
    if age_s < 120:
        return f"{age_s:.0f} s ago"
    if age_s < 7200:
        return f"{age_s / 60:.0f} min ago"
    if age_s < 2 * 86400:
        return f"{age_s / 3600:.1f} h ago"
    return f"{age_s / 86400:.1f} d ago"


def _config(tp: int, clock_mhz: int) -> str:
    return f"TP{tp}@{clock_mhz}MHz" if clock_mhz else f"TP{tp}@default"


def _mix(parts: Iterable[tuple[int, int, int]]) -> str:
    """ "2x TP4@1410MHz, 1x TP8@1980MHz" from (tp, clock MHz, count)."""
    return ", ".join(f"{n}x {_config(tp, mhz)}" for tp, mhz, n in parts if n) or "none"


def _json_mix(mix: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [(int(i["tp"]), int(i["clock_mhz"]), int(i["count"])) for i in mix.get("instances", [])]


def _kwh(energy_j: float) -> str:
    return f"{energy_j / 3.6e6:.4g} kWh"


# ---------------------------------------------------------------- status / nodes / pools


def status_cmd(args: argparse.Namespace) -> int:
    reply = _call(_conn(args), lambda c: c.cluster_status())
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    echo(_status_text(reply, time.time_ns()))
    return 0


def _status_text(s: admin_pb2.ClusterStatusResponse, now_unix_ns: int) -> str:
    from controller.api.client import mode_name

    behind = s.desired_generation - s.observed_generation
    applied = f"{behind} not yet applied on every ready node" if behind > 0 else "every ready node current"
    last = (
        "none yet"
        if s.last_decision_unix_ns == 0
        else f"{_ago(s.last_decision_unix_ns, now_unix_ns)} ({_utc(s.last_decision_unix_ns)})"
    )
    pairs = [
        ("mode", mode_name(s.mode)),
        ("policy", s.policy),
        ("objective", s.objective),
        ("model / GPU", f"{s.model} / {s.gpu}"),
        ("nodes ready/total", f"{s.nodes_ready_count}/{s.nodes_count}"),
        ("GPUs held/total", f"{s.gpus_held_count}/{s.gpus_count} (ready nodes)"),
        ("instances", str(s.instances_count)),
        ("pools", str(s.pools_count)),
        ("power W", f"{s.power_w:.1f}"),
        ("energy kWh", f"{s.energy_j / 3.6e6:.3f} (since the store was created)"),
        ("generation desired/observed", f"{s.desired_generation}/{s.observed_generation} ({applied})"),
        ("routes version", str(s.routes_version)),
        ("last decision", last),
        ("cycle time s", f"{s.cycle_time_s:.1f}"),
        ("controller", f"{s.controller_version or '?'}, started {_utc(s.started_unix_ns)}"),
    ]
    return _key_values(pairs)


def nodes_cmd(args: argparse.Namespace) -> int:
    reply = _call(_conn(args), lambda c: c.list_nodes())
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    echo(_nodes_table(reply) if reply.nodes else "no nodes configured")
    return 0


def _nodes_table(reply: admin_pb2.ListNodesResponse) -> str:
    from controller.api.v1 import admin_pb2

    rows = []
    for n in reply.nodes:
        error = n.last_error + (" (permanent)" if n.last_error_permanent else "") if n.last_error else "-"
        rows.append(
            [
                n.name,
                n.address,
                _enum_short(n.state, admin_pb2.NodeState, "NODE_STATE_"),
                "yes" if n.draining else "no",
                f"{n.gpus_held_count}/{n.gpus_count}",
                f"{n.power_w:.1f}",
                f"{n.lease_remaining_s:.0f}",
                len(n.engines),
                error,
            ]
        )
    header = ["NAME", "ADDRESS", "STATE", "DRAINING", "GPUS HELD/TOTAL", "POWER W", "LEASE S", "ENGINES"]
    return _table([*header, "LAST ERROR"], rows)


def pools_cmd(args: argparse.Namespace) -> int:
    reply = _call(_conn(args), lambda c: c.list_pools())
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    echo((_pools_table(reply) + f"\n\n{CLASSES_NOTE}") if reply.pools else "no pools")
    return 0


def _pool_instances(instances: Iterable[admin_pb2.PoolInstance]) -> str:
    """Instances grouped by configuration; phases other than ACTIVE are named (e.g. "1x TP8@1980MHz
    starting")."""
    counts = Counter((i.tp_degree, i.clock_mhz, i.phase) for i in instances)
    parts = []
    for (tp, mhz, phase), n in sorted(counts.items()):
        suffix = "" if phase in ("", "ACTIVE") else f" {phase.lower()}"
        parts.append(f"{n}x {_config(tp, mhz)}{suffix}")
    return ", ".join(parts) or "none"


def _pools_table(reply: admin_pb2.ListPoolsResponse) -> str:
    rows = [
        [
            p.name,
            ",".join(p.class_names),
            _pool_instances(p.instances),
            f"{p.power_w:.1f}",
            f"{p.guard_factor:.2f}",
            p.clock_floor_mhz or "-",
            "-" if p.slo_attainment_ratio < 0 else f"{p.slo_attainment_ratio * 100:.2f}",
            f"{p.energy_per_output_token_j:.3f}" if p.energy_per_output_token_j else "-",
        ]
        for p in reply.pools
    ]
    header = [
        "POOL",
        "CLASSES",
        "INSTANCES",
        "POWER W",
        "GUARD FACTOR",
        "CLOCK FLOOR MHZ",
        "SLO %",
        "J/TOKEN",
    ]
    return _table(header, rows)


# ---------------------------------------------------------------- plan


def plan_cmd(args: argparse.Namespace) -> int:
    explain: bool = args.explain
    reply = _call(_conn(args), lambda c: c.get_plan(explain))
    if args.output == "json":
        _print_json(with_details(message_dict(reply)))
        return 0
    echo(_plan_text(reply))
    if explain:
        for pool in reply.pools:
            echo("\n" + "\n".join(_explain_pool(reply, pool)))
    echo(f"\n{CLASSES_NOTE}")
    return 0


def _plan_text(reply: admin_pb2.GetPlanResponse) -> str:
    decided = (
        "the initial plan from the config"
        if reply.decided_unix_ns == 0
        else f"decided {_utc(reply.decided_unix_ns)}"
    )
    rows = [
        [
            p.name,
            ",".join(p.class_names),
            _mix((i.tp_degree, i.clock_mhz, i.instances_count) for i in p.instances),
            sum(i.tp_degree * i.instances_count for i in p.instances),
        ]
        for p in reply.pools
    ]
    table = _table(["POOL", "CLASSES", "INSTANCES", "GPUS"], rows) if rows else "no pools"
    return f"plan generation {reply.generation}, {decided}\n\n{table}"


@dataclass(frozen=True, slots=True)
class _PoolRecord:
    """The newest plan-step record deciding one pool: the record, its parsed step and the pool's entry."""

    record: admin_pb2.DecisionRecord
    step: dict[str, Any]
    pool: dict[str, Any]


def _newest_pool_record(records: Sequence[admin_pb2.DecisionRecord], pool: str) -> _PoolRecord | None:
    """Records come oldest first; instance-level (clock) records and unparseable ones carry no pools."""
    for record in reversed(records):
        step = _parse_json(record.detail_json)
        if not isinstance(step, dict) or not isinstance(step.get("pools"), list):
            continue
        for entry in step["pools"]:
            if isinstance(entry, dict) and entry.get("pool") == pool:
                return _PoolRecord(record, step, entry)
    return None


def _explain_pool(reply: admin_pb2.GetPlanResponse, pool: admin_pb2.PlannedPool) -> list[str]:
    in_force = [(i.tp_degree, i.clock_mhz, i.instances_count) for i in pool.instances]
    lines = [f"pool {pool.name} ({','.join(pool.class_names)}): {_mix(in_force)}, because"]
    found = _newest_pool_record(reply.records, pool.name)
    if found is None:
        return [*lines, "  no decision record for this pool was sent (the initial plan from the config?)"]
    capacity = next((c for c in reply.capacities if c.pool == pool.name), None)
    try:
        lines += _decision_lines(found, capacity)
    except (KeyError, TypeError, ValueError) as exc:  # a record of another shape: say so, show the rest
        lines.append(f"  record {found.record.id} is not in the expected form ({type(exc).__name__}: {exc})")
        return lines
    if sorted(_json_mix(found.pool["chosen"])) != sorted(in_force):
        lines.append("  (the plan in force has changed since this choice, e.g. instance-level clock changes)")
    return lines


def _decision_lines(found: _PoolRecord, capacity: admin_pb2.PoolCapacity | None) -> list[str]:
    rec, step, p = found.record, found.step, found.pool
    horizon_s = float(step["horizon_s"])
    lines = [
        f"  decided by the {rec.level} step at {_utc(rec.ts_unix_ns)} (record {rec.id}, cycle time "
        f"{float(step['t_s']):.0f} s, generation {step.get('generation', '?')}, horizon {horizon_s:.0f} s)",
        "  " + _forecast_line(step, p),
        f"  GPU budget {p['gpu_budget']}, solver {p['solver_status']}, "
        f"shortfall {float(p['shortfall_rps']):.2f} rps",
        "  " + _mix_line("chosen", p["chosen"], horizon_s, capacity),
    ]
    runner_up = p.get("runner_up")
    if runner_up is None:
        lines.append("  runner-up: none (no alternative mix was considered)")
    else:
        lines.append("  " + _mix_line("runner-up", runner_up, horizon_s, capacity, baseline=p["chosen"]))
    factor, floor = float(p.get("guard_factor", 1.0)), int(p.get("clock_floor_mhz", 0))
    guard = (
        "none"
        if factor == 1.0 and floor == 0
        else f"load factor {factor:.2f}, clock floor {floor or '-'} MHz"
    )
    lines.append(f"  SLO guard: {guard}")
    return lines + _capacity_lines(capacity, p["chosen"], runner_up)


def _forecast_line(step: dict[str, Any], p: dict[str, Any]) -> str:
    from controller.model.classes import CLASS_NAMES

    text = (
        f"forecast {float(p['forecast_rps']):.2f} rps planned (SLO guard factor and burst allowance included"
    )
    per_class = step.get("class_forecast_rps") or []
    if len(per_class) == len(CLASS_NAMES):
        by_class = dict(zip(CLASS_NAMES, per_class, strict=True))
        parts = [f"{c} {float(by_class[c]):.2f}" for c in p["classes"] if c in by_class]
        text += f"; {step.get('forecast_kind', '?')} forecast per class: {', '.join(parts)} rps"
    return text + ")"


def _mix_line(
    name: str,
    mix: dict[str, Any],
    horizon_s: float,
    capacity: admin_pb2.PoolCapacity | None,
    *,
    baseline: dict[str, Any] | None = None,
) -> str:
    """A mix, its power and its energy over the horizon (energy = power x horizon); against `baseline`
    (the chosen mix) the extra power it would have cost."""
    power_w = float(mix["power_w"])
    text = (
        f"{name}: {_mix(_json_mix(mix))}: {power_w:.1f} W, {_kwh(power_w * horizon_s)} over {horizon_s:.0f} s"
    )
    serves = _mix_capacity_rps(mix, capacity)
    if serves is not None:
        text += f", serves up to {serves:.2f} rps"
    if baseline is not None:
        extra_w = power_w - float(baseline["power_w"])
        share = f" ({extra_w / float(baseline['power_w']) * 100:+.1f}%)" if float(baseline["power_w"]) else ""
        text += f"; {extra_w:+.1f} W{share} against the chosen mix"
    return text


def _mix_capacity_rps(mix: dict[str, Any], capacity: admin_pb2.PoolCapacity | None) -> float | None:
    if capacity is None:
        return None
    per_config = {(c.tp_degree, c.clock_mhz): c.max_load_rps for c in capacity.configs}
    parts = _json_mix(mix)
    if not all((tp, mhz) in per_config for tp, mhz, _ in parts):
        return None
    return sum(per_config[(tp, mhz)] * n for tp, mhz, n in parts)


def _capacity_lines(
    capacity: admin_pb2.PoolCapacity | None, chosen: dict[str, Any], runner_up: dict[str, Any] | None
) -> list[str]:
    if capacity is None or not capacity.configs:
        return ["  capacity per configuration: not sent"]
    used = {(tp, mhz): n for tp, mhz, n in _json_mix(chosen)}
    alternative = {} if runner_up is None else {(tp, mhz): n for tp, mhz, n in _json_mix(runner_up)}
    rows = []
    for c in capacity.configs:
        key = (c.tp_degree, c.clock_mhz)
        marks = ([f"chosen {used[key]}x"] if key in used else []) + (
            [f"runner-up {alternative[key]}x"] if key in alternative else []
        )
        rows.append([c.tp_degree, c.clock_mhz, f"{c.max_load_rps:.2f}", f"{c.power_w:.1f}", ", ".join(marks)])
    table = _table(["TP", "CLOCK MHZ", "MAX LOAD RPS", "POWER W", "USED BY"], rows)
    title = "  capacity per configuration (one instance, SLO-meeting load for the pool's classes):"
    return [title, *("    " + line for line in table.splitlines())]


# ---------------------------------------------------------------- decisions


def decisions_cmd(args: argparse.Namespace) -> int:
    since = 0 if args.since is None else since_unix_ns(args.since, time.time_ns())
    level = "" if args.level is None else _level(args.level)
    limit = None if args.limit is None else _count("--limit", args.limit, minimum=1)
    conn = _conn(args)
    records = _run(_decisions(conn, since, level, limit))
    if args.output == "json":
        _print_json({"decisions": with_details([message_dict(r) for r in records])})
        return 0
    rows = [[_utc(r.ts_unix_ns), r.level, r.summary] for r in records]
    echo(_table(["TIME UTC", "LEVEL", "SUMMARY"], rows) if rows else "no decisions")
    return 0


async def _decisions(
    conn: _Conn, since_unix_ns: int, level: str, limit: int | None
) -> list[admin_pb2.DecisionRecord]:
    records: list[admin_pb2.DecisionRecord] = []
    token = ""
    async with conn.client() as client:
        while limit is None or len(records) < limit:
            size = MAX_PAGE_SIZE if limit is None else min(MAX_PAGE_SIZE, limit - len(records))
            page = await client.list_decisions(since_unix_ns, size, token, level)
            records.extend(page.decisions)
            token = page.next_page_token
            # an empty page with a token would never end: stop rather than loop on a broken server
            if not token or not page.decisions:
                break
    return records if limit is None else records[:limit]


# ---------------------------------------------------------------- mode / drain


def mode_cmd(args: argparse.Namespace) -> int:
    from controller.api.client import mode_name

    mode: str = args.mode
    reason = _reason(args.reason)
    reply = _call(_conn(args), lambda c: c.set_mode(mode, reason))
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    previous, now = mode_name(reply.previous_mode), mode_name(reply.mode)
    echo(f"mode {previous} -> {now}" + (" (unchanged)" if previous == now else ""))
    return 0


def drain_cmd(args: argparse.Namespace) -> int:
    node: str = args.node
    undrain: bool = args.undrain
    reason = _reason(args.reason)
    reply = _call(_conn(args), lambda c: c.drain_node(node, undrain, reason))
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    if reply.draining:
        echo(f"node {reply.node}: draining (no new instances; its instances move to other nodes)")
    else:
        echo(f"node {reply.node}: in service (not draining)")
    return 0


# ---------------------------------------------------------------- watch

_WATCH_WIDTHS: Final = (24, 8)


def watch_cmd(args: argparse.Namespace) -> int:
    kinds = [] if args.kinds is None else _choices("--kinds", args.kinds, KINDS)
    count = None if args.count is None else _count("--count", args.count, minimum=1)
    _run(_watch(_conn(args), kinds, count, args.output))
    return 0


def _event_line(event: admin_pb2.Event) -> str:
    time_w, kind_w = _WATCH_WIDTHS
    return f"{_utc(event.ts_unix_ns).ljust(time_w)}  {event.kind.ljust(kind_w)}  {event.summary}"


async def _watch(conn: _Conn, kinds: list[str], count: int | None, output: str) -> None:
    time_w, kind_w = _WATCH_WIDTHS
    if output == "table":
        echo(f"{'TIME UTC'.ljust(time_w)}  {'KIND'.ljust(kind_w)}  SUMMARY", flush=True)
    seen = 0
    async with conn.client() as client:
        stream = client.watch_events(kinds)
        async with contextlib.aclosing(stream):
            async for event in stream:
                if output == "json":
                    echo(json.dumps(with_details(message_dict(event))), flush=True)
                else:
                    echo(_event_line(event), flush=True)
                seen += 1
                if count is not None and seen >= count:
                    break
