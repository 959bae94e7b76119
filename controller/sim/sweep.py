"""A grid of comparisons: `dctl sweep --grid FILE.toml --out DIR` (docs/simulator.md, *Sweeps*).

Flow: `load_grid` reads and checks the grid file (every key named in its error) -> `Grid.cells` is the
cross product of traces x rate scales x seeds x objectives x predictor accuracies, each cell one
`dctl simulate --compare` of the grid's policies (`Cell.simulate_args`) -> the caller
(`controller.dctl.cmd_sweep`) runs the cells, skipping those already done -> `sweep_rows` flattens the
cells' report.json files into one row per (cell, policy) with the ratios to the cell's baseline
(`normalised_rows`) -> `format_sweep_table` and `plot_sweep` show the grid. Pure but for reading the
grid and the reports and writing the plot.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.api.errors import DataFileError, InvalidArgumentError
from controller.policy.objective import OBJECTIVES
from controller.sim.bound import BOUND_NAME
from controller.sim.compare import DEFAULT_BASELINE, REPORT_FILE, is_failure, normalised_rows
from controller.sim.plots import pyplot
from controller.sim.policies import SIM_POLICIES
from controller.textfiles import read_text

SWEEP_SCHEMA = "dynamollm.sweep/v1"
_EXPECTED = "a TOML grid of dctl sweep (docs/simulator.md, Sweeps)"
ONLINE = "online"  # the predictor accuracy of a cell that uses the online learned predictor
_LISTS: Mapping[str, tuple[type, ...]] = {
    "policies": (str,),
    "traces": (str,),
    "rate_scales": (int, float),
    "seeds": (int,),
    "objectives": (str,),
    "predictor_accuracies": (int, float, str),
}
_NUMBERS = ("duration_s", "start_s")
_DEFAULTS: Mapping[str, list[Any]] = {
    "rate_scales": [1.0],
    "seeds": [0],
    "objectives": ["energy"],
    "predictor_accuracies": [ONLINE],
}


def _trace_name(trace: str) -> str:
    """A trace as a cell's folder names it: a file by its file name, a synthetic or week spec as written."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", Path(trace).name if "/" in trace else trace)


@dataclass(frozen=True, slots=True)
class Cell:
    """One comparison of the grid."""

    trace: str
    rate_scale: float
    seed: int
    objective: str
    predictor_accuracy: float | None  # None: the online predictor

    @property
    def key(self) -> str:
        """A name for its folder, the same in every run of the same grid (resuming relies on it)."""
        accuracy = ONLINE if self.predictor_accuracy is None else f"acc{self.predictor_accuracy:g}"
        return f"{_trace_name(self.trace)}_x{self.rate_scale:g}_seed{self.seed}_{self.objective}_{accuracy}"

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "rate_scale": self.rate_scale,
            "seed": self.seed,
            "objective": self.objective,
            "predictor_accuracy": self.predictor_accuracy,
        }


@dataclass(frozen=True, slots=True)
class Grid:
    policies: tuple[str, ...]
    traces: tuple[str, ...]
    rate_scales: tuple[float, ...]
    seeds: tuple[int, ...]
    objectives: tuple[str, ...]
    predictor_accuracies: tuple[float | None, ...]
    duration_s: float | None = None
    start_s: float = 0.0

    def cells(self) -> tuple[Cell, ...]:
        product = itertools.product(
            self.traces, self.rate_scales, self.seeds, self.objectives, self.predictor_accuracies
        )
        return tuple(Cell(*values) for values in product)

    def simulate_args(self, cell: Cell, out_dir: Path) -> list[str]:
        """`dctl simulate` arguments of `cell`'s comparison, written to `out_dir`."""
        args = ["simulate", "--trace", cell.trace, "--compare", *self.policies, "--out", str(out_dir)]
        args += [
            "--rate-scale",
            f"{cell.rate_scale!r}",
            "--seed",
            str(cell.seed),
            "--objective",
            cell.objective,
        ]
        args += ["--start", f"{self.start_s!r}", "--no-progress"]
        if self.duration_s is not None:
            args += ["--duration", f"{self.duration_s!r}"]
        if cell.predictor_accuracy is not None:
            args += ["--predictor-accuracy", f"{cell.predictor_accuracy!r}"]
        return args


