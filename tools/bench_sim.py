#!/usr/bin/env python3
"""Speed of the cluster simulator: `dctl simulate` on the one-hour Azure conversation trace and on a
slice of the Azure week.

    PYTHONPATH=. .venv/bin/python tools/bench_sim.py [--data-dir ../shared/data] [--mode both]
        [--sizing-jobs 2] [--week-slice-s 3600] [--week-policy dynamollm] [--engine both] [--profile N]

Says whether the simulated engines run compiled (tools/build_native.py) or as plain Python. Runs
`dctl simulate --policy singlepool` on traces/AzureLLMInferenceTrace_conv.csv (19,366 requests) in this
process (`main([...])`, imports already warm) and/or as a fresh subprocess (what a user waits for,
interpreter start-up included), and in this process with `--jobs N` (the sizing trials in N processes),
then prints the wall times, simulated requests per second and the sizing trials (singlepool is sized by
simulation: every trial runs inside the wall time), and the engine iterations of the final run. Then
(unless `--week-slice-s 0`) runs `--week-policy` on the first `--week-slice-s` seconds of
`azure-week:conv` in this process, with the reference engine (every iteration on its own, plain Python)
and with the simulator's engine (`--engine both`, the default), prints requests/s, engine iterations/s,
the ratio and whether the reports are identical, and the wall time of the last extrapolated to the whole
week, by simulated time and by request count (the week's load varies by hour and day: a slice's
extrapolation is an estimate). A benchmark, not a test: it prints figures and exits 0
(docs/architecture.md).

`--profile N` runs only the week slice, under cProfile, and prints the N functions with the most time of
their own and the N with the most cumulative time, per request and per engine iteration (the profiler
slows the run about 2x; the shares are what counts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRACE = Path("traces") / "AzureLLMInferenceTrace_conv.csv"
WEEK_TRACE = "azure-week:conv"
WEEK_S = 7 * 86400.0


def _argv(trace: Path | str, json_path: Path, policy: str) -> list[str]:
    return ["simulate", "--trace", str(trace), "--policy", policy, "--no-progress", "--json", str(json_path)]


def run_in_process(trace: Path | str, json_path: Path, policy: str, extra: tuple[str, ...] = ()) -> float:
    from controller.dctl.main import main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main([*_argv(trace, json_path, policy), *extra])
    wall_s = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"dctl simulate exited {code}")
    return wall_s


def run_subprocess(trace: Path, json_path: Path, policy: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "controller.dctl.main", *_argv(trace, json_path, policy)]
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wall_s = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"dctl simulate exited {done.returncode}: {done.stderr.strip()}")
    return wall_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--mode", choices=("in-process", "subprocess", "both"), default="both")
    parser.add_argument("--policy", default="singlepool")
    parser.add_argument(
        "--sizing-jobs",
        type=int,
        default=2,
        metavar="N",
        help="also run the hour with --jobs N: its sizing trials in N processes (default 2; 1: skip)",
    )
    parser.add_argument("--week-slice-s", type=float, default=3600.0, help="0: skip the week slice")
    parser.add_argument("--week-policy", default="dynamollm")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile the week slice")
    parser.add_argument(
        "--engine",
        choices=("both", "fast", "reference"),
        default="both",
        help="week slice: the simulator's engine (decode runs in one step), the reference engine (every "
        "iteration on its own), or both in this run, compared (default both)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.week_slice_s <= WEEK_S:
        parser.error(f"--week-slice-s: {args.week_slice_s} not in 0..{WEEK_S:.0f}")
    trace = args.data_dir / TRACE
    if not trace.is_file():
        parser.error(f"--data-dir: {trace} not found")

    if args.profile:
        if args.week_slice_s <= 0 or args.profile < 1:
            parser.error("--profile N (N >= 1) needs a week slice (--week-slice-s > 0)")
        profile_week_slice(args.data_dir, args.week_slice_s, args.week_policy, args.profile, args.engine)
        return 0
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}")
    from agent.sim.native import native_status

    print(f"simulated engines: {native_status()}")
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "report.json"
        walls: dict[str, float] = {}
        if args.mode in ("subprocess", "both"):
            walls["subprocess (interpreter start-up included)"] = run_subprocess(
                trace, json_path, args.policy
            )
        if args.mode in ("in-process", "both"):
            walls["in-process"] = run_in_process(trace, json_path, args.policy)
            if args.sizing_jobs > 1:
                parallel = Path(tmp) / "parallel.json"
                extra = ("--jobs", str(args.sizing_jobs))
                walls[f"in-process --jobs {args.sizing_jobs}"] = run_in_process(
                    trace, parallel, args.policy, extra
                )
                same = _without_wall(json.loads(parallel.read_text())) == _without_wall(
                    json.loads(json_path.read_text())
                )
                print(f"--jobs {args.sizing_jobs} report {'identical' if same else 'DIFFERS'} but for wall_s")
        report = json.loads(json_path.read_text())
    iterations = report["engine_iterations"]
    print(
        f"trace: {trace.name}: {report['requests']} requests ({report['admitted']} admitted, refused "
        f"{report['refused'] or 'none'}), {report['duration_s']:.0f} s simulated, "
        f"policy {report['policy']}, {report['plan']['gpus']} GPUs"
    )
    sizing = report["workload"]["sizing"]
    print(f"sizing trials (instances: SLO attainment): {sizing['trials']}")
    for mode, wall_s in walls.items():
        print(
            f"dctl simulate {mode}: {wall_s:.1f} s wall; {report['requests'] / wall_s:,.0f} requests/s, "
            f"{len(sizing['trials'])} simulations of the hour; final run {iterations:,} engine iterations"
        )
    print(f"report wall_s (load + simulate, inside dctl): {report['wall_s']:.1f} s")
    if args.week_slice_s > 0:
        engines = ("reference", "fast") if args.engine == "both" else (args.engine,)
        bench_week_slice(args.data_dir, args.week_slice_s, args.week_policy, engines)
    return 0


def _week_extra(data_dir: Path, slice_s: float, engine: str) -> tuple[str, ...]:
    extra = ("--duration", f"{slice_s:g}", "--trace-dir", str(data_dir / "traces"))
    return (*extra, "--reference-engine") if engine == "reference" else extra


def bench_week_slice(data_dir: Path, slice_s: float, policy: str, engines: tuple[str, ...]) -> None:
    """The first `slice_s` of the Azure week under `policy`, timed in this process with each engine, and
    the week extrapolated from the last by simulated time and by requests."""
    walls: dict[str, float] = {}
    reports: dict[str, dict[str, Any]] = {}
    for engine in engines:
        with tempfile.TemporaryDirectory() as tmp:
            json_path = Path(tmp) / "week.json"
            walls[engine] = run_in_process(
                WEEK_TRACE, json_path, policy, _week_extra(data_dir, slice_s, engine)
            )
            reports[engine] = json.loads(json_path.read_text())
        report, wall_s = reports[engine], walls[engine]
        iterations = report["engine_iterations"]
        print(
            f"week slice, {engine} engine: {WEEK_TRACE} first {slice_s:.0f} s, policy {policy}: "
            f"{report['requests']:,} requests, SLO attainment {report['slo_attainment']:.2%}, "
            f"{wall_s:.1f} s wall; {report['requests'] / wall_s:,.0f} requests/s, {iterations:,} engine "
            f"iterations ({iterations / wall_s:,.0f}/s)"
        )
    if len(walls) == 2:
        same = _without_wall(reports["fast"]) == _without_wall(reports["reference"])
        print(
            f"fast engine {walls['reference'] / walls['fast']:.2f}x the reference engine's requests/s "
            f"(target >= 5x); reports {'identical' if same else 'DIFFER'} but for wall_s"
        )
    from controller.sim.week import HOURLY_FILE, read_hourly_counts

    # The week's hourly counts (its arrivals are Poisson around them): no need to build 27 M requests.
    week_requests = sum(read_hourly_counts(data_dir / "traces" / HOURLY_FILE, "conv").requests)
    # The slice's load is not the week's (the first hours are a night): scale by requests as well.
    by_time_min = wall_s * WEEK_S / slice_s / 60
    by_requests_min = wall_s * week_requests / report["requests"] / 60
    print(
        f"week extrapolated (target: under 10 min): by simulated time {by_time_min:.1f} min; "
        f"by requests ({week_requests:,} in the week) {by_requests_min:.1f} min"
    )


def _without_wall(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "wall_s"}


def profile_week_slice(data_dir: Path, slice_s: float, policy: str, top: int, engine: str) -> None:
    """The week slice under cProfile: where the time goes, per request and per engine iteration."""
    import cProfile
    import pstats

    extra = _week_extra(data_dir, slice_s, "fast" if engine == "both" else engine)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "week.json"
        profiler.enable()
        wall_s = run_in_process(WEEK_TRACE, json_path, policy, extra)
        profiler.disable()
        report = json.loads(json_path.read_text())
    requests, iterations = report["requests"], report["engine_iterations"]
    print(
        f"profiled: {WEEK_TRACE} first {slice_s:.0f} s, policy {policy}: {requests:,} requests, "
        f"{iterations:,} engine iterations ({iterations / requests:.1f} per request), {wall_s:.1f} s wall "
        f"under the profiler ({wall_s / requests * 1e6:.0f} us per request, "
        f"{wall_s / iterations * 1e6:.1f} us per iteration)"
    )
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    total_s = sum(tt for (_, _, tt, _, _) in entries.values())
    for key, title in ((2, "own time"), (3, "cumulative time")):
        print(f"top {top} by {title}: share of the run, us per request, calls per request, function")
        rows = sorted(entries.items(), key=lambda kv: kv[1][key], reverse=True)[:top]
        for (path, line, name), values in rows:
            seconds, calls = values[key], values[1]
            where = f"{Path(path).name}:{line}({name})" if line else name
            share, per_request_us = seconds / total_s, seconds / requests * 1e6
            print(f"  {share:6.1%}  {per_request_us:8.1f}  {calls / requests:8.2f}  {where}")


if __name__ == "__main__":
    sys.exit(main())
