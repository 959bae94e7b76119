"""Output-length prediction: which output bin (S/M/L) a request will fall in (docs/architecture.md).

Flow: at arrival the router knows the prompt length and maybe a `max_tokens` hint; it asks
`predict_output_bin` for the output bin, which with the input bin gives the request's class and so its
pool. When a request completes, `update` folds its true output length into the statistics. The
simulator does exactly this online (learning only from requests that have completed), and for the
sensitivity study replaces the predictor by `inject_accuracy` (a given share of correct bins).

The default predictor (`OutputPredictor`, a frozen value) keeps counts of output bins per input-length
bucket. Buckets are log-spaced (BUCKETS_PER_DOUBLING per doubling of the prompt length) and nest
inside the class input bins, so each bucket belongs to one input bin. Finer buckets than the three
input bins pay: on the Azure 2023 conversation trace the output bin of the mode per input *bin* is
right for 57% of requests (learned online), per bucket (4 per doubling) for 77% (docs/prediction-forecast.md).

Prediction: the most frequent output bin of the prompt's bucket (ties go to the larger bin, so the
router errs towards the pool with more headroom); an empty bucket backs off to the pooled counts of its
input bin, and with no data at all the largest bin is predicted (conservative cold start). A
`max_tokens` hint caps the output length, so only bins reachable under the hint compete. Counts of a
bucket are halved (rounded down) once they reach `max_count_per_bucket`, so the statistics follow
drift in the workload (a bucket remembers its last few hundred completions).

Pure: values in, new values out; no randomness except the injected Generator of `inject_accuracy`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError
from controller.model.classes import BIN_NAMES, ClassBins

N_OUTPUT_BINS = len(BIN_NAMES)
BUCKETS_PER_DOUBLING = 4
# Prompts up to 2^15 tokens get their own buckets; longer ones share the last (open) bucket.
_MAX_BUCKET_EDGE_LOG2 = 15
DEFAULT_MAX_COUNT_PER_BUCKET = 1000
DEFAULT_BINS = ClassBins()

Counts = tuple[int, int, int]
_ZERO_COUNTS: Counts = (0, 0, 0)


def default_bucket_edges_tokens(
    bins: ClassBins = DEFAULT_BINS, buckets_per_doubling: int = BUCKETS_PER_DOUBLING
) -> tuple[int, ...]:
    """Log-spaced prompt-length bucket edges (tokens) from 2 up to 2^15, plus the class input edges.

    A length equal to an edge falls in the upper bucket (as in `ClassBins`). Including the class input
    edges makes every bucket lie inside one input bin.
    """
    if buckets_per_doubling < 1:
        raise InvalidArgumentError("buckets_per_doubling", buckets_per_doubling, "an integer >= 1")
    steps = range(buckets_per_doubling, _MAX_BUCKET_EDGE_LOG2 * buckets_per_doubling + 1)
    edges = {round(2.0 ** (k / buckets_per_doubling)) for k in steps}
    return tuple(sorted(edges | set(bins.input_edges_tokens)))


@dataclass(frozen=True, slots=True)
class OutputPredictor:
    """Online output-bin statistics: `counts[b]` = completions per output bin (S, M, L) of prompt bucket b.

    Build with `OutputPredictor()` (empty, default bins and buckets) or give `bins` and
    `bucket_edges_tokens` (which must contain the class input edges). `counts` left empty means all
    zero. Immutable: `update` returns a new value.
    """

    bins: ClassBins = DEFAULT_BINS
    bucket_edges_tokens: tuple[int, ...] = field(default_factory=default_bucket_edges_tokens)
    max_count_per_bucket: int = DEFAULT_MAX_COUNT_PER_BUCKET
    counts: tuple[Counts, ...] = ()
    # Input bin of each bucket (derived; not an argument).
    _bucket_input_bin: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        edges = self.bucket_edges_tokens
        if not (edges and edges[0] > 0 and all(a < b for a, b in itertools.pairwise(edges))):
            raise InvalidArgumentError("bucket_edges_tokens", edges, "increasing positive token counts")
        missing = [e for e in self.bins.input_edges_tokens if e not in edges]
        if missing:
            raise InvalidArgumentError(
                "bucket_edges_tokens", edges, f"edges that include the class input edges {missing}"
            )
        if self.max_count_per_bucket < 2:
            raise InvalidArgumentError("max_count_per_bucket", self.max_count_per_bucket, "an integer >= 2")
        n_buckets = len(edges) + 1
        if not self.counts:
            object.__setattr__(self, "counts", (_ZERO_COUNTS,) * n_buckets)
        elif len(self.counts) != n_buckets or any(
            len(row) != N_OUTPUT_BINS or min(row) < 0 for row in self.counts
        ):
            raise InvalidArgumentError(
                "counts", len(self.counts), f"{n_buckets} rows of {N_OUTPUT_BINS} non-negative counts"
            )
        object.__setattr__(self, "_bucket_input_bin", _bucket_input_bins(self.bins, edges))

    def bucket(self, input_tokens: int) -> int:
        """Index of the prompt-length bucket of `input_tokens`."""
        return bisect.bisect_right(self.bucket_edges_tokens, input_tokens)

    @property
    def completions(self) -> int:
        """Completions currently remembered (after halving), over all buckets."""
        return sum(sum(row) for row in self.counts)


@functools.lru_cache(maxsize=16)
def _bucket_input_bins(bins: ClassBins, edges: tuple[int, ...]) -> tuple[int, ...]:
    """Input bin of each bucket (cached: `update` builds a new state per completion)."""
    return tuple(bins.input_bin(lo) for lo in (0, *edges))


def _mode_bin(counts: Counts, cap_bin: int) -> int | None:
    """Most frequent bin among 0..cap_bin, ties to the larger; None when they hold no counts."""
    best: int | None = None
    for b in range(cap_bin, -1, -1):
        if counts[b] > 0 and (best is None or counts[b] > counts[best]):
            best = b
    return best


def predict_output_bin(state: OutputPredictor, input_tokens: int, max_tokens_hint: int | None) -> int:
    """Predicted output bin (0 = S, 1 = M, 2 = L) of a request with this prompt length and hint.

    `max_tokens_hint` (the request's `max_tokens`, None when absent) bounds the output, so bins above
    the hint's bin are excluded.
    """
    if input_tokens < 0:
        raise InvalidArgumentError("input_tokens", input_tokens, "a non-negative token count")
    if max_tokens_hint is not None and max_tokens_hint < 1:
        raise InvalidArgumentError("max_tokens_hint", max_tokens_hint, "a positive token count or None")
    cap_bin = N_OUTPUT_BINS - 1 if max_tokens_hint is None else state.bins.output_bin(max_tokens_hint)
    b = state.bucket(input_tokens)
    predicted = _mode_bin(state.counts[b], cap_bin)
    if predicted is None:
        in_bin = state._bucket_input_bin[b]
        pooled = [0] * N_OUTPUT_BINS
        for row, row_bin in zip(state.counts, state._bucket_input_bin, strict=True):
            if row_bin == in_bin:
                for o in range(N_OUTPUT_BINS):
                    pooled[o] += row[o]
        predicted = _mode_bin((pooled[0], pooled[1], pooled[2]), cap_bin)
    return cap_bin if predicted is None else predicted


def predict_output_bins(
    state: OutputPredictor,
    input_tokens: npt.NDArray[np.integer],
    max_tokens_hint: npt.NDArray[np.integer] | None = None,
) -> npt.NDArray[np.int8]:
    """`predict_output_bin` for many requests against the same state (hint <= 0 means no hint)."""
    tokens = np.asarray(input_tokens)
    hints = np.zeros(len(tokens), np.int64) if max_tokens_hint is None else np.asarray(max_tokens_hint)
    if hints.shape != tokens.shape:
        raise InvalidArgumentError("max_tokens_hint", hints.shape, f"one hint per request {tokens.shape}")
    # Few distinct (bucket, cap) pairs: predict each once.
    buckets = np.searchsorted(np.asarray(state.bucket_edges_tokens), tokens, side="right")
    caps = np.where(
        hints > 0,
        np.searchsorted(np.asarray(state.bins.output_edges_tokens), hints, side="right"),
        N_OUTPUT_BINS,
    )
    keys = buckets * (N_OUTPUT_BINS + 1) + caps
    unique, inverse = np.unique(keys, return_inverse=True)
    table = np.empty(len(unique), np.int8)
    lower_edges = (0, *state.bucket_edges_tokens)
    for i, key in enumerate(unique.tolist()):
        bucket, cap = divmod(key, N_OUTPUT_BINS + 1)
        hint = None if cap == N_OUTPUT_BINS else _hint_for_cap(state.bins, cap)
        table[i] = predict_output_bin(state, lower_edges[bucket], hint)
    return table[inverse.reshape(tokens.shape)]


def _hint_for_cap(bins: ClassBins, cap_bin: int) -> int:
    """A max_tokens value whose output bin is `cap_bin`."""
    return 1 if cap_bin == 0 else bins.output_edges_tokens[cap_bin - 1]


def update(state: OutputPredictor, input_tokens: int, output_tokens: int) -> OutputPredictor:
    """The state after one more completed request (its true prompt and output lengths)."""
    if input_tokens < 0 or output_tokens < 0:
        raise InvalidArgumentError(
            "tokens", (input_tokens, output_tokens), "non-negative input and output token counts"
        )
    b = state.bucket(input_tokens)
    row = list(state.counts[b])
    row[state.bins.output_bin(output_tokens)] += 1
    if sum(row) >= state.max_count_per_bucket:
        row = [c // 2 for c in row]
    return _with_counts(state, (*state.counts[:b], (row[0], row[1], row[2]), *state.counts[b + 1 :]))


def _with_counts(state: OutputPredictor, counts: tuple[Counts, ...]) -> OutputPredictor:
    """`state` with new counts derived from its own, skipping `__post_init__`'s checks: they would
    cost ~15 us per completion, and counts grown from a valid state by one bin at a time stay valid."""
    new = object.__new__(OutputPredictor)
    for name in OutputPredictor.__slots__:
        object.__setattr__(new, name, counts if name == "counts" else getattr(state, name))
    return new


def update_many(
    state: OutputPredictor,
    input_tokens: npt.NDArray[np.integer],
    output_tokens: npt.NDArray[np.integer],
) -> OutputPredictor:
    """`update` for a batch of completions, in order (same result as folding `update` over them)."""
    inputs = np.asarray(input_tokens)
    outputs = np.asarray(output_tokens)
    if inputs.shape != outputs.shape or inputs.ndim != 1:
        raise InvalidArgumentError("tokens", (inputs.shape, outputs.shape), "two 1-D arrays of equal length")
    if len(inputs) and (inputs.min() < 0 or outputs.min() < 0):
        raise InvalidArgumentError("tokens", "negative", "non-negative input and output token counts")
    buckets = np.searchsorted(np.asarray(state.bucket_edges_tokens), inputs, side="right")
    out_bins = np.searchsorted(np.asarray(state.bins.output_edges_tokens), outputs, side="right")
    counts = [list(row) for row in state.counts]
    # Halving depends on order within a bucket, so fold per bucket in arrival order; a bucket's
    # completions between two halvings only add up, which bincount does at once.
    for b in np.unique(buckets).tolist():
        row = counts[b]
        pending = out_bins[buckets == b]
        while len(pending):
            room = state.max_count_per_bucket - sum(row)
            take = pending[:room]
            added = np.bincount(take, minlength=N_OUTPUT_BINS)
            row = [c + int(a) for c, a in zip(row, added, strict=True)]
            if sum(row) >= state.max_count_per_bucket:
                row = [c // 2 for c in row]
            pending = pending[room:]
        counts[b] = row
    return _with_counts(state, tuple((r[0], r[1], r[2]) for r in counts))
