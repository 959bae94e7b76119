"""PNG figures of a policy comparison (`dctl simulate --compare ... --out DIR`), drawn from reports.

Flow: `controller.sim.compare` runs the policies and writes report.json; these functions read the
reports' `timeseries` (`controller.sim.report`: per-bin cluster power, and per pool the instance counts
by (TP, clock) over time) and only draw and write files, so the figures can be redrawn from a saved
report.json. matplotlib is imported inside each function with the non-interactive Agg backend: importing
this module costs nothing and no display is ever needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from agent.api.errors import InvalidArgumentError

MixKind = Literal["tp", "clock"]

POWER_FILE = "power.png"
MIX_KINDS: tuple[MixKind, ...] = ("tp", "clock")
SECONDS_PER_HOUR = 3600.0
_DPI = 110


def mix_file(policy: str, kind: MixKind) -> str:
    """File name of a policy's TP-mix or clock-mix figure."""
    return f"{policy}_{kind}_mix.png"


def _pyplot() -> Any:
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
    plt = _pyplot()
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
    plt = _pyplot()
    end_s = float(report["duration_s"])
    unit_s, label = _time_axis(end_s)
    fig, axes = plt.subplots(len(pools), 1, figsize=(9, 1.8 * len(pools) + 1.2), sharex=True, squeeze=False)
    mixes = {name: mix_counts(pool, kind) for name, pool in pools.items()}
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
            ax.set_ylabel(f"{name}\ninstances", fontsize="small")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel(label)
        what = "TP degree" if kind == "tp" else "SM clock"
        fig.suptitle(f"{report['policy']} on {report['trace']}: instances by {what}, per pool")
        fig.tight_layout()
        fig.savefig(path, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    return path


def _label_value(label: str) -> int:
    """The number in a mix label ("TP4" -> 4, "1400 MHz" -> 1400), for numeric order."""
    return int("".join(ch for ch in label if ch.isdigit()))
