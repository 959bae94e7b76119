"""The simulated engine core against a small fake performance model (latency linear in the batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from agent.api.errors import InternalError, InvalidArgumentError
from agent.sim.engine_core import CompletedRequest, EngineConfig, PerfModelLike, SimEngine
from agent.sim.physics import PerfModel, load_perf_model


@dataclass(frozen=True)
class Call:
    clock_mhz: float
    prefill_tokens: int
    prefill_attn_tokens: int
    decode_seqs: int
    decode_context_tokens: int
    latency_s: float
    power_w: float


@dataclass
class FakePerf:
    """latency = base + per_token * prefill_tokens * (max_clock / clock) + per_seq * decode_seqs."""

    tp: int = 2
    idle_power_w: float = 50.0
    kv_capacity_tokens: int = 1_000_000
    min_clock_mhz: int = 800
    max_clock_mhz: int = 1980
    base_s: float = 1.0
    per_prefill_token_s: float = 0.1
    per_decode_seq_s: float = 0.01
    calls: list[Call] = field(default_factory=list)

    def iteration(
        self,
        clock_mhz: float,
        prefill_tokens: int,
        prefill_attn_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float]:
        latency_s = (
            self.base_s
            + self.per_prefill_token_s * prefill_tokens * self.max_clock_mhz / clock_mhz
            + self.per_decode_seq_s * decode_seqs
        )
        power_w = 100.0 + 1.0 * prefill_tokens + 2.0 * decode_seqs
        self.calls.append(
            Call(
                clock_mhz,
                prefill_tokens,
                prefill_attn_tokens,
                decode_seqs,
                decode_context_tokens,
                latency_s,
                power_w,
            )
        )
        return latency_s, power_w


NO_JITTER = EngineConfig(max_num_batched_tokens=8, max_num_seqs=4, jitter_cv=0.0, kv_watermark_fraction=0.0)


def make(perf: PerfModelLike, config: EngineConfig = NO_JITTER, seed: int = 0, **kw: Any) -> SimEngine:
    return SimEngine(perf, 1980, np.random.default_rng(seed), config=config, **kw)


def by_id(done: list[CompletedRequest]) -> dict[int, CompletedRequest]:
    return {r.request_id: r for r in done}


def test_hand_computed_tiny_case() -> None:
    perf = FakePerf()
    eng = make(perf)
    eng.submit(1, 0.0, 10, 3)
    eng.submit(2, 0.5, 4, 2)  # advances the engine past 0.5: iteration 0 (A's first chunk) ends at 1.8
    assert eng.now_s == pytest.approx(1.8)
    eng.advance_to(100.0)
    got = [
        (c.prefill_tokens, c.prefill_attn_tokens, c.decode_seqs, c.decode_context_tokens) for c in perf.calls
    ]
    # it0: A chunk 8; it1: A's last 2 (context 10) + B's 4; it2: decode A (ctx 11) + B (ctx 5);
    # it3: decode A (ctx 12)
    assert got == [(8, 64, 0, 0), (6, 2 * 10 + 4 * 4, 0, 0), (0, 0, 2, 16), (0, 0, 1, 12)]
    done = by_id(eng.pop_completed())
    a, b = done[1], done[2]
    assert a.first_token_s == pytest.approx(3.4) and b.first_token_s == pytest.approx(3.4)
    assert b.ttft_s == pytest.approx(2.9)
    assert b.finish_s == pytest.approx(4.42) and a.finish_s == pytest.approx(5.43)
    assert a.tbt_mean_s == pytest.approx((5.43 - 3.4) / 2) and a.tbt_max_s == pytest.approx(1.02)
    assert b.tbt_mean_s == pytest.approx(1.02) and b.tbt_max_s == pytest.approx(1.02)
    assert a.e2e_s == pytest.approx(5.43)
    gaps, tokens = eng.tbt_histogram
    assert gaps.tolist() == pytest.approx([1.02, 1.01]) and tokens.tolist() == [2, 1]
    assert eng.busy_s == pytest.approx(1.8 + 1.6 + 1.02 + 1.01)
    assert eng.now_s == 100.0


def test_one_token_answer_finishes_with_its_prefill() -> None:
    eng = make(FakePerf())
    eng.submit(7, 0.0, 5, 1)
    eng.advance_to(10.0)
    (r,) = eng.pop_completed()
    assert r.first_token_s == r.finish_s == pytest.approx(1.5)
    assert r.tbt_mean_s == 0.0 and r.tbt_max_s == 0.0


def test_fcfs_and_token_budget_and_seq_limit() -> None:
    perf = FakePerf(per_prefill_token_s=0.001)
    config = EngineConfig(max_num_batched_tokens=64, max_num_seqs=5, jitter_cv=0.0)
    eng = make(perf, config)
    for i in range(40):
        eng.submit(i, 0.01 * i, 30, 20)
    eng.advance_to(1e4)
    done = eng.pop_completed()
    assert sorted(r.request_id for r in done) == list(range(40))
    first = [by_id(done)[i].first_token_s for i in range(40)]
    finish = [by_id(done)[i].finish_s for i in range(40)]
    assert first == sorted(first) and finish == sorted(finish)  # equal requests: served in arrival order
    for c in perf.calls:
        assert c.prefill_tokens + c.decode_seqs <= 64
        assert c.decode_seqs <= 5
    assert max(c.decode_seqs for c in perf.calls) == 5  # the seq limit binds


def test_chunked_prefill_splits_a_long_prompt() -> None:
    perf = FakePerf(per_prefill_token_s=1e-4)
    eng = make(perf, EngineConfig(max_num_batched_tokens=2048, jitter_cv=0.0))
    eng.submit(1, 0.0, 5000, 2)
    eng.advance_to(100.0)
    chunks = [(c.prefill_tokens, c.prefill_attn_tokens) for c in perf.calls if c.prefill_tokens]
    assert chunks == [(2048, 2048 * 2048), (2048, 2048 * 4096), (904, 904 * 5000)]
    (r,) = eng.pop_completed()
    assert r.first_token_s == pytest.approx(sum(c.latency_s for c in perf.calls[:3]))


def test_decodes_are_scheduled_before_prefill_chunks() -> None:
    perf = FakePerf(per_prefill_token_s=1e-3)
    eng = make(perf, EngineConfig(max_num_batched_tokens=16, max_num_seqs=4, jitter_cv=0.0))
    eng.submit(1, 0.0, 4, 10)
    eng.advance_to(1.01)  # request 1 is decoding from now on
    eng.submit(2, eng.now_s, 100, 2)
    eng.advance_to(eng.now_s + 1e-9)
    c = perf.calls[-1]
    assert (c.decode_seqs, c.prefill_tokens) == (1, 15)


def test_kv_capacity_holds_back_admission() -> None:
    perf = FakePerf(kv_capacity_tokens=100, per_prefill_token_s=0.0)
    eng = make(perf, EngineConfig(max_num_batched_tokens=256, max_num_seqs=8, jitter_cv=0.0))
    eng.submit(1, 0.0, 60, 5)
    eng.submit(2, 0.0, 30, 5)
    eng.submit(3, 0.0, 30, 5)  # 60 + 30 fit, the third does not: it waits (FCFS, nothing skips it)
    eng.advance_to(0.5)
    assert (eng.num_running, eng.num_waiting) == (2, 1)
    eng.advance_to(100.0)
    done = by_id(eng.pop_completed())
    assert done[3].first_token_s > done[1].finish_s - 1e-9
    assert eng.num_preemptions == 0


def test_watermark_reserves_kv_at_admission() -> None:
    perf = FakePerf(kv_capacity_tokens=100)
    eng = make(perf, EngineConfig(max_num_batched_tokens=256, jitter_cv=0.0, kv_watermark_fraction=0.1))
    assert eng.max_request_tokens == 90
    eng.submit(1, 0.0, 50, 2)
    eng.submit(2, 0.0, 45, 2)  # 95 > 100 - 10: waits
    eng.advance_to(0.5)
    assert (eng.num_running, eng.num_waiting) == (1, 1)


def test_decode_growth_preempts_the_newest_request_and_recomputes_it() -> None:
    perf = FakePerf(kv_capacity_tokens=100, per_prefill_token_s=0.0)
    eng = make(perf, EngineConfig(max_num_batched_tokens=256, max_num_seqs=8, jitter_cv=0.0))
    eng.submit(1, 0.0, 40, 40)
    eng.submit(2, 0.0, 40, 40)
    eng.advance_to(1e4)
    done = by_id(eng.pop_completed())
    assert set(done) == {1, 2}
    assert done[1].finish_s < done[2].finish_s  # the older request kept its cache
    # both prompts fit (80 <= 100); at decode step 11 the contexts would reach 2 x 51 > 100, so request 2
    # (1 + 10 tokens produced) is preempted and later recomputed as a 40 + 11 token prefill, after request 1
    assert perf.calls[0].prefill_tokens == 80
    assert [c.prefill_tokens for c in perf.calls[1:] if c.prefill_tokens] == [51]
    assert eng.num_preemptions == 1
    # every iteration kept the KV cache within capacity: contexts of decoders never exceed it
    assert max(c.decode_context_tokens for c in perf.calls) <= 100
    # the resumed token's gap spans the recomputation wait: request 2's largest gap > any iteration
    assert done[2].tbt_max_s > max(c.latency_s for c in perf.calls)
    gaps, tokens = eng.tbt_histogram
    assert int(tokens.sum()) == 2 * 39  # every token after the first, exactly once
    assert done[2].tbt_max_s == pytest.approx(float(gaps.max()))
    assert eng.outstanding_tokens == 0


def test_energy_is_busy_plus_idle_exactly() -> None:
    perf = FakePerf()
    eng = make(perf, power_bin_s=0.7)
    eng.advance_to(3.0)
    eng.submit(1, 3.0, 10, 4)
    eng.advance_to(20.0)
    eng.submit(2, 25.0, 3, 2)
    eng.close(40.0)
    busy_j = perf.tp * sum(c.power_w * c.latency_s for c in perf.calls)
    busy_s = sum(c.latency_s for c in perf.calls)
    idle_j = perf.tp * perf.idle_power_w * (40.0 - busy_s)
    assert eng.busy_s == pytest.approx(busy_s)
    assert eng.energy_j == pytest.approx(busy_j + idle_j, rel=1e-12)
    bins = eng.energy_by_bin_j
    assert len(bins) == math.ceil(40.0 / 0.7)
    assert bins.sum() == pytest.approx(eng.energy_j, rel=1e-12)
    assert bins[0] == pytest.approx(perf.tp * perf.idle_power_w * 0.7)  # idle before the first arrival


def test_close_charges_only_up_to_end() -> None:
    perf = FakePerf()
    eng = make(perf, power_bin_s=1.0)
    eng.submit(1, 0.0, 8, 1)  # one iteration of 1.8 s
    eng.close(1.0)
    assert eng.now_s == 1.0
    assert eng.energy_j == pytest.approx(perf.tp * perf.calls[0].power_w * 1.0)
    assert eng.energy_by_bin_j.tolist() == pytest.approx([eng.energy_j])
    with pytest.raises(InternalError):
        eng.advance_to(2.0)


@pytest.mark.parametrize(("end_s", "busy_s"), [(1.0, 1.0), (3.0, 1.8)])
def test_close_after_idling_past_end_takes_back_idle_and_busy_parts(end_s: float, busy_s: float) -> None:
    perf = FakePerf()
    eng = make(perf, power_bin_s=1.0)
    eng.submit(1, 0.0, 8, 1)  # one iteration of 1.8 s, then idle
    eng.advance_to(5.0)
    eng.close(end_s)
    busy_w = perf.tp * perf.calls[0].power_w
    idle_w = perf.tp * perf.idle_power_w
    expected_j = busy_w * busy_s + idle_w * (end_s - busy_s)
    assert eng.now_s == end_s and eng.busy_s == pytest.approx(busy_s)
    assert eng.energy_j == pytest.approx(expected_j, rel=1e-12)
    assert eng.energy_by_bin_j.sum() == pytest.approx(expected_j, rel=1e-12)


def test_close_before_the_last_iteration_started_is_refused() -> None:
    eng = make(FakePerf())
    eng.submit(1, 0.0, 8, 5)
    eng.advance_to(5.0)
    with pytest.raises(InvalidArgumentError) as err:
        eng.close(1.0)
    assert err.value.field == "end_s"


def test_set_clock_applies_to_the_next_iteration() -> None:
    perf = FakePerf()
    eng = make(perf)
    eng.submit(1, 0.0, 16, 2)
    eng.advance_to(0.1)  # first chunk at 1980 MHz
    eng.set_clock(990)
    eng.advance_to(100.0)
    assert [c.clock_mhz for c in perf.calls] == [1980, 990, 990]
    assert perf.calls[1].latency_s == pytest.approx(1.0 + 0.1 * 8 * 2)
    assert eng.clock_mhz == 990
    with pytest.raises(InvalidArgumentError) as err:
        eng.set_clock(2500)
    assert err.value.field == "clock_mhz"


def _random_run(
    seed: int, step_s: float | None, jitter_cv: float = 0.03
) -> tuple[list[CompletedRequest], float]:
    perf = FakePerf(base_s=0.01, per_prefill_token_s=1e-5, per_decode_seq_s=1e-4, kv_capacity_tokens=20_000)
    eng = make(perf, EngineConfig(jitter_cv=0.03), seed=seed)
    wl = np.random.default_rng(99)
    arrivals = np.cumsum(wl.exponential(0.05, 400))
    inputs = wl.integers(1, 3000, 400)
    outputs = wl.integers(1, 400, 400)
    done: list[CompletedRequest] = []
    for i, (t, n_in, n_out) in enumerate(zip(arrivals, inputs, outputs, strict=True)):
        if step_s is None:
            eng.advance_to(float(t))
        else:  # many small advances: must not change anything
            while eng.now_s < t:
                eng.advance_to(min(float(t), eng.now_s + step_s))
        eng.submit(i, float(t), int(n_in), int(n_out))
        done += eng.pop_completed()
    eng.close(float(arrivals[-1]) + 1000.0)
    done += eng.pop_completed()
    assert eng.num_running == 0 and eng.num_waiting == 0 and eng.outstanding_tokens == 0
    return done, eng.energy_j


def test_no_request_lost_and_latencies_are_consistent() -> None:
    done, _ = _random_run(1, None)
    assert sorted(r.request_id for r in done) == list(range(400))
    for r in done:
        assert r.arrival_s < r.first_token_s <= r.finish_s
        assert r.tbt_max_s >= r.tbt_mean_s - 1e-12
        assert (r.output_tokens == 1) == (r.finish_s == r.first_token_s)


def test_deterministic_per_seed_and_independent_of_advance_granularity() -> None:
    a = _random_run(5, None)
    b = _random_run(5, None)
    c = _random_run(5, 0.013)
    d = _random_run(6, None)
    assert a == b
    assert a == c
    assert a[0] != d[0]


def test_jitter_is_mean_one_with_the_configured_cv() -> None:
    perf = FakePerf(base_s=1.0, per_prefill_token_s=0.0, per_decode_seq_s=0.0)
    eng = make(perf, EngineConfig(jitter_cv=0.1), seed=3)
    eng.submit(1, 0.0, 1, 5001)
    eng.advance_to(1e6)
    gaps, _ = eng.tbt_histogram
    assert len(gaps) == 5000
    assert gaps.mean() == pytest.approx(1.0, abs=0.006)
    assert gaps.std() / gaps.mean() == pytest.approx(0.1, rel=0.05)


def test_take_tbt_log_hands_over_the_log_so_far_and_empties_it() -> None:
    perf = FakePerf(base_s=1.0, per_prefill_token_s=0.0, per_decode_seq_s=0.0)
    whole, taken = make(perf, seed=4), make(perf, seed=4)
    for eng in (whole, taken):
        eng.submit(1, 0.0, 1, 301)
    whole.advance_to(1e6)
    taken.advance_to(100.0)
    first = taken.take_tbt_log()
    assert taken.tbt_log_len == 0 and len(taken.tbt_histogram[0]) == 0
    taken.advance_to(1e6)
    rest = taken.take_tbt_log()
    assert whole.tbt_log_len == len(first[0]) + len(rest[0]) == 300
    assert np.array_equal(whole.tbt_histogram[0], np.concatenate((first[0], rest[0])))
    assert np.array_equal(whole.tbt_histogram[1], np.concatenate((first[1], rest[1])))


def test_advance_to_runs_iterations_starting_before_t_and_idles_otherwise() -> None:
    perf = FakePerf()
    eng = make(perf)
    eng.advance_to(2.0)
    assert eng.now_s == 2.0 and not perf.calls  # idle: jumps straight to t
    eng.submit(1, 2.0, 8, 3)
    eng.advance_to(2.0)
    assert not perf.calls  # no iteration starts before 2.0
    eng.advance_to(2.5)
    assert len(perf.calls) == 1 and eng.now_s == pytest.approx(3.8)  # the last may end after t
    eng.advance_to(3.0)
    assert len(perf.calls) == 1  # t in the past: nothing to do
    eng.advance_to(3.81)
    assert len(perf.calls) == 2
    assert eng.outstanding_tokens == 1  # one decode token left


def test_idle_gaps_land_in_the_right_bins() -> None:
    eng = make(FakePerf(), power_bin_s=10.0, start_s=100.0)
    eng.advance_to(125.0)
    assert eng.energy_by_bin_j.tolist() == pytest.approx([1000.0, 1000.0, 500.0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_tokens": 0}, "input_tokens"),
        ({"output_tokens": 0}, "output_tokens"),
        ({"input_tokens": 990_000, "output_tokens": 20_000}, "input_tokens+output_tokens"),
        ({"arrival_s": math.nan}, "arrival_s"),
    ],
)
def test_bad_requests_are_refused_without_effect(kwargs: dict[str, float], field: str) -> None:
    eng = make(FakePerf())
    args = {"request_id": 1, "arrival_s": 0.0, "input_tokens": 10, "output_tokens": 10} | kwargs
    with pytest.raises(InvalidArgumentError) as err:
        eng.submit(**args)  # type: ignore[arg-type]
    assert err.value.field == field
    assert eng.num_waiting == 0 and eng.outstanding_tokens == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 100, "max_num_seqs": 200}, "max_num_batched_tokens"),
        ({"jitter_cv": -0.1}, "jitter_cv"),
        ({"kv_watermark_fraction": 0.7}, "kv_watermark_fraction"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        EngineConfig(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_bad_engine_arguments() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        make(FakePerf(), power_bin_s=0.0)
    assert err.value.field == "power_bin_s"
    with pytest.raises(InvalidArgumentError) as err:
        SimEngine(FakePerf(), 100, np.random.default_rng(0))
    assert err.value.field == "clock_mhz"


def test_tbt_max_stays_exact_over_a_long_busy_period() -> None:
    """The engine never empties for ~100k iterations (its gap log gets trimmed meanwhile): every request's
    largest gap still equals the longest iteration among those that produced its tokens."""
    perf = FakePerf(base_s=1e-3, per_prefill_token_s=1e-6, per_decode_seq_s=1e-4)
    eng = make(perf, EngineConfig(jitter_cv=0.0))
    wl = np.random.default_rng(4)
    t = 0.0
    for i in range(140):
        eng.submit(i, t, int(wl.integers(1, 3000)), int(wl.integers(1500, 2500)))
        t += float(wl.uniform(0.2, 1.6))  # an answer takes > 1.5 s: the busy period never ends
    eng.advance_to(1e4)
    lat = np.array([c.latency_s for c in perf.calls])
    assert len(lat) > 90_000
    ends = np.cumsum(lat)
    assert eng.busy_s == pytest.approx(ends[-1])  # one busy period: no idle gap at all
    done = eng.pop_completed()
    assert len(done) == 140
    for r in done:
        first = int(np.searchsorted(ends, r.first_token_s - 1e-9))
        last = int(np.searchsorted(ends, r.finish_s - 1e-9))
        assert ends[last] == pytest.approx(r.finish_s)
        assert last - first == r.output_tokens - 1
        assert r.tbt_max_s == float(lat[first + 1 : last + 1].max())


# ---------------------------------------------------------------- decode runs against the reference engine


@dataclass
class CountingPerf:
    """The fitted physics, counting how the engine asks for it."""

    perf: PerfModel
    iteration_calls: int = 0
    run_calls: int = 0
    run_iterations: int = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.perf, name)

    def iteration(self, *args: float) -> tuple[float, float]:
        self.iteration_calls += 1
        return self.perf.iteration(*args)  # type: ignore[arg-type]

    def decode_iterations(
        self, clock_mhz: float, decode_seqs: int, first_context_tokens: int, count: int
    ) -> tuple[list[float], list[float]]:
        self.run_calls += 1
        self.run_iterations += count
        return self.perf.decode_iterations(clock_mhz, decode_seqs, first_context_tokens, count)


def _drive(engine: SimEngine, seed: int) -> dict[str, object]:
    """A busy, irregular life: Poisson arrivals with deadlines, advances of every size, clock changes
    with stalls, requests taken out and rejected, a drain and a close; everything observable."""
    rng = np.random.default_rng(seed)
    t_s, done, moved, rejected = 0.0, [], [], []
    for i in range(400):
        t_s += float(rng.exponential(0.08))
        engine.advance_to(t_s)
        size = engine.max_request_tokens
        inputs = int(rng.integers(1, min(3000, size - 1)))
        outputs = int(rng.integers(1, min(600, size - inputs) + 1))
        deadline_s = t_s + float(rng.choice([0.5, 2.0, math.inf]))
        engine.submit(i, t_s, inputs, outputs, deadline_s)
        if i % 37 == 0:
            engine.set_clock(float(rng.choice([800, 1200, 1600, 1980])), float(rng.choice([0.0, 0.06])))
        if i % 53 == 0:
            moved += [w.request_id for w in engine.take_waiting(t_s + 1.0)]
        if i % 29 == 0:
            rejected += engine.reject_past_deadline(t_s)
        done += engine.pop_completed()
    idle_s = engine.drain(t_s + 120.0)
    engine.close(t_s + 150.0)
    done += engine.pop_completed()
    gaps_s, tokens = engine.tbt_histogram
    fields = ("request_id", "arrival_s", "first_token_s", "finish_s", "tbt_mean_s", "tbt_max_s")
    return {
        # as values: the compiled engine's CompletedRequest is another class
        "done": [tuple(getattr(r, f) for f in fields) for r in done],
        "moved": moved,
        "rejected": rejected,
        "idle_s": idle_s,
        "energy_j": engine.energy_j,
        "busy_s": engine.busy_s,
        "bins_j": engine.energy_by_bin_j.tolist(),
        "gaps_s": gaps_s.tolist(),
        "tokens": tokens.tolist(),
        "iterations": engine.iterations,
        "preemptions": engine.num_preemptions,
    }


@pytest.mark.parametrize(("tp", "seed"), [(2, 1), (4, 2), (8, 3)])
def test_decode_runs_give_the_reference_engine_results_bit_for_bit(tp: int, seed: int) -> None:
    """The engine advances over decode-only runs in one physics call; the reference engine (stepwise)
    takes every iteration on its own. Same draws, same everything, compared with ==. TP2 holds a small
    KV cache, so that run preempts."""
    reference = CountingPerf(load_perf_model("llama2-70b", "h100-sxm", tp))
    fast = CountingPerf(load_perf_model("llama2-70b", "h100-sxm", tp))
    want = _drive(SimEngine(reference, 1980, np.random.default_rng(seed), stepwise=True), seed)  # type: ignore[arg-type]
    got = _drive(SimEngine(fast, 1980, np.random.default_rng(seed)), seed)  # type: ignore[arg-type]
    assert got == want
    assert reference.run_calls == 0 and reference.iteration_calls == want["iterations"]
    # a good part of the iterations came from runs (a quarter to two thirds here)
    assert fast.run_calls > 0 and fast.iteration_calls < 0.75 * reference.iteration_calls
    if tp == 2:
        assert isinstance(want["preemptions"], int) and want["preemptions"] > 0
