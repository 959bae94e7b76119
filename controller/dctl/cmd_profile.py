"""`dctl profile`: generate a performance/energy profile on the simulated engine, or show one.

Where it sits: the operator-facing shell over `controller.sim.profiling` (measurement),
`controller.profiles` (files) and `controller.model.profile` (the data model). Heavy imports (numpy,
the simulator) happen inside the handlers so that `dctl --help` stays fast. Format: docs/profile-format.md.

    dctl profile generate --model llama2-70b --gpu h100-sxm --out FILE [--tp 2,4,8] [--clocks 800,...]
                          [--classes SS,...] [--seed N] [--jobs N]
    dctl profile show FILE [--class C] [--output table|json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.api.errors import InvalidArgumentError
from controller.dctl.files import named_by
from controller.dctl.output import echo

# generate_profile's parameter names -> the flags that set them, so errors name what the operator typed
_FLAG_FOR_FIELD = {
    "model": "--model",
    "gpu": "--gpu",
    "tp": "--tp",
    "tps": "--tp",
    "clocks_mhz": "--clocks",
    "classes": "--classes",
    "seed": "--seed",
    "jobs": "--jobs",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("profile", help="generate or show performance/energy profiles")
    sub = parser.add_subparsers(dest="profile_command", required=True, metavar="SUBCOMMAND")

    gen = sub.add_parser(
        "generate",
        help="measure a profile by running the simulated engine (all classes x TP x clocks x loads)",
        description="Measure p99 TTFT, p99 TBT, power, energy per request and the SLO-meeting maximum load "
        "for each request class x TP degree x SM clock by running the simulated engine at several loads.",
    )
    gen.add_argument("--model", required=True, help="model name, e.g. llama2-70b")
    gen.add_argument("--gpu", required=True, help="GPU type, e.g. h100-sxm")
    gen.add_argument("--out", required=True, help="profile JSON file to write")
    gen.add_argument("--tp", default="2,4,8", help="comma-separated TP degrees (default: 2,4,8)")
    gen.add_argument("--clocks", default=None, help="comma-separated SM clocks in MHz (default: the GPU's)")
    gen.add_argument("--classes", default=None, help="comma-separated request classes (default: all nine)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    gen.add_argument("--jobs", type=int, default=1, help="worker processes; results do not depend on it")
    gen.set_defaults(func=generate)

    show = sub.add_parser("show", help="print the SLO-meeting maximum load per (TP, clock) of a profile")
    show.add_argument("file", help="profile JSON file")
    show.add_argument("--class", dest="class_name", default=None, help="only this request class")
    show.add_argument("--output", choices=["table", "json"], default="table")
    show.set_defaults(func=show_profile)


def _int_list(flag: str, text: str, example: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(flag, text, f"comma-separated integers, e.g. {example}") from None
    return values


def generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from controller.model.classes import CLASS_NAMES
    from controller.profiles import save_profile
    from controller.sim.profiling import generate_profile

    tps = _int_list("--tp", args.tp, "2,4,8")
    clocks = None if args.clocks is None else _int_list("--clocks", args.clocks, "1200,1980")
    classes = list(CLASS_NAMES) if args.classes is None else args.classes.split(",")
    if args.jobs < 1:
        raise InvalidArgumentError("--jobs", args.jobs, ">= 1")
    if args.seed < 0:
        raise InvalidArgumentError("--seed", args.seed, ">= 0")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidArgumentError("--out", args.out, "a file in an existing directory")

    with tqdm(desc="profile", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            profile = generate_profile(
                args.model,
                args.gpu,
                tps=tps,
                clocks_mhz=clocks,
                classes=classes,
                seed=args.seed,
                jobs=args.jobs,
                progress=progress,
            )
        except InvalidArgumentError as err:
            flag = _FLAG_FOR_FIELD.get(err.field)
            if flag is None:
                raise
            raise InvalidArgumentError(flag, err.value, err.allowed) from None
    save_profile(profile, out)
    echo(
        f"wrote {out}: {len(profile.classes)} classes x TP {','.join(map(str, profile.tps))} x "
        f"{len(profile.clocks_mhz)} clocks ({','.join(map(str, profile.clocks_mhz))} MHz)"
    )
    return 0


def show_profile(args: argparse.Namespace) -> int:
    from controller.profiles import load_profile

    with named_by("profile file"):
        profile = load_profile(args.file)
    if args.class_name is None:
        names = list(profile.class_names)
    elif args.class_name in profile.class_names:
        names = [args.class_name]
    else:
        raise InvalidArgumentError("--class", args.class_name, profile.class_names)

    if args.output == "json":
        doc = {
            name: {
                "slo": {"ttft_s": profile.slo(name).ttft_s, "tbt_s": profile.slo(name).tbt_s},
                "max_load_rps": {
                    f"tp{tp}": {str(c): profile.max_load_rps(name, tp, c) for c in profile.clocks_mhz}
                    for tp in profile.tps
                },
            }
            for name in names
        }
        echo(json.dumps(doc, indent=2))
        return 0

    echo(
        f"profile {args.file}: {profile.model} on {profile.gpu}; max load (requests/s) meeting the class SLO"
    )
    header = "  TP \\ MHz" + "".join(f"{c:>9}" for c in profile.clocks_mhz)
    for name in names:
        slo = profile.slo(name)
        echo(f"\nclass {name}: SLO p99 TTFT {slo.ttft_s:.3g} s, p99 TBT {slo.tbt_s * 1e3:.3g} ms")
        echo(header)
        for tp in profile.tps:
            cells = []
            for c in profile.clocks_mhz:
                cfg = profile.config(name, tp, c)
                cells.append("-" if not cfg.load_rps else f"{cfg.max_load_rps:.3g}")
            echo(f"  TP{tp:<7}" + "".join(f"{cell:>9}" for cell in cells))
    echo("\n'-' = not servable: a request of the class does not fit in the KV cache")
    return 0
