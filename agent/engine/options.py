"""Engine option values: the types the engine driver knows, checked before anything stops.

Where it sits: `agent.engine.driver.validate_spec` calls `validate_engine_options` on every spec, so a
ReconfigureEngine whose options the engine would refuse at start-up (a negative `max-num-seqs`, a word
where a number goes, NaN seconds) is INVALID_ARGUMENT naming the option and its allowed values, before
the running engine is drained or stopped. Which keys a caller may use at all is the agent's allow-list
(`engine.options_allowed`, checked by `agent.control`); this module types the values of the keys it knows
(`KNOWN_ENGINE_OPTIONS`, vLLM's flags and the simulated engine's) and holds every other value to a
conservative string rule (`GENERIC_VALUE_ALLOWED`). Each option becomes `--KEY VALUE` on the engine's
command line (`--KEY` alone for a flag), never through a shell. Checks across options (vLLM and the
simulated engine want max-num-batched-tokens >= max-num-seqs) stay the engine's: it refuses at start-up
and the driver rolls back. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from agent.api.errors import InvalidArgumentError

MAX_OPTION_KEY_CHARS = 64
MAX_OPTION_VALUE_CHARS = 256
OPTION_KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")
_INT_PATTERN = re.compile(r"[0-9]{1,19}")
_DECIMAL_PATTERN = re.compile(r"(?:[0-9]{1,12}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})(?:[eE][-+]?[0-9]{1,3})?")
GENERIC_VALUE_ALLOWED = (
    f"at most {MAX_OPTION_VALUE_CHARS} printable characters, no whitespace other than spaces, "
    "not starting with '--'"
)

OptionKind = Literal["int", "decimal", "flag", "choice"]


@dataclass(frozen=True, slots=True)
class OptionType:
    """What one engine option's value may be: an integer or decimal in [low, high] (`low_open`: low
    itself excluded), a flag (empty value: `--KEY` alone), or one of `choices`. `unit` names the unit of
    a number in messages ("seconds", "tokens")."""

    kind: OptionKind
    low: float = 0.0
    high: float = 0.0
    low_open: bool = False
    unit: str = ""
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        if self.kind == "flag":
            return "the empty string (a flag without a value)"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        bracket = "(" if self.low_open else "["
        if self.kind == "int":
            low, high, what = f"{int(self.low)}", f"{int(self.high)}", "an integer"
        else:
            low, high, what = f"{self.low:g}", f"{self.high:g}", "a decimal number"
        unit = f" ({self.unit})" if self.unit else ""
        return f"{what} in {bracket}{low}, {high}]{unit}"

    def accepts(self, value: str) -> bool:
        if self.kind == "flag":
            return value == ""
        if self.kind == "choice":
            return value in self.choices
        pattern = _INT_PATTERN if self.kind == "int" else _DECIMAL_PATTERN
        if not pattern.fullmatch(value):
            return False
        number = float(value)
        if not math.isfinite(number) or number > self.high:
            return False
        return number > self.low if self.low_open else number >= self.low


# vLLM's `vllm serve` flags and the simulated engine's (agent.sim.engine) that the driver types. The
# ranges are the engines' own where they state one, else generous bounds that keep numbers sane.
KNOWN_ENGINE_OPTIONS: Mapping[str, OptionType] = MappingProxyType(
    {
        "max-num-seqs": OptionType("int", 1, 2**20, unit="sequences"),
        "max-num-batched-tokens": OptionType("int", 1, 2**24, unit="tokens"),
        "max-model-len": OptionType("int", 2, 2**24, unit="tokens"),
        "gpu-memory-utilization": OptionType("decimal", 0.0, 1.0, low_open=True, unit="share of GPU memory"),
        "swap-space": OptionType("decimal", 0.0, 1024.0, unit="GiB"),
        "seed": OptionType("int", 0, 2**32 - 1),
        "enforce-eager": OptionType("flag"),
        "dtype": OptionType("choice", choices=("auto", "half", "float16", "bfloat16", "float", "float32")),
        "kv-cache-dtype": OptionType("choice", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2")),
        # the simulated engine's imitated model loading and its SIGTERM grace
        "startup-s": OptionType("decimal", 0.0, 3600.0, unit="seconds"),
        "shutdown-grace-s": OptionType("decimal", 0.0, 3600.0, unit="seconds"),
    }
)


def _generic_value_ok(value: str) -> bool:
    return (
        len(value) <= MAX_OPTION_VALUE_CHARS
        and not value.startswith("--")
        and all(c == " " or c.isprintable() for c in value)
    )


def validate_engine_options(options: Mapping[str, str]) -> None:
    """InvalidArgumentError naming the first bad option (`engine_options['KEY']`) and its allowed values."""
    for key, value in sorted(options.items()):
        if len(key) > MAX_OPTION_KEY_CHARS or not OPTION_KEY_PATTERN.fullmatch(key):
            raise InvalidArgumentError(
                "engine_options",
                key,
                f"keys of at most {MAX_OPTION_KEY_CHARS} characters of [a-z0-9-] (flag names without dashes)",
            )
        field = f"engine_options[{key!r}]"
        known = KNOWN_ENGINE_OPTIONS.get(key)
        if known is not None:
            if not known.accepts(value):
                raise InvalidArgumentError(field, value, known.allowed())
        elif not _generic_value_ok(value):
            raise InvalidArgumentError(field, value, GENERIC_VALUE_ALLOWED)