def load_grid(path: Path) -> Grid:
    """The grid of a TOML file; DataFileError for a file that is not TOML, InvalidArgumentError naming
    the key (`grid.KEY`) for an unknown key or a bad value."""
    text = read_text(path, _EXPECTED)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = getattr(err, "lineno", None)
        raise DataFileError(str(path), line, None, f"not valid TOML: {err}; expected {_EXPECTED}") from None
    known = (*_LISTS, *_NUMBERS)
    for key in doc:
        if key not in known:
            raise InvalidArgumentError(f"grid.{key}", doc[key], f"one of the keys {', '.join(known)}")
    lists = {key: _list(doc, key) for key in _LISTS}
    names = [_trace_name(t) for t in lists["traces"]]
    if len(set(names)) != len(names):  # each cell's folder is named after its trace's file name
        raise InvalidArgumentError("grid.traces", lists["traces"], "traces whose file names differ")
    policies = tuple(n for n in SIM_POLICIES if n != BOUND_NAME)
    return Grid(
        policies=tuple(_checked("grid.policies", n, n in policies, policies) for n in lists["policies"]),
        traces=tuple(lists["traces"]),
        rate_scales=tuple(
            _checked("grid.rate_scales", float(x), math.isfinite(x) and x > 0, "positive numbers")
            for x in lists["rate_scales"]
        ),
        seeds=tuple(_checked("grid.seeds", x, x >= 0, "integers >= 0") for x in lists["seeds"]),
        objectives=tuple(
            _checked("grid.objectives", x, x in OBJECTIVES, OBJECTIVES) for x in lists["objectives"]
        ),
        predictor_accuracies=tuple(_accuracy(x) for x in lists["predictor_accuracies"]),
        duration_s=_seconds(doc, "duration_s", positive=True) if "duration_s" in doc else None,
        start_s=_seconds(doc, "start_s", positive=False) if "start_s" in doc else 0.0,
    )


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    value = doc.get(key, _DEFAULTS.get(key))
    if value is None:
        raise InvalidArgumentError(f"grid.{key}", None, "a non-empty list (required)")
    kinds = _LISTS[key]
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, kinds) for v in value)
    ):
        names = " or ".join(k.__name__ for k in kinds)
        raise InvalidArgumentError(f"grid.{key}", value, f"a non-empty list of {names}")
    if len(set(value)) != len(value):  # by value: 1 and 1.0 are one rate scale (and one cell folder)
        raise InvalidArgumentError(f"grid.{key}", value, "each value once")
    return value


def _checked(key: str, value: Any, ok: bool, allowed: str | tuple[str, ...]) -> Any:
    """`value`, or InvalidArgumentError naming `key` and `allowed` when it is not `ok`."""
    if not ok:
        raise InvalidArgumentError(key, value, allowed)
    return value


def _seconds(doc: Mapping[str, Any], key: str, *, positive: bool) -> float:
    value = doc[key]
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = number and (value > 0 if positive else value >= 0)
    return float(_checked(f"grid.{key}", value, ok, "seconds > 0" if positive else "seconds >= 0"))


def _accuracy(value: float | str) -> float | None:
    if value == ONLINE:
        return None
    if isinstance(value, str) or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError("grid.predictor_accuracies", value, f'shares in [0, 1] or "{ONLINE}"')
    return float(value)


# ---------------------------------------------------------------------------------------------- results


def sweep_rows(cells: Sequence[tuple[Cell, Path]], baseline: str = DEFAULT_BASELINE) -> list[dict[str, Any]]:
    """One row per (cell, policy) of the cells' report.json files (`dir` each), in grid order: the cell's
    parameters, the policy's figures and its ratios to the cell's baseline; a policy that could not run
    has `failed` and its error."""
    rows: list[dict[str, Any]] = []
    for cell, out_dir in cells:
        entries = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
        reports = [e for e in entries if not is_failure(e)]
        have_base = any(r["policy"] == baseline for r in reports)
        figures = {r.policy: r for r in normalised_rows(reports, baseline if have_base else None)}
        for entry in entries:
            row: dict[str, Any] = {"cell": cell.key, **cell.to_json(), "policy": entry["policy"]}
            if is_failure(entry):
                row.update(failed=True, error=entry["error"])
            else:
                f = figures[entry["policy"]]
                row.update(
                    failed=False, energy_kwh=f.energy_kwh, energy_x=f.energy_x, cost_x=f.cost_x,
                    carbon_x=f.carbon_x, slo_attainment=f.slo_attainment, energy_x_bound=f.energy_x_bound,
                    avg_servers=f.avg_servers,
                )  # fmt: skip
            rows.append(row)
    return rows


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The grid for a terminal: a line per (cell, policy), ratios to each cell's baseline."""
    header = f"{'cell':<52}{'policy':<12}{'energy kWh':>11}{'energy x':>9}{'cost x':>8}"
    header += f"{'SLO met':>9}{'x bound':>9}"
    lines = [header]
    for r in rows:
        if r["failed"]:
            lines.append(f"{r['cell']:<52}{r['policy']:<12}FAILED: {r['error']}")
            continue
        slo = "-" if r["slo_attainment"] is None else f"{100.0 * r['slo_attainment']:.2f}%"
        lines.append(
            f"{r['cell']:<52}{r['policy']:<12}{r['energy_kwh']:>11.3f}{_x(r['energy_x']):>9}"
            f"{_x(r['cost_x']):>8}{slo:>9}{_x(r['energy_x_bound']):>9}"
        )
    return "\n".join(lines)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Energy relative to each cell's baseline, a group of bars per cell, a bar per policy."""
    plt = pyplot()
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    value = {(r["cell"], r["policy"]): r.get("energy_x") for r in rows if not r["failed"]}
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cells) * max(1, len(policies)) * 0.5), 4.5))
    for i, policy in enumerate(policies):
        heights = [value.get((c, policy)) or 0.0 for c in cells]
        ax.bar([k + i * width for k in range(len(cells))], heights, width, label=policy)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([k + width * (len(policies) - 1) / 2 for k in range(len(cells))])
    ax.set_xticklabels(cells, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("energy / the cell's baseline")
    ax.set_title("dctl sweep: energy relative to each cell's baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
