"""controller/loops/traffic.py: router reports held until the tick that covers them, then summarised."""

from __future__ import annotations

import numpy as np

from controller.control.history import ArrivalHistory
from controller.loops.traffic import CLASS_INDEX, N_CLASSES, Arrival, Completion, TrafficBuffer
from controller.model.fleet import Arrivals, Completions

SS, MM, LL = CLASS_INDEX["SS"], CLASS_INDEX["MM"], CLASS_INDEX["LL"]


def _done(
    t_s: float, routed: int, true: int = -1, met: bool = True, tokens: int = 10, pool: str = "p"
) -> Completion:
    return Completion(t_s, routed, true, met, tokens, pool)


def test_take_returns_arrivals_up_to_and_including_the_tick_in_time_order() -> None:
    buf = TrafficBuffer()
    buf.add([Arrival(3.0, MM, 300, 1), Arrival(1.0, SS, 100, 1), Arrival(2.0, LL, 200, 2)], [])
    got = buf.take(2.0)
    assert got.arrivals.arrival_s.tolist() == [1.0, 2.0]
    assert got.arrivals.class_index.tolist() == [SS, LL]
    assert got.arrivals.input_tokens is not None and got.arrivals.input_tokens.tolist() == [100, 200]
    later = buf.take(10.0)
    assert later.arrivals.arrival_s.tolist() == [3.0] and later.arrivals.class_index.tolist() == [MM]
    assert buf.take(20.0).arrivals.arrival_s.size == 0


def test_an_empty_take_has_typed_empty_arrays_and_no_completions() -> None:
    got = TrafficBuffer().take(5.0)
    assert got.arrivals.arrival_s.dtype.name == "float64" and got.arrivals.arrival_s.size == 0
    assert got.arrivals.class_index.dtype.name == "int64"
    assert got.routed == {}
    assert got.completions == Completions() and not got.completions.any()
    assert not got.finished and not got.output_tokens


def test_routed_counts_requests_per_known_instance_including_instance_zero() -> None:
    buf = TrafficBuffer()
    arrivals = [
        Arrival(1.0, SS, 1, 4),
        Arrival(1.5, SS, 1, 0),
        Arrival(1.6, MM, 1, 0),
        Arrival(1.7, MM, 1, -1),
    ]
    buf.add(arrivals, [])
    buf.add([Arrival(9.0, SS, 1, 4)], [])  # after the tick: not counted yet
    assert buf.take(5.0).routed == {4: 1, 0: 2}  # the cycle's first instance is 0; -1 means "not known"


def test_completions_count_met_and_total_per_routed_class() -> None:
    buf = TrafficBuffer()
    buf.add(
        [], [_done(1.0, SS, met=True), _done(1.1, SS, met=False), _done(1.2, LL, met=True), _done(6.0, MM)]
    )
    got = buf.take(5.0).completions
    expected_total = [0] * N_CLASSES
    expected_met = [0] * N_CLASSES
    expected_total[SS], expected_met[SS] = 2, 1
    expected_total[LL], expected_met[LL] = 1, 1
    assert got.total == tuple(expected_total)
    assert got.met == tuple(expected_met)
    assert buf.take(10.0).completions.total[MM] == 1  # the later one waits for its tick


def test_served_maps_routed_class_to_true_class_and_unknown_to_routed() -> None:
    buf = TrafficBuffer()
    buf.add([], [_done(1.0, SS, true=LL), _done(1.0, SS, true=-1), _done(1.0, MM, true=MM)])
    served = buf.take(1.0).completions.served
    assert len(served) == N_CLASSES and all(len(row) == N_CLASSES for row in served)
    assert served[SS][LL] == 1 and served[SS][SS] == 1 and served[MM][MM] == 1
    assert sum(map(sum, served)) == 3


def test_finished_and_output_tokens_are_per_pool_and_true_class() -> None:
    buf = TrafficBuffer()
    buf.add(
        [],
        [
            _done(1.0, SS, true=LL, tokens=700, pool="big"),
            _done(1.0, LL, true=-1, tokens=300, pool="big"),
            _done(1.0, SS, true=SS, tokens=20, pool="small"),
            _done(1.0, SS, true=SS, tokens=99, pool=""),  # no pool (rejected): not in the ledger
        ],
    )
    got = buf.take(1.0)
    assert dict(got.finished) == {("big", "LL"): 2, ("small", "SS"): 1}
    assert dict(got.output_tokens) == {("big", "LL"): 1000, ("small", "SS"): 20}
    assert got.completions.total[SS] == 3  # the pool-less one still counts for the SLO guard


def test_beyond_max_pending_the_oldest_items_are_dropped_and_counted() -> None:
    buf = TrafficBuffer(max_pending=2)
    buf.add([Arrival(float(t), SS, 1, 1) for t in (5, 1, 3, 4)], [_done(float(t), SS) for t in (2, 1, 3)])
    assert buf.dropped == 3  # two arrivals and one completion
    got = buf.take(100.0)
    assert got.arrivals.arrival_s.tolist() == [4.0, 5.0]
    assert got.completions.total[SS] == 2
    buf.add([Arrival(1.0, SS, 1, 1)], [])
    assert buf.dropped == 3  # within the bound again


def test_late_out_of_order_arrivals_count_in_their_own_bins_and_windows() -> None:
    """Routers report arrivals a little late: the same arrivals in report order or in time order give the
    cycle the same rates and burst peaks for the windows the late ones end."""
    times = np.array([1.0, 2.0, 3.0, 61.0, 62.0, 4.0, 63.0])  # 4.0 reported after the next bin's arrivals
    ordered = ArrivalHistory(bin_s=60.0, max_bins=10, burst_windows_s=(5.0,))
    late = ArrivalHistory(bin_s=60.0, max_bins=10, burst_windows_s=(5.0,))
    ordered.add(Arrivals(np.sort(times), np.zeros(7, dtype=np.int64)))
    late.add(Arrivals(times[:5], np.zeros(5, dtype=np.int64)))
    late.add(Arrivals(times[5:], np.zeros(2, dtype=np.int64)))
    assert late.rates_rps(120.0)[0] == ordered.rates_rps(120.0)[0] == (4 / 60, 3 / 60)
    # bin 0: 4 arrivals within 5 s (1..4); bin 1: 3 (61..63); a reversed merge would count 6
    assert late.bursts_rps(120.0)[0][0] == ordered.bursts_rps(120.0)[0][0] == (4 / 5, 3 / 5)


def test_traffic_before_the_cycles_origin_is_dropped_and_counted() -> None:
    buf = TrafficBuffer()
    buf.add([Arrival(-3.0, SS, 10, 1), Arrival(2.0, MM, 20, 1)], [_done(-1.0, SS), _done(3.0, MM)])
    got = buf.take(10.0)
    assert got.arrivals.arrival_s.tolist() == [2.0] and sum(got.completions.total) == 1
    assert buf.before_origin == 2


def test_a_mix_of_two_specs_prints_in_tp_then_clock_order() -> None:
    """Decision summaries of a pool with two kinds of instance (specs have no order of their own: this
    crashed the controller at its first guard step once)."""
    from controller.loops.control import _mix
    from controller.model.cluster import InstanceSpec

    counts = {InstanceSpec(4, 1000): 1, InstanceSpec(2, 1980): 2, InstanceSpec(2, 800): 1}
    assert _mix(counts.items()) == "1x TP2@800, 2x TP2@1980, 1x TP4@1000"
