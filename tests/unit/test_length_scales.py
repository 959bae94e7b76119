"""Capacity for the prompts a class really sees: the profile's mean prompt length under load, the
cycle's observed means (controller/control/history.py), and the capacity scale
(controller/policy/capacity.length_scales)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agent.api.errors import DataFileError, InvalidArgumentError
from controller.control.history import ArrivalHistory
from controller.model.classes import CLASS_NAMES
from controller.model.fleet import Arrivals
from controller.model.profile import Profile
from controller.policy.capacity import LENGTH_TOLERANCE, MIN_LENGTH_SCALE, length_scales, pool_capacities
from controller.profiles import default_profile

PROFILE = default_profile("llama2-70b", "h100-sxm")
N = len(CLASS_NAMES)
LS = CLASS_NAMES.index("LS")


def test_the_default_profile_records_the_mean_prompt_it_was_measured_with() -> None:
    means = {c: PROFILE.classes[c].load_input_tokens_mean for c in CLASS_NAMES}
    assert all(m is not None for m in means.values())
    assert means["SS"] < 256 <= means["MS"] < 1024 <= means["LS"] <= 4096  # within each input bin
    doc = PROFILE.to_dict()
    assert Profile.from_dict(doc, "mem") == PROFILE
    # An older profile without the field reads as "not recorded"; a bad value is refused by name.
    del doc["classes"][0]["load_input_tokens_mean"]
    assert Profile.from_dict(doc, "mem").classes[CLASS_NAMES[0]].load_input_tokens_mean is None
    doc["classes"][0]["load_input_tokens_mean"] = -3
    with pytest.raises(DataFileError, match=r"classes\[0\]\.load_input_tokens_mean"):
        Profile.from_dict(doc, "p.json")


def test_prompts_beyond_the_tolerance_scale_their_bin_down_shorter_ones_do_not_scale_it_up() -> None:
    long_classes = ("LS", "LM", "LL")
    reference = sum(PROFILE.classes[c].load_input_tokens_mean or 0.0 for c in long_classes) / 3
    observed = [0.0] * N
    for c in long_classes:
        observed[CLASS_NAMES.index(c)] = 2 * LENGTH_TOLERANCE * reference
    assert length_scales(PROFILE, observed) == dict.fromkeys(long_classes, 0.5)
    for c in long_classes:
        observed[CLASS_NAMES.index(c)] = LENGTH_TOLERANCE * reference * 0.99  # within the tolerance
    assert length_scales(PROFILE, observed) == {}
    for c in long_classes:
        observed[CLASS_NAMES.index(c)] = 100 * reference
    assert length_scales(PROFILE, observed) == dict.fromkeys(long_classes, MIN_LENGTH_SCALE)
    assert length_scales(PROFILE, ()) == {}


def test_a_scaled_class_has_less_capacity_and_costs_more_energy_per_request() -> None:
    plain = {(c.tp, c.clock_mhz): c for c in pool_capacities(PROFILE, {"LS": 1.0})}
    half = {(c.tp, c.clock_mhz): c for c in pool_capacities(PROFILE, {"LS": 1.0}, {"LS": 0.5})}
    for key, c in plain.items():
        assert half[key].max_load_rps == pytest.approx(c.max_load_rps / 2)
        assert half[key].energy_per_request_j > c.energy_per_request_j
    mixed = {(c.tp, c.clock_mhz): c for c in pool_capacities(PROFILE, {"LS": 1.0, "LL": 1.0}, {"LS": 0.5})}
    both = {(c.tp, c.clock_mhz): c for c in pool_capacities(PROFILE, {"LS": 1.0, "LL": 1.0})}
    assert all(mixed[k].max_load_rps < both[k].max_load_rps for k in both)


def test_the_history_keeps_prompt_lengths_by_input_bin() -> None:
    h = ArrivalHistory(bin_s=60.0, max_bins=60, burst_windows_s=())
    classes = np.array([LS, LS, CLASS_NAMES.index("LM"), 0], dtype=np.int64)
    h.add(Arrivals(np.array([1.0, 2.0, 3.0, 4.0]), classes, np.array([3000, 4000, 2000, 100])))
    means = h.input_tokens_mean(120.0, 15)
    # every long-prompt class gets the bin's mean, whatever the predicted answer sorted them into
    assert means[LS] == means[CLASS_NAMES.index("LM")] == means[CLASS_NAMES.index("LL")] == 3000.0
    assert means[0] == 100.0 and means[CLASS_NAMES.index("MS")] == 0.0  # nothing of that bin at all
    h.add(Arrivals(np.array([70.0]), np.array([LS], dtype=np.int64)))  # lengths not reported: not counted
    assert h.input_tokens_mean(180.0, 15)[LS] == 3000.0
    with pytest.raises(InvalidArgumentError, match="input_tokens"):
        Arrivals(np.array([1.0]), np.array([0], dtype=np.int64), np.array([1, 2]))


def test_scales_are_dropped_for_a_profile_without_recorded_lengths() -> None:
    bare = dataclasses.replace(
        PROFILE,
        classes={n: dataclasses.replace(c, load_input_tokens_mean=None) for n, c in PROFILE.classes.items()},
    )
    assert length_scales(bare, [10_000.0] * N) == {}
