#!/usr/bin/env python3
"""The router's two figures, measured end to end over real HTTP and gRPC on loopback.

    PYTHONPATH=. .venv/bin/python tools/bench_router.py [--only overhead|max-rate] [--rate 200]
        [--duration-s 20] [--rounds 3] [--tokens 16] [--token-delay-ms 1] [--concurrency 64]
        [--max-rate-s 15] [--arrivals poisson|fixed] [--router-cpus 0,1] [--json PATH]

Every component is a process of its own (this script in a hidden mode, or the real router):
- a fake engine (`--serve-fake-engine`, aiohttp): `/v1/completions` answers with an SSE stream of
  `max_tokens` OpenAI completion chunks (` tok` each, the last with finish_reason "length") and
  `data: [DONE]`, chunk i at (i + 1) x `--token-delay-ms` after the request came (a schedule, so that
  late timer wake-ups do not add up), so that its own time is constant;
- a fake controller (`--serve-fake-controller ENGINE_PORT`, grpc.aio `ControllerAdmin`): `WatchEvents`
  sends one routes event (version 1) pointing all nine classes SS..LL at the fake engine as pool "p",
  then stays open; `ReportTraffic` counts and answers the counts; every other RPC is UNIMPLEMENTED. At
  SIGTERM it prints what it was reported (the check that the router's reports flowed);
- the real router (`python -m controller.router.app --listen 127.0.0.1:0 --controller ...`, with
  DYNAMOLLM_ROUTER_MAX_INFLIGHT=100000 so that the bench measures the proxy, not its wait queue).
The load generator is this process (aiohttp, keep-alive connections, one session per target). Every
request is `/v1/completions`, model "llama2-70b", a short prompt, max_tokens = `--tokens`, streamed.
Per request: TTFT = send -> the first token chunk, e2e = send -> `data: [DONE]` (perf_counter, from the
moment the request's coroutine starts the POST); a request is an error unless it got 200, every token
and [DONE].

1. Overhead at `--rate` req/s (target: added p99 < 5 ms). Open loop (Poisson arrivals, the same seeded
   sequence for every run, or a fixed interval): after a warm-up of both targets, `--rounds` rounds of
   `--duration-s` each straight to the engine and through the router, alternating which goes first. Added
   latency = router percentile - direct percentile of the same round, for TTFT and e2e p50 and p99; the
   table shows the median over rounds of those differences (and of each side's percentiles). Also: the
   sender's lateness (how late the load generator issued requests against its schedule; latencies
   count from the actual send, so it is not in them, but it shows how busy this process's loop was),
   and during each run the CPU of the router, the engine and this process (/proc/<pid>/stat utime +
   stime, getrusage), the machine's busy and steal time (/proc/stat) and what other work used.
2. Maximum request rate. Closed loop: `--concurrency` clients, each sending its next request when the
   last finished, for a 2 s warm-up then `--max-rate-s` counted, against a fake engine with no per-token
   delay: completed requests/s straight to the engine and through the router, with the same CPU figures.
   Which process saturated (>= 90% of one core: each is one Python event loop) is named, so that a
   limit of the fake engine or of the load generator is not read as the router's.
On a small shared host the router, the engine and the load generator compete for the same CPUs: the
overhead figures are upper bounds and the maximum rate a lower bound. `--router-cpus 0,1` pins the
router to those CPUs and everything else to the others (needs more CPUs than that).

Progress goes to stderr; the figures to stdout as a table (and with --json PATH, to a file). Every
process started is in its own process group and is stopped (SIGTERM, then SIGKILL) before exit, also
when this script is interrupted (Ctrl-C or SIGTERM). Defaults take about 3 minutes.
A benchmark, not a test: it prints figures and exits 0 (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchkit import CHILDREN, cpu_s, print_table, quantile, self_cpu_s, spawn, stop_all  # noqa: E402

MODEL = "llama2-70b"
PROMPT = "Tell me a short story about a power-efficient data centre."
START_TIMEOUT_S = 60.0
ROUTES_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0  # outstanding requests after a run's last send
WARMUP_S = 3.0  # overhead: per target, at the run's rate
MAX_RATE_WARMUP_S = 2.0
ERROR_BACKOFF_S = 0.01  # a closed-loop client after a failed request
SATURATED_PCT = 90.0
ROUTER_MAX_INFLIGHT = 100_000
SEED = 20250101

# Every child process, so that main() can stop whatever a section left behind (interrupt included).


def _progress(message: str) -> None:
    print(f"[bench_router {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ms(value_s: float) -> float:
    return round(value_s * 1e3, 3)


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


# ------------------------------------------------------------------------------------ processes


async def _json_line(
    proc: subprocess.Popen[bytes], out: Path, err: Path, event: str, timeout_s: float
) -> dict[str, Any]:
    """The child's first stdout line that is a JSON object with this `event` (it names the bound port)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = out.read_text() if out.exists() else ""
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n") or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict) and parsed.get("event") == event:
                    return parsed
        if proc.poll() is not None:
            tail = err.read_text()[-2000:] if err.exists() else ""
            raise SystemExit(f"child {proc.args!r} exited with {proc.returncode} before {event}:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"child {proc.args!r} printed no {event} line within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat: idle and iowait are not busy; steal is
    time the hypervisor gave to other guests; guest time is already inside user time."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        values += [0] * (8 - len(values))
        total = sum(values)
        idle, steal = values[3] + values[4], values[7]
        return total - idle - steal, steal, total
    return 0, 0, 0


class CpuMeter:
    """CPU of the given processes, of this process and of the machine between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._machine0 = (0, 0, 0)

    def _sample(self) -> dict[str, float]:
        values = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                values[name] = cpu_s(pid)
        values["load generator"] = self_cpu_s()
        return values

    def start(self) -> None:
        self._cpu0, self._machine0, self._t0 = self._sample(), _machine_ticks(), time.perf_counter()

    def stop(self) -> dict[str, Any]:
        """CPU per process in % of one core; the machine's busy and steal time in % of all its CPUs;
        `other_pct_of_one_core`: busy time of everything else on the machine (other work), % of one core."""
        wall_s = time.perf_counter() - self._t0
        cpu1, (busy1, steal1, total1) = self._sample(), _machine_ticks()
        busy0, steal0, total0 = self._machine0
        pct = {
            name: round((cpu1[name] - self._cpu0[name]) / wall_s * 100, 1)
            for name in cpu1
            if name in self._cpu0 and wall_s > 0
        }
        cpus = os.cpu_count() or 1
        ticks = total1 - total0
        busy = (busy1 - busy0) / ticks * 100 if ticks > 0 else math.nan
        return {
            "pct_of_one_core": pct,
            "machine_busy_pct": round(busy, 1),
            "machine_steal_pct": round((steal1 - steal0) / ticks * 100, 1) if ticks > 0 else math.nan,
            "other_pct_of_one_core": round(max(0.0, busy * cpus - sum(pct.values())), 1),
            "cpus": cpus,
        }


# ------------------------------------------------------------------------------------ fake engine


def _engine_chunks() -> tuple[bytes, bytes, bytes]:
    """(a token chunk, the last token chunk, [DONE]) as SSE events of an OpenAI completion stream."""

    def chunk(finish: str | None) -> bytes:
        body = {
            "id": "cmpl-bench",
            "object": "text_completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    return chunk(None), chunk("length"), b"data: [DONE]\n\n"


async def _serve_fake_engine(token_delay_ms: float) -> int:
    """Hidden mode: the fake engine (module docstring) on an ephemeral port until SIGTERM."""
    from aiohttp import web

    delay_s = token_delay_ms / 1e3
    middle, last, done = _engine_chunks()
    served = 0

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal served
        try:
            body = json.loads(await request.read())
            tokens = int(body.get("max_tokens") or 16)
        except (ValueError, TypeError, AttributeError):
            return web.json_response({"error": {"message": "bad body", "code": 400}}, status=400)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await out.prepare(request)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(tokens):
            if delay_s > 0:  # on a schedule from the request's start: late wake-ups do not add up
                await asyncio.sleep(max(0.0, t0 + (i + 1) * delay_s - loop.time()))
            await out.write(last if i == tokens - 1 else middle)
        await out.write(done)
        await out.write_eof()
        served += 1
        return out

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    print(json.dumps({"event": "fake_engine_listening", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(json.dumps({"event": "fake_engine_stopped", "served": served}), flush=True)
    await runner.cleanup()
    return 0


# ------------------------------------------------------------------------------------ fake controller


def _routing_table(engine_port: int) -> Any:
    from controller.api.v1 import admin_pb2
    from controller.model.classes import REQUEST_CLASSES

    endpoint = admin_pb2.RouteEndpoint(
        instance_id=1, node="bench", host="127.0.0.1", http_port=engine_port, weight_s=1.0
    )
    classes = [admin_pb2.ClassRoute(class_name=c.name, pool="p", primary=[endpoint]) for c in REQUEST_CLASSES]
    return admin_pb2.RoutingTable(version=1, classes=classes)


async def _serve_fake_controller(engine_port: int) -> int:
    """Hidden mode: the fake controller (module docstring) on an ephemeral port until SIGTERM."""
    import grpc

    from controller.api.v1 import admin_pb2, admin_pb2_grpc

    table = _routing_table(engine_port)
    counts = {"arrivals": 0, "completions": 0, "reports": 0, "watches": 0}

    class FakeController(admin_pb2_grpc.ControllerAdminServicer):
        async def WatchEvents(self, request: Any, context: Any) -> Any:
            counts["watches"] += 1
            yield admin_pb2.Event(
                seq=1, ts_unix_ns=time.time_ns(), kind="routes", summary="bench routes", routes=table
            )
            await asyncio.Event().wait()  # open until the caller cancels or the server stops

        async def ReportTraffic(self, request: Any, context: Any) -> Any:
            counts["reports"] += 1
            counts["arrivals"] += len(request.arrivals)
            counts["completions"] += len(request.completions)
            return admin_pb2.ReportTrafficResponse(
                arrivals_count=len(request.arrivals), completions_count=len(request.completions)
            )

    server = grpc.aio.server()
    # the generated base class answers UNIMPLEMENTED to the RPCs not overridden (abstract in the stubs)
    admin_pb2_grpc.add_ControllerAdminServicer_to_server(FakeController(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "fake_controller_listening", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    print(json.dumps({"event": "fake_controller_stopped", **counts}), flush=True)
    return 0


# ------------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    """A fake engine, a fake controller routing to it, and the real router, as processes."""

    work: Path
    engine: subprocess.Popen[bytes]
    controller: subprocess.Popen[bytes]
    router: subprocess.Popen[bytes]
    engine_port: int
    router_port: int

    @property
    def pids(self) -> dict[str, int]:
        return {
            "router": self.router.pid,
            "fake engine": self.engine.pid,
            "fake controller": self.controller.pid,
        }

    def stop(self) -> dict[str, Any]:
        """Stop router, then controller and engine; what the fakes counted (from their last line)."""
        stop_all([self.router, self.controller, self.engine], in_order=True)
        counted: dict[str, Any] = {"router_exit": self.router.returncode}
        for name, event in (("controller", "fake_controller_stopped"), ("engine", "fake_engine_stopped")):
            path = self.work / f"{name}.out"
            for line in path.read_text().splitlines() if path.exists() else []:
                with contextlib.suppress(ValueError):
                    parsed = json.loads(line)
                    if parsed.get("event") == event:
                        counted[name] = {k: v for k, v in parsed.items() if k != "event"}
        return counted


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMOLLM_ROUTER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def _start_child(
    work: Path, name: str, args: Sequence[str], event: str, env: dict[str, str], cpus: set[int] | None
) -> tuple[subprocess.Popen[bytes], int]:
    """A child (stdout and stderr in work/NAME.out, .err) and the port its `event` line names."""
    out, err = work / f"{name}.out", work / f"{name}.err"
    proc = spawn(args, env=env, out=out, err=err, cpus=cpus)
    try:
        return proc, int((await _json_line(proc, out, err, event, START_TIMEOUT_S))["port"])
    except BaseException:
        await asyncio.to_thread(stop_all, [proc])
        raise


async def start_stack(work: Path, token_delay_ms: float, router_cpus: set[int] | None) -> Stack:
    work.mkdir(parents=True, exist_ok=True)
    others = set(range(os.cpu_count() or 1)) - router_cpus if router_cpus else None
    me = str(Path(__file__).resolve())
    env = _child_env()
    started: list[subprocess.Popen[bytes]] = []
    try:
        engine, engine_port = await _start_child(
            work,
            "engine",
            [sys.executable, me, "--serve-fake-engine", "--token-delay-ms", str(token_delay_ms)],
            "fake_engine_listening",
            env,
            others,
        )
        started.append(engine)
        controller, controller_port = await _start_child(
            work,
            "controller",
            [sys.executable, me, "--serve-fake-controller", str(engine_port)],
            "fake_controller_listening",
            env,
            others,
        )
        started.append(controller)
        config = work / "router.toml"
        config.write_text("# bench_router: the defaults, and the environment's DYNAMOLLM_ROUTER_*\n")
        router_env = dict(
            env,
            DYNAMOLLM_ROUTER_MAX_INFLIGHT=str(ROUTER_MAX_INFLIGHT),  # the proxy, not its wait queue
            DYNAMOLLM_ROUTER_LOG_LEVEL="warning",
            DYNAMOLLM_ROUTER_LOG_JSON="true",
        )
        router_args = [
            sys.executable, "-m", "controller.router.app", "--config", str(config),
            "--listen", "127.0.0.1:0", "--controller", f"127.0.0.1:{controller_port}",
        ]  # fmt: skip
        router, router_port = await _start_child(
            work, "router", router_args, "router_listening", router_env, router_cpus
        )
        started.append(router)
        await _wait_routes(router_port)
    except BaseException:
        await asyncio.to_thread(functools.partial(stop_all, list(reversed(started)), in_order=True))
        raise
    return Stack(work, engine, controller, router, engine_port, router_port)


async def _wait_routes(port: int) -> None:
    """Until the router's /health shows the routing table of the fake controller."""
    import aiohttp

    deadline = time.monotonic() + ROUTES_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200 and (await resp.json()).get("routes_version", 0) >= 1:
                        return
            await asyncio.sleep(0.1)
    raise SystemExit(f"the router had no routing table from the fake controller within {ROUTES_TIMEOUT_S} s")


# ------------------------------------------------------------------------------------ load generator


@dataclass
class Sample:
    sent_s: float  # perf_counter at the POST
    ttft_s: float
    e2e_s: float


@dataclass
class Tally:
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


def _body(tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "stream": True}).encode()


