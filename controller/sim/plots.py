"""PNG figures of a policy comparison (`dctl simulate --compare ... --out DIR`), drawn from reports.

Flow: `controller.sim.compare` runs the policies and writes report.json; these functions read the
reports' `timeseries` (`controller.sim.report`: per-bin cluster power, and per pool the instance counts
by (TP, clock) over time) and only draw and write files, so the figures can be redrawn from a saved
report.json. matplotlib is imported inside each function with the non-interactive Agg backend: importing
this module costs nothing and no display is ever needed.

Names a reader sees are explained where they appear: a pool is labelled with the request classes it
serves (`pool_label`: "ML (serves SS SM MS MM SL ML)"; a merged pool is named after its heaviest
class), read from the plan the run started with (the report's `plan`), and every figure showing pools
carries the one-line key of the class names (`class_key`: SS..LL = input bin x output bin, with the
token edges).
The table of `controller.sim.compare` and `dctl simulate` print the same two explanations.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from agent.api.errors import InvalidArgumentError
from controller.model.classes import BIN_NAMES, CLASS_NAMES, ClassBins

MixKind = Literal["tp", "clock"]

POWER_FILE = "power.png"
MIX_KINDS: tuple[MixKind, ...] = ("tp", "clock")
SECONDS_PER_HOUR = 3600.0
# Under every figure with pools, before the class key.
POOL_NOTE = (
    "Pools with the classes each serves at the start of the run (a merged pool is named after its heaviest "
    "class, the one an instance serves the fewest requests/s of; a dynamic policy may regroup classes at "
    "each cluster step)."
)
_DPI = 110


def class_key(bins: ClassBins | None = None) -> str:
    """One line saying what SS..LL mean, with the token edges of `bins` (default: the simulator's)."""
    b = bins or ClassBins()
    (i1, i2), (o1, o2) = b.input_edges_tokens, b.output_edges_tokens
    s, m, long_ = BIN_NAMES
    return (
        f"Request classes XY: X = input bin, Y = output bin; input {s} <{i1}, {m} <{i2}, {long_} >={i2} "
        f"tokens; output {s} <{o1}, {m} <{o2}, {long_} >={o2} tokens (e.g. {m}{long_} = medium prompt, "
        "long answer)"
    )


def pool_label(name: str, class_names: Sequence[str], *, at_start: bool = False) -> str:
    """A pool as a reader should see it: its name and the classes it serves when that is not obvious
    (`at_start`: say that the classes are those of the start of the run)."""
    classes = tuple(class_names)
    if classes == (name,):
        return name
    serves = "at start serves" if at_start else "serves"
    if set(classes) == set(CLASS_NAMES):
        return f"{name} ({serves} all nine classes)"
    return f"{name} ({serves} {' '.join(classes)})"


def pool_labels(report: Mapping[str, Any], *, at_start: bool = False) -> dict[str, str]:
    """Pool name -> `pool_label`, from the pools of the report's plan (the plan the run started with)."""
    pools = report.get("plan", {}).get("pools", [])
    return {p["name"]: pool_label(p["name"], p.get("class_names", ()), at_start=at_start) for p in pools}


def mix_file(policy: str, kind: MixKind) -> str:
    """File name of a policy's TP-mix or clock-mix figure."""
    return f"{policy}_{kind}_mix.png"


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(report: Mapping[str, Any]) -> Mapping[str, Any]:
    series = report.get("timeseries")
    if not series:
        raise InvalidArgumentError(
            f"report of {report.get('policy')}", "no timeseries", "a report with timeseries"
        )
    return series  # type: ignore[no-any-return]


def _time_axis(span_s: float) -> tuple[float, str]:
    """Hours for runs longer than two hours, minutes otherwise: (seconds per unit, label)."""
    return (SECONDS_PER_HOUR, "time (h)") if span_s > 2 * SECONDS_PER_HOUR else (60.0, "time (min)")


def plot_power(reports: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Cluster GPU power over time (kW, per-bin means), one line per policy."""
    if not reports:
        raise InvalidArgumentError("reports", [], "at least one report")
    plt = pyplot()
    unit_s, label = _time_axis(max(r["duration_s"] for r in reports))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    try:
        for r in reports:
            s = _series(r)
            bin_s = float(s["bin_s"])
            t = [(i + 0.5) * bin_s / unit_s for i in range(len(s["power_w"]))]
            ax.plot(t, [p / 1000.0 for p in s["power_w"]], label=r["policy"], linewidth=1.1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"cluster GPU power (kW, {float(_series(reports[0])['bin_s']):g}-s means)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        ax.set_title(f"{reports[0]['trace']}: cluster power")
        fig.tight_layout()
        fig.savefig(path, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    return path


def mix_counts(pool_series: Mapping[str, Any], kind: MixKind) -> dict[str, list[int]]:
    """A pool's instance counts per label ("TP4" or "1400 MHz") over its sample times, summed over the
    other knob, labels in numeric order."""
    if kind not in MIX_KINDS:
        raise InvalidArgumentError("kind", kind, MIX_KINDS)
    n = len(pool_series["t_s"])
    by_value: dict[int, list[int]] = {}
    for entry in pool_series["instances"]:
        value = int(entry["tp"] if kind == "tp" else entry["clock_mhz"])
        total = by_value.setdefault(value, [0] * n)
        for i, c in enumerate(entry["counts"]):
            total[i] += int(c)
    fmt = "TP{}" if kind == "tp" else "{} MHz"
    return {fmt.format(v): by_value[v] for v in sorted(by_value)}


def plot_mix(report: Mapping[str, Any], kind: MixKind, path: Path) -> Path:
    """One panel per pool: its instances by TP degree (`kind="tp"`) or by SM clock (`"clock"`), stacked,
    as steps from each sample time to the next (the last to the end of the run)."""
    pools: Mapping[str, Any] = _series(report)["pools"]
    if not pools:
        raise InvalidArgumentError(
            f"report of {report['policy']}", "no pools in timeseries", "at least one pool"
        )
    plt = pyplot()
    end_s = float(report["duration_s"])
    unit_s, label = _time_axis(end_s)
    fig, axes = plt.subplots(len(pools), 1, figsize=(9, 1.8 * len(pools) + 1.6), sharex=True, squeeze=False)
    mixes = {name: mix_counts(pool, kind) for name, pool in pools.items()}
    pool_names = pool_labels(report, at_start=True)
    # One colour per label across every panel, so "1400 MHz" looks the same in each pool.
    labels = sorted({k for m in mixes.values() for k in m}, key=_label_value)
    colours = {k: plt.get_cmap("tab20")(i % 20) for i, k in enumerate(labels)}
    try:
        for ax, (name, pool) in zip(axes[:, 0], pools.items(), strict=True):
            counts = mixes[name]
            if pool["t_s"] and counts:
                t = [x / unit_s for x in (*pool["t_s"], end_s)]
                ax.stackplot(
                    t,
                    *[[*c, c[-1]] for c in counts.values()],
                    labels=list(counts),
                    colors=[colours[k] for k in counts],
                    step="post",
                )
                ax.legend(loc="upper left", fontsize="x-small", ncol=min(len(counts), 8))
            shown = pool_names.get(name, f"{name} (formed during the run)")
            ax.set_ylabel(_wrap(f"pool {shown}", 18) + "\ninstances", fontsize="x-small")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel(label)
        what = "TP degree" if kind == "tp" else "SM clock"
        fig.suptitle(f"{report['policy']} on {report['trace']}: instances by {what}, per pool")
        fig.text(0.01, 0.005, _wrap(POOL_NOTE + " " + class_key(), 150), fontsize="x-small", va="bottom")
        fig.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))
        fig.savefig(path, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _label_value(label: str) -> int:
    """The number in a mix label ("TP4" -> 4, "1400 MHz" -> 1400), for numeric order."""
    return int("".join(ch for ch in label if ch.isdigit()))
