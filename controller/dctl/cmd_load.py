"""`dctl load`: replay a request trace against a live OpenAI-compatible server (an engine, or the router in
front of engines) over real HTTP, and report per-class SLO attainment and latencies as the client saw them.

Flow: validate every flag (nothing is sent on a bad one) -> the trace and its window, resolved as `dctl
simulate` does (`controller.sim.compare.resolve_trace`: files, synthetic:KIND, azure-week:conv|code) ->
the SLOs of the classes from the profile -> GET /v1/models once (the model, unless --model; an unreachable
--url is one line and exit 3) -> `controller.loadgen.replay` (a progress bar on stderr, drawn on a
terminal) -> `controller.loadgen.build_report` -> JSON written atomically (`--json`) and the table (or the
JSON, `--output json`) on stdout. The replay rules and definitions are in controller.loadgen's docstring.
Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.api.errors import InvalidArgumentError
from controller.dctl.files import existing_file, named_by, writable_json
from controller.dctl.output import echo

if TYPE_CHECKING:
    from controller.loadgen import Progress
    from controller.model.classes import ClassSlo
    from controller.sim.traces import Trace

TRACE_FORMS = (
    "a trace CSV file, synthetic:conversation, synthetic:coding, synthetic:long-context,"
    " synthetic:conversation-2day, azure-week:conv, azure-week:code"
)
WEEK_PREFIX = "azure-week:"  # controller.sim.week.WEEK_SPEC_PREFIX, repeated to keep --help import-light
DEFAULT_TRACE_DIR = Path("..") / "shared" / "data" / "traces"
DEFAULT_SLO_MODEL = "llama2-70b"
DEFAULT_SLO_GPU = "h100-sxm"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CONCURRENCY = 512
EXIT_CODES = (
    "exit codes: 0 the replay ran (whatever its SLO attainment); 2 bad flags or input files; 3 --url "
    "unreachable at the start (or it names no model and --model is not given); 4 internal error; 141 "
    "stdout closed by its reader (e.g. | head)"
)
CLASSES_NOTE = (
    "classes: input-length bin then output-length bin, S/M/L = short/medium/long "
    "(e.g. LS: long prompt, short answer); the report's last line gives the token edges"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "load",
        help="replay a request trace against a live OpenAI-compatible server and report SLO attainment",
        description=(
            "Replay a request trace over real HTTP (POST /v1/completions, streamed) against an engine or "
            "the router, at the trace's arrival times divided by --speedup, and report per request class "
            "the outcomes (ok, rejected, failed, refused at admission), SLO attainment and TTFT/TBT/e2e "
            "percentiles measured at the client (dynamollm.loadreport/v1). Latencies are multiplied by "
            "--speedup (simulated seconds) before they are judged and reported. " + CLASSES_NOTE + "."
        ),
        epilog=EXIT_CODES,
    )
    p.add_argument("--url", required=True, metavar="http://HOST:PORT", help="base URL of the server")
    p.add_argument(
        "--trace", required=True, metavar="PATH|synthetic:conversation|synthetic:coding|azure-week:conv|code"
    )
    p.add_argument(
        "--trace-dir",
        default=str(DEFAULT_TRACE_DIR),
        metavar="DIR",
        help=f"where azure-week:conv|code finds its source files (default {DEFAULT_TRACE_DIR})",
    )
    p.add_argument("--start", default="0", metavar="S", help="window start in the trace, seconds (default 0)")
    p.add_argument(
        "--duration", default=None, metavar="S", help="window length, trace seconds (default: to the end)"
    )
    p.add_argument("--rate-scale", default="1.0", metavar="F", help="multiply the request rate (default 1)")
    p.add_argument("--seed", default="0", metavar="N", help="seed of synthetic traces and --rate-scale")
    p.add_argument(
        "--speedup",
        default="1",
        metavar="X",
        help="send at arrival/X, and report wall-clock latencies x X, for a server X times faster than "
        "real time (default 1: real time)",
    )
    p.add_argument(
        "--max-duration-s",
        default=None,
        metavar="T",
        help="send nothing after T wall seconds (requests not sent are counted as 'not sent'; default: "
        "the whole window)",
    )
    p.add_argument(
        "--timeout-s",
        default=str(DEFAULT_TIMEOUT_S),
        metavar="T",
        help="wall seconds a request may take from its send before it fails as 'timeout'; after the last "
        f"send the run waits at most this long (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--concurrency-limit",
        default=str(DEFAULT_CONCURRENCY),
        metavar="N",
        help=f"most connections open at once; more requests wait for one (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="model to ask for (default: the first of GET /v1/models)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help=f"dynamollm.profile/v1 file whose per-class SLOs judge the requests (default: the built-in "
        f"{DEFAULT_SLO_MODEL} on {DEFAULT_SLO_GPU} profile)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the report here (atomically)")
    p.add_argument(
        "--per-request",
        action="store_true",
        help="also put every request's record in the JSON report (request_records)",
    )
    p.add_argument("--output", default="table", metavar="table|json", help="stdout format (default table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class _Options:
    """The validated flags."""

    url: str
    trace: str
    trace_dir: Path
    start_s: float
    duration_s: float | None
    rate_scale: float
    seed: int
    speedup: float
    max_duration_s: float | None
    timeout_s: float
    concurrency_limit: int
    model: str | None
    profile: Path | None
    json_path: Path | None
    per_request: bool
    output: str
    progress: bool


def _number(value: str, flag: str, ok: Callable[[float], bool], allowed: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise InvalidArgumentError(flag, value, allowed) from None
    if not (math.isfinite(x) and ok(x)):
        raise InvalidArgumentError(flag, value, allowed)
    return x


def _url(value: str) -> str:
    allowed = "http://HOST:PORT or https://HOST:PORT (optionally with a path prefix)"
    try:
        parts = urlsplit(value)
        _ = parts.port  # ValueError on a bad port
    except ValueError:
        raise InvalidArgumentError("--url", value, allowed) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidArgumentError("--url", value, allowed)
    return value.rstrip("/")


def validate(args: argparse.Namespace) -> _Options:
    """Every flag checked before any work starts; InvalidArgumentError names the first bad one."""
    url = _url(args.url)
    if args.output not in ("table", "json"):
        raise InvalidArgumentError("--output", args.output, ("table", "json"))
    trace = str(args.trace)
    trace_dir = Path(args.trace_dir)
    if trace.startswith(WEEK_PREFIX) and not trace_dir.is_dir():
        raise InvalidArgumentError("--trace-dir", str(trace_dir), "a folder with the Azure trace files")
    if not trace.startswith(("synthetic:", WEEK_PREFIX)):
        existing_file(trace, "--trace", TRACE_FORMS)
    if args.model is not None and not args.model.strip():
        raise InvalidArgumentError("--model", args.model, "a model name")
    seed = _number(args.seed, "--seed", lambda x: x >= 0 and x == int(x), "an integer >= 0")
    concurrency = _number(
        args.concurrency_limit, "--concurrency-limit", lambda x: x >= 1 and x == int(x), "an integer >= 1"
    )
    return _Options(
        url=url,
        trace=trace,
        trace_dir=trace_dir,
        start_s=_number(args.start, "--start", lambda x: x >= 0, "seconds >= 0"),
        duration_s=None
        if args.duration is None
        else _number(args.duration, "--duration", lambda x: x > 0, "seconds > 0"),
        rate_scale=_number(args.rate_scale, "--rate-scale", lambda x: x > 0, "a positive number"),
        seed=int(seed),
        speedup=_number(args.speedup, "--speedup", lambda x: x > 0, "a positive number (1: real time)"),
        max_duration_s=None
        if args.max_duration_s is None
        else _number(args.max_duration_s, "--max-duration-s", lambda x: x > 0, "seconds > 0"),
        timeout_s=_number(args.timeout_s, "--timeout-s", lambda x: x > 0, "seconds > 0"),
        concurrency_limit=int(concurrency),
        model=args.model,
        profile=existing_file(args.profile, "--profile", "a dynamollm.profile/v1 JSON file"),
        json_path=writable_json(args.json),
        per_request=bool(args.per_request),
        output=args.output,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    opts = validate(args)
    trace = _trace(opts)
    slos = _slos(opts)
    return asyncio.run(_run(opts, trace, slos))


def _trace(opts: _Options) -> Trace:
    """The trace window, resolved exactly as `dctl simulate` resolves --trace."""
    from controller.sim.compare import resolve_trace

    with named_by("--trace-dir" if opts.trace.startswith(WEEK_PREFIX) else "--trace"):
        return resolve_trace(
            opts.trace,
            trace_dir=opts.trace_dir,
            rate_scale=opts.rate_scale,
            start_s=opts.start_s,
            duration_s=opts.duration_s,
            seed=opts.seed,
        )


def _slos(opts: _Options) -> dict[str, ClassSlo]:
    """The per-class SLOs of --profile (or the built-in profile); all nine classes are needed."""
    from controller.model.classes import CLASS_NAMES
    from controller.profiles import default_profile, load_profile

    if opts.profile is not None:
        with named_by("--profile"):
            profile = load_profile(opts.profile)
    else:
        profile = default_profile(DEFAULT_SLO_MODEL, DEFAULT_SLO_GPU)
    missing = [name for name in CLASS_NAMES if name not in profile.class_names]
    if missing:
        raise InvalidArgumentError(
            "--profile",
            str(opts.profile),
            f"a profile of all nine request classes (this one lacks {', '.join(missing)})",
        )
    return {name: profile.slo(name) for name in CLASS_NAMES}


async def _run(opts: _Options, trace: Trace, slos: dict[str, ClassSlo]) -> int:
    import aiohttp

    from controller.loadgen import (
        ReplayConfig,
        build_report,
        format_table,
        probe,
        replay,
        requests_from_trace,
    )
    from controller.textfiles import write_text_atomic

    t0 = time.perf_counter()
    requests = requests_from_trace(trace, opts.speedup)
    connector = aiohttp.TCPConnector(limit=opts.concurrency_limit)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        info = await probe(session, opts.url, opts.model)
        config = ReplayConfig(
            url=opts.url,
            model=info.model,
            speedup=opts.speedup,
            timeout_s=opts.timeout_s,
            max_duration_s=opts.max_duration_s,
            concurrency_limit=opts.concurrency_limit,
            max_model_len=info.max_model_len,
            slos=slos,
        )
        print(
            f"dctl load: replaying {len(requests)} requests of {opts.trace} against {opts.url} "
            f"(model {info.model}, speedup {opts.speedup:g})",
            file=sys.stderr,
            flush=True,
        )
        with _progress_bar(len(requests), opts.progress) as progress:
            result = await replay(requests, config, on_progress=progress, session=session)
    meta: dict[str, Any] = {
        "trace": opts.trace,
        "window": {"start_s": opts.start_s, "duration_s": trace.duration_s, "rate_scale": opts.rate_scale},
        "seed": opts.seed,
        "slo_source": str(opts.profile)
        if opts.profile
        else f"built-in {DEFAULT_SLO_MODEL} on {DEFAULT_SLO_GPU}",
    }
    report = build_report(result, config, meta=meta, include_requests=opts.per_request)
    report["command_wall_s"] = time.perf_counter() - t0
    text = json.dumps(report, indent=2, allow_nan=False)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(opts.json_path, text + "\n")
    echo(text if opts.output == "json" else format_table(report))
    return 0


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[Progress], None]]:
    """A tqdm bar over finished requests on stderr (drawn only on a terminal), with the sent count and
    the SLO met so far; tqdm shows the elapsed time."""
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="req",
        desc="load",
        file=sys.stderr,
        disable=None if enabled else True,  # None: draw only on a terminal
        leave=False,
    ) as bar:

        def progress(p: Progress) -> None:
            if p.done > bar.n:
                bar.update(p.done - bar.n)
            met = f"{p.slo_met}/{p.judged}" if p.judged else "-"
            bar.set_postfix_str(f"sent {p.sent} done {p.done} SLO met {met}", refresh=False)

        yield progress
