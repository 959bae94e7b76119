"""`dctl sweep`: a grid of `dctl simulate --compare` runs, resumable, across processes
(docs/simulator.md, *Sweeps*).

    dctl sweep --grid FILE.toml --out DIR [--jobs N | --ray ADDRESS] [--no-progress]

Flow: the grid is read and checked (`controller.sim.sweep.load_grid`; nothing runs on a bad one) -> each
cell is `dctl simulate --compare ...` in a child process of its own (`--jobs` at a time here, or as Ray tasks
on a Ray cluster with `--ray`, Ray being an optional extra), writing
DIR/cells/CELL/ (report.json, table.txt, plots; its stderr in simulate.log); a cell that ran to its end
(exit 0, or 1 when one of its policies could not run) gets a `done` marker holding the arguments it ran
with, and a later run skips it while its arguments are the same (a grid whose policies or window changed
runs it again), so an interrupted sweep resumes where it stopped; a cell whose run failed is reported and
tried again next time -> the rows of every done cell go to DIR/sweep.json (`dynamollm.sweep/v1`),
DIR/table.txt and DIR/energy.png, and the table to stdout. Exit 0 when every cell is done, 1 when some
failed. Progress ("[k/n] CELL: done in S s", skipped, FAILED) and a bar over cells on stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api.errors import InvalidArgumentError
from controller.dctl.cmd_simulate import jobs_count
from controller.dctl.output import echo

if TYPE_CHECKING:
    from controller.sim.sweep import Cell, Grid

DONE = "done"
CELLS = "cells"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of simulate --compare runs (policies x traces x rate scales x seeds x ...)",
        description=(
            "Run every cell of a grid (TOML: policies, traces, rate_scales, seeds, objectives, "
            "predictor_accuracies, duration_s, start_s) as a `dctl simulate --compare`, N at a time, "
            "skipping the cells a previous run finished; write one table and plot of the grid. "
            "Format: docs/simulator.md, Sweeps."
        ),
    )
    p.add_argument("--grid", required=True, metavar="FILE.toml", help="the grid")
    p.add_argument("--out", required=True, metavar="DIR", help="cells/, sweep.json, table.txt, energy.png")
    p.add_argument("--jobs", default="1", metavar="N", help="cells run at once, each a process (default 1)")
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the cells as tasks on this Ray cluster (`auto`, `ray://HOST:PORT`, or `local` for a Ray "
        "instance started here); DIR must be on a file system every node shares. Needs Ray: "
        "pip install 'dynamollm[ray]'",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controller.sim.sweep import SWEEP_SCHEMA, format_sweep_table, load_grid, plot_sweep, sweep_rows
    from controller.textfiles import write_text_atomic

    jobs = jobs_count(args.jobs)
    if args.ray is not None and jobs != 1:
        raise InvalidArgumentError("--jobs", args.jobs, "only without --ray (Ray schedules the cells)")
    ray = _ray(args.ray) if args.ray is not None else None
    grid_path = Path(args.grid)
    if not grid_path.is_file():
        raise InvalidArgumentError("--grid", args.grid, "an existing TOML file")
    grid = load_grid(grid_path)
    out = Path(args.out)
    cells = grid.cells()
    done, failed = _run_cells(grid, out, args.progress, _on_ray(ray, args.ray) if ray else _here(jobs))
    finished = [(cell, out / CELLS / cell.key) for cell in cells if cell.key in done]
    rows = sweep_rows(finished)
    doc = {
        "schema": SWEEP_SCHEMA,
        "grid": str(grid_path),
        "cells": len(cells),
        "failed_cells": failed,
        "rows": rows,
    }
    write_text_atomic(out / "sweep.json", json.dumps(doc, indent=2) + "\n")
    table = format_sweep_table(rows)
    write_text_atomic(out / "table.txt", table + "\n")
    if rows:
        plot_sweep(rows, out / "energy.png")
    echo(table)
    if failed:
        print(f"dctl sweep: {len(failed)} of {len(cells)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


Results = Iterator[tuple["Cell", tuple[bool, float, str]]]
Runner = Callable[["Grid", Sequence["Cell"], Path], Results]


def _run_cells(grid: Grid, out: Path, progress: bool, runner: Runner) -> tuple[set[str], list[str]]:
    """Every cell not yet done, through `runner`; (the keys of the done cells, those that failed)."""
    from tqdm import tqdm

    cells = grid.cells()
    done = {c.key for c in cells if _is_done(grid, c, out / CELLS / c.key)}
    todo = [c for c in cells if c.key not in done]
    total = len(cells)
    for cell in cells:
        if cell.key in done:
            print(f"dctl sweep: {cell.key}: done before, skipped", file=sys.stderr)
    failed: list[str] = []
    with tqdm(
        total=total, initial=len(done), unit="cell", file=sys.stderr, disable=None if progress else True
    ) as bar:
        for cell, (ok, wall_s, why) in runner(grid, todo, out):
            if ok:
                done.add(cell.key)
            else:
                failed.append(cell.key)
            state = f"done in {wall_s:.1f} s" if ok else f"FAILED after {wall_s:.1f} s: {why}"
            bar.write(f"dctl sweep: [{len(done) + len(failed)}/{total}] {cell.key}: {state}", file=sys.stderr)
            bar.update(1)
    return done, failed


def _here(jobs: int) -> Runner:
    """Cells as child processes of this one, `jobs` at a time."""

    def run(grid: Grid, todo: Sequence[Cell], out: Path) -> Results:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_run_cell, grid, cell, out / CELLS / cell.key): cell for cell in todo}
            for future in as_completed(futures):
                yield futures[future], future.result()

    return run


def _ray(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidArgumentError(
            "--ray", address, "an address, with Ray installed (pip install 'dynamollm[ray]')"
        ) from None
    return ray


def _on_ray(ray: Any, address: str) -> Runner:
    """Cells as Ray tasks (one CPU each), each running the cell's child process on its node."""

    def run(grid: Grid, todo: Sequence[Cell], out: Path) -> Results:
        try:
            ray.init(
                address=None if address == "local" else address, include_dashboard=False, log_to_driver=False
            )
        except Exception as exc:  # Ray raises many kinds for an address it cannot reach
            raise InvalidArgumentError(
                "--ray", address, f"the address of a running Ray cluster ({exc})"
            ) from None
        try:
            remote = ray.remote(num_cpus=1)(_run_cell)
            pending = {remote.remote(grid, cell, out / CELLS / cell.key): cell for cell in todo}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    yield pending.pop(ref), ray.get(ref)
        finally:
            ray.shutdown()

    return run


