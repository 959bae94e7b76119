#!/usr/bin/env python3
"""Fit the physics model's parameters on the training split of the calibration data and write
agent/sim/physics/params/<model>__h100-sxm.json (committed; nothing at run time reads the data).

    PYTHONPATH=. .venv/bin/python tools/fit_physics.py [--data-dir ../shared/data] [--check]

Stages, each on training rows only (controller.sim.calibration.is_validation holds the rest back):
  1. kernels   <- vidur H100 linear-layer op times (Llama-2-7B and -70B blocks, TP 1/2/4/8)
  2. all-reduce <- vidur h100_dgx all_reduce.csv, alpha + bytes/bw per TP degree
  3. engine terms of llama2-70b <- splitwise-sim perf_model.csv (h100-80gb prefill and decode)
  4. engine terms of llama3.1-* <- ML.ENERGY V3 median inter-token latency (vLLM, H100)
  5. power (memory-bound and other dynamic watts) <- ML.ENERGY V3 average power per GPU
  6. voltage at the lowest clock <- splitwise-sim h100-80gb-pcap prefill times (power cap 490 W)
Fixed, not fitted (docs/physics.md says why): idle 75 W and compute-bound dynamic power up to the
700 W TDP (splitwise-sim's power model), memory-time clock exponent from the papers' statement.
Prints the fit diagnostics and the validation table; --check exits 1 when the committed files differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from scipy.optimize import least_squares

from agent.sim.physics.model import (
    AllReduceParams,
    AttentionParams,
    ClockParams,
    EngineParams,
    KernelParams,
    PerfModel,
    PerfParams,
    PowerParams,
)
from agent.sim.physics.params import PARAMS_DIR, params_path, params_to_json
from agent.sim.physics.specs import MODEL_NAMES, arch_for, gpu_for
from controller.sim import calibration as cal

GPU = cal.GPU
IDLE_W = 75.0  # splitwise-sim constant power model, H100 idle
TDP_W = gpu_for(GPU).tdp_w
# Decode throughput "about the same" at 1.6 GHz as at 2.0 GHz (DynamoLLM; Patel et al.): memory-bound
# time may grow by at most ~2% for a 1.24x lower clock -> exponent 0.1 (1.2375**0.1 = 1.021).
MEMORY_TIME_EXPONENT = 0.1

Residuals = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T", cal.VidurBlockRow, cal.AllReduceRow, cal.SplitwiseRow, cal.MlEnergyRow)
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """A Log that drops the fit diagnostics (cross-validation refits, tests)."""


def _fit(residuals: Residuals, x0: Sequence[float], name: str, log: Log) -> np.ndarray:
    result = least_squares(residuals, np.asarray(x0, dtype=float), method="lm", xtol=1e-12, ftol=1e-12)
    res = residuals(result.x)
    log(f"  {name}: rms log-residual {math.sqrt(float(np.mean(res**2))):.4f} on {res.size} training values")
    return np.asarray(result.x)


def fit_kernels(rows: Sequence[cal.VidurBlockRow], log: Log) -> KernelParams:
    def params_of(x: np.ndarray) -> KernelParams:
        return KernelParams(
            gemm_flops_per_s=math.exp(x[0]),
            weight_bw_bytes_per_s=math.exp(x[1]),
            roofline_sharpness=1.0 + math.exp(x[2]),
            layer_floor_s=math.exp(x[3]),
            elementwise_s_per_token=math.exp(x[4]),
        )

    def residuals(x: np.ndarray) -> np.ndarray:
        k = params_of(x)
        return np.array(
            [math.log(cal.vidur_block_time_s(k, r.arch, r.tp, r.num_tokens) / r.block_time_s) for r in rows]
        )

    x = _fit(
        residuals,
        [math.log(6e14), math.log(2.5e12), math.log(2.0), math.log(2e-5), math.log(5e-8)],
        "kernels",
        log,
    )
    return params_of(x)


def fit_allreduce(rows: Sequence[cal.AllReduceRow], log: Log) -> tuple[AllReduceParams, ...]:
    out = []
    for tp in sorted({r.tp for r in rows}):
        sel = [r for r in rows if r.tp == tp]

        def residuals(x: np.ndarray, sel: Sequence[cal.AllReduceRow] = sel) -> np.ndarray:
            return np.array(
                [math.log((math.exp(x[0]) + r.size_bytes / math.exp(x[1])) / r.time_s) for r in sel]
            )

        x = _fit(residuals, [math.log(3e-5), math.log(2e11)], f"all-reduce tp{tp}", log)
        out.append(AllReduceParams(tp=tp, alpha_s=math.exp(x[0]), bw_bytes_per_s=math.exp(x[1])))
    return tuple(out)


def _model(model: str, tp: int, params: PerfParams) -> PerfModel:
    return PerfModel(arch_for(model), gpu_for(GPU), tp, params)


@dataclass(frozen=True)
class Bounded:
    """One fitted scalar: initial value and bounds in SI units (the solver sees value / scale)."""

    name: str
    x0: float
    lo: float
    hi: float

    @property
    def scale(self) -> float:
        return self.x0


def _fit_bounded(
    residuals: Callable[[dict[str, float]], np.ndarray], spec: Sequence[Bounded], name: str, log: Log
) -> dict[str, float]:
    scales = np.array([b.scale for b in spec])

    def unpack(z: np.ndarray) -> dict[str, float]:
        return {b.name: float(v) for b, v in zip(spec, z * scales, strict=True)}

    result = least_squares(
        lambda z: residuals(unpack(z)),
        np.ones(len(spec)),
        bounds=(np.array([b.lo for b in spec]) / scales, np.array([b.hi for b in spec]) / scales),
        method="trf",
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )
    # a parameter the data push against a bound is written as the bound itself, not as the solver's
    # last interior step (1e-29 s and the like), so the committed files read cleanly
    z = result.x.copy()
    for i, b in enumerate(spec):
        for bound in (b.lo, b.hi):
            if abs(z[i] * scales[i] - bound) <= 1e-9 * scales[i]:
                z[i] = bound / scales[i]
    fitted = unpack(z)
    res = residuals(fitted)
    log(f"  {name}: rms log-residual {math.sqrt(float(np.mean(res**2))):.4f} on {res.size} training values")
    for b in spec:
        at_bound = (
            " (at bound)" if math.isclose(fitted[b.name], b.lo) or math.isclose(fitted[b.name], b.hi) else ""
        )
        log(f"    {b.name} = {fitted[b.name]:.6g}{at_bound}")
    return fitted


PEAK_FLOPS = gpu_for(GPU).peak_bf16_flops
HBM_BW = gpu_for(GPU).memory_bw_bytes_per_s
LATENCY_SPEC = (
    # shared attention kernels: between 5% and 100% of the data-sheet peak
    Bounded("attn_flops", 0.4 * PEAK_FLOPS, 0.05 * PEAK_FLOPS, PEAK_FLOPS),
    Bounded("kv_bw", 0.7 * HBM_BW, 0.2 * HBM_BW, HBM_BW),
    Bounded("attn_seq_layer", 0.3e-6, 0.0, 10e-6),
    # splitwise-sim's engine (llama2-70b)
    Bounded("sw_iter", 10e-3, 0.0, 0.1),
    Bounded("sw_prefill", 5e-3, 0.0, 0.1),
    Bounded("sw_seq", 20e-6, 0.0, 1e-3),
    Bounded("sw_token", 60e-6, 0.0, 1e-3),
    Bounded("sw_latency", 1.0, 0.1, 10.0),
    Bounded("sw_hop", 5e-6, 0.0, 1e-3),
    Bounded("sw_bw", 0.9, 0.02, 1.0),
    # vLLM as run by ML.ENERGY (llama3.1-*)
    Bounded("ml_iter", 2e-3, 0.0, 0.1),
    Bounded("ml_prefill", 1e-3, 0.0, 0.1),
    Bounded("ml_seq", 20e-6, 0.0, 1e-3),
    Bounded("ml_token", 1e-6, 0.0, 1e-3),
    Bounded("ml_latency", 1.0, 0.1, 10.0),
)
SW_SOURCE = "splitwise-sim perf_model.csv llama2-70b h100-80gb"
ML_SOURCE = "ML.ENERGY V3 llm_configs_all_tasks.csv Llama-3.1-8B/70B H100 (vLLM)"


def _attention(x: dict[str, float]) -> AttentionParams:
    return AttentionParams(x["attn_flops"], x["kv_bw"], x["attn_seq_layer"])


def _splitwise_engine(x: dict[str, float]) -> EngineParams:
    return EngineParams(
        SW_SOURCE,
        x["sw_iter"],
        x["sw_prefill"],
        x["sw_seq"],
        x["sw_token"],
        x["sw_latency"],
        x["sw_hop"],
        x["sw_bw"],
    )


def _mlenergy_engine(x: dict[str, float]) -> EngineParams:
    # only TP4 data: per-hop latency and bandwidth stay at the NCCL microbenchmark's
    return EngineParams(
        ML_SOURCE, x["ml_iter"], x["ml_prefill"], x["ml_seq"], x["ml_token"], x["ml_latency"], 0.0, 1.0
    )


def fit_latency(
    bases: dict[str, PerfParams],
    splitwise: Sequence[cal.SplitwiseRow],
    mlenergy: Sequence[cal.MlEnergyRow],
    log: Log,
) -> dict[str, PerfParams]:
    """Attention kernels (shared) and both engines' terms, jointly on splitwise and ML.ENERGY latencies."""

    def with_x(x: dict[str, float]) -> dict[str, PerfParams]:
        attention = _attention(x)
        return {
            m: replace(
                b,
                attention=attention,
                engine=_splitwise_engine(x) if m == "llama2-70b" else _mlenergy_engine(x),
            )
            for m, b in bases.items()
        }

    def residuals(x: dict[str, float]) -> np.ndarray:
        params = with_x(x)
        out = []
        for r in splitwise:
            out.append(
                math.log(
                    cal.splitwise_predict(_model("llama2-70b", r.tp, params["llama2-70b"]), r) / r.time_s
                )
            )
        for m in mlenergy:
            itl_s = cal.mlenergy_predict(_model(m.model, m.tp, params[m.model]), m)[0]
            out.append(math.log(itl_s / m.median_itl_s))
        return np.array(out)

    return with_x(_fit_bounded(residuals, LATENCY_SPEC, "attention + engines (splitwise, ML.ENERGY)", log))


