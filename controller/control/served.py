"""What each routed class really served: the realised class mix behind the output-length predictor.
Pure (a sliding window in memory, no clock).

Where it sits: the router classifies a request at arrival by its prompt and a PREDICTED output bin;
its true class is known only when it finishes. `ControlCycle.tick` folds the driver's `Completions.served`
(routed class x true class counts) into a window here, and hands the row-normalised table to the policy
(`ClusterObs.served_mix`). A pool planned for short answers that the predictor fills with long ones
serves long ones: its capacity is theirs (`controller.policy.instance_model.served_shares`), so the
mispredicted requests count in the load of the pool that actually serves them, and the pool is sized
for them before the SLO guard has to notice the misses.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.classes import CLASS_NAMES

_N = len(CLASS_NAMES)
# Fewer completions of a routed class than this in the window: its row is taken as routed (identity),
# too few to tell a pattern from chance.
DEFAULT_MIN_SAMPLES = 50
DEFAULT_WINDOW_S = 900.0


class ServedMix:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, min_samples: int = DEFAULT_MIN_SAMPLES) -> None:
        if not window_s > 0:
            raise InvalidArgumentError("served_window_s", window_s, "a positive number of seconds")
        self.window_s = window_s
        self.min_samples = min_samples
        self._window: deque[tuple[float, npt.NDArray[np.int64]]] = deque()
        self._sum = np.zeros((_N, _N), dtype=np.int64)

    def observe(self, now_s: float, served: tuple[tuple[int, ...], ...]) -> None:
        if served:
            counts = np.asarray(served, dtype=np.int64)
            if counts.shape != (_N, _N):
                raise InvalidArgumentError("served", counts.shape, f"{_N} x {_N} counts")
            if counts.any():
                self._window.append((now_s, counts))
                self._sum += counts
        while self._window and self._window[0][0] <= now_s - self.window_s:
            self._sum -= self._window.popleft()[1]

    def shares(self) -> tuple[tuple[float, ...], ...]:
        """Per routed class, the share of each true class among its completions in the window (a row of
        the identity where there are fewer than `min_samples`)."""
        rows: list[tuple[float, ...]] = []
        for r in range(_N):
            n = int(self._sum[r].sum())
            if n < self.min_samples:
                rows.append(tuple(1.0 if t == r else 0.0 for t in range(_N)))
            else:
                rows.append(tuple((self._sum[r] / n).tolist()))
        return tuple(rows)
