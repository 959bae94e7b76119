"""`dctl sweep`: the grid file checked key by key before anything runs, cells as the cross product with
stable folder names, each cell a real `dctl simulate --compare` child process; a second run skips the
cells already done (an interrupted sweep resumes), a cell whose run fails is reported, not marked done,
and tried again; one table, sweep.json and plot of the grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.api.errors import DataFileError, InvalidArgumentError
from controller.dctl.main import main
from controller.sim.sweep import Cell, load_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_cells_are_the_cross_product_with_stable_names(tmp_path: Path) -> None:
    grid = load_grid(
        _grid(
            tmp_path,
            'policies = ["dynamollm"]\ntraces = ["synthetic:coding", "/data/my trace.csv"]\n'
            'rate_scales = [1, 2.5]\nseeds = [3]\npredictor_accuracies = ["online", 0.8]\nduration_s = 600\n',
        )
    )
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 1 * 1 * 2
    assert cells[0] == Cell("synthetic:coding", 1.0, 3, "energy", None)
    assert cells[0].key == "synthetic-coding_x1_seed3_energy_online"
    assert cells[-1].key == "my-trace.csv_x2.5_seed3_energy_acc0.8"
    assert len({c.key for c in cells}) == len(cells)
    args = grid.simulate_args(cells[-1], tmp_path / "c")
    assert args[:5] == ["simulate", "--trace", "/data/my trace.csv", "--compare", "dynamollm"]
    assert (
        args[args.index("--predictor-accuracy") + 1] == "0.8"
        and args[args.index("--duration") + 1] == "600.0"
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('traces = ["synthetic:coding"]\n', "grid.policies"),
        ('policies = ["fast"]\ntraces = ["synthetic:coding"]\n', "grid.policies"),
        ('policies = ["bound"]\ntraces = ["synthetic:coding"]\n', "grid.policies"),
        ('policies = []\ntraces = ["synthetic:coding"]\n', "grid.policies"),
        ('policies = ["dynamollm"]\ntraces = ["synthetic:coding"]\nseeds = [1, 1]\n', "grid.seeds"),
        ('policies = ["dynamollm"]\ntraces = ["synthetic:coding"]\nseeds = [-1]\n', "grid.seeds"),
        ('policies = ["dynamollm"]\ntraces = ["synthetic:coding"]\nrate_scales = [0]\n', "grid.rate_scales"),
        (
            'policies = ["dynamollm"]\ntraces = ["synthetic:coding"]\nobjectives = ["speed"]\n',
            "grid.objectives",
        ),
        (
            'policies = ["dynamollm"]\ntraces = ["x"]\npredictor_accuracies = [1.5]\n',
            "grid.predictor_accuracies",
        ),
        ('policies = ["dynamollm"]\ntraces = ["x"]\nduration_s = "long"\n', "grid.duration_s"),
        ('policies = ["dynamollm"]\ntraces = ["x"]\nwhatever = 1\n', "grid.whatever"),
        ('policies = ["dynamollm"]\ntraces = ["a/t.csv", "b/t.csv"]\n', "grid.traces"),
    ],
)
def test_a_bad_grid_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        load_grid(_grid(tmp_path, text))
    assert refused.value.field == key


def test_a_file_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as refused:
        load_grid(_grid(tmp_path, 'policies = ["dynamollm"]\ntraces = [\n'))
    assert refused.value.path.endswith("grid.toml") and "not valid TOML" in str(refused.value)


def test_sweep_runs_resumes_and_reports_a_failing_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _grid(
        tmp_path,
        'policies = ["multipool"]\ntraces = ["synthetic:conversation", "/no/such/trace.csv"]\n'
        "seeds = [0, 1]\nduration_s = 60\n",
    )
    out = tmp_path / "out"
    code = main(["sweep", "--grid", str(grid), "--out", str(out), "--jobs", "2", "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 1  # the two cells of the missing trace failed
    assert stderr.count("FAILED") == 2 and "--trace" in stderr
    good = sorted(p.name for p in (out / "cells").iterdir() if (p / "done").is_file())
    assert good == [
        "synthetic-conversation_x1_seed0_energy_online",
        "synthetic-conversation_x1_seed1_energy_online",
    ]
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["schema"] == "dynamollm.sweep/v1" and doc["cells"] == 4 and len(doc["failed_cells"]) == 2
    assert [(r["seed"], r["policy"]) for r in doc["rows"]] == [
        (0, "singlepool"), (0, "multipool"), (1, "singlepool"), (1, "multipool")
    ]  # fmt: skip
    assert all(r["energy_x"] > 0 for r in doc["rows"]) and doc["rows"][0]["energy_x"] == 1.0
    assert stdout.splitlines()[0].startswith("cell") and len(stdout.splitlines()) == 5
    assert (out / "energy.png").read_bytes().startswith(PNG_MAGIC)

    report = out / "cells" / good[0] / "report.json"
    before = report.stat().st_mtime_ns
    (out / "cells" / good[1] / "done").unlink()  # as if the sweep had been cut off during that cell
    code = main(["sweep", "--grid", str(grid), "--out", str(out), "--no-progress"])
    _, stderr = capsys.readouterr()
    assert code == 1 and f"{good[0]}: done before, skipped" in stderr
    assert f"{good[1]}: done in" in stderr and report.stat().st_mtime_ns == before
    assert stderr.count("FAILED") == 2  # failed cells are tried again

    grid.write_text(grid.read_text().replace('["multipool"]', '["multipool", "scaleinst"]'))
    code = main(["sweep", "--grid", str(grid), "--out", str(out), "--no-progress"])
    _, stderr = capsys.readouterr()
    assert "skipped" not in stderr and report.stat().st_mtime_ns != before  # other policies: run again
    assert {r["policy"] for r in json.loads((out / "sweep.json").read_text())["rows"]} == {
        "singlepool", "multipool", "scaleinst"
    }  # fmt: skip


def test_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _grid(tmp_path, 'policies = ["dynamollm"]\ntraces = ["synthetic:coding"]\nbogus = 1\n')
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")]) == 2
    assert "grid.bogus" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["sweep", "--grid", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_sweep_on_a_local_ray_instance_gives_the_rows_of_a_local_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install '.[ray]')")
    grid = _grid(
        tmp_path,
        'policies = ["multipool"]\ntraces = ["synthetic:conversation"]\nseeds = [0, 1]\nduration_s = 60\n',
    )
    rows = {}
    for how, flags in (("here", ["--jobs", "2"]), ("ray", ["--ray", "local"])):
        code = main(["sweep", "--grid", str(grid), "--out", str(tmp_path / how), *flags, "--no-progress"])
        assert code == 0, capsys.readouterr().err
        rows[how] = json.loads((tmp_path / how / "sweep.json").read_text())["rows"]
    assert rows["ray"] == rows["here"] and len(rows["ray"]) == 4


def test_ray_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _grid(tmp_path, 'policies = ["multipool"]\ntraces = ["synthetic:conversation"]\n')
    code = main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o"), "--ray", "local", "--jobs", "2"])
    assert code == 2 and "--jobs: got '2'; allowed: only without --ray" in capsys.readouterr().err
