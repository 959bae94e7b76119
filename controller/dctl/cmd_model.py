"""`dctl model`: check the performance/energy model against public measurements, or show its parameters.

Where it sits: the operator-facing shell over `controller.sim.calibration` (which owns the data-set
readers and the split); the model itself lives in agent.sim.physics and is reached only through
controller.sim. Equations and the measured errors: docs/physics.md.

    dctl model validate [--data-dir DIR] [--json FILE]     exit 1 if a dataset misses its target
    dctl model show --model M --gpu G --tp N
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.api.errors import InvalidArgumentError, NotFoundError
from controller.dctl.output import echo

DATA_DIR_ENV = "DYNAMOLLM_SHARED_DATA"
VALIDATION_FORMAT = "dynamollm.model-validation/v1"


def default_data_dir() -> Path:
    """$DYNAMOLLM_SHARED_DATA, else ../shared/data relative to the current directory."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path("..") / "shared" / "data")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("model", help="validate or show the performance/energy model")
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")

    val = sub.add_parser(
        "validate",
        help="relative error of the model on the held-back rows of each calibration data set",
        description="Compare the fitted model with the held-back (validation) rows of the public calibration "
        "data (vidur, splitwise-sim, ML.ENERGY V3) and print n, median and max relative error per data set "
        "and quantity. Exit status 1 if a median error is above its target.",
    )
    val.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the public data set (default: ${DATA_DIR_ENV}, else ../shared/data)",
    )
    val.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    val.set_defaults(func=validate)

    show = sub.add_parser("show", help="print the fitted parameters of one instance as JSON")
    show.add_argument("--model", required=True, help="model name, e.g. llama2-70b")
    show.add_argument("--gpu", required=True, help="GPU type, e.g. h100-sxm")
    show.add_argument("--tp", required=True, type=int, help="tensor-parallel degree")
    show.set_defaults(func=show_model)


def format_table(rows: list[Any]) -> str:
    header = ("dataset", "quantity", "n", "median %", "max %", "target %", "ok")
    body = [
        (
            r.dataset,
            r.quantity,
            str(r.n),
            f"{100 * r.median_rel_err:.1f}",
            f"{100 * r.max_rel_err:.1f}",
            f"{100 * r.target:.0f}",
            "ok" if r.ok else "MISSED",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    numeric = {2, 3, 4, 5}

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    return "\n".join([fmt(header), *(fmt(line) for line in body)])


def validate(args: argparse.Namespace) -> int:
    from controller.sim.calibration import validate as run_validation

    data_dir: Path = args.data_dir if args.data_dir is not None else default_data_dir()
    if not data_dir.is_dir():
        raise NotFoundError(f"--data-dir: {data_dir} is not a directory (set --data-dir or ${DATA_DIR_ENV})")
    rows = run_validation(data_dir)
    echo(format_table(rows))
    if args.json is not None:
        doc = {
            "format": VALIDATION_FORMAT,
            "data_dir": str(data_dir),
            "rows": [
                {
                    "dataset": r.dataset,
                    "quantity": r.quantity,
                    "n": r.n,
                    "median_rel_err": r.median_rel_err,
                    "max_rel_err": r.max_rel_err,
                    "target": r.target,
                    "ok": r.ok,
                }
                for r in rows
            ],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    missed = [r for r in rows if not r.ok]
    for r in missed:
        print(f"target missed: {r.dataset} {r.quantity}", file=sys.stderr)
    return 1 if missed else 0


def show_model(args: argparse.Namespace) -> int:
    from controller.sim.calibration import model_summary

    try:
        summary = model_summary(args.model, args.gpu, args.tp)
    except InvalidArgumentError as err:  # name the flag the operator typed
        raise InvalidArgumentError(f"--{err.field}", err.value, err.allowed) from None
    echo(json.dumps(summary, indent=2))
    return 0
