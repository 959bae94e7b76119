"""A function mapped over a few items in forked worker processes (`dctl simulate --jobs N`).

Where it sits: the sizing search of a static policy (`controller.sim.cluster.size_by_simulation`) runs
its candidate sizes through `fork_map`; each item is a whole simulation, so a process per item is cheap
beside it. Workers are forked, so the function (a closure over the trace, the profile and the policy)
reaches them without pickling; only the results travel back. Where the platform cannot fork, or with one
job, the items run here, one after another. Results come back in item order either way.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The function of the map in progress: set in the parent just before the workers fork, so they inherit it.
_FUNCTION: Callable[[Any], Any] | None = None


def _call(item: Any) -> Any:
    assert _FUNCTION is not None
    return _FUNCTION(item)


def fork_map(function: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    """`[function(x) for x in items]`, in up to `jobs` forked processes."""
    global _FUNCTION
    if jobs <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(x) for x in items]
    _FUNCTION = function
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=context) as pool:
            return list(pool.map(_call, items))
    finally:
        _FUNCTION = None