POWER_SPEC = (
    Bounded("busy_w", 200.0, 0.0, 700.0),
    Bounded("comm_w", 100.0, 0.0, 700.0),
    Bounded("gap_w", 50.0, 0.0, 700.0),
    # physical ceilings: the TDP's dynamic share at the data-sheet peak FLOP rate / HBM bandwidth
    Bounded("energy_per_flop_j", 0.3e-12, 0.0, (TDP_W - IDLE_W) / PEAK_FLOPS),
    Bounded("energy_per_byte_j", 20e-12, 0.0, (TDP_W - IDLE_W) / HBM_BW),
)


def _power(x: dict[str, float]) -> PowerParams:
    return PowerParams(
        IDLE_W, x["busy_w"], x["comm_w"], x["gap_w"], x["energy_per_flop_j"], x["energy_per_byte_j"]
    )


# splitwise-sim's power model is a model, not a measurement: each of its rows counts half a measured row
ANCHOR_WEIGHT = 0.5


def fit_power(
    bases: dict[str, PerfParams],
    mlenergy: Sequence[cal.MlEnergyRow],
    splitwise: Sequence[cal.SplitwiseRow],
    log: Log,
) -> dict[str, PerfParams]:
    """Measured ML.ENERGY power, plus splitwise-sim's power model for the llama2-70b engine (prompt phase
    700 W, token phase 380 W: the docs/physics.md anchors) at ANCHOR_WEIGHT."""

    def with_x(x: dict[str, float]) -> dict[str, PerfParams]:
        return {m: replace(b, power=_power(x)) for m, b in bases.items()}

    def residuals(x: dict[str, float]) -> np.ndarray:
        params = with_x(x)
        out = [
            math.log(cal.mlenergy_predict(_model(r.model, r.tp, params[r.model]), r)[1] / r.power_w_per_gpu)
            for r in mlenergy
        ]
        for r in splitwise:
            perf = _model("llama2-70b", r.tp, params["llama2-70b"])
            power_w = perf.iteration(perf.max_clock_mhz, *cal.splitwise_iteration_args(r))[1]
            out.append(ANCHOR_WEIGHT * math.log(power_w / cal.splitwise_power_model_w(r)))
        return np.array(out)

    return with_x(_fit_bounded(residuals, POWER_SPEC, "power (ML.ENERGY + splitwise-sim power model)", log))


