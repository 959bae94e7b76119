"""Profile generation on the real physics model, the committed default profile, and `dctl profile`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.api.errors import DataFileError, InvalidArgumentError, NotFoundError
from agent.sim.physics.specs import arch_for
from controller.dctl.main import main
from controller.model.classes import CLASS_NAMES, ClassBins, class_by_name
from controller.model.cluster import ClusterPlan, InstanceSpec, PoolPlan
from controller.model.profile import SLO_ATTAINMENT_TARGET, Profile
from controller.profiles import PROFILES_DIR, default_profile, load_profile, save_profile
from controller.sim.cluster import simulate
from controller.sim.profiling import generate_profile, sample_class_lengths
from controller.sim.report import meets_slo
from controller.sim.traces import Trace

MODEL, GPU = "llama2-70b", "h100-sxm"
CONTEXT_TOKENS = arch_for(MODEL).max_context_tokens


@pytest.fixture(scope="module")
def small() -> Profile:
    return generate_profile(MODEL, GPU, tps=(8,), clocks_mhz=(1200, 1980), classes=("SS",), seed=0)


@pytest.fixture(scope="module")
def default() -> Profile:
    return default_profile(MODEL, GPU)


def test_small_generation_is_deterministic_for_any_number_of_jobs(small: Profile) -> None:
    again = generate_profile(MODEL, GPU, tps=(8,), clocks_mhz=(1980, 1200), classes=("SS",), seed=0, jobs=2)
    assert again == small
    other_seed = generate_profile(MODEL, GPU, tps=(8,), clocks_mhz=(1980,), classes=("SS",), seed=1)
    assert other_seed.config("SS", 8, 1980) != small.config("SS", 8, 1980)


def test_committed_default_profile_is_what_the_generator_measures(small: Profile, default: Profile) -> None:
    """Regenerate with: see docs/profile-format.md (one command); the file is never edited by hand."""
    assert default.provenance == small.provenance
    assert default.slo("SS") == small.slo("SS")
    for clock in (1200, 1980):
        assert default.config("SS", 8, clock) == small.config("SS", 8, clock)


@pytest.mark.parametrize("name", ["SS", "ML", "LL"])
def test_lengths_spread_over_the_class_bins(name: str) -> None:
    inputs, outputs = sample_class_lengths(name, 2000, np.random.default_rng(7), CONTEXT_TOKENS)
    assert len(inputs) == len(outputs) == 2000
    assert set(ClassBins().class_indices(inputs, outputs).tolist()) == {class_by_name(name).index}
    again = sample_class_lengths(name, 2000, np.random.default_rng(7), CONTEXT_TOKENS)
    assert np.array_equal(again[0], inputs) and np.array_equal(again[1], outputs)
    # only requests the model admits: a longer one is refused and never reaches an engine
    assert np.all(inputs + outputs <= CONTEXT_TOKENS)
    # the representative lengths are the bins' p90s (over all classes, the context not applied): most
    # requests are shorter (long prompts: all, the context cuts them)
    cls = class_by_name(name)
    assert 0.75 < np.mean(inputs <= cls.representative_input_tokens) < (0.97 if cls.input_bin < 2 else 1.01)
    assert 0.75 < np.mean(outputs <= cls.representative_output_tokens) < 0.97
    assert len(np.unique(inputs)) > 100 and len(np.unique(outputs)) > 50


def test_max_load_is_what_the_simulators_slo_attainment_accepts(small: Profile) -> None:
    """One instance replaying class-SS Poisson traffic in the cluster simulator, judged by the report's
    per-request rule: below the profile's max load it meets the 99% target, clearly above it it does not."""
    slo = small.slo("SS")
    max_load_rps = small.max_load_rps("SS", 8, 1980)
    plan = ClusterPlan(pools=(PoolPlan("ss", ("SS",), (InstanceSpec(tp=8, clock_mhz=1980),)),))
    attainment = {}
    for factor in (0.8, 1.3):
        rng = np.random.default_rng(11)
        arrival_s = np.cumsum(rng.exponential(1.0 / (factor * max_load_rps), 3000))
        inputs, outputs = sample_class_lengths("SS", 3000, rng, CONTEXT_TOKENS)
        trace = Trace("ss", arrival_s, inputs, outputs, None, None)
        result = simulate(trace, plan, model=MODEL, gpu=GPU)
        attainment[factor] = float(np.mean(meets_slo(result, dict.fromkeys(CLASS_NAMES, slo))))
    assert attainment[0.8] >= SLO_ATTAINMENT_TARGET > attainment[1.3], attainment


