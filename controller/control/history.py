"""Arrival history per request class, as the control cycle keeps it: counts per history bin and causal
short-term burst peaks. Pure (numpy arrays in memory, no clock).

Where it sits: `ControlCycle.tick` adds the arrivals the router classified since the last tick
(`add`); the cycle's observation reads the rates of the finished bins (`rates_rps`) and their burst
peaks (`bursts_rps`) for the policy. Bins are aligned to `origin_s` (the cycle's start) and grow as time
passes; only the last `max_bins` are handed to policies.

Burst peaks per (window, class, bin): the most arrivals of a class within a window ENDING at one of its
arrivals in the bin, so a finished bin's value needs no arrival after it (causal). Each class keeps only
the arrival times within the longest window (plus a minute, for late reports) of its newest arrival.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.classes import REQUEST_CLASSES
from controller.model.fleet import Arrivals

_N_CLASSES = len(REQUEST_CLASSES)
_GROW_BINS = 1024
# Each class keeps its arrivals this long beyond the longest burst window, so that an arrival reported
# up to this late still finds those before it (live routers report every fraction of a second).
_LATE_S = 60.0


class ArrivalHistory:
    def __init__(
        self, bin_s: float, max_bins: int, burst_windows_s: tuple[float, ...], origin_s: float = 0.0
    ):
        if not bin_s > 0:
            raise InvalidArgumentError("history_bin_s", bin_s, "a positive number of seconds")
        if max_bins < 1:
            raise InvalidArgumentError("history_max_bins", max_bins, ">= 1")
        self.bin_s = bin_s
        self.max_bins = max_bins
        self.origin_s = origin_s
        self.burst_windows_s = burst_windows_s
        self._windows = np.asarray(burst_windows_s, dtype=np.float64)
        self._counts = np.zeros((_N_CLASSES, _GROW_BINS), dtype=np.int64)
        # prompt tokens per class and bin, and how many arrivals reported them
        self._tokens = np.zeros((_N_CLASSES, _GROW_BINS), dtype=np.float64)
        self._token_counts = np.zeros((_N_CLASSES, _GROW_BINS), dtype=np.int64)
        self._bursts = np.zeros((len(burst_windows_s), _N_CLASSES, _GROW_BINS), dtype=np.int64)
        self._tail = [np.empty(0, dtype=np.float64) for _ in range(_N_CLASSES)]

    def _ensure(self, n_bins: int) -> None:
        have = self._counts.shape[1]
        if n_bins <= have:
            return
        grow = max(n_bins - have, have)
        self._counts = np.pad(self._counts, ((0, 0), (0, grow)))
        self._tokens = np.pad(self._tokens, ((0, 0), (0, grow)))
        self._token_counts = np.pad(self._token_counts, ((0, 0), (0, grow)))
        self._bursts = np.pad(self._bursts, ((0, 0), (0, 0), (0, grow)))

    def add(self, arrivals: Arrivals) -> None:
        times = arrivals.arrival_s
        if len(times) == 0:
            return
        classes = arrivals.class_index
        b = ((times - self.origin_s) // self.bin_s).astype(np.int64)
        if b.min() < 0:
            raise InvalidArgumentError(
                "arrival_s", float(times[0]), f">= the history's origin {self.origin_s}"
            )
        self._ensure(int(b.max()) + 1)
        np.add.at(self._counts, (classes, b), 1)
        if arrivals.input_tokens is not None:
            np.add.at(self._tokens, (classes, b), arrivals.input_tokens.astype(np.float64))
            np.add.at(self._token_counts, (classes, b), 1)
        for c in np.unique(classes).tolist():
            mine = classes == c
            new_s = times[mine]
            # Live routers report a little late and out of order (a request that waited is reported when
            # it is placed): each new arrival's window is counted on the merged, sorted times. Windows
            # of arrivals counted before are not revisited (a late one may leave their peak a bit low).
            seen = np.sort(np.concatenate((self._tail[c], new_s)), kind="stable")
            ends = np.searchsorted(seen, new_s, side="right")
            for k, w in enumerate(self._windows):
                counts = ends - np.searchsorted(seen, new_s - w, side="right")
                np.maximum.at(self._bursts[k, c], b[mine], counts)
            if len(self._windows):
                self._tail[c] = seen[seen > seen[-1] - self._windows[-1] - _LATE_S]

    def _span(self, now_s: float, max_bins: int | None = None) -> tuple[int, int]:
        done = max(0, int((now_s - self.origin_s) // self.bin_s))
        self._ensure(done)
        return max(0, done - min(self.max_bins, max_bins or self.max_bins)), done

    def rates_rps(self, now_s: float, max_bins: int | None = None) -> tuple[tuple[float, ...], ...]:
        """Per class, the arrival rate of each finished bin up to `now_s` (at most `max_bins`, and never
        more than the history keeps)."""
        lo, hi = self._span(now_s, max_bins)
        return tuple(tuple(row) for row in (self._counts[:, lo:hi] / self.bin_s).tolist())

    def input_tokens_mean(self, now_s: float, max_bins: int) -> tuple[float, ...]:
        """Per class, the mean prompt length of the arrivals of its INPUT BIN in the last `max_bins`
        finished bins (0 where there were none, or nothing was reported). By input bin, not by routed
        class: the input bin is known at arrival, while the routed class carries the output-length
        predictor's choice, which sorts prompts of one bin by length (its buckets)."""
        lo, hi = self._span(now_s, max_bins)
        tokens = self._tokens[:, lo:hi].sum(axis=1)
        counts = self._token_counts[:, lo:hi].sum(axis=1)
        out: list[float] = []
        for cls in REQUEST_CLASSES:
            same_bin = [k for k, other in enumerate(REQUEST_CLASSES) if other.input_bin == cls.input_bin]
            n = int(counts[same_bin].sum())
            out.append(float(tokens[same_bin].sum() / n) if n else 0.0)
        return tuple(out)

    def bursts_rps(self, now_s: float) -> tuple[tuple[tuple[float, ...], ...], ...]:
        """Per burst window, per class, the short-term peak (rps) of the same bins as `rates_rps`."""
        lo, hi = self._span(now_s)
        return tuple(
            tuple(tuple(row) for row in (self._bursts[k, :, lo:hi] / w).tolist())
            for k, w in enumerate(self._windows.tolist())
        )

    def counts(self, lo_s: float, hi_s: float) -> npt.NDArray[np.int64]:
        """Arrivals per class in the bins covering [lo_s, hi_s) (for scoring forecasts)."""
        lo = max(0, round((lo_s - self.origin_s) / self.bin_s))
        hi = max(lo, round((hi_s - self.origin_s) / self.bin_s))
        self._ensure(hi)
        return self._counts[:, lo:hi].copy()
