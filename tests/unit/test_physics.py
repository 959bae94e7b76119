"""Behaviour of the performance/energy model (agent.sim.physics) from the committed parameters alone:
monotonicity, clock and TP dependence, power bounds, input validation and the parameter-file format.
Agreement with the public data is tests/sim/test_model_validation.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from agent.api.errors import DataFileError, InvalidArgumentError, OutOfRangeError
from agent.sim.physics import GPU_NAMES, MODEL_NAMES, PerfModel, load_perf_model
from agent.sim.physics.params import load_params_file, params_from_json, params_path, params_to_json
from agent.sim.physics.specs import ARCHS, GPUS, kv_capacity_tokens

INSTANCES = [("llama2-70b", 2), ("llama2-70b", 4), ("llama2-70b", 8), ("llama3.1-8b", 1), ("llama3.1-70b", 4)]
F_MAX = 1980


def _perf(model: str, tp: int) -> PerfModel:
    return load_perf_model(model, "h100-sxm", tp)


def test_names() -> None:
    assert MODEL_NAMES == ("llama2-70b", "llama3.1-8b", "llama3.1-70b")
    assert "h100-sxm" in GPU_NAMES


def test_instance_attributes() -> None:
    perf = _perf("llama2-70b", 8)
    assert (perf.model, perf.gpu, perf.tp) == ("llama2-70b", "h100-sxm", 8)
    assert perf.profile_clocks_mhz == (800, 1000, 1200, 1400, 1600, 1800, 1980)
    assert (perf.min_clock_mhz, perf.max_clock_mhz) == (800, 1980)
    assert perf.idle_power_w == pytest.approx(75.0)


@pytest.mark.parametrize(("model", "tp"), INSTANCES)
def test_latency_grows_with_every_input(model: str, tp: int) -> None:
    perf = _perf(model, tp)
    base = (512, 512 * 1024, 32, 32 * 1500)
    lat0 = perf.iteration(F_MAX, *base)[0]
    for i, extra in enumerate((256, 512 * 2048, 16, 32 * 1500)):
        bigger = list(base)
        bigger[i] += extra
        assert perf.iteration(F_MAX, *bigger)[0] > lat0, f"input {i} did not raise latency"
    for seqs in (1, 8, 64, 256):
        assert (
            perf.iteration(F_MAX, 0, 0, seqs * 2, seqs * 2 * 1000)[0]
            > perf.iteration(F_MAX, 0, 0, seqs, seqs * 1000)[0]
        )
    for tokens in (16, 256, 2048, 8192):
        small = perf.iteration(F_MAX, tokens, tokens * tokens, 0, 0)[0]
        assert perf.iteration(F_MAX, 2 * tokens, 4 * tokens * tokens, 0, 0)[0] > small


@pytest.mark.parametrize(("model", "tp"), INSTANCES)
def test_lower_clock_is_never_faster(model: str, tp: int) -> None:
    perf = _perf(model, tp)
    for args in ((2048, 2048 * 2048, 0, 0), (0, 0, 64, 64 * 1024), (256, 256 * 512, 32, 32 * 800)):
        latencies = [perf.iteration(f, *args)[0] for f in perf.profile_clocks_mhz]
        assert latencies == sorted(latencies, reverse=True)


def test_prefill_scales_with_clock_decode_barely() -> None:
    # compute-bound prefill: ~1/clock (at most f_max/f); memory-bound decode: a few percent
    for model, tp in (("llama3.1-8b", 1), ("llama2-70b", 2)):
        perf = _perf(model, tp)
        prefill = (8192, 8192 * 8192, 0, 0)
        ratio = perf.iteration(1000, *prefill)[0] / perf.iteration(F_MAX, *prefill)[0]
        assert 1.75 < ratio <= F_MAX / 1000 + 1e-9
        decode = (0, 0, 8, 8 * 1024)
        decode_ratio = perf.iteration(1000, *decode)[0] / perf.iteration(F_MAX, *decode)[0]
        assert decode_ratio < 1.1
    # the papers' statement: at 1.6 GHz decode throughput is about the same as at 2.0 GHz
    perf = _perf("llama2-70b", 8)
    decode = (0, 0, 64, 64 * 1024)
    assert perf.iteration(1600, *decode)[0] / perf.iteration(F_MAX, *decode)[0] < 1.05


@pytest.mark.parametrize(("model", "tp"), INSTANCES)
def test_power_between_idle_and_tdp(model: str, tp: int) -> None:
    perf = _perf(model, tp)
    for f in perf.profile_clocks_mhz:
        for args in (
            (1, 1, 0, 0),
            (8192, 8192 * 8192, 0, 0),
            (0, 0, 1, 10),
            (0, 0, 256, 256 * 4000),
            (512, 512 * 512, 128, 128 * 900),
        ):
            power_w = perf.iteration(f, *args)[1]
            assert perf.idle_power_w < power_w <= 700.0


@pytest.mark.parametrize(("model", "tp"), INSTANCES)
def test_dynamic_power_grows_superlinearly_with_clock(model: str, tp: int) -> None:
    perf = _perf(model, tp)
    for args in ((0, 0, 1, 1024), (0, 0, 64, 64 * 1024), (512, 512 * 512, 0, 0)):
        powers = [perf.iteration(f, *args)[1] for f in perf.profile_clocks_mhz]
        assert powers == sorted(powers)
        high = perf.iteration(F_MAX, *args)[1]
        if high < 700.0:  # not clipped at the TDP
            low = perf.iteration(990, *args)[1]
            assert (high - perf.idle_power_w) / (low - perf.idle_power_w) > 2.0


def test_prefill_draws_more_power_than_decode() -> None:
    perf = _perf("llama2-70b", 8)
    assert (
        perf.iteration(F_MAX, 4096, 4096 * 4096, 0, 0)[1]
        > perf.iteration(F_MAX, 0, 0, 16, 16 * 1024)[1] + 150
    )


def test_higher_tp_is_faster_for_prefill_and_batches() -> None:
    prefill = (4096, 4096 * 4096, 0, 0)
    times = [_perf("llama2-70b", tp).iteration(F_MAX, *prefill)[0] for tp in (2, 4, 8)]
    assert times == sorted(times, reverse=True)
    decode = (0, 0, 128, 128 * 1024)
    times = [_perf("llama2-70b", tp).iteration(F_MAX, *decode)[0] for tp in (2, 4, 8)]
    assert times == sorted(times, reverse=True)
    # at batch 1 splitwise measured TP8 no faster than TP4 (all-reduce latency); the model keeps that
    single = (0, 0, 1, 1024)
    assert (
        _perf("llama2-70b", 2).iteration(F_MAX, *single)[0]
        > _perf("llama2-70b", 8).iteration(F_MAX, *single)[0]
    )


def test_deterministic() -> None:
    perf = _perf("llama2-70b", 4)
    args = (300, 300 * 700, 40, 40 * 900)
    assert (
        perf.iteration(1400, *args)
        == perf.iteration(1400, *args)
        == _perf("llama2-70b", 4).iteration(1400, *args)
    )


def test_kv_capacity() -> None:
    arch, gpu = ARCHS["llama2-70b"], GPUS["h100-sxm"]
    caps = [_perf("llama2-70b", tp).kv_capacity_tokens for tp in (2, 4, 8)]
    assert caps == sorted(caps) and caps[0] > 10_000
    expected = (0.9 * gpu.memory_bytes - arch.weight_bytes / 8 - 2 * 2**30) * 8 // arch.kv_bytes_per_token
    assert caps[2] == int(expected)
    assert arch.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert kv_capacity_tokens(arch, gpu, 1) == 0  # 138 GB of weights do not fit one 80 GB GPU


def test_architectures() -> None:
    assert ARCHS["llama2-70b"].params_total == pytest.approx(68.98e9, rel=0.01)
    assert ARCHS["llama3.1-70b"].params_total == pytest.approx(70.55e9, rel=0.01)
    assert ARCHS["llama3.1-8b"].params_total == pytest.approx(8.03e9, rel=0.01)


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"model": "gpt-4", "gpu": "h100-sxm", "tp": 8}, "model", "llama2-70b, llama3.1-8b, llama3.1-70b"),
        ({"model": "llama2-70b", "gpu": "b200", "tp": 8}, "gpu", "h100-sxm"),
        ({"model": "llama2-70b", "gpu": "h100-sxm", "tp": 3}, "tp", "2, 4, 8"),
        ({"model": "llama2-70b", "gpu": "h100-sxm", "tp": 1}, "tp", "2, 4, 8"),
        ({"model": "llama3.1-8b", "gpu": "h100-sxm", "tp": 16}, "tp", "1, 2, 4, 8"),
    ],
)
def test_load_errors_name_field_and_allowed(kwargs: dict[str, object], field: str, allowed: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        load_perf_model(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.allowed == allowed
    assert field in str(info.value) and allowed in str(info.value)


def test_clock_outside_range() -> None:
    perf = _perf("llama2-70b", 8)
    for clock in (799.0, 1981.0, 0.0):
        with pytest.raises(OutOfRangeError) as info:
            perf.iteration(clock, 10, 100, 0, 0)
        assert info.value.field == "clock_mhz"
        assert "800..1980" in str(info.value)


def test_params_roundtrip_and_bad_files(tmp_path: Path) -> None:
    path = params_path("llama2-70b", "h100-sxm")
    params = load_params_file(path)
    doc = params_to_json(params, {"note": "test"})
    assert params_from_json(json.loads(json.dumps(doc)), path) == params

    broken = dict(doc, power=dict(doc["power"], busy_w="hot"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(DataFileError) as info:
        load_params_file(bad)
    assert info.value.field == "power.busy_w"

    missing = dict(doc)
    del missing["engine"]
    bad.write_text(json.dumps(missing))
    with pytest.raises(DataFileError) as info:
        load_params_file(bad)
    assert info.value.field == "engine"

    bad.write_text("{not json")
    with pytest.raises(DataFileError) as info:
        load_params_file(bad)
    assert info.value.line == 1


def test_model_uses_its_parameters() -> None:
    # a changed parameter changes the result: PerfModel reads the values it is given
    perf = _perf("llama2-70b", 8)
    params = perf.params
    slower = replace(
        params, engine=replace(params.engine, iteration_overhead_s=params.engine.iteration_overhead_s + 0.01)
    )
    other = PerfModel(ARCHS["llama2-70b"], GPUS["h100-sxm"], 8, slower)
    args = (0, 0, 4, 4000)
    assert other.iteration(F_MAX, *args)[0] == pytest.approx(perf.iteration(F_MAX, *args)[0] + 0.01)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("tp", [2, 4, 8])  # the 70B models do not fit on one GPU
def test_decode_iterations_equal_iteration_bit_for_bit(model: str, tp: int) -> None:
    """The engine's decode runs price every iteration through decode_iterations: it must be `iteration`
    exactly (==, not approximately), at any clock, batch and context."""
    perf = load_perf_model(model, "h100-sxm", tp)
    for clock in (perf.min_clock_mhz, 1234.5, perf.max_clock_mhz):
        for n, ctx in ((1, 1), (7, 3_001), (64, 90_000), (256, perf.kv_capacity_tokens - 256 * 40)):
            latencies_s, powers_w = perf.decode_iterations(clock, n, ctx, 40)
            expected = [perf.iteration(clock, 0, 0, n, ctx + k * n) for k in range(40)]
            assert list(zip(latencies_s, powers_w, strict=True)) == expected
    assert perf.decode_iterations(1980, 4, 100, 0) == ([], [])