def _marker(grid: Grid, cell: Cell, out_dir: Path) -> str:
    """What a cell's `done` marker holds: the arguments it ran with (its folder's path left out)."""
    return json.dumps([a for a in grid.simulate_args(cell, out_dir) if a != str(out_dir)]) + "\n"


def _is_done(grid: Grid, cell: Cell, out_dir: Path) -> bool:
    """Done by a run with the same arguments: a grid whose policies or durations changed runs it again."""
    marker = out_dir / DONE
    return marker.is_file() and marker.read_text(errors="replace") == _marker(grid, cell, out_dir)


def _run_cell(grid: Grid, cell: Cell, out_dir: Path) -> tuple[bool, float, str]:
    """One cell's comparison in a child process; (done, wall seconds, why it failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE).unlink(missing_ok=True)
    started_s = time.perf_counter()
    with open(out_dir / "simulate.log", "wb") as log:
        child = subprocess.run(
            [sys.executable, "-m", "controller.dctl.main", *grid.simulate_args(cell, out_dir)],
            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    wall_s = time.perf_counter() - started_s
    # 1: the comparison ran and one of its policies could not (its report says which): the cell is done
    if child.returncode in (0, 1) and (out_dir / "report.json").is_file():
        (out_dir / DONE).write_text(_marker(grid, cell, out_dir))
        return True, wall_s, ""
    lines = (out_dir / "simulate.log").read_text(errors="replace").strip().splitlines()
    return False, wall_s, (lines[-1] if lines else f"exit status {child.returncode}")
