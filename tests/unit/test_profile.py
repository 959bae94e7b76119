"""The profile data model (format round trip, interpolation, refusal to extrapolate, validation) and
profile files (`controller.profiles`: load, save, the committed default; never the simulator)."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.api.errors import DataFileError, InvalidArgumentError, NotFoundError, OutOfRangeError
from controller import profiles
from controller.model.classes import ClassSlo
from controller.model.profile import (
    PROFILE_FORMAT,
    SLO_ATTAINMENT_TARGET,
    ClassProfile,
    ConfigProfile,
    Profile,
    ProfilePoint,
    max_load_meeting_slo,
)

SLO = ClassSlo(ttft_s=1.0, tbt_s=0.1)


def pt(
    attainment: float, ttft: float = 0.2, tbt: float = 0.05, power: float = 300.0, energy: float = 1000.0
) -> ProfilePoint:
    return ProfilePoint(
        ttft_p99_s=ttft, tbt_p99_s=tbt, slo_attainment=attainment, power_w=power, energy_per_request_j=energy
    )


def cfg(tp: int, clock: int, loads: tuple[float, ...], points: tuple[ProfilePoint, ...]) -> ConfigProfile:
    return ConfigProfile(
        tp=tp,
        clock_mhz=clock,
        max_load_rps=max_load_meeting_slo(loads, points),
        load_rps=loads,
        points=points,
    )


LOADS = (0.1, 1.0, 2.0)
# p99 TTFT above the 1 s target at 2 rps does not decide by itself: the share of requests meeting it does
POINTS = (
    pt(1.0, 0.2, 0.05, 200.0, 5000.0),
    pt(0.995, 0.4, 0.06, 300.0, 900.0),
    pt(0.95, 2.0, 0.08, 400.0, 600.0),
)


def make_profile() -> Profile:
    configs = {
        (4, 1200): cfg(4, 1200, (), ()),  # not servable
        (4, 1980): cfg(4, 1980, LOADS, POINTS),
        (8, 1200): cfg(8, 1200, (0.5, 1.5), (pt(1.0), pt(0.99, 1.5, 0.2))),
        (8, 1980): cfg(8, 1980, (0.5, 3.0), (pt(1.0), pt(0.9))),
    }
    cls = ClassProfile(name="SS", input_tokens=224, output_tokens=90, slo=SLO, configs=configs)
    return Profile(
        model="llama2-70b",
        gpu="h100-sxm",
        tps=(4, 8),
        clocks_mhz=(1200, 1980),
        classes={"SS": cls},
        provenance={"seed": 3, "generator": "hand-written test", "jitter_cv": 0.03, "simulated": True},
    )


def test_round_trip_through_json_is_exact() -> None:
    p = make_profile()
    doc = json.loads(json.dumps(p.to_dict()))
    assert doc["format"] == PROFILE_FORMAT
    back = Profile.from_dict(doc, "mem")
    assert back == p
    assert back.to_dict() == p.to_dict()


def test_interpolation_is_linear_in_load_between_levels() -> None:
    p = make_profile()
    assert p.point("SS", 4, 1980, 1.0) == POINTS[1]  # exactly a measured level
    assert p.point("SS", 4, 1980, 0.1) == POINTS[0]
    assert p.point("SS", 4, 1980, 2.0) == POINTS[2]
    mid = p.point("SS", 4, 1980, 1.5)
    assert mid.ttft_p99_s == pytest.approx(1.2)
    assert mid.tbt_p99_s == pytest.approx(0.07)
    assert mid.slo_attainment == pytest.approx(0.9725)
    assert mid.power_w == pytest.approx(350.0)
    assert mid.energy_per_request_j == pytest.approx(750.0)
    q = p.point("SS", 4, 1980.0, 0.55)  # a float clock equal to a profiled one is accepted
    assert q.ttft_p99_s == pytest.approx(0.3)
    assert q.slo_attainment == pytest.approx(0.9975)


@pytest.mark.parametrize("load", [0.0, 0.0999, 2.0001, 100.0, -1.0])
def test_refuses_to_extrapolate_in_load(load: float) -> None:
    with pytest.raises(OutOfRangeError) as err:
        make_profile().point("SS", 4, 1980, load)
    assert err.value.field == "load_rps"
    assert "0.1..2" in str(err.value)


def test_unservable_configuration_has_no_points() -> None:
    p = make_profile()
    assert p.max_load_rps("SS", 4, 1200) == 0.0
    with pytest.raises(OutOfRangeError):
        p.point("SS", 4, 1200, 0.5)


def test_unprofiled_class_tp_or_clock_is_refused() -> None:
    p = make_profile()
    with pytest.raises(InvalidArgumentError) as err:
        p.point("LL", 8, 1980, 1.0)
    assert err.value.field == "class_name"
    with pytest.raises(InvalidArgumentError) as err:
        p.point("SS", 2, 1980, 1.0)
    assert err.value.field == "tp"
    with pytest.raises(InvalidArgumentError) as err:
        p.max_load_rps("SS", 8, 1500)
    assert err.value.field == "clock_mhz"
    assert p.slo("SS") == SLO
    assert (p.tps, p.clocks_mhz, p.class_names) == ((4, 8), (1200, 1980), ("SS",))


def test_max_load_interpolates_the_first_attainment_crossing() -> None:
    assert SLO_ATTAINMENT_TARGET == 0.99
    assert POINTS[1].meets_slo and not POINTS[2].meets_slo
    # attainment falls from 0.995 (1 rps) to 0.95 (2 rps): 0.99 is crossed at 1 + 0.005 / 0.045
    assert max_load_meeting_slo(LOADS, POINTS) == pytest.approx(1.0 + 1.0 / 9.0)
    p = make_profile()
    assert p.max_load_rps("SS", 4, 1980) == pytest.approx(1.0 + 1.0 / 9.0)
    # every level reaches the target (0.99 exactly counts, whatever the p99s): the top level, no further
    assert p.max_load_rps("SS", 8, 1200) == 1.5
    assert p.max_load_rps("SS", 8, 1980) == pytest.approx(0.5 + 0.1 * 2.5)
    assert max_load_meeting_slo((0.1, 1.0), (pt(0.98), pt(1.0))) == 0.0
    assert max_load_meeting_slo((), ()) == 0.0
    # a level recovering after a miss does not count: the first miss decides
    wobbly = (pt(1.0), pt(0.97), pt(1.0))
    assert max_load_meeting_slo(LOADS, wobbly) == pytest.approx(0.1 + 0.9 / 3.0)


def _set(doc: dict[str, Any], path: list[str | int], value: object) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()
C0 = ["classes", 0]
K1 = [*C0, "configs", 1]  # TP4 at 1980 MHz: three levels


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (["format"], "dynamollm.profile/v0", "format"),
        (["format"], _DELETE, "format"),
        (["model"], "", "model"),
        (["gpu"], 7, "gpu"),
        (["tps"], [8, 4], "tps"),
        (["tps"], [], "tps"),
        (["tps", 0], 0, "tps[0]"),
        (["clocks_mhz"], "1200", "clocks_mhz"),
        (["clocks_mhz", 1], 1.5, "clocks_mhz[1]"),
        (["provenance"], [], "provenance"),
        (["provenance", "seed"], [1], "provenance.seed"),
        (["classes"], [], "classes"),
        ([*C0], "SS", "classes[0]"),
        ([*C0, "name"], "XX", "classes[0].name"),
        ([*C0, "input_tokens"], 0, "classes[0].input_tokens"),
        ([*C0, "output_tokens"], True, "classes[0].output_tokens"),
        ([*C0, "slo"], _DELETE, "classes[0].slo"),
        ([*C0, "slo", "ttft_s"], -1.0, "classes[0].slo.ttft_s"),
        ([*C0, "slo", "tbt_s"], float("nan"), "classes[0].slo.tbt_s"),
        ([*C0, "configs"], {}, "classes[0].configs"),
        ([*K1, "tp"], 2, "classes[0].configs[1].tp"),
        ([*K1, "clock_mhz"], 1200, "classes[0].configs[1]"),  # duplicate of configs[0]
        ([*K1, "clock_mhz"], "1980", "classes[0].configs[1].clock_mhz"),
        ([*K1, "max_load_rps"], -0.5, "classes[0].configs[1].max_load_rps"),
        ([*K1, "max_load_rps"], 1.9, "classes[0].configs[1].max_load_rps"),  # disagrees with levels + SLO
        ([*K1, "load_rps", 1], 0.05, "classes[0].configs[1].load_rps[1]"),
        ([*K1, "load_rps", 0], "0.1", "classes[0].configs[1].load_rps[0]"),
        ([*K1, "ttft_p99_s", 2], 0.0, "classes[0].configs[1].ttft_p99_s[2]"),
        ([*K1, "tbt_p99_s"], [0.05, 0.06], "classes[0].configs[1].tbt_p99_s"),
        ([*K1, "slo_attainment"], _DELETE, "classes[0].configs[1].slo_attainment"),
        ([*K1, "slo_attainment", 0], 1.01, "classes[0].configs[1].slo_attainment[0]"),
        ([*K1, "slo_attainment", 1], -0.1, "classes[0].configs[1].slo_attainment[1]"),
        ([*K1, "slo_attainment", 2], "0.9", "classes[0].configs[1].slo_attainment[2]"),
        # a share of 0 is a valid value, but it moves the crossing the stored max load was read off
        ([*K1, "slo_attainment", 2], 0.0, "classes[0].configs[1].max_load_rps"),
        ([*K1, "power_w", 0], None, "classes[0].configs[1].power_w[0]"),
        ([*K1, "energy_per_request_j"], _DELETE, "classes[0].configs[1].energy_per_request_j"),
        ([*K1, "energy_per_request_j", 1], float("inf"), "classes[0].configs[1].energy_per_request_j[1]"),
    ],
)
def test_every_bad_field_is_named(path: list[str | int], value: object, field: str) -> None:
    doc = copy.deepcopy(make_profile().to_dict())
    _set(doc, path, value)
    with pytest.raises(DataFileError) as err:
        Profile.from_dict(doc, "profiles/x.json")
    assert err.value.field == field
    assert err.value.path == "profiles/x.json"


def test_a_missing_configuration_is_named() -> None:
    doc = make_profile().to_dict()
    del doc["classes"][0]["configs"][3]
    with pytest.raises(DataFileError) as err:
        Profile.from_dict(doc, "p.json")
    assert err.value.field == "classes[0].configs"
    assert "TP8/1980 MHz" in err.value.reason


def test_a_duplicate_class_is_named() -> None:
    doc = make_profile().to_dict()
    doc["classes"].append(copy.deepcopy(doc["classes"][0]))
    with pytest.raises(DataFileError) as err:
        Profile.from_dict(doc, "p.json")
    assert err.value.field == "classes[1].name"


def test_not_an_object() -> None:
    with pytest.raises(DataFileError):
        Profile.from_dict([1, 2], "p.json")


def test_constructors_check_their_invariants() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        ConfigProfile(tp=8, clock_mhz=1980, max_load_rps=0.0, load_rps=(1.0, 0.5), points=(pt(1.0), pt(1.0)))
    assert err.value.field == "load_rps"
    with pytest.raises(InvalidArgumentError) as err:
        ConfigProfile(tp=8, clock_mhz=1980, max_load_rps=3.0, load_rps=(1.0,), points=(pt(1.0),))
    assert err.value.field == "max_load_rps"
    p = make_profile()
    configs = dict(p.classes["SS"].configs)
    del configs[(8, 1980)]
    with pytest.raises(InvalidArgumentError) as err:
        Profile(
            model="m",
            gpu="g",
            tps=(4, 8),
            clocks_mhz=(1200, 1980),
            classes={"SS": ClassProfile("SS", 224, 90, SLO, configs)},
            provenance={},
        )
    assert err.value.field == "classes.SS.configs"


# ------------------------------------------------------------------ profile files: controller.profiles
ROOT = Path(__file__).resolve().parents[2]


def test_profile_files_do_not_pull_in_the_simulator() -> None:
    """The live controller daemon reads profiles too: controller.profiles must not import the simulator."""
    code = (
        "import sys, controller.profiles as p; p.default_profile('llama2-70b', 'h100-sxm'); "
        "print(sorted(m for m in sys.modules if m.startswith(('controller.sim', 'agent.sim'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_default_profile_is_package_data_beside_the_module() -> None:
    assert profiles.PROFILES_DIR == ROOT / "controller" / "profile_data"
    assert profiles.default_profile_path("llama2-70b", "h100-sxm").is_file()
    assert profiles.default_profile("llama2-70b", "h100-sxm").model == "llama2-70b"
    with pytest.raises(NotFoundError, match=r"llama3\.1-8b"):
        profiles.default_profile("llama3.1-8b", "h100-sxm")


def test_save_is_atomic_and_readable_like_any_new_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    profiles.save_profile(make_profile(), path)
    assert profiles.load_profile(path) == make_profile()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("data", "reason", "line"),
    [
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
            "binary data (NUL byte at offset 8)",
            3,
        ),
        (b'{"format": "caf\xe9"}', "not UTF-8 text (byte 0xe9 at offset 15)", 1),
        (b'{"format":\n', "not valid JSON", 2),
    ],
)
def test_bad_files_are_one_error_naming_the_file(tmp_path: Path, data: bytes, reason: str, line: int) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(data)
    with pytest.raises(DataFileError) as err:
        profiles.load_profile(path)
    assert (err.value.path, err.value.line) == (str(path), line)
    assert reason in str(err.value) and "dynamollm.profile/v1" in str(err.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        profiles.load_profile(tmp_path / "gone.json")
    with pytest.raises(DataFileError, match="a folder, not a file"):
        profiles.load_profile(tmp_path)
    if Path("/proc/self/mem").exists():  # fails with EIO at offset 0, also for root
        with pytest.raises(DataFileError, match="cannot read: "):
            profiles.load_profile("/proc/self/mem")