def fit_voltage(base: PerfParams, rows: Sequence[cal.SplitwiseRow], log: Log) -> ClockParams:
    def clock_of(x: np.ndarray) -> ClockParams:
        # V(f_min)/V(f_max) in (0, 1)
        return ClockParams(MEMORY_TIME_EXPONENT, 1.0 / (1.0 + math.exp(-x[0])))

    def residuals(x: np.ndarray) -> np.ndarray:
        params = replace(base, clock=clock_of(x))
        return np.array(
            [math.log(cal.splitwise_predict(_model("llama2-70b", r.tp, params), r) / r.time_s) for r in rows]
        )

    return clock_of(_fit(residuals, [1.0], "voltage (splitwise pcap)", log))


def fit_all(
    data: cal.CalibrationData, held_out: Callable[[str], bool] = cal.is_validation, verbose: bool = True
) -> dict[str, PerfParams]:
    """The fitted parameters of every model on h100-sxm, from the rows of `data` not `held_out`."""
    log: Log = print if verbose else _quiet

    def train(rows: Sequence[T]) -> list[T]:
        return [r for r in rows if not held_out(r.key)]

    kernels = fit_kernels(train(data.vidur), log)
    allreduce = fit_allreduce(train(data.allreduce), log)
    # latency at max clock does not depend on clock or power parameters: start those anywhere
    x0 = {b.name: b.x0 for b in LATENCY_SPEC}
    clock0 = ClockParams(MEMORY_TIME_EXPONENT, 0.8)
    power0 = _power({b.name: b.x0 for b in POWER_SPEC})
    bases = {
        m: PerfParams(m, GPU, kernels, _attention(x0), allreduce, _splitwise_engine(x0), clock0, power0)
        for m in MODEL_NAMES
    }
    splitwise = train(data.splitwise)
    bases = fit_latency(bases, [r for r in splitwise if r.hardware == "h100-80gb"], train(data.mlenergy), log)
    bases = fit_power(bases, train(data.mlenergy), [r for r in splitwise if r.hardware == "h100-80gb"], log)
    pcap_prefill = [r for r in splitwise if r.hardware == "h100-80gb-pcap" and r.phase == "prefill"]
    clock = fit_voltage(bases["llama2-70b"], pcap_prefill, log)
    return {m: replace(b, clock=clock) for m, b in bases.items()}


