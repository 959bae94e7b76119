"""`dctl simulate` end to end through `dctl`'s own entry point: a short synthetic run writes the report
and prints the table; bad flags and bad files exit 2 naming the flag, file or field, and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.dctl.main import main

SHORT = ["simulate", "--trace", "synthetic:conversation", "--policy", "singlepool", "--duration", "60"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_short_synthetic_run_writes_the_report_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sub" / "r.json"
    code, out, err = _run(capsys, *SHORT, "--json", str(path), "--seed", "4")
    assert code == 0, err
    report = json.loads(path.read_text())
    assert report["schema"] == "dynamollm.simreport/v1"
    assert report["policy"] == "singlepool" and report["trace"] == "synthetic:conversation"
    assert report["seed"] == 4
    assert 0 < report["completed"] <= report["requests"]
    assert report["reconfigurations"] == 0
    assert report["carbon_source"].startswith("constant 194 g/kWh (default")
    assert report["cost"]["gpu_usd_per_server_hour"] == 88.5
    assert report["workload"]["trace_spec"] == "synthetic:conversation"
    trials = report["workload"]["sizing"]["trials"]
    assert trials and trials[0]["instances"] == report["workload"]["sizing"]["peak_rule_instances"]
    chosen = report["plan"]["pools"][0]["instances"][0]["count"]
    assert {"instances": chosen, "slo_attainment": report["slo_attainment"]} in trials
    assert report["slo_attainment"] >= 0.99
    assert "SLO attainment" in out and "policy singlepool" in out and "sizing: smallest" in out
    for name in ("SS", "LL"):
        assert f"\n{name} " in out


def test_same_seed_same_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = []
    for name in ("a.json", "b.json"):
        code, _, err = _run(capsys, *SHORT, "--json", str(tmp_path / name), "--rate-scale", "0.5")
        assert code == 0, err
        report = json.loads((tmp_path / name).read_text())
        report.pop("wall_s")
        reports.append(report)
    assert reports[0] == reports[1]


def test_instances_flag_fixes_the_size(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, *SHORT, "--output", "json", "--instances", "5")
    assert code == 0, err
    r = json.loads(out)
    assert r["plan"]["gpus"] == 40 and r["avg_servers"] == 5.0
    assert r["workload"]["sizing"]["trials"] == []


def test_json_on_stdout_and_pricing_flags(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--carbon-g-per-kwh", "100", "--energy-usd-per-kwh", "0.2", "--gpu-usd-per-server-hour", "10"]
    code, out, err = _run(capsys, *SHORT, "--output", "json", *flags)
    assert code == 0, err
    r = json.loads(out)
    assert r["carbon_g"] == pytest.approx(r["energy_kwh"] * 100.0)
    assert r["cost"]["energy_usd"] == pytest.approx(r["energy_kwh"] * 0.2)
    assert r["cost"]["gpu_rental_usd"] == pytest.approx(r["avg_servers"] * r["duration_s"] / 3600.0 * 10.0)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--policy", "dynamo"], "--policy: got 'dynamo'; allowed: singlepool"),
        (["--rate-scale", "0"], "--rate-scale"),
        (["--rate-scale", "abc"], "--rate-scale"),
        (["--duration", "-5"], "--duration"),
        (["--start", "nan"], "--start"),
        (["--seed", "1.5"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--model", "gpt-5"], "--model: got 'gpt-5'; allowed: llama2-70b"),
        (["--gpu", "b200"], "--gpu: got 'b200'; allowed:"),
        (["--trace", "/no/such/trace.csv"], "--trace"),
        (["--trace", "synthetic:chat"], "--trace"),
        (["--profile", "/no/such/profile.json"], "--profile"),
        (["--carbon", "/no/such/carbon.csv"], "--carbon"),
        (["--prices", "/no/such/prices.csv"], "--prices"),
        (["--carbon-g-per-kwh", "-1"], "--carbon-g-per-kwh"),
        (["--energy-usd-per-kwh", "inf"], "--energy-usd-per-kwh"),
        (["--gpu-usd-per-server-hour", "-3"], "--gpu-usd-per-server-hour"),
        (["--max-drain", "0"], "--max-drain"),
        (["--output", "yaml"], "--output: got 'yaml'; allowed: table, json"),
        (["--instances", "0"], "--instances: got '0'; allowed: 1..512"),
        (["--instances", "2.5"], "--instances"),
        (["--slo-target", "1.5"], "--slo-target"),
        (["--slo-target", "0"], "--slo-target"),
        (["--out", "somewhere"], "--out: got 'somewhere'; allowed: only with --compare"),
        (["--trace", "azure-week:conv", "--trace-dir", "/no/such/dir"], "--trace-dir"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_and_write_nothing(
    flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    argv = [*SHORT, "--json", str(path)]
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("dctl simulate: error: ")
    assert named in err
    assert out == "" and not path.exists()


def test_json_into_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, *SHORT, "--json", str(tmp_path))
    assert code == 2 and "--json" in err


def test_a_window_past_the_end_of_a_trace_file_names_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0.0,10,20\n30.0,10,20\n")
    code, _, err = _run(capsys, "simulate", "--trace", str(trace), "--policy", "singlepool", "--start", "31")
    assert code == 2 and "--start" in err


def test_a_bad_trace_row_names_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n0.0,10,20\n1.0,x,20\n")
    code, _, err = _run(capsys, "simulate", "--trace", str(trace), "--policy", "singlepool")
    assert code == 2
    assert f"{trace}:3" in err and "input_tokens" in err


def test_a_profile_of_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.sim.profiling import default_profile, save_profile

    profile = default_profile("llama2-70b", "h100-sxm")
    path = tmp_path / "p.json"
    save_profile(profile, path)
    code, _, err = _run(capsys, *SHORT, "--profile", str(path), "--model", "llama3.1-8b")
    assert code == 2 and "--profile" in err and "llama3.1-8b" in err


def test_an_hourly_file_must_cover_the_trace(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    carbon = shared_data / "carbon"
    # the synthetic workload starts at the 2023 trace's real start, 2023-11-16 18:15 UTC
    code, out, err = _run(capsys, *SHORT, "--carbon", str(carbon / "US-CAL-CISO_2023_hourly.csv"))
    assert code == 0, err
    assert "US-CAL-CISO_2023_hourly.csv" in out
    code, out, err = _run(capsys, *SHORT, "--prices", str(carbon / "US-CAL-CISO_electricity_prices_2024.csv"))
    assert code == 2 and "2023-11-16" in err and out == ""


def test_a_profile_missing_classes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from controller.sim.profiling import default_profile, save_profile

    full = default_profile("llama2-70b", "h100-sxm")
    partial = replace(full, classes={k: v for k, v in full.classes.items() if k != "LL"})
    path = tmp_path / "p.json"
    save_profile(partial, path)
    code, _, err = _run(capsys, *SHORT, "--profile", str(path))
    assert code == 2 and "--profile" in err and "LL" in err


def test_compare_writes_reports_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--trace", "synthetic:conversation", "--duration", "120", "--no-progress"]
    code = main([*argv, "--compare", "scalefreq", "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    reports = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [r["policy"] for r in reports] == ["singlepool", "scalefreq"]
    assert "normalised to singlepool" in out
    assert (tmp_path / "cmp" / "power.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--compare", "nope", "--out", "x"], "--compare: got 'nope'"),
        (["--compare"], "--out: got None; allowed: a folder (required with --compare)"),
        (["--compare", "--out", "x", "--sizing-window", "0"], "--sizing-window"),
    ],
)
def test_bad_compare_flags_exit_2(flags: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--trace", "synthetic:conversation", "--no-progress", *flags])
    assert code == 2 and named in capsys.readouterr().err
