"""`dctl simulate`: evaluate a cluster policy on a request trace with the cluster simulator
(docs/simulator.md; where it sits in the system: docs/architecture.md).

Flow: validate every flag (nothing runs on a bad one; a named file that does not exist is reported as
not found) -> load trace, profile, carbon and price data (controller.sim, controller.profiles; a file
that is unreadable, binary or malformed is one error line naming the flag and the file) -> `run_policy`
(arrival statistics -> policy plan -> discrete-event simulation; a static policy is sized by simulation
to the smallest count meeting --slo-target unless --instances is given; a progress bar over simulated
time on stderr) -> `build_report` -> JSON written atomically (`--json`) and a table (or the JSON,
`--output json`) on stdout. `--compare` runs several policies through `controller.sim.compare`, with one
line per policy ("[i/n] policy") and its progress bar on stderr; a policy that cannot run is reported
and the others still run (exit 1). Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api.errors import InvalidArgumentError
from controller.dctl.files import existing_file, named_by, writable_json
from controller.dctl.output import echo

if TYPE_CHECKING:
    from collections.abc import Iterator

    from controller.model.profile import Profile
    from controller.policy.registry import PolicySettings
    from controller.sim.carbon import CarbonSource, PriceSource
    from controller.sim.cluster import ProgressCallback, SimConfig
    from controller.sim.report import Pricing
    from controller.sim.traces import Trace

# Names of controller.sim.policies.SIM_POLICIES (listed here so that --help and validation need no heavy
# import; tests/sim/test_cmd_simulate.py checks they agree), and `bound`, the fluid lower bound on energy
# (controller.sim.bound): computed, not simulated, in every --compare; `--policy bound` is refused.
POLICIES = ("singlepool", "multipool", "scaleinst", "scaleshard", "scalefreq", "dynamollm", "oracle", "bound")
TRACE_FORMS = (
    "a trace CSV file, synthetic:conversation, synthetic:coding, synthetic:long-context,"
    " synthetic:conversation-2day, azure-week:conv, azure-week:code"
)
WEEK_PREFIX = "azure-week:"  # controller.sim.week.WEEK_SPEC_PREFIX, repeated to keep --help import-light
DEFAULT_TRACE_DIR = Path("..") / "shared" / "data" / "traces"
DEFAULT_MODEL = "llama2-70b"
DEFAULT_GPU = "h100-sxm"
# controller.policy.objective's names and defaults, repeated to keep --help import-light (the tests
# check they agree). After the DynamoLLM paper's cost model (docs/evaluation.md): rental of one 8-GPU
# H100 server for an hour; the mean of the hourly CAISO price over 2024, 40.67 USD/MWh (CAISO price
# data via sustain-cluster).
OBJECTIVES = ("energy", "cost", "carbon")
DEFAULT_GPU_USD_PER_SERVER_HOUR = 88.5
DEFAULT_ENERGY_USD_PER_KWH = 0.0407
# Mean direct carbon intensity of CAISO over 2023, 193.96 gCO2eq/kWh (../shared/data/carbon/
# US-CAL-CISO_2023_hourly.csv, Electricity Maps via sustain-cluster): the year of the Azure 2023 traces.
DEFAULT_CARBON_G_PER_KWH = 194.0
DEFAULT_MAX_DRAIN_S = 600.0
# Share of requests that must meet both latency targets of their class (the bar for "SLO met").
DEFAULT_SLO_TARGET = 0.99
CARBON_FILE = "an hourly carbon-intensity CSV (Electricity Maps format)"
PRICE_FILE = "an hourly energy-price CSV (Datetime (UTC), Price (USD/MWh))"
EXIT_CODES = (
    "exit codes: 0 success; 1 with --compare, at least one policy could not run (the others ran and "
    "were written; its reason is on stderr, in the table and in report.json); 2 bad flags or input "
    "files; 3 a needed resource is unavailable; 4 internal error; 141 stdout closed by its reader "
    "(e.g. | head)"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a cluster policy on a request trace and report energy, latency, carbon, cost",
        description=(
            "Replay a request trace over a simulated cluster of DGX H100 servers run by a policy, and "
            "report GPU energy, TTFT/TBT percentiles, SLO attainment, carbon and cost "
            "(dynamollm.simreport/v1). Definitions: docs/simulator.md."
        ),
        epilog=EXIT_CODES,
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
        help="run these policies (none: all) and singlepool on the same trace; needs --out DIR. A policy "
        "that cannot run is reported (table, report.json, stderr), the others still run; exit status 1. "
        "Every comparison also reports 'bound', the fluid lower bound on energy (computed from the trace, "
        "not simulated): a table row and each policy's 'x bound'",
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
    p.add_argument(
        "--jobs",
        default="1",
        metavar="N",
        help="processes (default 1): with --compare the policies run in N processes; a static --policy "
        "sized by simulation runs its trial sizes in N processes, the next ones speculatively. The "
        "reports are the same as with 1",
    )
    p.add_argument("--rate-scale", default="1.0", metavar="X", help="multiply the request rate (default 1)")
    p.add_argument("--start", default="0", metavar="S", help="window start in the trace, seconds (default 0)")
    p.add_argument(
        "--duration", default=None, metavar="S", help="window length, seconds (default: to the end)"
    )
    p.add_argument("--seed", default="0", metavar="N", help="seed of every random draw (default 0)")
    p.add_argument(
        "--nodes",
        default=None,
        metavar="N",
        help="servers of 8 GPUs the cluster has: the policies' GPU budget and where instances are placed "
        "(default: as many as they need); e.g. a live fleet's count, to predict it",
    )
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
        "--objective",
        default=None,
        metavar="NAME",
        help="what dynamollm's pool MILP minimises: energy (default, or the --policy-config's), cost"
        " (server rental + energy, at the prices below) or carbon (decides as energy does: docs/control.md)",
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
    p.add_argument(
        "--reference-engine",
        action="store_true",
        help="run every engine iteration on its own, as the simulator did before it advanced over runs "
        "of decode-only iterations in one step: slower, the same report (the check of the fast path)",
    )
    p.add_argument(
        "--policy-config",
        default=None,
        metavar="FILE",
        help="TOML file of policy settings (knobs, [periods], [costs]; docs/control.md); flags win over it",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the report here (atomically)")
    p.add_argument(
        "--workload-stats",
        default=None,
        metavar="FILE",
        help="also write the trace's per-class request counts and peak rates (what the policies size "
        "from) as a dynamollm.workloadstats/v1 file: the controller's control.initial_workload",
    )
    p.add_argument("--output", default="table", metavar="table|json", help="stdout format (default table)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr: no progress bar (drawn only on a terminal) and, with --compare, no "
        "'[i/n] POLICY' lines (a policy that fails is still reported)",
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
    jobs: int
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
    objective: str | None
    max_drain_s: float
    nodes: int | None
    instances: int | None
    slo_target: float
    predictor_accuracy: float | None
    periods: tuple[float, float, float] | None
    fast_reshard: bool
    reference_engine: bool
    policy_config: Path | None
    json_path: Path | None
    workload_stats_path: Path | None
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


def jobs_count(value: str) -> int:
    """`--jobs N`: worker processes (`simulate --compare`, `sweep`)."""
    return int(_number(value, "--jobs", lambda x: x >= 1 and x == int(x), "a whole number of processes >= 1"))


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
    if args.compare is not None and args.json is not None:
        raise InvalidArgumentError(
            "--json", args.json, "only with --policy (--compare writes --out/report.json)"
        )
    if args.compare is None and args.sizing_window is not None:
        raise InvalidArgumentError("--sizing-window", args.sizing_window, "only with --compare")
    jobs = jobs_count(args.jobs)
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
    if not trace.startswith(("synthetic:", WEEK_PREFIX)):
        existing_file(trace, "--trace", TRACE_FORMS)
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
        jobs=jobs,
        rate_scale=_number(args.rate_scale, "--rate-scale", lambda x: x > 0, "a positive number"),
        start_s=_number(args.start, "--start", lambda x: x >= 0, "seconds >= 0"),
        duration_s=None
        if args.duration is None
        else _number(args.duration, "--duration", lambda x: x > 0, "seconds > 0"),
        seed=int(seed),
        model=args.model,
        gpu=args.gpu,
        profile=existing_file(args.profile, "--profile", "a dynamollm.profile/v1 JSON file"),
        carbon=existing_file(args.carbon, "--carbon", CARBON_FILE),
        carbon_g_per_kwh=None
        if args.carbon_g_per_kwh is None
        else _number(args.carbon_g_per_kwh, "--carbon-g-per-kwh", lambda x: x >= 0, "a number >= 0"),
        prices=existing_file(args.prices, "--prices", PRICE_FILE),
        energy_usd_per_kwh=None
        if args.energy_usd_per_kwh is None
        else _number(args.energy_usd_per_kwh, "--energy-usd-per-kwh", lambda x: x >= 0, "a number >= 0"),
        gpu_usd_per_server_hour=_number(
            args.gpu_usd_per_server_hour, "--gpu-usd-per-server-hour", lambda x: x >= 0, "a number >= 0"
        ),
        objective=None if args.objective is None else _objective(args.objective),
        max_drain_s=_number(args.max_drain, "--max-drain", lambda x: x > 0, "seconds > 0"),
        nodes=None
        if args.nodes is None
        else int(
            _number(args.nodes, "--nodes", lambda x: 1 <= x <= 512 and x == int(x), "an integer 1..512")
        ),
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
        reference_engine=bool(args.reference_engine),
        policy_config=existing_file(args.policy_config, "--policy-config", "a TOML file of policy settings"),
        json_path=writable_json(args.json),
        workload_stats_path=writable_json(args.workload_stats, "--workload-stats"),
        output=args.output,
        progress=not args.no_progress,
    )


def _objective(value: str) -> str:
    if value not in OBJECTIVES:
        raise InvalidArgumentError("--objective", value, OBJECTIVES)
    return value


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
        with named_by("--carbon"):
            carbon = CarbonIntensity.from_csv(opts.carbon)
        carbon_source = f"hourly {opts.carbon} (direct)"
    elif opts.carbon_g_per_kwh is not None:
        carbon = ConstantCarbonIntensity(opts.carbon_g_per_kwh)
        carbon_source = f"constant {opts.carbon_g_per_kwh:g} g/kWh"
    else:
        carbon = ConstantCarbonIntensity(DEFAULT_CARBON_G_PER_KWH)
        carbon_source = f"constant {DEFAULT_CARBON_G_PER_KWH:g} g/kWh (default: CAISO 2023 mean, direct)"
    if opts.prices is not None:
        with named_by("--prices"):
            price = EnergyPrice.from_csv(opts.prices)
        price_source = f"hourly {opts.prices}"
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


@contextlib.contextmanager
def _progress_bar(desc: str, total_s: float, enabled: bool) -> Iterator[ProgressCallback]:
    """A tqdm bar over simulated seconds on stderr (drawn only on a terminal); the callback restarts it
    when the sizing search starts another trial run."""
    from tqdm import tqdm

    total = max(1, math.ceil(total_s))
    with tqdm(
        total=total,
        unit="sim-s",
        desc=desc,
        file=sys.stderr,
        # None: tqdm draws only on a terminal, so logs and pipes get no carriage-return noise
        disable=None if enabled else True,
        leave=False,
    ) as bar:

        def progress(now_s: float) -> None:
            if now_s < bar.n:  # the sizing search started another trial run
                bar.reset()
            bar.update(max(0, min(total, math.floor(now_s)) - bar.n))

        yield progress


class _CompareProgress:
    """`--compare` on stderr: "[i/n] policy: running" and its progress bar (`bars`: one policy at a
    time; with --jobs the runs report only their start and end), then how it ended."""

    def __init__(self, total_s: float, enabled: bool, *, bars: bool = True) -> None:
        self._total_s = total_s
        self._enabled = enabled
        self._bars = bars
        self._bar: contextlib.ExitStack | None = None

    def policy_started(self, index: int, total: int, name: str) -> ProgressCallback | None:
        self._close_bar()
        if not self._enabled:
            return None
        print(f"dctl simulate: [{index}/{total}] {name}: running", file=sys.stderr, flush=True)
        if not self._bars:
            return None
        self._bar = contextlib.ExitStack()
        return self._bar.enter_context(_progress_bar(f"[{index}/{total}] {name}", self._total_s, True))

    def policy_finished(self, index: int, total: int, name: str, error: str | None, wall_s: float) -> None:
        self._close_bar()
        if error is not None:  # always said, also with --no-progress: the table comes only at the end
            print(
                f"dctl simulate: [{index}/{total}] {name}: FAILED after {wall_s:.1f} s: {error}",
                file=sys.stderr,
                flush=True,
            )
        elif self._enabled:
            print(
                f"dctl simulate: [{index}/{total}] {name}: done in {wall_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        """Take down a bar left open by a run that ended in an exception."""
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from dataclasses import replace

    from controller.model.cluster import GPUS_PER_SERVER
    from controller.sim.cluster import GPU_NAMES, MODEL_NAMES, SimConfig, check_profile_engine
    from controller.sim.report import check_pricing_covers

    opts = validate(args, tuple(MODEL_NAMES), tuple(GPU_NAMES))
    profile, profile_name = _profile(opts)
    config = SimConfig(
        seed=opts.seed,
        max_drain_s=opts.max_drain_s,
        predictor_accuracy=opts.predictor_accuracy,
        reference_engine=opts.reference_engine,
    )
    if opts.nodes is not None:
        config = replace(config, total_gpus=GPUS_PER_SERVER * opts.nodes, max_nodes=opts.nodes)
    check_profile_engine(profile, config.engine, profile_name)
    pricing = _pricing(opts)
    settings = _policy_settings(opts, pricing)
    trace = _trace(opts)
    # Bins up to the latest possible end: the trace, the whole drain allowance, one last iteration.
    check_pricing_covers(
        pricing,
        trace.start_unix_s,
        trace.duration_s + opts.max_drain_s + config.power_bin_s,
        config.power_bin_s,
    )
    if opts.workload_stats_path is not None:
        _write_workload_stats(opts.workload_stats_path, trace, profile, config)
    if opts.compare is not None:
        return _run_compare(opts, trace, profile, config, settings, pricing)
    return _run_one(opts, trace, profile, config, settings, pricing, t0)


def _write_workload_stats(path: Path, trace: Trace, profile: Profile, config: SimConfig) -> None:
    from controller.policy.base import arrival_stats_to_json
    from controller.sim.cluster import trace_arrival_stats
    from controller.textfiles import write_text_atomic

    doc = arrival_stats_to_json(trace_arrival_stats(trace, profile, config))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def _profile(opts: _Options) -> tuple[Profile, str]:
    """The profile named by --profile (or the built-in one of --model on --gpu), checked against them."""
    from controller.model.classes import CLASS_NAMES
    from controller.profiles import default_profile, load_profile

    if opts.profile is not None:
        with named_by("--profile"):
            profile = load_profile(opts.profile)
    else:
        profile = default_profile(opts.model, opts.gpu)
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
    return profile, profile_name


def _policy_settings(opts: _Options, pricing: Pricing) -> PolicySettings:
    """--policy-config, then --periods, --fast-reshard and --objective with the report's prices over it,
    for the simulated hardware. The cost objective prices energy at the mean of an hourly price file:
    rental outweighs energy some 400-fold, so the hour's price never changes its choice."""
    from dataclasses import replace

    from controller.model.state import Periods
    from controller.policy_files import load_policy_settings
    from controller.sim.carbon import EnergyPrice
    from controller.sim.policies import sim_settings

    base = None
    if opts.policy_config is not None:
        with named_by("--policy-config"):
            base = load_policy_settings(opts.policy_config)
    periods = None if opts.periods is None else Periods(*opts.periods)
    settings = sim_settings(
        opts.model, opts.gpu, periods=periods, fast_reshard=opts.fast_reshard or None, base=base
    )
    price = pricing.energy_price
    usd_per_mwh = (
        float(price.series.values.mean()) if isinstance(price, EnergyPrice) else price.usd_per_mwh_at(0.0)
    )
    objective = settings.objective if opts.objective is None else opts.objective
    if objective == "cost" and not usd_per_mwh > 0.0:
        flag = "--prices" if isinstance(price, EnergyPrice) else "--energy-usd-per-kwh"
        raise InvalidArgumentError(
            flag, usd_per_mwh / 1000.0, "a mean energy price > 0 USD/kWh with --objective cost"
        )
    return replace(
        settings,
        objective=objective,
        gpu_usd_per_server_hour=opts.gpu_usd_per_server_hour,
        energy_usd_per_kwh=usd_per_mwh / 1000.0,
    )


