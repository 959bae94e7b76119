"""Performance/energy profiles (format `dynamollm.profile/v1`): what each engine configuration can do.

Where it sits: produced by `controller.sim.profiling` (by running the simulated engine) or, later, by
`dctl profile` against real engines; read by the policy core (pool MILP, instance clock choice) and the
cluster simulator's sizing. Pure data and interpolation: no file I/O (load/save live in
`controller.sim.profiling`). The format, field by field: docs/profile-format.md.

A profile holds, per request class and per engine configuration (TP degree, SM clock), a list of
measured load levels with p99 TTFT, p99 TBT (token-weighted), SLO attainment (share of requests meeting
the class SLO, judged per request as the cluster simulator's evaluation does), mean power per GPU and
energy per request, plus the largest load whose SLO attainment reaches SLO_ATTAINMENT_TARGET. Queries
are linear in load between measured levels and never extrapolate: outside the measured range the answer
is an OutOfRangeError.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from agent.api.errors import DataFileError, InvalidArgumentError, OutOfRangeError
from controller.model.classes import CLASS_NAMES, ClassSlo

PROFILE_FORMAT = "dynamollm.profile/v1"

# Share of requests that must meet the class SLO for a load to count as served: the same 99% the cluster
# simulator sizes static baselines to (`dctl simulate --slo-target` default), so a profile's max load is
# what the evaluation accepts.
SLO_ATTAINMENT_TARGET = 0.99

# Relative tolerance when checking a stored max_load_rps against the one its levels' attainment implies.
_MAX_LOAD_RTOL = 1e-6

ProvenanceValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """Behaviour of one instance serving one class at one load (measured or interpolated)."""

    ttft_p99_s: float
    tbt_p99_s: float
    # share of requests with TTFT <= the class's ttft_s and mean inter-token time <= its tbt_s
    slo_attainment: float
    power_w: float  # mean per GPU, idle gaps included
    energy_per_request_j: float  # all GPUs of the instance, idle gaps included

    @property
    def meets_slo(self) -> bool:
        """Whether enough requests meet the class SLO (SLO_ATTAINMENT_TARGET) at this load."""
        return self.slo_attainment >= SLO_ATTAINMENT_TARGET


@dataclass(frozen=True, slots=True)
class ConfigProfile:
    """Measured load levels of one (class, TP, clock); `load_rps` strictly increasing, one point each.

    No levels means the configuration cannot serve the class at all (e.g. its requests do not fit in the
    KV cache); max_load_rps is then 0.
    """

    tp: int
    clock_mhz: int
    max_load_rps: float
    load_rps: tuple[float, ...]
    points: tuple[ProfilePoint, ...]

    def __post_init__(self) -> None:
        if len(self.load_rps) != len(self.points):
            raise InvalidArgumentError(
                "points", len(self.points), f"one per load level ({len(self.load_rps)})"
            )
        if any(b <= a for a, b in pairwise(self.load_rps)):
            raise InvalidArgumentError("load_rps", self.load_rps, "strictly increasing")
        if self.load_rps and self.load_rps[0] < 0:
            raise InvalidArgumentError("load_rps", self.load_rps[0], ">= 0")
        top = self.load_rps[-1] if self.load_rps else 0.0
        if not (0.0 <= self.max_load_rps <= top):
            raise InvalidArgumentError("max_load_rps", self.max_load_rps, f"0..{top} (the measured range)")

    def point(self, load_rps: float) -> ProfilePoint:
        """Linear interpolation in load between the two measured levels around load_rps."""
        loads = self.load_rps
        if not loads:
            raise OutOfRangeError(
                "load_rps", load_rps, f"nothing: TP{self.tp} at {self.clock_mhz} MHz was not measurable"
            )
        if not (loads[0] <= load_rps <= loads[-1]):
            raise OutOfRangeError(
                "load_rps",
                load_rps,
                f"{loads[0]:g}..{loads[-1]:g} rps (measured at TP{self.tp}, {self.clock_mhz} MHz)",
            )
        i = bisect_right(loads, load_rps) - 1
        if i >= len(loads) - 1:
            return self.points[-1]
        w = (load_rps - loads[i]) / (loads[i + 1] - loads[i])
        if w == 0.0:
            return self.points[i]
        a, b = self.points[i], self.points[i + 1]
        return ProfilePoint(
            ttft_p99_s=a.ttft_p99_s + w * (b.ttft_p99_s - a.ttft_p99_s),
            tbt_p99_s=a.tbt_p99_s + w * (b.tbt_p99_s - a.tbt_p99_s),
            slo_attainment=a.slo_attainment + w * (b.slo_attainment - a.slo_attainment),
            power_w=a.power_w + w * (b.power_w - a.power_w),
            energy_per_request_j=a.energy_per_request_j
            + w * (b.energy_per_request_j - a.energy_per_request_j),
        )


def max_load_meeting_slo(load_rps: Sequence[float], points: Sequence[ProfilePoint]) -> float:
    """Largest load at which the measured curve meets the SLO (attainment >= SLO_ATTAINMENT_TARGET).

    Walks up the levels while they meet it; at the first level that misses it, returns the load where the
    linearly interpolated SLO attainment falls to the target between that level and the one below. 0 if
    the lowest level misses it already; the top level's load if every level meets it (no extrapolation).
    """
    if not load_rps or not points[0].meets_slo:
        return 0.0
    for i in range(1, len(load_rps)):
        a, b = points[i - 1], points[i]
        if b.meets_slo:
            continue
        x = (a.slo_attainment - SLO_ATTAINMENT_TARGET) / (a.slo_attainment - b.slo_attainment)
        return load_rps[i - 1] + x * (load_rps[i] - load_rps[i - 1])
    return load_rps[-1]


@dataclass(frozen=True, slots=True)
class ClassProfile:
    """One request class: its representative lengths (the SLO reference), its SLO, one ConfigProfile per (tp,
    clock). The load levels are measured with lengths spread over the class's bins, not these."""

    name: str
    input_tokens: int
    output_tokens: int
    slo: ClassSlo
    configs: Mapping[tuple[int, int], ConfigProfile]
    # Mean prompt length of the requests the load levels were measured with (None: not recorded). A
    # workload whose prompts of this class are longer needs more work per request than measured.
    load_input_tokens_mean: float | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    """A complete profile of one (model, GPU type) over a grid of TP degrees x clocks, per class.

    `provenance` records how it was measured (generator, seed, engine settings, run lengths).
    """

    model: str
    gpu: str
    tps: tuple[int, ...]
    clocks_mhz: tuple[int, ...]
    classes: Mapping[str, ClassProfile]
    provenance: Mapping[str, ProvenanceValue]

    def __post_init__(self) -> None:
        grid = {(tp, c) for tp in self.tps for c in self.clocks_mhz}
        for name, cls in self.classes.items():
            if name != cls.name or name not in CLASS_NAMES:
                raise InvalidArgumentError("classes", name, CLASS_NAMES)
            if set(cls.configs) != grid:
                raise InvalidArgumentError(
                    f"classes.{name}.configs", sorted(cls.configs), f"exactly {sorted(grid)}"
                )

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def _class(self, class_name: str) -> ClassProfile:
        try:
            return self.classes[class_name]
        except KeyError:
            raise InvalidArgumentError("class_name", class_name, self.class_names) from None

    def config(self, class_name: str, tp: int, clock_mhz: float) -> ConfigProfile:
        """The measured levels of one (class, TP, clock); TP and clock must be profiled values."""
        cls = self._class(class_name)
        if tp not in self.tps:
            raise InvalidArgumentError("tp", tp, self.tps)
        if clock_mhz not in self.clocks_mhz:
            raise InvalidArgumentError("clock_mhz", clock_mhz, self.clocks_mhz)
        return cls.configs[(tp, int(clock_mhz))]

    def slo(self, class_name: str) -> ClassSlo:
        return self._class(class_name).slo

    def point(self, class_name: str, tp: int, clock_mhz: float, load_rps: float) -> ProfilePoint:
        """Interpolated behaviour at load_rps; OutOfRangeError outside the measured loads."""
        return self.config(class_name, tp, clock_mhz).point(load_rps)

    def max_load_rps(self, class_name: str, tp: int, clock_mhz: float) -> float:
        """Largest load (requests/s) at which SLO attainment reaches SLO_ATTAINMENT_TARGET; 0 if none does."""
        return self.config(class_name, tp, clock_mhz).max_load_rps

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (docs/profile-format.md)."""
        return {
            "format": PROFILE_FORMAT,
            "model": self.model,
            "gpu": self.gpu,
            "tps": list(self.tps),
            "clocks_mhz": list(self.clocks_mhz),
            "provenance": dict(self.provenance),
            "classes": [
                {
                    "name": cls.name,
                    "input_tokens": cls.input_tokens,
                    "output_tokens": cls.output_tokens,
                    **(
                        {}
                        if cls.load_input_tokens_mean is None
                        else {"load_input_tokens_mean": cls.load_input_tokens_mean}
                    ),
                    "slo": {"ttft_s": cls.slo.ttft_s, "tbt_s": cls.slo.tbt_s},
                    "configs": [
                        {
                            "tp": cfg.tp,
                            "clock_mhz": cfg.clock_mhz,
                            "max_load_rps": cfg.max_load_rps,
                            "load_rps": list(cfg.load_rps),
                            "ttft_p99_s": [p.ttft_p99_s for p in cfg.points],
                            "tbt_p99_s": [p.tbt_p99_s for p in cfg.points],
                            "slo_attainment": [p.slo_attainment for p in cfg.points],
                            "power_w": [p.power_w for p in cfg.points],
                            "energy_per_request_j": [p.energy_per_request_j for p in cfg.points],
                        }
                        for cfg in (cls.configs[(tp, c)] for tp in self.tps for c in self.clocks_mhz)
                    ],
                }
                for cls in self.classes.values()
            ],
        }

    @classmethod
    def from_dict(cls, doc: object, source: str) -> Profile:
        """Parse and validate a profile document; any bad field -> DataFileError naming its path."""
        return _Parser(source).profile(doc)


# Per-level series that are strictly positive; slo_attainment (a share, may be 0) is checked apart.
_POSITIVE_SERIES = ("ttft_p99_s", "tbt_p99_s", "power_w", "energy_per_request_j")


class _Parser:
    """Validating reader of the JSON document; every error names the field's path in the document."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, reason: str) -> DataFileError:
        return DataFileError(self.source, None, field, reason)

    def obj(self, value: object, field: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, got {type(value).__name__}")
        return value

    def get(self, d: Mapping[str, Any], key: str, field: str) -> object:
        if key not in d:
            raise self.fail(f"{field}.{key}" if field else key, "missing")
        return d[key]

    def lst(self, value: object, field: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {type(value).__name__}")
        return value

    def string(self, value: object, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(field, f"must be a non-empty string, got {value!r}")
        return value

    def pos_int(self, value: object, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(field, f"must be a positive integer, got {value!r}")
        return value

    def number(self, value: object, field: str, *, positive: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {value!r}")
        if value < 0 or (positive and value == 0):
            raise self.fail(field, f"must be {'> 0' if positive else '>= 0'}, got {value!r}")
        return float(value)

    def increasing_ints(self, value: object, field: str) -> tuple[int, ...]:
        items = tuple(self.pos_int(v, f"{field}[{i}]") for i, v in enumerate(self.lst(value, field)))
        if not items:
            raise self.fail(field, "must not be empty")
        if any(b <= a for a, b in pairwise(items)):
            raise self.fail(field, f"must be strictly increasing, got {list(items)}")
        return items

    def profile(self, doc: object) -> Profile:
        d = self.obj(doc, "(document)")
        fmt = self.get(d, "format", "")
        if fmt != PROFILE_FORMAT:
            raise self.fail("format", f"expected {PROFILE_FORMAT!r}, got {fmt!r}")
        model = self.string(self.get(d, "model", ""), "model")
        gpu = self.string(self.get(d, "gpu", ""), "gpu")
        tps = self.increasing_ints(self.get(d, "tps", ""), "tps")
        clocks = self.increasing_ints(self.get(d, "clocks_mhz", ""), "clocks_mhz")
        provenance: dict[str, ProvenanceValue] = {}
        for key, value in self.obj(self.get(d, "provenance", ""), "provenance").items():
            if not isinstance(value, str | int | float | bool):
                raise self.fail(f"provenance.{key}", f"must be a string, number or boolean, got {value!r}")
            provenance[key] = value
        raw_classes = self.lst(self.get(d, "classes", ""), "classes")
        if not raw_classes:
            raise self.fail("classes", "must not be empty")
        classes: dict[str, ClassProfile] = {}
        for i, raw in enumerate(raw_classes):
            c = self.class_profile(raw, f"classes[{i}]", tps, clocks)
            if c.name in classes:
                raise self.fail(f"classes[{i}].name", f"duplicate class {c.name!r}")
            classes[c.name] = c
        return Profile(
            model=model, gpu=gpu, tps=tps, clocks_mhz=clocks, classes=classes, provenance=provenance
        )

    def class_profile(
        self, raw: object, field: str, tps: tuple[int, ...], clocks: tuple[int, ...]
    ) -> ClassProfile:
        d = self.obj(raw, field)
        name = self.get(d, "name", field)
        if not isinstance(name, str) or name not in CLASS_NAMES:
            raise self.fail(f"{field}.name", f"must be one of {', '.join(CLASS_NAMES)}, got {name!r}")
        input_tokens = self.pos_int(self.get(d, "input_tokens", field), f"{field}.input_tokens")
        output_tokens = self.pos_int(self.get(d, "output_tokens", field), f"{field}.output_tokens")
        load_input_tokens_mean = (
            self.number(d["load_input_tokens_mean"], f"{field}.load_input_tokens_mean", positive=True)
            if "load_input_tokens_mean" in d
            else None
        )
        slo_d = self.obj(self.get(d, "slo", field), f"{field}.slo")
        slo = ClassSlo(
            ttft_s=self.number(
                self.get(slo_d, "ttft_s", f"{field}.slo"), f"{field}.slo.ttft_s", positive=True
            ),
            tbt_s=self.number(self.get(slo_d, "tbt_s", f"{field}.slo"), f"{field}.slo.tbt_s", positive=True),
        )
        configs: dict[tuple[int, int], ConfigProfile] = {}
        for j, raw_cfg in enumerate(self.lst(self.get(d, "configs", field), f"{field}.configs")):
            cfg = self.config(raw_cfg, f"{field}.configs[{j}]", tps, clocks)
            key = (cfg.tp, cfg.clock_mhz)
            if key in configs:
                raise self.fail(
                    f"{field}.configs[{j}]", f"duplicate configuration TP{key[0]} at {key[1]} MHz"
                )
            configs[key] = cfg
        missing = [(tp, c) for tp in tps for c in clocks if (tp, c) not in configs]
        if missing:
            listed = ", ".join(f"TP{tp}/{c} MHz" for tp, c in missing)
            raise self.fail(f"{field}.configs", f"missing configurations: {listed}")
        return ClassProfile(
            name=name,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            slo=slo,
            configs=configs,
            load_input_tokens_mean=load_input_tokens_mean,
        )

    def config(self, raw: object, field: str, tps: tuple[int, ...], clocks: tuple[int, ...]) -> ConfigProfile:
        d = self.obj(raw, field)
        tp = self.pos_int(self.get(d, "tp", field), f"{field}.tp")
        if tp not in tps:
            raise self.fail(f"{field}.tp", f"must be one of the profile's tps {list(tps)}, got {tp}")
        clock = self.pos_int(self.get(d, "clock_mhz", field), f"{field}.clock_mhz")
        if clock not in clocks:
            raise self.fail(
                f"{field}.clock_mhz", f"must be one of the profile's clocks_mhz {list(clocks)}, got {clock}"
            )
        max_load = self.number(self.get(d, "max_load_rps", field), f"{field}.max_load_rps", positive=False)
        raw_loads = self.lst(self.get(d, "load_rps", field), f"{field}.load_rps")
        loads = tuple(
            self.number(v, f"{field}.load_rps[{k}]", positive=False) for k, v in enumerate(raw_loads)
        )
        for k in range(1, len(loads)):
            if loads[k] <= loads[k - 1]:
                raise self.fail(f"{field}.load_rps[{k}]", f"must be > the previous level {loads[k - 1]!r}")
        series: dict[str, tuple[float, ...]] = {}
        for name in (*_POSITIVE_SERIES, "slo_attainment"):
            values = self.lst(self.get(d, name, field), f"{field}.{name}")
            if len(values) != len(loads):
                raise self.fail(
                    f"{field}.{name}", f"must have one value per load level ({len(loads)}), got {len(values)}"
                )
            series[name] = tuple(
                self.number(v, f"{field}.{name}[{k}]", positive=name in _POSITIVE_SERIES)
                for k, v in enumerate(values)
            )
        for k, share in enumerate(series["slo_attainment"]):
            if share > 1.0:
                raise self.fail(f"{field}.slo_attainment[{k}]", f"must be a share in 0..1, got {share!r}")
        points = tuple(
            ProfilePoint(
                ttft_p99_s=series["ttft_p99_s"][k],
                tbt_p99_s=series["tbt_p99_s"][k],
                slo_attainment=series["slo_attainment"][k],
                power_w=series["power_w"][k],
                energy_per_request_j=series["energy_per_request_j"][k],
            )
            for k in range(len(loads))
        )
        expected = max_load_meeting_slo(loads, points)
        if not math.isclose(max_load, expected, rel_tol=_MAX_LOAD_RTOL, abs_tol=1e-12):
            raise self.fail(
                f"{field}.max_load_rps",
                f"{max_load!r} disagrees with the levels' SLO attainment, which gives {expected!r}",
            )
        return ConfigProfile(tp=tp, clock_mhz=clock, max_load_rps=max_load, load_rps=loads, points=points)
