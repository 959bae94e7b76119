"""The nine request classes (input bin x output bin) and their SLO defaults (docs/architecture.md).

Pure data used by the router (classify at arrival), the policy core (one pool per class), profiles
(measured per class) and the simulator's per-class report. Input length is known at arrival; in the
simulator the output bin comes from the trace until the predictor (next issue) replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError

BIN_NAMES = ("S", "M", "L")

# Third-party readings of the DynamoLLM paper (docs/architecture.md): input < 256 / < 1024 / >= 1024
# tokens, output < 100 / < 350 / >= 350 tokens.
DEFAULT_INPUT_EDGES_TOKENS = (256, 1024)
DEFAULT_OUTPUT_EDGES_TOKENS = (100, 350)

# Representative lengths of each bin: the p90 of the lengths falling in that bin over the Azure 2023
# conversation + coding traces together (28,185 requests). Inputs: 223 / 997 / 4114; outputs 90 / 215 / 501.
REPRESENTATIVE_INPUT_TOKENS = (224, 1000, 4096)
REPRESENTATIVE_OUTPUT_TOKENS = (90, 215, 500)

# Default SLO = this multiple of the class's unloaded latency on the reference configuration
# (TP8 at maximum clock) at its representative lengths (docs/architecture.md, request classes).
DEFAULT_SLO_SCALE = 5.0


@dataclass(frozen=True, slots=True)
class RequestClass:
    """One of the nine classes; `name` is input bin then output bin, e.g. "LS" = long prompt, short answer."""

    index: int
    input_bin: int
    output_bin: int

    @property
    def name(self) -> str:
        return BIN_NAMES[self.input_bin] + BIN_NAMES[self.output_bin]

    @property
    def representative_input_tokens(self) -> int:
        return REPRESENTATIVE_INPUT_TOKENS[self.input_bin]

    @property
    def representative_output_tokens(self) -> int:
        return REPRESENTATIVE_OUTPUT_TOKENS[self.output_bin]


REQUEST_CLASSES: tuple[RequestClass, ...] = tuple(
    RequestClass(index=3 * i + o, input_bin=i, output_bin=o) for i in range(3) for o in range(3)
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in REQUEST_CLASSES)


def class_by_name(name: str) -> RequestClass:
    """The class called `name` ("SS" ... "LL")."""
    for c in REQUEST_CLASSES:
        if c.name == name:
            return c
    raise InvalidArgumentError("request_class", name, CLASS_NAMES)


@dataclass(frozen=True, slots=True)
class ClassBins:
    """Bin edges in tokens; a length equal to an edge falls in the upper bin."""

    input_edges_tokens: tuple[int, int] = DEFAULT_INPUT_EDGES_TOKENS
    output_edges_tokens: tuple[int, int] = DEFAULT_OUTPUT_EDGES_TOKENS

    def __post_init__(self) -> None:
        for field, edges in (
            ("input_edges_tokens", self.input_edges_tokens),
            ("output_edges_tokens", self.output_edges_tokens),
        ):
            if len(edges) != 2 or not 0 < edges[0] < edges[1]:
                raise InvalidArgumentError(field, edges, "two increasing positive token counts")

    def input_bin(self, input_tokens: int) -> int:
        lo, hi = self.input_edges_tokens
        return 0 if input_tokens < lo else (1 if input_tokens < hi else 2)

    def output_bin(self, output_tokens: int) -> int:
        lo, hi = self.output_edges_tokens
        return 0 if output_tokens < lo else (1 if output_tokens < hi else 2)

    def classify(self, input_tokens: int, output_tokens: int) -> RequestClass:
        return REQUEST_CLASSES[3 * self.input_bin(input_tokens) + self.output_bin(output_tokens)]

    def class_indices(
        self, input_tokens: npt.NDArray[np.integer], output_tokens: npt.NDArray[np.integer]
    ) -> npt.NDArray[np.int8]:
        """Vectorised `classify(...).index` for whole traces."""
        in_bin = np.searchsorted(np.asarray(self.input_edges_tokens), input_tokens, side="right")
        out_bin = np.searchsorted(np.asarray(self.output_edges_tokens), output_tokens, side="right")
        return (3 * in_bin + out_bin).astype(np.int8)


@dataclass(frozen=True, slots=True)
class ClassSlo:
    """Latency targets of one class: p99 time to first token and p99 time between tokens."""

    ttft_s: float
    tbt_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tbt_s > 0):
            raise InvalidArgumentError("slo", (self.ttft_s, self.tbt_s), "positive seconds")