def provenance(data_dir: Path) -> dict[str, object]:
    return {
        "fitted_by": "tools/fit_physics.py",
        "split": f"held back: CRC32(config key) % {cal.VALIDATION_EVERY} == 0 (controller.sim.calibration)",
        "data": "../shared/data/calibration: vidur (MIT), splitwise-sim (MIT), ML.ENERGY V3 (Apache-2.0)",
        "fixed": {
            "idle_w": "splitwise-sim constant power model (H100 idle 75 W)",
            "compute_dynamic_w": "TDP - idle: splitwise-sim prompt power 700 W",
            "memory_time_exponent": "papers: decode throughput about the same at 1.6 vs 2.0 GHz",
            "mlenergy_prompt_tokens": cal.MLENERGY_PROMPT_TOKENS,
        },
    }


def render(params: PerfParams, data_dir: Path) -> str:
    return json.dumps(params_to_json(params, provenance(data_dir)), indent=2, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    default_dir = os.environ.get("DYNAMOLLM_SHARED_DATA", "../shared/data")
    parser.add_argument("--data-dir", type=Path, default=Path(default_dir))
    parser.add_argument("--out-dir", type=Path, default=PARAMS_DIR)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if committed files differ")
    parser.add_argument(
        "--cross-validate",
        action="store_true",
        help=f"also print {cal.VALIDATION_EVERY}-fold cross-validated errors",
    )
    args = parser.parse_args(argv)

    data = cal.load_all(args.data_dir)
    print("fitting on the training split:")
    fitted = fit_all(data)
    differs = False
    for model, params in fitted.items():
        path = params_path(model, GPU, args.out_dir)
        text = render(params, args.data_dir)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                print(f"differs: {path}")
                differs = True
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    print("\nvalidation (held-back rows, committed split):")
    print_rows(cal.validate_data(data, fitted))
    if args.cross_validate:
        print(
            f"\n{cal.VALIDATION_EVERY}-fold cross-validation (each fold held out in turn, refit without it):"
        )
        print_rows(cross_validate(data))
    return 1 if differs else 0


def print_rows(rows: Sequence[cal.ValidationRow]) -> None:
    for r in rows:
        print(
            f"  {r.dataset:32s} {r.quantity:18s} n={r.n:4d} median {100 * r.median_rel_err:5.1f}% "
            f"max {100 * r.max_rel_err:6.1f}% target {100 * r.target:.0f}% {'ok' if r.ok else 'MISSED'}"
        )


def cross_validate(data: cal.CalibrationData) -> list[cal.ValidationRow]:
    """Errors pooled over VALIDATION_EVERY refits, each holding out one CRC32 residue class of the keys."""
    pooled: dict[tuple[str, str], cal.Errors] = {}
    for fold in range(cal.VALIDATION_EVERY):

        def held_out(key: str, fold: int = fold) -> bool:
            return zlib.crc32(key.encode()) % cal.VALIDATION_EVERY == fold

        params = fit_all(data, held_out, verbose=False)
        for e in cal.validation_errors(data, params, held_out):
            prev = pooled.get((e.dataset, e.quantity))
            pooled[(e.dataset, e.quantity)] = (
                e if prev is None else replace(prev, rel_errs=prev.rel_errs + e.rel_errs)
            )
    return [e.summary() for e in pooled.values()]


if __name__ == "__main__":
    sys.exit(main())
