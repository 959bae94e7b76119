"""`dctl simulate` end to end through `dctl`'s own entry point: a short synthetic run writes the report
and prints the table; bad flags and bad files exit 2 naming the flag, file or field, and write nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
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


def test_jobs_run_the_sizing_trials_in_processes_with_the_same_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = []
    for jobs in ("1", "3"):
        path = tmp_path / f"{jobs}.json"
        code, _, err = _run(capsys, *SHORT, "--duration", "300", "--json", str(path), "--jobs", jobs)
        assert code == 0, err
        report = json.loads(path.read_text())
        report.pop("wall_s")
        reports.append(report)
    assert reports[0] == reports[1]
    assert len(reports[0]["workload"]["sizing"]["trials"]) >= 2


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
        (["--objective", "speed"], "--objective: got 'speed'; allowed: energy, cost, carbon"),
        (["--objective", "cost", "--energy-usd-per-kwh", "0"], "--energy-usd-per-kwh"),
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
    from controller.profiles import default_profile, save_profile

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

    from controller.profiles import default_profile, save_profile

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
        (["--compare", "--out", "x", "--jobs", "0"], "--jobs: got '0'; allowed: a whole number of processes"),
        (["--compare", "--out", "x", "--jobs", "1.5"], "--jobs"),
    ],
)
def test_bad_compare_flags_exit_2(flags: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--trace", "synthetic:conversation", "--no-progress", *flags])
    assert code == 2 and named in capsys.readouterr().err


# ------------------------------------------------------------------ the CLI as a user runs it (subprocess)
ROOT = Path(__file__).resolve().parents[2]
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" + bytes(range(256)) * 8


def _dctl(*argv: str) -> subprocess.CompletedProcess[str]:
    """`dctl` in a child process with stdout and stderr as pipes, on the checkout under test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "controller.dctl.main", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("policy", ["dynamollm", "oracle"])
def test_json_stdout_parses_when_the_solver_prints_its_banner(policy: str) -> None:
    """HiGHS writes its banner to file descriptor 1 from C++: it must land on stderr, not in the JSON."""
    done = _dctl(*SHORT[:4], policy, "--duration", "60", "--output", "json", "--no-progress")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["policy"] == policy
    assert "HiGHS" in done.stderr  # the banner was printed, and went to stderr


