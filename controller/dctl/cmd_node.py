"""`dctl node`: look at and operate one node agent over gRPC (docs/agent.md, wire contract docs/wire.md).

Where it sits: the operator's shell over `agent.api.client.AgentClient`; it never imports the agent's
own modules, only the wire contract and its client. Every flag is validated before the first RPC;
the agent validates values against the node (supported clocks, power range, GPU set, models) and its
INVALID_ARGUMENT message is printed as it came. Control commands draw their generation from the wall
clock (`GenerationSource`), so two runs never reuse one; a controller managing the same node sees
ABORTED on its next call and re-reads the inventory (docs/agent.md, "dctl next to the controller").

    dctl node status ADDR
    dctl node watch ADDR [--period-s S] [--count N] [--gpu I,..] [--engines]
    dctl node set-clocks ADDR --gpu I,..|all --min-mhz A --max-mhz B [--lease-s S] [--power-limit-w W]
                         [--dry-run]
    dctl node reset-clocks ADDR [--gpu I,..]
    dctl node engine start ADDR --engine ID --model M --gpus 0,1,.. [--tp N] [--option K=V ..]
    dctl node engine reconfigure ADDR --engine ID [--gpus 0,1,..] [--tp N] [--model M] [--option K=V ..]
    dctl node engine stop ADDR --engine ID
  common: --output table|json, --token T (or DYNAMOLLM_TOKEN), --timeout-s S,
          --tls-ca F --tls-cert F --tls-key F --tls-server-name N (or DYNAMOLLM_TLS_CA/_CERT/_KEY)
Exit codes (controller/dctl/main.py): 2 bad flag or refused by the agent, 3 node unreachable or the
agent temporarily unable (UNAVAILABLE, deadline), 4 internal error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from agent.api.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from controller.dctl.output import echo, stdout

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from agent.api.client import AgentClient, ClientTls
    from agent.api.v1 import common_pb2, control_pb2, telemetry_pb2

_T = TypeVar("_T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_LEASE_S = 300.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
# Deadline of ReconfigureEngine when --timeout-s is not given: the drain, then the start (the agent's
# default ready timeout, 600 s, when --ready-timeout-s is 0), plus slack for the stop.
AGENT_DEFAULT_READY_TIMEOUT_S = 600.0
ENGINE_DEADLINE_SLACK_S = 60.0
TOKEN_ENV = "DYNAMOLLM_TOKEN"
TLS_CA_ENV = "DYNAMOLLM_TLS_CA"
TLS_CERT_ENV = "DYNAMOLLM_TLS_CERT"
TLS_KEY_ENV = "DYNAMOLLM_TLS_KEY"
ADDR_FORMS = "HOST:PORT, [IPV6]:PORT or unix:/path"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("addr", metavar="ADDR", help=f"the agent's gRPC address: {ADDR_FORMS}")
    common.add_argument("--output", choices=["table", "json"], default="table")
    common.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token for the agent (default: ${TOKEN_ENV}; none when unset)",
    )
    common.add_argument(
        "--tls-ca",
        default=os.environ.get(TLS_CA_ENV),
        metavar="FILE",
        help=f"TLS: CA (PEM) that signed the agent's certificate (default: ${TLS_CA_ENV}; with only "
        "--tls-cert/--tls-key: the system's roots). Any --tls-* flag makes the channel TLS",
    )
    common.add_argument(
        "--tls-cert",
        default=os.environ.get(TLS_CERT_ENV),
        metavar="FILE",
        help=f"TLS: client certificate chain (PEM) for an agent requiring mTLS (default: ${TLS_CERT_ENV})",
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
        help="TLS: host name to check the agent's certificate against (default: the one in ADDR)",
    )
    common.add_argument(
        "--timeout-s",
        default=None,
        metavar="S",
        help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT_S:g}; engine commands: drain + "
        "ready timeouts + 60)",
    )

    node = subparsers.add_parser("node", help="inspect and operate one node agent (GPU clocks, engines)")
    sub = node.add_subparsers(dest="node_command", required=True, metavar="SUBCOMMAND")

    status = sub.add_parser("status", parents=[common], help="inventory: GPUs, clocks, power, engines, lease")
    status.set_defaults(func=status_cmd)

    watch = sub.add_parser("watch", parents=[common], help="stream live telemetry until Ctrl-C or --count")
    watch.add_argument("--period-s", default="0", metavar="S", help="sample period (default: the agent's)")
    watch.add_argument("--count", default=None, metavar="N", help="stop after N samples (default: never)")
    watch.add_argument("--gpu", default=None, metavar="I,..", help="only these GPUs (default: all)")
    watch.add_argument("--engines", action="store_true", help="also show each engine's serving metrics")
    watch.set_defaults(func=watch_cmd)

    set_clocks = sub.add_parser(
        "set-clocks",
        parents=[common],
        help="lock SM clocks (and optionally the power limit) of GPUs under a lease",
        description="Lock the SM clock of the given GPUs into [--min-mhz, --max-mhz] (equal values pin "
        "it) under a lease: unless renewed or set again within --lease-s, the agent restores defaults.",
    )
    set_clocks.add_argument("--gpu", required=True, metavar="I,..|all", help="GPU indices or 'all'")
    set_clocks.add_argument("--min-mhz", required=True, metavar="MHZ", help="lower bound of the lock")
    set_clocks.add_argument("--max-mhz", required=True, metavar="MHZ", help="upper bound of the lock")
    set_clocks.add_argument(
        "--lease-s", default=str(DEFAULT_LEASE_S), metavar="S", help=f"lease (default {DEFAULT_LEASE_S:g})"
    )
    set_clocks.add_argument(
        "--power-limit-w", default=None, metavar="W", help="power limit (default: the GPU's default)"
    )
    set_clocks.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
    set_clocks.set_defaults(func=set_clocks_cmd)

    reset = sub.add_parser(
        "reset-clocks", parents=[common], help="restore default clocks and power limits (all GPUs by default)"
    )
    reset.add_argument("--gpu", default=None, metavar="I,..", help="only these GPUs (default: all)")
    reset.set_defaults(func=reset_clocks_cmd)

    engine = sub.add_parser("engine", help="start, stop or reconfigure an engine instance")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    engine_common = argparse.ArgumentParser(add_help=False, parents=[common])
    engine_common.add_argument("--engine", required=True, metavar="ID", help="engine id ([a-z][a-z0-9-]*)")
    engine_common.add_argument(
        "--drain-timeout-s",
        default=str(DEFAULT_DRAIN_TIMEOUT_S),
        metavar="S",
        help=f"time in-flight requests get before the old engine stops (default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--tp", default=None, metavar="N", help="tensor-parallel degree")
    shape.add_argument(
        "--option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="engine flag without dashes, e.g. max-num-seqs=256 (repeatable; the agent's allow-list)",
    )
    shape.add_argument(
        "--ready-timeout-s", default="0", metavar="S", help="time to READY (default 0: the agent's default)"
    )

    start = engine_sub.add_parser(
        "start", parents=[engine_common, shape], help="create (or start a stopped) engine; returns at READY"
    )
    start.add_argument("--model", required=True, metavar="M", help="model, one the agent serves")
    start.add_argument("--gpus", required=True, metavar="I,..", help="GPU indices, e.g. 0,1,2,3")
    start.set_defaults(func=engine_start_cmd)

    reconf = engine_sub.add_parser(
        "reconfigure",
        parents=[engine_common, shape],
        help="change an engine's GPUs/TP/model: drain -> stop -> start; returns at READY",
        description="Unset flags keep the engine's current value (options too, unless --option is given).",
    )
    reconf.add_argument("--model", default=None, metavar="M", help="model (default: unchanged)")
    reconf.add_argument("--gpus", default=None, metavar="I,..", help="GPU indices (default: unchanged)")
    reconf.set_defaults(func=engine_reconfigure_cmd)

    stop = engine_sub.add_parser("stop", parents=[engine_common], help="drain and stop an engine")
    stop.set_defaults(func=engine_stop_cmd)


# ---------------------------------------------------------------- flag parsing (before any RPC)


def _addr(text: str) -> str:
    if text.startswith("unix:") and len(text) > len("unix:"):
        return text
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and 1 <= int(port) <= 65535:
        return text
    raise InvalidArgumentError("ADDR", text, ADDR_FORMS)


def _seconds(flag: str, text: str, *, zero_ok: bool) -> float:
    allowed = "a finite number of seconds >= 0" if zero_ok else "a finite number of seconds > 0"
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(flag, text, allowed) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise InvalidArgumentError(flag, text, allowed)
    return value


def _count(flag: str, text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgumentError(flag, text, f"an integer >= {minimum}") from None
    if value < minimum:
        raise InvalidArgumentError(flag, text, f"an integer >= {minimum}")
    return value


def _indices(flag: str, text: str) -> list[int]:
    allowed = "comma-separated GPU indices, e.g. 0,1,2,3"
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(flag, text, allowed) from None
    if any(v < 0 for v in values):
        raise InvalidArgumentError(flag, text, allowed)
    return values


def _options(texts: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key or key.startswith("-"):
            raise InvalidArgumentError("--option", text, "KEY=VALUE with KEY an engine flag without dashes")
        options[key] = value
    return options


def _timeout_s(args: argparse.Namespace) -> float:
    return (
        DEFAULT_TIMEOUT_S
        if args.timeout_s is None
        else _seconds("--timeout-s", args.timeout_s, zero_ok=False)
    )


def _engine_timeout_s(args: argparse.Namespace, drain_timeout_s: float, ready_timeout_s: float) -> float:
    if args.timeout_s is not None:
        return _seconds("--timeout-s", args.timeout_s, zero_ok=False)
    ready_s = ready_timeout_s or AGENT_DEFAULT_READY_TIMEOUT_S
    return drain_timeout_s + ready_s + ENGINE_DEADLINE_SLACK_S


@dataclass(frozen=True, slots=True)
class _Conn:
    """Where and how to call, validated before any RPC; the channel itself is opened inside the event
    loop that uses it (`client()` in a coroutine)."""

    addr: str
    token: str | None
    timeout_s: float
    tls: ClientTls | None = None

    def client(self) -> AgentClient:
        from agent.api.client import AgentClient

        return AgentClient(self.addr, token=self.token, timeout_s=self.timeout_s, tls=self.tls)


def _tls(args: argparse.Namespace) -> ClientTls | None:
    """TLS when any --tls-* flag (or its environment variable) is given; files are read now, so that a
    missing one is a flag error (exit 2) before any RPC."""
    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    from agent.api.client import ClientTls

    return ClientTls.from_files(
        ca_file=args.tls_ca or None,
        cert_file=args.tls_cert or None,
        key_file=args.tls_key or None,
        server_name=args.tls_server_name or None,
        names=("--tls-ca", "--tls-cert", "--tls-key"),
    )


def _conn(args: argparse.Namespace, timeout_s: float) -> _Conn:
    return _Conn(_addr(args.addr), args.token or None, timeout_s, _tls(args))


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


# ---------------------------------------------------------------- rendering


def message_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as plain JSON values: numbers stay numbers (proto3 JSON would quote 64-bit
    integers), enums by name, absent optional fields and sub-messages as null."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.is_repeated:
            if field.message_type is not None:
                out[field.name] = [message_dict(v) for v in value]
            elif field.enum_type is not None:
                out[field.name] = [field.enum_type.values_by_number[v].name for v in value]
            else:
                out[field.name] = list(value)
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        elif field.message_type is not None:
            out[field.name] = message_dict(value)
        elif field.enum_type is not None:
            out[field.name] = field.enum_type.values_by_number[value].name
        else:
            out[field.name] = value
    return out


def _print_json(doc: object) -> None:
    echo(json.dumps(doc, indent=2))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _utc(ts_unix_ns: int) -> str:
    return (
        datetime.fromtimestamp(ts_unix_ns / 1e9, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _enum_short(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _lock(lock: common_pb2.SmClockRange | None) -> str:
    if lock is None:
        return "default"
    if lock.min_clock_mhz == lock.max_clock_mhz:
        return f"{lock.min_clock_mhz}"
    return f"{lock.min_clock_mhz}-{lock.max_clock_mhz}"


def _lease_line(lease: common_pb2.LeaseState) -> str:
    if not lease.active:
        return f"lease: none (GPU generation {lease.generation})"
    holder = f", holder {lease.holder}" if lease.holder else ""
    return (
        f"lease: active, generation {lease.generation}{holder}, {lease.remaining_s:.1f} s left "
        f"(expires {_utc(lease.expires_unix_ns)})"
    )


def _engine_line(engine: common_pb2.EngineInfo) -> str:
    from agent.api.v1 import common_pb2

    state = _enum_short(engine.state, common_pb2.EngineState, "ENGINE_STATE_")
    gpus = ",".join(map(str, engine.gpu_indices))
    line = (
        f"engine {engine.engine_id} {state}: model {engine.model}, GPUs {gpus}, TP {engine.tp_degree}, "
        f"port {engine.http_port}, generation {engine.generation}"
    )
    return line + (f"; failure: {engine.failure_reason}" if engine.failure_reason else "")


# ---------------------------------------------------------------- status / watch


def status_cmd(args: argparse.Namespace) -> int:
    timeout_s = _timeout_s(args)
    conn = _conn(args, timeout_s)
    inventory, sample = _run(_status(conn, timeout_s))
    if args.output == "json":
        _print_json({"inventory": message_dict(inventory), "sample": message_dict(sample)})
        return 0
    echo(_status_table(inventory, sample))
    return 0


async def _status(
    conn: _Conn, timeout_s: float
) -> tuple[telemetry_pb2.GetInventoryResponse, telemetry_pb2.TelemetrySample]:
    from agent.api.errors import UnavailableError

    async with conn.client() as client:
        inventory = await client.inventory()
        stream = client.stream_telemetry(include_engines=True)
        try:
            sample = await asyncio.wait_for(anext(stream), timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"agent {client.target}: no telemetry sample within {timeout_s:g} s"
            ) from None
        finally:
            await stream.aclose()
    return inventory, sample


def _status_table(
    inventory: telemetry_pb2.GetInventoryResponse, sample: telemetry_pb2.TelemetrySample
) -> str:
    from agent.api.v1 import common_pb2

    backend = _enum_short(inventory.gpu_backend, common_pb2.GpuBackendKind, "GPU_BACKEND_KIND_")
    lines = [
        f"node {inventory.node_id} (host {inventory.hostname}), agent {inventory.agent_version}, "
        f"backend {backend}, at {_utc(inventory.ts_unix_ns)}",
        _lease_line(inventory.lease),
        "",
    ]
    readings = {g.gpu_index: g for g in sample.gpus}
    rows = []
    for gpu in inventory.gpus:
        r = readings.get(gpu.gpu_index)
        lock = gpu.sm_clock_lock if gpu.HasField("sm_clock_lock") else None
        live: list[object] = (
            ["-"] * 5
            if r is None
            else [
                f"{r.power_w:.1f}",
                f"{r.energy_j:.0f}",
                r.sm_clock_mhz,
                f"{r.util_gpu_ratio * 100:.0f}",
                f"{r.temperature_c:.0f}",
            ]
        )
        clocks = gpu.supported_sm_clocks_mhz
        supported = f"{clocks[0]}-{clocks[-1]}" if clocks else "-"
        limits = f"{gpu.min_power_limit_w:.0f}-{gpu.max_power_limit_w:.0f}"
        modified = "yes" if gpu.modified else "no"
        rows.append(
            [
                gpu.gpu_index,
                gpu.name,
                _lock(lock),
                supported,
                f"{gpu.power_limit_w:.0f}",
                limits,
                *live,
                modified,
            ]
        )
    header = ["GPU", "NAME", "LOCK MHZ", "SUPPORTED MHZ", "LIMIT W", "LIMIT RANGE W", "POWER W", "ENERGY J"]
    header += ["SM MHZ", "UTIL %", "TEMP C", "MODIFIED"]
    lines.append(_table(header, rows))
    if inventory.engines:
        metrics = {m.engine_id: m for m in sample.engines}
        engine_rows = []
        for e in inventory.engines:
            m = metrics.get(e.engine_id)
            serving: list[object] = (
                ["-"] * 4
                if m is None
                else [
                    m.running_requests_count,
                    m.waiting_requests_count,
                    f"{m.kv_cache_usage_ratio * 100:.0f}",
                    f"{m.generation_tokens_per_s:.0f}",
                ]
            )
            state = _enum_short(e.state, common_pb2.EngineState, "ENGINE_STATE_")
            gpus = ",".join(map(str, e.gpu_indices))
            engine_rows.append(
                [e.engine_id, e.model, state, gpus, e.tp_degree, e.http_port, e.generation, *serving]
            )
        header = ["ENGINE", "MODEL", "STATE", "GPUS", "TP", "PORT", "GENERATION", "RUNNING", "WAITING"]
        header += ["KV %", "GEN TOK/S"]
        lines += ["", _table(header, engine_rows)]
        lines += [
            f"engine {e.engine_id} failed: {e.failure_reason}" for e in inventory.engines if e.failure_reason
        ]
    else:
        lines += ["", "no engines"]
    return "\n".join(lines)


def watch_cmd(args: argparse.Namespace) -> int:
    period_s = _seconds("--period-s", args.period_s, zero_ok=True)
    count = None if args.count is None else _count("--count", args.count, minimum=1)
    gpus = [] if args.gpu is None else _indices("--gpu", args.gpu)
    conn = _conn(args, _timeout_s(args))
    _run(_watch(conn, period_s, count, gpus, args.engines, args.output))
    return 0


_WATCH_HEADER = ["TIME UTC", "GPU", "POWER W", "ENERGY J", "SM MHZ", "MEM MHZ", "UTIL %", "MEM GIB"]
_WATCH_HEADER += ["TEMP C", "LIMIT W", "DROPPED"]
_WATCH_WIDTHS = [24, 3, 8, 12, 6, 7, 6, 7, 6, 7, 7]


async def _watch(
    conn: _Conn, period_s: float, count: int | None, gpus: list[int], engines: bool, output: str
) -> None:
    def row(cells: Sequence[object]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, _WATCH_WIDTHS, strict=True))

    async with conn.client() as client:
        if output == "table":
            echo(row(_WATCH_HEADER), flush=True)
        seen = 0
        stream = client.stream_telemetry(period_s=period_s, gpu_indices=gpus, include_engines=engines)
        async with contextlib.aclosing(stream):
            async for sample in stream:
                if output == "json":
                    echo(json.dumps(message_dict(sample)), flush=True)
                else:
                    when = _utc(sample.ts_unix_ns)
                    for g in sample.gpus:
                        cells: list[object] = [when, g.gpu_index, f"{g.power_w:.1f}", f"{g.energy_j:.1f}"]
                        cells += [g.sm_clock_mhz, g.mem_clock_mhz, f"{g.util_gpu_ratio * 100:.0f}"]
                        cells += [f"{g.mem_used_bytes / 2**30:.1f}", f"{g.temperature_c:.0f}"]
                        cells += [f"{g.enforced_power_limit_w:.0f}", sample.dropped_samples_count]
                        echo(row(cells))
                    for m in sample.engines:
                        echo(
                            f"{'':>24}  engine {m.engine_id}: running {m.running_requests_count}, waiting "
                            f"{m.waiting_requests_count}, KV {m.kv_cache_usage_ratio * 100:.0f}%, "
                            f"prompt {m.prompt_tokens_per_s:.0f} tok/s, "
                            f"generation {m.generation_tokens_per_s:.0f} tok/s"
                        )
                    stdout().flush()
                seen += 1
                if count is not None and seen >= count:
                    break


# ---------------------------------------------------------------- clocks


def set_clocks_cmd(args: argparse.Namespace) -> int:
    min_mhz = _count("--min-mhz", args.min_mhz, minimum=1)
    max_mhz = _count("--max-mhz", args.max_mhz, minimum=1)
    lease_s = _seconds("--lease-s", args.lease_s, zero_ok=False)
    power_limit_w = None
    if args.power_limit_w is not None:
        power_limit_w = _seconds("--power-limit-w", args.power_limit_w, zero_ok=False)
    gpus = None if args.gpu == "all" else _indices("--gpu", args.gpu)
    conn = _conn(args, _timeout_s(args))
    reply = _run(_set_clocks(conn, gpus, min_mhz, max_mhz, lease_s, power_limit_w, args.dry_run))
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    what = "would apply (dry run)" if reply.dry_run else "applied"
    echo(f"{what} generation {reply.generation}{' (replayed)' if reply.replayed else ''}")
    for a in reply.applied:
        lock = a.sm_clock_lock if a.HasField("sm_clock_lock") else None
        echo(f"  GPU {a.gpu_index}: SM clock {_lock(lock)} MHz, power limit {a.power_limit_w:.0f} W")
    echo(_lease_line(reply.lease))
    return 0


async def _set_clocks(
    conn: _Conn,
    gpus: list[int] | None,
    min_mhz: int,
    max_mhz: int,
    lease_s: float,
    power_limit_w: float | None,
    dry_run: bool,
) -> control_pb2.ApplyGpuConfigResponse:
    from agent.api.client import GenerationSource, GpuClockSetting

    async with conn.client() as client:
        if gpus is None:
            gpus = [g.gpu_index for g in (await client.inventory()).gpus]
        settings = [GpuClockSetting(i, min_mhz, max_mhz, power_limit_w) for i in gpus]
        return await client.apply_gpu_config(
            GenerationSource().next(), settings, lease_s=lease_s, dry_run=dry_run
        )


def reset_clocks_cmd(args: argparse.Namespace) -> int:
    gpus = [] if args.gpu is None else _indices("--gpu", args.gpu)
    conn = _conn(args, _timeout_s(args))
    reply = _run(_reset_clocks(conn, gpus))
    if args.output == "json":
        _print_json(message_dict(reply))
        return 0
    echo(f"restored defaults, generation {reply.generation}{' (replayed)' if reply.replayed else ''}")
    for r in reply.restored:
        lock = r.sm_clock_lock if r.HasField("sm_clock_lock") else None
        echo(f"  GPU {r.gpu_index}: SM clock {_lock(lock)}, power limit {r.power_limit_w:.0f} W")
    echo(_lease_line(reply.lease))
    return 0


async def _reset_clocks(conn: _Conn, gpus: list[int]) -> control_pb2.RestoreDefaultsResponse:
    from agent.api.client import GenerationSource

    async with conn.client() as client:
        return await client.restore_defaults(GenerationSource().next(), gpus)


# ---------------------------------------------------------------- engines


def _print_engine_reply(
    reply: control_pb2.ReconfigureEngineResponse | control_pb2.StopEngineResponse, output: str
) -> None:
    from agent.api.v1 import control_pb2

    if output == "json":
        _print_json(message_dict(reply))
        return
    echo(_engine_line(reply.engine) + (" (replayed)" if reply.replayed else ""))
    steps = f"drain {reply.drain_s:.2f} s, stop {reply.stop_s:.2f} s"
    if isinstance(reply, control_pb2.StopEngineResponse):
        echo(f"  {steps}")
    elif reply.restarted:
        echo(f"  {steps}, start {reply.start_s:.2f} s")
    else:
        echo("  already running this configuration; nothing done")


def engine_start_cmd(args: argparse.Namespace) -> int:
    drain_s = _seconds("--drain-timeout-s", args.drain_timeout_s, zero_ok=True)
    ready_s = _seconds("--ready-timeout-s", args.ready_timeout_s, zero_ok=True)
    gpus = _indices("--gpus", args.gpus)
    tp = len(gpus) if args.tp is None else _count("--tp", args.tp, minimum=1)
    options = _options(args.option or [])
    conn = _conn(args, _engine_timeout_s(args, drain_s, ready_s))
    reply = _run(_engine_start(conn, args.engine, args.model, gpus, tp, options, drain_s, ready_s))
    _print_engine_reply(reply, args.output)
    return 0


async def _engine_start(
    conn: _Conn,
    engine_id: str,
    model: str,
    gpus: list[int],
    tp: int,
    options: dict[str, str],
    drain_s: float,
    ready_s: float,
) -> control_pb2.ReconfigureEngineResponse:
    from agent.api.client import GenerationSource
    from agent.api.v1 import common_pb2

    async with conn.client() as client:
        inventory = await client.inventory(timeout_s=DEFAULT_TIMEOUT_S)
        current = next((e for e in inventory.engines if e.engine_id == engine_id), None)
        stopped = (common_pb2.ENGINE_STATE_STOPPED, common_pb2.ENGINE_STATE_FAILED)
        same = current is not None and (current.model, list(current.gpu_indices), current.tp_degree) == (
            model,
            gpus,
            tp,
        )
        if current is not None and current.state not in stopped and not same:
            raise FailedPreconditionError(
                f"{_engine_line(current)}: runs another configuration; use `dctl node engine reconfigure`"
            )
        return await client.reconfigure_engine(
            GenerationSource().next(),
            engine_id,
            model=model,
            gpu_indices=gpus,
            tp_degree=tp,
            engine_options=options,
            drain_timeout_s=drain_s,
            ready_timeout_s=ready_s,
        )


def engine_reconfigure_cmd(args: argparse.Namespace) -> int:
    drain_s = _seconds("--drain-timeout-s", args.drain_timeout_s, zero_ok=True)
    ready_s = _seconds("--ready-timeout-s", args.ready_timeout_s, zero_ok=True)
    gpus = None if args.gpus is None else _indices("--gpus", args.gpus)
    tp = None if args.tp is None else _count("--tp", args.tp, minimum=1)
    options = None if args.option is None else _options(args.option)
    conn = _conn(args, _engine_timeout_s(args, drain_s, ready_s))
    reply = _run(_engine_reconfigure(conn, args.engine, args.model, gpus, tp, options, drain_s, ready_s))
    _print_engine_reply(reply, args.output)
    return 0


async def _engine_reconfigure(
    conn: _Conn,
    engine_id: str,
    model: str | None,
    gpus: list[int] | None,
    tp: int | None,
    options: dict[str, str] | None,
    drain_s: float,
    ready_s: float,
) -> control_pb2.ReconfigureEngineResponse:
    from agent.api.client import GenerationSource

    async with conn.client() as client:
        inventory = await client.inventory(timeout_s=DEFAULT_TIMEOUT_S)
        current = next((e for e in inventory.engines if e.engine_id == engine_id), None)
        if current is None:
            known = ", ".join(e.engine_id for e in inventory.engines) or "none"
            raise NotFoundError(
                f"engine {engine_id!r} is not on node {client.target} (engines: {known}); "
                "create it with `dctl node engine start`"
            )
        return await client.reconfigure_engine(
            GenerationSource().next(),
            engine_id,
            model=current.model if model is None else model,
            gpu_indices=list(current.gpu_indices) if gpus is None else gpus,
            tp_degree=current.tp_degree if tp is None else tp,
            engine_options=dict(current.engine_options) if options is None else options,
            drain_timeout_s=drain_s,
            ready_timeout_s=ready_s,
        )


def engine_stop_cmd(args: argparse.Namespace) -> int:
    drain_s = _seconds("--drain-timeout-s", args.drain_timeout_s, zero_ok=True)
    timeout_s = drain_s + ENGINE_DEADLINE_SLACK_S
    if args.timeout_s is not None:
        timeout_s = _seconds("--timeout-s", args.timeout_s, zero_ok=False)
    conn = _conn(args, timeout_s)
    reply = _run(_engine_stop(conn, args.engine, drain_s))
    _print_engine_reply(reply, args.output)
    return 0


async def _engine_stop(conn: _Conn, engine_id: str, drain_s: float) -> control_pb2.StopEngineResponse:
    from agent.api.client import GenerationSource

    async with conn.client() as client:
        return await client.stop_engine(GenerationSource().next(), engine_id, drain_timeout_s=drain_s)