async def _one(session: Any, url: str, body: bytes, tokens: int, tally: Tally) -> Sample | None:
    """One streamed completion; its Sample (also added to the tally) or None (an error, counted)."""
    import aiohttp

    t0 = time.perf_counter()
    ttft = math.nan
    seen = 0
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                tally.error(f"HTTP {resp.status}")
                return None
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    if not seen:
                        ttft = time.perf_counter() - t0
                    seen += 1
                elif line.startswith(b"data: [DONE]"):
                    e2e = time.perf_counter() - t0
                    if seen != tokens:
                        tally.error(f"{seen} of {tokens} tokens")
                        return None
                    sample = Sample(t0, ttft, e2e)
                    tally.samples.append(sample)
                    return sample
            tally.error(f"no [DONE] after {seen} tokens")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(type(exc).__name__)
    return None


def _session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    )


async def _drain(tasks: set[asyncio.Task[Any]], tally: Tally) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=DRAIN_TIMEOUT_S)
    for task in pending:
        task.cancel()
        tally.error("unfinished at the drain timeout")
    if pending:
        await asyncio.wait(pending, timeout=5.0)


async def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel what is still running (a run interrupted): no request outlives its session."""
    live = [t for t in tasks if not t.done()]
    for task in live:
        task.cancel()
    if live:
        await asyncio.wait(live, timeout=5.0)


async def open_loop(
    session: Any, url: str, *, rate: float, duration_s: float, tokens: int, poisson: bool
) -> tuple[Tally, list[float], int]:
    """Requests at `rate` for `duration_s` (the same seeded arrival sequence each call), all awaited;
    (tally, the sender's lateness per request, requests sent)."""
    rng = random.Random(SEED)
    body = _body(tokens)
    tally = Tally()
    lateness: list[float] = []
    tasks: set[asyncio.Task[Any]] = set()
    start = time.perf_counter() + 0.01
    offset = 0.0
    try:
        while offset < duration_s:
            target = start + offset
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness.append(max(0.0, time.perf_counter() - target))
            task = asyncio.create_task(_one(session, url, body, tokens, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            offset += rng.expovariate(rate) if poisson else 1.0 / rate
        await _drain(tasks, tally)
    finally:
        await _cancel(list(tasks))
    return tally, lateness, len(lateness)


async def closed_loop(
    session: Any, url: str, *, clients: int, warmup_s: float, window_s: float, tokens: int, meter: CpuMeter
) -> tuple[Tally, float, dict[str, Any]]:
    """`clients` clients back to back; (tally of the requests that finished inside the counted window,
    the window's length, CPU over the window)."""
    body = _body(tokens)
    everything = Tally()
    t_start = time.perf_counter()
    window0, window1 = t_start + warmup_s, t_start + warmup_s + window_s

    async def client() -> None:
        while time.perf_counter() < window1:
            if await _one(session, url, body, tokens, everything) is None:
                await asyncio.sleep(ERROR_BACKOFF_S)

    tasks = {asyncio.create_task(client()) for _ in range(clients)}
    try:
        await asyncio.sleep(max(0.0, window0 - time.perf_counter()))
        errors_before = dict(everything.errors)
        meter.start()
        await asyncio.sleep(max(0.0, window1 - time.perf_counter()))
        cpu = meter.stop()
        errors_in_window = {k: v - errors_before.get(k, 0) for k, v in everything.errors.items()}
        await _drain(tasks, everything)
    finally:
        await _cancel(tasks)
    counted = Tally(
        [s for s in everything.samples if window0 <= s.sent_s + s.e2e_s <= window1],
        {k: v for k, v in errors_in_window.items() if v},
    )
    return counted, window1 - window0, cpu


def _latency(tally: Tally) -> dict[str, Any]:
    ttft = [s.ttft_s for s in tally.samples]
    e2e = [s.e2e_s for s in tally.samples]
    return {
        "completed": len(tally.samples),
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "ttft_p50_ms": _ms(quantile(ttft, 0.5)),
        "ttft_p99_ms": _ms(quantile(ttft, 0.99)),
        "e2e_p50_ms": _ms(quantile(e2e, 0.5)),
        "e2e_p99_ms": _ms(quantile(e2e, 0.99)),
        "e2e_max_ms": _ms(max(e2e)) if e2e else math.nan,
    }


# ------------------------------------------------------------------------------------ 1. overhead


async def bench_overhead(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    _progress(f"overhead: starting fake engine ({args.token_delay_ms:g} ms/token), fake controller, router")
    stack = await start_stack(work, args.token_delay_ms, args.router_cpus)
    try:
        urls = {
            "direct": f"http://127.0.0.1:{stack.engine_port}/v1/completions",
            "router": f"http://127.0.0.1:{stack.router_port}/v1/completions",
        }
        poisson = args.arrivals == "poisson"
        rounds: list[dict[str, Any]] = []
        warmup_sent = 0
        async with _session() as direct_session, _session() as router_session:
            sessions = {"direct": direct_session, "router": router_session}
            for target in ("direct", "router"):
                _progress(f"overhead: warm-up {WARMUP_S:g} s {target} at {args.rate:g} req/s")
                tally, _, sent = await open_loop(
                    sessions[target],
                    urls[target],
                    rate=args.rate,
                    duration_s=WARMUP_S,
                    tokens=args.tokens,
                    poisson=poisson,
                )
                warmup_sent += sent if target == "router" else 0
                if tally.errors:
                    _progress(f"overhead: warm-up {target} errors: {tally.errors}")
            for r in range(args.rounds):
                order = ("direct", "router") if r % 2 == 0 else ("router", "direct")
                one: dict[str, Any] = {}
                for target in order:
                    _progress(
                        f"overhead: round {r + 1}/{args.rounds}, {target}: {args.duration_s:g} s at "
                        f"{args.rate:g} req/s ({args.arrivals})"
                    )
                    meter = CpuMeter(stack.pids)
                    meter.start()
                    tally, lateness, sent = await open_loop(
                        sessions[target],
                        urls[target],
                        rate=args.rate,
                        duration_s=args.duration_s,
                        tokens=args.tokens,
                        poisson=poisson,
                    )
                    cpu = meter.stop()
                    stats = _latency(tally)
                    stats.update(
                        sent=sent,
                        offered_rps=round(sent / args.duration_s, 1),
                        sender_lateness_p50_ms=_ms(quantile(lateness, 0.5)),
                        sender_lateness_p99_ms=_ms(quantile(lateness, 0.99)),
                        cpu=cpu,
                    )
                    one[target] = stats
                    _progress(
                        f"  {target}: TTFT p50 {stats['ttft_p50_ms']:.2f} p99 {stats['ttft_p99_ms']:.2f} ms, "
                        f"e2e p50 {stats['e2e_p50_ms']:.2f} p99 {stats['e2e_p99_ms']:.2f} ms, "
                        f"{stats['completed']}/{sent} ok, {stats['errors']} errors, "
                        f"CPU {cpu['pct_of_one_core']}"
                    )
                one["added"] = {
                    key: round(one["router"][key] - one["direct"][key], 3)
                    for key in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")
                }
                one["first"] = order[0]
                rounds.append(one)
    finally:
        counted = await asyncio.to_thread(stack.stop)
    keys = ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")
    median = {
        side: {k: round(_median(r[side][k] for r in rounds), 3) for k in keys}
        for side in ("direct", "router")
    }
    median["added"] = {k: round(_median(r["added"][k] for r in rounds), 3) for k in keys}
    for side in ("direct", "router"):
        for cpu_name in ("router", "fake engine", "load generator"):
            median[side][f"cpu_{cpu_name.replace(' ', '_')}_pct"] = round(
                _median(r[side]["cpu"]["pct_of_one_core"].get(cpu_name, math.nan) for r in rounds), 1
            )
        for key in ("machine_busy_pct", "machine_steal_pct", "other_pct_of_one_core"):
            median[side][key] = round(_median(r[side]["cpu"][key] for r in rounds), 1)
        median[side]["sender_lateness_p99_ms"] = round(
            _median(r[side]["sender_lateness_p99_ms"] for r in rounds), 3
        )
        median[side]["errors"] = sum(r[side]["errors"] for r in rounds)
        median[side]["completed"] = sum(r[side]["completed"] for r in rounds)
    router_requests = sum(r["router"]["sent"] for r in rounds)
    return {
        "rate_rps": args.rate,
        "duration_s": args.duration_s,
        "rounds_count": args.rounds,
        "arrivals": args.arrivals,
        "tokens": args.tokens,
        "token_delay_ms": args.token_delay_ms,
        "rounds": rounds,
        "median": median,
        "fakes_counted": counted,
        "router_requests_incl_warmup": router_requests + warmup_sent,
        "router_cpu_ms_per_request": round(median["router"]["cpu_router_pct"] * 10 / args.rate, 3),
    }


# ------------------------------------------------------------------------------------ 2. max rate


def _limit(cpu: dict[str, Any], names: Sequence[str], others_cpus: int | None) -> str:
    """Which process saturated (>= SATURATED_PCT of one core), else whether the CPUs left to the engine
    and the load generator (`others_cpus`, when the router is pinned) or the machine were full."""
    pct = cpu["pct_of_one_core"]
    hot = [f"{n} ({pct[n]:.0f}%)" for n in names if pct.get(n, 0.0) >= SATURATED_PCT]
    if hot:
        return "saturated: " + ", ".join(hot)
    if others_cpus:
        shared = sum(v for n, v in pct.items() if n != "router")
        if shared >= SATURATED_PCT * others_cpus:
            return f"the {others_cpus} CPU(s) of engine + load generator full ({shared:.0f}%)"
    if cpu["machine_busy_pct"] >= 95.0:
        return f"machine CPU full ({cpu['machine_busy_pct']:.0f}% busy)"
    return "no process saturated"


async def bench_max_rate(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    _progress("max rate: starting fake engine (no per-token delay), fake controller, router")
    stack = await start_stack(work, 0.0, args.router_cpus)
    runs: dict[str, Any] = {}
    try:
        urls = {
            "direct": f"http://127.0.0.1:{stack.engine_port}/v1/completions",
            "router": f"http://127.0.0.1:{stack.router_port}/v1/completions",
        }
        for target in ("direct", "router"):
            _progress(
                f"max rate: {target}, {args.concurrency} clients, {MAX_RATE_WARMUP_S:g} s warm-up + "
                f"{args.max_rate_s:g} s"
            )
            async with _session() as session:
                meter = CpuMeter(stack.pids)
                tally, window_s, cpu = await closed_loop(
                    session,
                    urls[target],
                    clients=args.concurrency,
                    warmup_s=MAX_RATE_WARMUP_S,
                    window_s=args.max_rate_s,
                    tokens=args.tokens,
                    meter=meter,
                )
            stats = _latency(tally)
            stats["rps"] = round(stats["completed"] / window_s, 1)
            stats["cpu"] = cpu
            names = ["fake engine", "load generator"] + (["router"] if target == "router" else [])
            others = (os.cpu_count() or 1) - len(args.router_cpus) if args.router_cpus else None
            stats["limit"] = _limit(cpu, names, others)
            runs[target] = stats
            _progress(
                f"  {target}: {stats['rps']:.0f} req/s, e2e p50 {stats['e2e_p50_ms']:.1f} ms, "
                f"{stats['errors']} errors, CPU {cpu['pct_of_one_core']}, "
                f"machine {cpu['machine_busy_pct']}%; "
                f"{stats['limit']}"
            )
    finally:
        counted = await asyncio.to_thread(stack.stop)
    router_pct = runs["router"]["cpu"]["pct_of_one_core"].get("router", math.nan) if "router" in runs else 0
    return {
        "concurrency": args.concurrency,
        "window_s": args.max_rate_s,
        "tokens": args.tokens,
        "runs": runs,
        "router_cpu_ms_per_request": round(router_pct * 10 / runs["router"]["rps"], 3)
        if runs.get("router", {}).get("rps")
        else math.nan,
        "fakes_counted": counted,
    }


# ------------------------------------------------------------------------------------ report


def _table(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    ov = results.get("overhead")
    if ov:
        m = ov["median"]
        tag = (
            f"overhead, {ov['rate_rps']:g} req/s {ov['arrivals']}, {ov['tokens']} tokens x "
            f"{ov['token_delay_ms']:g} ms, median of {ov['rounds_count']} x {ov['duration_s']:g} s"
        )
        a = m["added"]
        rows.append(
            (f"{tag}: added TTFT", f"p50 {a['ttft_p50_ms']:.2f} ms, p99 {a['ttft_p99_ms']:.2f} ms", "")
        )
        rows.append(
            (f"{tag}: added e2e", f"p50 {a['e2e_p50_ms']:.2f} ms, p99 {a['e2e_p99_ms']:.2f} ms", "p99 < 5 ms")
        )
        for side in ("direct", "router"):
            s = m[side]
            rows.append(
                (
                    f"  {side}: TTFT / e2e",
                    f"TTFT p50 {s['ttft_p50_ms']:.2f} p99 {s['ttft_p99_ms']:.2f} ms, "
                    f"e2e p50 {s['e2e_p50_ms']:.2f} p99 {s['e2e_p99_ms']:.2f} ms",
                    "",
                )
            )
            rows.append(
                (
                    f"  {side}: requests, CPU (% of one core)",
                    f"{s['completed']} ok, {s['errors']} errors; router {s['cpu_router_pct']:.0f}%, "
                    f"engine {s['cpu_fake_engine_pct']:.0f}%, load gen {s['cpu_load_generator_pct']:.0f}%, "
                    f"machine {s['machine_busy_pct']:.0f}% busy (other work "
                    f"{s['other_pct_of_one_core']:.0f}%, steal {s['machine_steal_pct']:.0f}%); "
                    f"sender late p99 {s['sender_lateness_p99_ms']:.2f} ms",
                    "",
                )
            )
        for i, r in enumerate(ov["rounds"], 1):
            a = r["added"]
            rows.append(
                (
                    f"  round {i} ({r['first']} first): added",
                    f"TTFT p50 {a['ttft_p50_ms']:.2f} p99 {a['ttft_p99_ms']:.2f} ms, "
                    f"e2e p50 {a['e2e_p50_ms']:.2f} p99 {a['e2e_p99_ms']:.2f} ms; other work direct "
                    f"{r['direct']['cpu']['other_pct_of_one_core']:.0f}%, "
                    f"router {r['router']['cpu']['other_pct_of_one_core']:.0f}%",
                    "",
                )
            )
        rows.append(("  router CPU per request", f"{ov['router_cpu_ms_per_request']:.3f} ms", ""))
        ctl = ov["fakes_counted"].get("controller")
        if ctl:
            rows.append(
                (
                    "  router -> fake controller ReportTraffic",
                    f"{ctl['completions']} completions in {ctl['reports']} reports "
                    f"({ov['router_requests_incl_warmup']} requests sent to the router)",
                    "",
                )
            )
    mr = results.get("max_rate")
    if mr:
        tag = f"max rate, {mr['concurrency']} clients closed loop, {mr['tokens']} tokens, no delay"
        for side in ("direct", "router"):
            s = mr["runs"].get(side)
            if not s:
                continue
            pct = s["cpu"]["pct_of_one_core"]
            cpu_text = ", ".join(
                f"{n} {pct[n]:.0f}%" for n in ("router", "fake engine", "load generator") if n in pct
            )
            rows.append(
                (
                    f"{tag}: {side}",
                    f"{s['rps']:.0f} req/s, e2e p50 {s['e2e_p50_ms']:.1f} p99 {s['e2e_p99_ms']:.1f} ms, "
                    f"{s['errors']} errors",
                    "",
                )
            )
            rows.append(
                (
                    f"  {side}: CPU (% of one core)",
                    f"{cpu_text}; machine {s['cpu']['machine_busy_pct']:.0f}% busy of {s['cpu']['cpus']} "
                    f"CPUs (other work {s['cpu']['other_pct_of_one_core']:.0f}%, "
                    f"steal {s['cpu']['machine_steal_pct']:.0f}%); {s['limit']}",
                    "",
                )
            )
        rows.append(("  router CPU per request", f"{mr['router_cpu_ms_per_request']:.3f} ms", ""))
    return rows


# ------------------------------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "router_cpus": sorted(args.router_cpus) if args.router_cpus else None,
    }
    task = asyncio.current_task()
    if task is not None:  # SIGTERM as Ctrl-C: the sections stop their children on the way out
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.router_cpus:  # this process (the load generator) keeps off the router's CPUs
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - args.router_cpus)
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        work = Path(tmp)
        if args.only in (None, "overhead"):
            results["overhead"] = await bench_overhead(work / "overhead", args)
        if args.only in (None, "max-rate"):
            results["max_rate"] = await bench_max_rate(work / "max-rate", args)
    return results


def _cpus(text: str) -> set[int]:
    try:
        cpus = {int(c) for c in text.split(",") if c.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: CPU numbers like 0,1") from None
    available = os.sched_getaffinity(0)
    if not cpus or not cpus < available:
        raise argparse.ArgumentTypeError(
            f"got {text!r}; allowed: a proper subset of this process's CPUs {sorted(available)}"
        )
    return cpus


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", choices=["overhead", "max-rate"], default=None)
    parser.add_argument("--rate", type=float, default=200.0, help="overhead: offered load, req/s (200)")
    parser.add_argument("--duration-s", type=float, default=20.0, help="overhead: length of one run (20 s)")
    parser.add_argument("--rounds", type=int, default=3, help="overhead: direct + router rounds (3)")
    parser.add_argument(
        "--arrivals", choices=["poisson", "fixed"], default="poisson", help="overhead (poisson)"
    )
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens = chunks streamed (16)")
    parser.add_argument(
        "--token-delay-ms", type=float, default=1.0, help="overhead: engine delay per token (1)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="max rate: closed-loop clients (64)")
    parser.add_argument("--max-rate-s", type=float, default=15.0, help="max rate: counted window (15 s)")
    parser.add_argument(
        "--router-cpus", type=_cpus, default=None, metavar="LIST", help="pin the router to these CPUs (none)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write figures as JSON")
    parser.add_argument("--serve-fake-engine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-fake-controller", type=int, default=0, metavar="ENGINE_PORT", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve_fake_engine:
        return asyncio.run(_serve_fake_engine(args.token_delay_ms))
    if args.serve_fake_controller:
        return asyncio.run(_serve_fake_controller(args.serve_fake_controller))
    for name in ("rate", "duration_s", "rounds", "tokens", "concurrency", "max_rate_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: > 0")
    if args.token_delay_ms < 0:
        parser.error(f"--token-delay-ms: got {args.token_delay_ms}; allowed: >= 0")
    from agent.api.log import configure_logging
    from controller.dctl.output import reserved_stdout

    configure_logging("error")
    started = time.perf_counter()
    try:
        with reserved_stdout():  # stray C-level output goes to stderr: stdout carries the figures only
            results = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _progress("interrupted")
        return 130
    finally:
        stop_all(list(CHILDREN), in_order=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(
        f"{results['host']}: {results['cpus']} CPUs, Python {results['python']}, {results['wall_s']} s"
        + (f", router on CPUs {results['router_cpus']}" if results["router_cpus"] else "")
    )
    print_table(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
