"""`fork_map` (the sizing search's worker processes): results in item order, a closure reaches the
workers without pickling, and an error raised in a worker comes back as itself (the error tree pickles)."""

from __future__ import annotations

import os
import pickle

import pytest

from agent.api.errors import DataFileError, InternalError, InvalidArgumentError, OutOfRangeError
from controller.sim.forkmap import fork_map


def test_results_in_item_order_from_other_processes() -> None:
    parent = os.getpid()
    offset = 10  # a closure: reaches the forked workers without pickling

    def work(x: int) -> tuple[int, bool]:
        return x + offset, os.getpid() != parent

    out = fork_map(work, [3, 1, 2, 5], 2)
    assert [v for v, _ in out] == [13, 11, 12, 15]
    assert all(elsewhere for _, elsewhere in out)
    assert fork_map(work, [4], 2) == [(14, False)]  # one item: no process for it
    assert fork_map(work, [1, 2], 1) == [(11, False), (12, False)]


def test_an_error_in_a_worker_comes_back_as_itself() -> None:
    def work(x: int) -> int:
        if x == 2:
            raise InvalidArgumentError("--instances", x, "a count the trace can be served with")
        return x

    with pytest.raises(InvalidArgumentError, match="--instances: got 2; allowed: a count the trace"):
        fork_map(work, [1, 2, 3], 2)


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgumentError("--x", 1, ["a", "b"]),
        OutOfRangeError("clock_mhz", 5000.0, "800..1980 MHz"),
        DataFileError("trace.csv", 7, "arrival_s", "not a number"),
        InternalError("broken invariant"),
    ],
)
def test_errors_pickle_with_their_fields(error: Exception) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)