def test_a_closed_stdout_exits_141_quietly() -> None:
    """`dctl ... | head` when head has already gone: no "bad input", no traceback, the SIGPIPE status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.dctl.main", *SHORT, "--duration", "30", "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before dctl writes its table
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "error" not in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--carbon", "--prices", "--profile", "--trace"])
def test_a_binary_file_is_one_line_naming_flag_and_file(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(BINARY)
    argv = [*SHORT, flag, str(path)]
    if flag == "--trace":
        argv[2] = str(path)
        argv = argv[:-2]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"dctl simulate: error: {flag} {path}")
    reason = err.split(str(path), 1)[1]  # (the test's folder name says "binary" too)
    assert "binary" in reason and len(err.strip().splitlines()) == 1 and len(err) < 400


@pytest.mark.parametrize("flag", ["--carbon", "--prices", "--profile", "--trace"])
def test_an_unreadable_file_is_one_line_naming_flag_and_file(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:  # a file this user may not read
        path = tmp_path / "secret.csv"
        path.write_text("x\n")
        path.chmod(0)
    elif Path("/proc/self/mem").exists():  # root reads every file; this one fails with EIO at offset 0
        path = Path("/proc/self/mem")
    else:
        pytest.skip("no unreadable file available to root here")
    argv = [*SHORT, flag, str(path)]
    if flag == "--trace":
        argv[2] = str(path)
        argv = argv[:-2]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"dctl simulate: error: {flag} {path}: cannot read: ")
    assert len(err.strip().splitlines()) == 1


def test_a_missing_trace_is_reported_as_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "trace.csv"
    code, out, err = _run(capsys, "simulate", "--trace", str(missing), "--policy", "singlepool")
    assert code == 2 and out == ""
    assert err.startswith(f"dctl simulate: error: --trace {missing}: not found")


def test_compare_says_which_policy_runs_i_of_n(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--trace", "synthetic:conversation", "--duration", "60"]
    code = main([*argv, "--compare", "multipool", "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[1/2] singlepool: running" in err and "[2/2] multipool: running" in err
    assert err.index("[1/2] singlepool") < err.index("[2/2] multipool")
    assert "[1/2]" not in out  # progress is stderr only


def _two_request_trace(tmp_path: Path) -> Path:
    # The request at the trace's end cannot finish within --max-drain 0.001 s on any cluster, so no
    # instance count reaches 99% attainment: singlepool cannot be sized, the other policies still run.
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,input_tokens,output_tokens\n0.0,100,50\n10.0,100,50\n")
    return path


def test_compare_survives_a_policy_that_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["simulate", "--trace", str(_two_request_trace(tmp_path)), "--max-drain", "0.001"]
    code, out, err = _run(capsys, *argv, "--compare", "dynamollm", "--out", str(out_dir))
    assert code == 1  # documented: a policy could not run
    entries = json.loads((out_dir / "report.json").read_text())
    assert [e["policy"] for e in entries] == ["singlepool", "dynamollm"]
    failure, report = entries
    assert failure["schema"] == "dynamollm.simfailure/v1" and failure["failed"] is True
    assert failure["error_type"] == "InvalidArgumentError" and "--slo-target" in failure["error"]
    assert report["schema"] == "dynamollm.simreport/v1" and report["requests"] == 2
    table = (out_dir / "table.txt").read_text()
    assert out.strip() == table.strip()
    assert "absolute figures only: singlepool (the baseline) failed" in table
    failed_row = next(line for line in table.splitlines() if line.startswith("singlepool"))
    assert "FAILED (InvalidArgumentError): --slo-target" in failed_row
    dynamo_row = next(line for line in table.splitlines() if line.startswith("dynamollm"))
    assert dynamo_row.split()[2] == "-"  # no ratio without the baseline
    for name in ("power.png", "dynamollm_tp_mix.png", "dynamollm_clock_mix.png"):
        assert (out_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert "singlepool: FAILED after" in err and "1 of 2 policies could not run (singlepool)" in err


def test_compare_files_are_readable_as_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "cmp"
    argv = ["simulate", "--trace", str(_two_request_trace(tmp_path)), "--compare", "multipool"]
    code, _, err = _run(capsys, *argv, "--out", str(out_dir), "--json", str(tmp_path / "unused.json"))
    assert code == 2 and "--json" in err  # --json is for --policy runs; nothing written
    code, _, err = _run(capsys, *argv, "--out", str(out_dir))
    assert code == 0, err
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out_dir.iterdir()}
    assert modes == {"report.json": expected, "table.txt": expected, "power.png": expected}, modes
    single = tmp_path / "single.json"
    code, _, err = _run(capsys, *SHORT, "--duration", "30", "--json", str(single))
    assert code == 0, err
    assert stat.S_IMODE(single.stat().st_mode) == expected


def test_tables_explain_class_names_and_pools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, *SHORT, "--duration", "30")
    assert code == 0, err
    assert "Request classes XY: X = input bin, Y = output bin; input S <256, M <1024, L >=1024 tokens" in out
    assert "singlepool  all (serves all nine classes)" in out
    out_dir = tmp_path / "cmp"
    argv = ["simulate", "--trace", "synthetic:conversation", "--duration", "60", "--compare", "dynamollm"]
    code, out, err = _run(capsys, *argv, "--out", str(out_dir))
    assert code == 0, err
    table = (out_dir / "table.txt").read_text()
    assert "Request classes XY" in table and "output S <100, M <350, L >=350 tokens" in table
    dynamo_pools = next(line for line in table.splitlines() if line.startswith("  dynamollm"))
    report = json.loads((out_dir / "report.json").read_text())[1]
    for pool in report["plan"]["pools"]:
        if pool["class_names"] != [pool["name"]]:
            assert f"{pool['name']} (serves {' '.join(pool['class_names'])})" in dynamo_pools


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 with --compare, at least one policy could not run" in out and "141 stdout closed" in out


def test_the_policy_names_of_help_are_the_simulators() -> None:
    from controller.dctl.cmd_simulate import POLICIES
    from controller.sim.policies import SIM_POLICIES

    assert set(POLICIES) == {*SIM_POLICIES, "bound"}  # bound: computed in every --compare, not simulated


def test_the_objective_names_and_prices_of_help_are_the_policys() -> None:
    from controller.dctl import cmd_simulate
    from controller.policy import objective

    assert cmd_simulate.OBJECTIVES == objective.OBJECTIVES
    assert cmd_simulate.DEFAULT_GPU_USD_PER_SERVER_HOUR == objective.DEFAULT_GPU_USD_PER_SERVER_HOUR
    assert cmd_simulate.DEFAULT_ENERGY_USD_PER_KWH == objective.DEFAULT_ENERGY_USD_PER_KWH


def test_a_request_beyond_the_context_is_refused_counted_and_warned_once(tmp_path: Path) -> None:
    """A 100,000-token prompt (Llama-2-70B takes 4,096) is never served: the run completes, the report
    counts it as refused, SLO attainment is over the rest, and stderr says so in one line."""
    rows = [f"{t * 0.5:.1f},{200 + t},{50}" for t in range(60)]
    rows.insert(10, "5.0,100000,100")
    trace = tmp_path / "long.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    for policy in ("dynamollm", "singlepool"):
        done = _dctl(
            "simulate", "--trace", str(trace), "--policy", policy, "--output", "json", "--no-progress"
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["refused"] == {"context_length": 1}
        assert report["admitted"] == 60 and report["requests"] == 61
        assert report["slo_attainment"] is not None and report["slo_attainment"] > 0.9
        warnings = [line for line in done.stderr.splitlines() if "refused at admission" in line]
        assert len(warnings) == 1 and "1 of 61 requests" in warnings[0]


def test_policy_settings_come_from_a_toml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "policy.toml"
    config.write_text("clock_headroom = 0.2\n[periods]\ncluster_s = 600\npool_s = 120\ninstance_s = 10\n")
    code, out, err = _run(
        capsys,
        *SHORT[:4],
        "dynamollm",
        "--duration",
        "300",
        "--output",
        "json",
        "--policy-config",
        str(config),
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["periods"] == {"cluster_s": 600.0, "pool_s": 120.0, "instance_s": 10.0}
    assert [d["t_s"] for d in report["decisions"] if d.get("level") == "pool"] == [120.0, 240.0]
    assert report["objective"] == "energy"
    # The file's objective holds unless --objective is given.
    config.write_text('objective = "cost"\n[periods]\npool_s = 120\n')
    args = (*SHORT[:4], "dynamollm", "--duration", "300", "--output", "json", "--policy-config", str(config))
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["objective"] == "cost"
    code, out, err = _run(capsys, *args, "--objective", "carbon")
    assert code == 0, err
    assert json.loads(out)["objective"] == "carbon"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("merge_fil = 1\n", "policy.merge_fil"),
        ("[costs]\nwarm_start_s = 'soon'\n", "costs.warm_start_s"),
        ("clock_headroom = 1.5\n", "policy.clock_headroom"),
        ("[periods\n", "not valid TOML"),
    ],
)
def test_a_bad_policy_config_exits_2_naming_the_key(
    text: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(text)
    code, out, err = _run(capsys, *SHORT, "--policy-config", str(config))
    assert code == 2 and named in err and out == ""
    config.write_bytes(BINARY)
    code, _, err = _run(capsys, *SHORT, "--policy-config", str(config))
    assert code == 2 and "--policy-config" in err and "binary" in err


def test_workload_stats_are_what_the_policies_size_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workload-stats writes the trace's per-class counts and peaks (requests beyond the context left
    out), in the form the controller's control.initial_workload reads back."""
    from controller.policy.base import arrival_stats_from_json

    path = tmp_path / "w" / "stats.json"
    code, out, err = _run(capsys, *SHORT, "--output", "json", "--workload-stats", str(path))
    assert code == 0, err
    stats = arrival_stats_from_json(json.loads(path.read_text()))
    r = json.loads(out)
    assert stats.requests == r["admitted"] and stats.duration_s == r["trace_duration_s"]
    assert stats.peak_rate_rps > 0 and sum(stats.peak_rate_rps_by_class) >= stats.peak_rate_rps
    code, _, err = _run(capsys, *SHORT, "--workload-stats", str(tmp_path))
    assert code == 2 and "--workload-stats" in err


def test_nodes_bounds_the_cluster_the_policies_plan_and_place_on(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["simulate", "--trace", "synthetic:conversation", "--policy", "dynamollm", "--duration", "300"]
    code, out, err = _run(capsys, *base, "--nodes", "2", "--output", "json")
    assert code == 0, err
    assert json.loads(out)["avg_servers"] <= 2.0
    code, _, err = _run(capsys, *base, "--nodes", "1")  # its first plan needs more than 8 GPUs
    assert code == 2 and "nodes: got 1" in err and "room for the first plan" in err
    code, _, err = _run(capsys, *base, "--nodes", "0")
    assert code == 2 and "--nodes" in err and "1..512" in err