def test_default_profile_covers_the_full_grid(default: Profile) -> None:
    assert (default.model, default.gpu) == (MODEL, GPU)
    assert default.class_names == CLASS_NAMES
    assert default.tps == (2, 4, 8)
    assert default.clocks_mhz == (800, 1000, 1200, 1400, 1600, 1800, 1980)
    for name in CLASS_NAMES:
        slo = default.slo(name)
        assert 0 < slo.tbt_s < 1 and 0 < slo.ttft_s < 5
        assert default.max_load_rps(name, 8, 1980) > 0
        # the SLO reference configuration meets the SLO at near-zero load
        assert default.config(name, 8, 1980).points[0].meets_slo
        for tp in default.tps:
            for clock in default.clocks_mhz:
                cfg = default.config(name, tp, clock)
                # the levels reach beyond the max load, so it is read off the curve, not its top end
                assert not cfg.points or not cfg.points[-1].meets_slo, (name, tp, clock)


def test_higher_clock_gives_lower_ttft(default: Profile) -> None:
    for name in CLASS_NAMES:
        for tp in (4, 8):
            slow, fast = default.config(name, tp, 800), default.config(name, tp, 1980)
            load = max(slow.load_rps[0], fast.load_rps[0])  # near-zero load, inside both ranges
            assert (
                default.point(name, tp, 800, load).ttft_p99_s > default.point(name, tp, 1980, load).ttft_p99_s
            )


def test_max_load_grows_with_tp(default: Profile) -> None:
    for name in CLASS_NAMES:
        for clock in (1200, 1980):
            loads = [default.max_load_rps(name, tp, clock) for tp in (2, 4, 8)]
            assert loads[0] < loads[2] and loads[1] < loads[2] * 1.1, (name, clock, loads)


def test_save_and_load_round_trip(tmp_path: Path, small: Profile) -> None:
    path = tmp_path / "p.json"
    save_profile(small, path)
    assert load_profile(path) == small
    assert json.loads(path.read_text())["format"] == "dynamollm.profile/v1"


def test_bad_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "dynamollm.profile/v1",\n  "model": }')
    with pytest.raises(DataFileError) as err:
        load_profile(bad)
    assert err.value.path == str(bad) and err.value.line == 2
    with pytest.raises(NotFoundError):
        default_profile("llama3.1-8b", "h100-sxm")
    assert (PROFILES_DIR / "llama2-70b_h100-sxm.json").is_file()


def test_generate_rejects_bad_arguments_by_name() -> None:
    cases = [
        ({"tps": (3,)}, "tp"),
        ({"clocks_mhz": (5000,)}, "clocks_mhz"),
        ({"classes": ("XX",)}, "classes"),
        ({"jobs": 0}, "jobs"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidArgumentError) as err:
            generate_profile(MODEL, GPU, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field


def test_dctl_profile_generate_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    argv = ["profile", "generate", "--model", MODEL, "--gpu", GPU, "--out", str(out)]
    assert main([*argv, "--tp", "8", "--clocks", "1980", "--classes", "SS"]) == 0
    profile = load_profile(out)
    assert profile.class_names == ("SS",) and profile.tps == (8,) and profile.clocks_mhz == (1980,)
    captured = capsys.readouterr()
    assert "profile" in captured.err  # the progress bar
    assert main(["profile", "show", str(out)]) == 0
    table = capsys.readouterr().out
    assert "class SS" in table and f"{profile.max_load_rps('SS', 8, 1980):.3g}" in table
    assert main(["profile", "show", str(out), "--output", "json", "--class", "SS"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["SS"]["max_load_rps"]["tp8"]["1980"] == profile.max_load_rps("SS", 8, 1980)


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--tp", "3"], "--tp"),
        (["--tp", "eight"], "--tp"),
        (["--clocks", "5000"], "--clocks"),
        (["--classes", "SS,XX"], "--classes"),
        (["--jobs", "0"], "--jobs"),
        (["--seed", "-1"], "--seed"),
        (["--model", "gpt-5"], "--model"),
        (["--gpu", "a100"], "--gpu"),
    ],
)
def test_dctl_profile_bad_flags_exit_2_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], flag: str
) -> None:
    argv = ["profile", "generate", "--model", MODEL, "--gpu", GPU, "--out", str(tmp_path / "p.json")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert flag in err
    assert not (tmp_path / "p.json").exists()


def test_dctl_profile_bad_output_dir_and_bad_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["profile", "generate", "--model", MODEL, "--gpu", GPU, "--out", str(tmp_path / "no" / "p.json")]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["profile", "show", str(PROFILES_DIR / "llama2-70b_h100-sxm.json"), "--class", "ZZ"]) == 2
    assert "--class" in capsys.readouterr().err
    assert main(["profile", "show", str(tmp_path / "missing.json")]) == 2
