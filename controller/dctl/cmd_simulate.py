"""`dctl simulate`: evaluate a cluster policy on a request trace with the cluster simulator (DESIGN §8).

Flow: validate every flag (nothing runs on a bad one) -> load trace, profile, carbon and price data
(controller.sim) -> `run_policy` (arrival statistics -> policy plan -> discrete-event simulation; a
static policy is sized by simulation to the smallest count meeting --slo-target unless --instances is
given; a progress bar over simulated time on stderr) -> `build_report` -> JSON written atomically (`--json`)
and a table (or the JSON, `--output json`) on stdout. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api.errors import InvalidArgumentError

if TYPE_CHECKING:
    from controller.sim.carbon import CarbonSource, PriceSource
    from controller.sim.report import Pricing

# Names of controller.policy.policies.POLICIES (listed here so that --help and validation need no heavy
# import; tests/sim/test_cmd_simulate.py checks they agree).
POLICIES = ("singlepool", "multipool", "scaleinst", "scaleshard", "scalefreq", "dynamollm", "oracle")
TRACE_FORMS = "a trace CSV file, synthetic:conversation, synthetic:coding, azure-week:conv, azure-week:code"
WEEK_PREFIX = "azure-week:"  # controller.sim.week.WEEK_SPEC_PREFIX, repeated to keep --help import-light
DEFAULT_TRACE_DIR = Path("..") / "shared" / "data" / "traces"
DEFAULT_MODEL = "llama2-70b"
DEFAULT_GPU = "h100-sxm"
# DESIGN §8 (after the DynamoLLM paper's cost model): rental of one 8-GPU H100 server for one hour.
DEFAULT_GPU_USD_PER_SERVER_HOUR = 88.5
# Mean of the hourly CAISO price over 2024, 40.67 USD/MWh (../shared/data/carbon/
# US-CAL-CISO_electricity_prices_2024.csv, HewlettPackard/sustain-cluster).
DEFAULT_ENERGY_USD_PER_KWH = 0.0407
# Mean direct carbon intensity of CAISO over 2023, 193.96 gCO2eq/kWh (../shared/data/carbon/
# US-CAL-CISO_2023_hourly.csv, Electricity Maps via sustain-cluster): the year of the Azure 2023 traces.
DEFAULT_CARBON_G_PER_KWH = 194.0
DEFAULT_MAX_DRAIN_S = 600.0
# Share of requests that must meet both latency targets of their class (the bar for "SLO met").
DEFAULT_SLO_TARGET = 0.99


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a cluster policy on a request trace and report energy, latency, carbon, cost",
        description=(
            "Replay a request trace over a simulated cluster of DGX H100 servers run by a policy, and "
            "report GPU energy, TTFT/TBT percentiles, SLO attainment, carbon and cost "
            "(dynamollm.simreport/v1). Definitions: docs/simulator.md."
        ),
    )
    p.add_argument(
        "--trace", required=True, metavar="PATH|synthetic:conversation|synthetic:coding|azure-week:conv|code"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", metavar="|".join(POLICIES))
    which.add_argument(
        "--compare",
        nargs="*",
        metavar="POLICY",
        help="run these policies (none: all) and singlepool on the same trace; needs --out DIR",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="with --compare: report.json, table.txt and PNG plots"
    )
    p.add_argument(
        "--trace-dir",
        default=str(DEFAULT_TRACE_DIR),
        metavar="DIR",
        help=f"where azure-week:conv|code finds its source files (default {DEFAULT_TRACE_DIR})",
    )
    p.add_argument(
        "--sizing-window",
        default=None,
        metavar="S",
        help="with --compare: size static policies on the busiest S seconds, then run once (week traces)",
    )
    p.add_argument("--rate-scale", default="1.0", metavar="X", help="multiply the request rate (default 1)")
    p.add_argument("--start", default="0", metavar="S", help="window start in the trace, seconds (default 0)")
    p.add_argument(
        "--duration", default=None, metavar="S", help="window length, seconds (default: to the end)"
    )
    p.add_argument("--seed", default="0", metavar="N", help="seed of every random draw (default 0)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"served model (default {DEFAULT_MODEL})")
    p.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU type (default {DEFAULT_GPU})")
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="dynamollm.profile/v1 file (default: the committed one)",
    )
    carbon = p.add_mutually_exclusive_group()
    carbon.add_argument(
        "--carbon", default=None, metavar="FILE", help="hourly carbon intensity CSV (Electricity Maps format)"
    )
    carbon.add_argument(
        "--carbon-g-per-kwh",
        default=None,
        metavar="X",
        help=f"constant carbon intensity (default {DEFAULT_CARBON_G_PER_KWH}: CAISO 2023 mean)",
    )
    price = p.add_mutually_exclusive_group()
    price.add_argument("--prices", default=None, metavar="FILE", help="hourly energy price CSV (USD/MWh)")
    price.add_argument(
        "--energy-usd-per-kwh",
        default=None,
        metavar="X",
        help=f"constant energy price (default {DEFAULT_ENERGY_USD_PER_KWH}: CAISO 2024 mean)",
    )
    p.add_argument(
        "--gpu-usd-per-server-hour",
        default=str(DEFAULT_GPU_USD_PER_SERVER_HOUR),
        metavar="X",
        help=f"rental of one 8-GPU server for an hour (default {DEFAULT_GPU_USD_PER_SERVER_HOUR})",
    )
    p.add_argument(
        "--max-drain",
        default=str(DEFAULT_MAX_DRAIN_S),
        metavar="S",
        help=f"time after the trace for requests to finish before they count as incomplete "
        f"(default {DEFAULT_MAX_DRAIN_S:g})",
    )
    p.add_argument(
        "--instances",
        default=None,
        metavar="N",
        help="instance count of a static policy (default: the smallest count whose simulation meets "
        "--slo-target, searched from the profile-based peak sizing)",
    )
    p.add_argument(
        "--slo-target",
        default=str(DEFAULT_SLO_TARGET),
        metavar="X",
        help=f"SLO attainment a static policy is sized to meet (default {DEFAULT_SLO_TARGET})",
    )
    p.add_argument(
        "--predictor-accuracy",
        default=None,
        metavar="X",
        help="dynamic policies: route with the true output bin kept with probability X in [0, 1] "
        "(default: the online learned predictor)",
    )
    p.add_argument(
        "--periods",
        default=None,
        metavar="CLUSTER,POOL,INSTANCE",
        help="dynamic policies: control periods in seconds (default 1800,300,5)",
    )
    p.add_argument(
        "--fast-reshard",
        action="store_true",
        help="dynamic policies: TP changes by GPU-to-GPU re-shard (~50 ms) instead of drain + restart",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the report here (atomically)")
    p.add_argument("--output", default="table", metavar="table|json", help="stdout format (default table)")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (drawn on stderr when it is a terminal)"
    )
    p.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class _Options:
    """The validated flags."""

    trace: str
    policy: str | None
    compare: tuple[str, ...] | None
    out: Path | None
    trace_dir: Path
    sizing_window_s: float | None
    rate_scale: float
    start_s: float
    duration_s: float | None
    seed: int
    model: str
    gpu: str
    profile: Path | None
    carbon: Path | None
    carbon_g_per_kwh: float | None
    prices: Path | None
    energy_usd_per_kwh: float | None
    gpu_usd_per_server_hour: float
    max_drain_s: float
    instances: int | None
    slo_target: float
    predictor_accuracy: float | None
    periods: tuple[float, float, float] | None
    fast_reshard: bool
    json_path: Path | None
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


def _existing_file(value: str | None, flag: str, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise InvalidArgumentError(flag, value, f"an existing {what}")
    return path


def _periods(value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    allowed = "three seconds CLUSTER,POOL,INSTANCE with 0 < INSTANCE <= POOL <= CLUSTER"
    parts = value.split(",")
    if len(parts) != 3:
        raise InvalidArgumentError("--periods", value, allowed)
    cluster_s, pool_s, instance_s = (_number(x, "--periods", lambda v: v > 0, allowed) for x in parts)
    if not instance_s <= pool_s <= cluster_s:
        raise InvalidArgumentError("--periods", value, allowed)
    return cluster_s, pool_s, instance_s


def _writable_json(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    allowed = "a file path in a writable folder"
    if path.is_dir():
        raise InvalidArgumentError("--json", value, allowed)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # missing folders are created on write: the first existing one decides
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise InvalidArgumentError("--json", value, allowed)
    return path


def validate(args: argparse.Namespace, model_names: tuple[str, ...], gpu_names: tuple[str, ...]) -> _Options:
    """Every flag checked before any work starts; InvalidArgumentError names the first bad one."""
    if args.policy is not None and args.policy not in POLICIES:
        raise InvalidArgumentError("--policy", args.policy, POLICIES)
    for name in args.compare or ():
        if name not in POLICIES:
            raise InvalidArgumentError("--compare", name, POLICIES)
    if args.compare is not None and args.out is None:
        raise InvalidArgumentError("--out", None, "a folder (required with --compare)")
    if args.compare is None and args.out is not None:
        raise InvalidArgumentError("--out", args.out, "only with --compare")
    if args.compare is None and args.sizing_window is not None:
        raise InvalidArgumentError("--sizing-window", args.sizing_window, "only with --compare")
    trace_dir = Path(args.trace_dir)
    if args.model not in model_names:
        raise InvalidArgumentError("--model", args.model, model_names)
    if args.gpu not in gpu_names:
        raise InvalidArgumentError("--gpu", args.gpu, gpu_names)
    if args.output not in ("table", "json"):
        raise InvalidArgumentError("--output", args.output, ("table", "json"))
    trace = str(args.trace)
    if trace.startswith(WEEK_PREFIX) and not trace_dir.is_dir():
        raise InvalidArgumentError("--trace-dir", str(trace_dir), "a folder with the Azure trace files")
    if not trace.startswith(("synthetic:", WEEK_PREFIX)) and not Path(trace).is_file():
        raise InvalidArgumentError("--trace", trace, TRACE_FORMS)
    seed = _number(args.seed, "--seed", lambda x: x >= 0 and x == int(x), "an integer >= 0")
    return _Options(
        trace=trace,
        policy=args.policy,
        compare=None if args.compare is None else tuple(args.compare),
        out=None if args.out is None else Path(args.out),
        trace_dir=trace_dir,
        sizing_window_s=None
        if args.sizing_window is None
        else _number(args.sizing_window, "--sizing-window", lambda x: x > 0, "seconds > 0"),
        rate_scale=_number(args.rate_scale, "--rate-scale", lambda x: x > 0, "a positive number"),
        start_s=_number(args.start, "--start", lambda x: x >= 0, "seconds >= 0"),
        duration_s=None
        if args.duration is None
        else _number(args.duration, "--duration", lambda x: x > 0, "seconds > 0"),
        seed=int(seed),
        model=args.model,
        gpu=args.gpu,
        profile=_existing_file(args.profile, "--profile", "dynamollm.profile/v1 JSON file"),
        carbon=_existing_file(args.carbon, "--carbon", "hourly carbon-intensity CSV file"),
        carbon_g_per_kwh=None
        if args.carbon_g_per_kwh is None
        else _number(args.carbon_g_per_kwh, "--carbon-g-per-kwh", lambda x: x >= 0, "a number >= 0"),
        prices=_existing_file(args.prices, "--prices", "hourly energy-price CSV file"),
        energy_usd_per_kwh=None
        if args.energy_usd_per_kwh is None
        else _number(args.energy_usd_per_kwh, "--energy-usd-per-kwh", lambda x: x >= 0, "a number >= 0"),
        gpu_usd_per_server_hour=_number(
            args.gpu_usd_per_server_hour, "--gpu-usd-per-server-hour", lambda x: x >= 0, "a number >= 0"
        ),
        max_drain_s=_number(args.max_drain, "--max-drain", lambda x: x > 0, "seconds > 0"),
        instances=None
        if args.instances is None
        # 512 = controller.sim.cluster.MAX_SEARCH_INSTANCES, repeated to keep --help import-light
        else int(_number(args.instances, "--instances", lambda x: 1 <= x <= 512 and x == int(x), "1..512")),
        slo_target=_number(args.slo_target, "--slo-target", lambda x: 0 < x <= 1, "a share in (0, 1]"),
        predictor_accuracy=None
        if args.predictor_accuracy is None
        else _number(
            args.predictor_accuracy, "--predictor-accuracy", lambda x: 0 <= x <= 1, "a share in [0, 1]"
        ),
        periods=_periods(args.periods),
        fast_reshard=bool(args.fast_reshard),
        json_path=_writable_json(args.json),
        output=args.output,
        progress=not args.no_progress,
    )


def _pricing(opts: _Options) -> Pricing:
    """Carbon and price sources from the flags, or the documented defaults, with their provenance."""
    from controller.sim.carbon import (
        CarbonIntensity,
        ConstantCarbonIntensity,
        ConstantEnergyPrice,
        EnergyPrice,
    )
    from controller.sim.report import Pricing

    carbon: CarbonSource
    price: PriceSource
    if opts.carbon is not None:
        carbon, carbon_source = CarbonIntensity.from_csv(opts.carbon), f"hourly {opts.carbon} (direct)"
    elif opts.carbon_g_per_kwh is not None:
        carbon = ConstantCarbonIntensity(opts.carbon_g_per_kwh)
        carbon_source = f"constant {opts.carbon_g_per_kwh:g} g/kWh"
    else:
        carbon = ConstantCarbonIntensity(DEFAULT_CARBON_G_PER_KWH)
        carbon_source = f"constant {DEFAULT_CARBON_G_PER_KWH:g} g/kWh (default: CAISO 2023 mean, direct)"
    if opts.prices is not None:
        price, price_source = EnergyPrice.from_csv(opts.prices), f"hourly {opts.prices}"
    else:
        usd_per_kwh = (
            DEFAULT_ENERGY_USD_PER_KWH if opts.energy_usd_per_kwh is None else opts.energy_usd_per_kwh
        )
        price = ConstantEnergyPrice(usd_per_kwh * 1000.0)
        price_source = f"constant {usd_per_kwh:g} USD/kWh"
        if opts.energy_usd_per_kwh is None:
            price_source += " (default: CAISO 2024 mean)"
    return Pricing(
        carbon=carbon,
        carbon_source=carbon_source,
        energy_price=price,
        energy_price_source=price_source,
        gpu_usd_per_server_hour=opts.gpu_usd_per_server_hour,
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from tqdm import tqdm

    from controller.model.classes import CLASS_NAMES
    from controller.model.state import Periods
    from controller.policy.base import DynamicPolicy
    from controller.policy.policies import make_policy
    from controller.sim.cluster import GPU_NAMES, MODEL_NAMES, SimConfig, check_profile_engine, run_policy
    from controller.sim.compare import format_compare_table, resolve_trace, run_compare, sizing_json
    from controller.sim.profiling import default_profile, load_profile
    from controller.sim.report import build_report, check_pricing_covers, format_table, write_report

    opts = validate(args, tuple(MODEL_NAMES), tuple(GPU_NAMES))
    profile = load_profile(opts.profile) if opts.profile else default_profile(opts.model, opts.gpu)
    profile_name = str(opts.profile) if opts.profile else "the built-in profile"
    if (profile.model, profile.gpu) != (opts.model, opts.gpu):
        raise InvalidArgumentError(
            "--profile",
            profile_name,
            f"a profile of --model {opts.model} on --gpu {opts.gpu} "
            f"(this one: {profile.model} on {profile.gpu})",
        )
    missing = [name for name in CLASS_NAMES if name not in profile.class_names]
    if missing:
        allowed = f"a profile of all nine request classes (this one lacks {', '.join(missing)})"
        raise InvalidArgumentError("--profile", profile_name, allowed)
    periods = None if opts.periods is None else Periods(*opts.periods)
    config = SimConfig(
        seed=opts.seed,
        max_drain_s=opts.max_drain_s,
        predictor_accuracy=opts.predictor_accuracy,
        periods=periods,
        fast_reshard=opts.fast_reshard,
    )
    check_profile_engine(profile, config.engine, profile_name)
    pricing = _pricing(opts)
    trace = resolve_trace(
        opts.trace,
        trace_dir=opts.trace_dir,
        rate_scale=opts.rate_scale,
        start_s=opts.start_s,
        duration_s=opts.duration_s,
        seed=opts.seed,
    )
    # Bins up to the latest possible end: the trace, the whole drain allowance, one last iteration.
    check_pricing_covers(
        pricing,
        trace.start_unix_s,
        trace.duration_s + opts.max_drain_s + config.power_bin_s,
        config.power_bin_s,
    )
    if opts.compare is not None:
        assert opts.out is not None  # validate() requires it
        outcome = run_compare(
            trace,
            opts.compare,
            profile,
            config=config,
            pricing=pricing,
            out_dir=opts.out,
            slo_target=opts.slo_target,
            sizing_window_s=opts.sizing_window_s,
            workload={"trace_spec": opts.trace, "rate_scale": opts.rate_scale, "start_s": opts.start_s},
            registry={name: partial(make_policy, name, periods=periods) for name in POLICIES},
        )
        print(format_compare_table(outcome.reports))
        return 0
    assert opts.policy is not None  # argparse: --policy or --compare
    policy = make_policy(opts.policy, periods=periods)
    dynamic = isinstance(policy, DynamicPolicy)

    total_s = max(1, math.ceil(trace.duration_s))
    with tqdm(
        total=total_s,
        unit="sim-s",
        desc="simulate",
        file=sys.stderr,
        # None: tqdm draws only on a terminal, so logs and pipes get no carriage-return noise
        disable=None if opts.progress else True,
        leave=False,
    ) as bar:

        def progress(now_s: float) -> None:
            if now_s < bar.n:  # the sizing search started another trial run
                bar.reset()
            bar.update(max(0, min(total_s, math.floor(now_s)) - bar.n))

        run = run_policy(
            trace,
            policy,
            profile,
            config=config,
            on_progress=progress,
            instances=opts.instances,
            slo_target=None if opts.instances is not None or dynamic else opts.slo_target,
        )
    result, stats = run.result, run.arrivals

    workload: dict[str, Any] = {
        "trace_spec": opts.trace,
        "rate_scale": opts.rate_scale,
        "start_s": opts.start_s,
        "peak_window_s": stats.window_s,
        "peak_rate_rps": stats.peak_rate_rps,
        "mean_rate_rps": stats.mean_rate_rps,
        "sizing": sizing_json(
            "--instances as given"
            if opts.instances is not None
            else "the dynamic policy's own initial plan"
            if dynamic
            else f"smallest instance count whose simulation meets slo_attainment >= {opts.slo_target:g}",
            run,
        ),
    }
    report = build_report(
        result,
        policy=policy.name,
        seed=opts.seed,
        model=opts.model,
        gpu=opts.gpu,
        slos={name: profile.slo(name) for name in profile.class_names},
        pricing=pricing,
        wall_s=time.perf_counter() - t0,
        workload=workload,
    )
    if opts.json_path is not None:
        write_report(report, opts.json_path)
    if opts.output == "json":
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0