def _trace(opts: _Options) -> Trace:
    """The workload, with one warning line when some of it is beyond the model's context."""
    from controller.sim.cluster import beyond_context
    from controller.sim.compare import resolve_trace

    with named_by("--trace-dir" if opts.trace.startswith(WEEK_PREFIX) else "--trace"):
        trace = resolve_trace(
            opts.trace,
            trace_dir=opts.trace_dir,
            rate_scale=opts.rate_scale,
            start_s=opts.start_s,
            duration_s=opts.duration_s,
            seed=opts.seed,
        )
    refused = int(beyond_context(trace, opts.model).sum())
    if refused:
        print(
            f"dctl simulate: warning: {refused} of {len(trace)} requests exceed the context of {opts.model}"
            " (input + output tokens) and are refused at admission, for every policy (report: refused)",
            file=sys.stderr,
        )
    return trace


def _run_compare(
    opts: _Options,
    trace: Trace,
    profile: Profile,
    config: SimConfig,
    settings: PolicySettings,
    pricing: Pricing,
) -> int:
    """`--compare`: every policy on the trace, the table on stdout; 1 when a policy could not run."""
    from controller.sim.compare import format_compare_table, run_compare
    from controller.sim.policies import sim_policy

    assert opts.out is not None and opts.compare is not None  # validate() requires --out with --compare
    compare_progress = _CompareProgress(trace.duration_s, opts.progress, bars=opts.jobs == 1)
    try:
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
            registry={name: partial(sim_policy, name, settings) for name in POLICIES},
            progress=compare_progress,
            jobs=opts.jobs,
        )
    finally:
        compare_progress.close()
    echo(format_compare_table(outcome.entries))
    if outcome.failures:
        names = ", ".join(f.policy for f in outcome.failures)
        print(
            f"dctl simulate: {len(outcome.failures)} of {len(outcome.entries)} policies could not run "
            f"({names}); the others were written to {opts.out}",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_one(
    opts: _Options,
    trace: Trace,
    profile: Profile,
    config: SimConfig,
    settings: PolicySettings,
    pricing: Pricing,
    t0: float,
) -> int:
    """`--policy`: one policy's run, its report on stdout (table or JSON) and in --json."""
    from controller.policy.base import DynamicPolicy
    from controller.sim.cluster import run_policy
    from controller.sim.compare import pool_lines, sizing_json
    from controller.sim.policies import sim_policy
    from controller.sim.report import build_report, format_table
    from controller.textfiles import write_text_atomic

    assert opts.policy is not None  # argparse: --policy or --compare
    policy = sim_policy(opts.policy, settings)
    dynamic = isinstance(policy, DynamicPolicy)

    with _progress_bar("simulate", trace.duration_s, opts.progress) as progress:
        run = run_policy(
            trace,
            policy,
            profile,
            config=config,
            on_progress=progress,
            instances=opts.instances,
            slo_target=None if opts.instances is not None or dynamic else opts.slo_target,
            jobs=opts.jobs,
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
    text = json.dumps(report, indent=2, allow_nan=False)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(opts.json_path, text + "\n")
    if opts.output == "json":
        echo(text)
    else:
        echo("\n".join([format_table(report), "", *pool_lines([report])]))
    return 0
