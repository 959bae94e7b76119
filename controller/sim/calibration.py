"""The public measurements the physics model is fitted to and checked against (docs/physics.md).

Readers for the calibration data sets under `../shared/data/calibration`, the deterministic
train/validation split, the mapping from each measurement to the model's inputs (`predict_*`), and
`validate`, which reports the model's relative error on the held-back rows. tools/fit_physics.py fits on
the training rows through the same functions; `dctl model validate` and tests/sim call `validate`.
This is the only place that knows the data sets' file layouts.
"""

from __future__ import annotations

import csv
import math
import statistics
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.api.errors import DataFileError, NotFoundError
from agent.sim.physics.model import KernelParams, PerfModel, PerfParams
from agent.sim.physics.params import load_perf_model, params_to_json
from agent.sim.physics.specs import ModelArch, arch_for, gpu_for, kv_capacity_tokens

GPU = "h100-sxm"

# Every VALIDATION_EVERY-th configuration (by a CRC32 of its stable key) is held back from fitting.
VALIDATION_EVERY = 4

LATENCY_TARGET = 0.15
POWER_TARGET = 0.20

# splitwise-sim's constant power model (configs/power_model/constant.yaml), H100, W per GPU: a model
# the Splitwise authors derived from their measurements, not a measurement itself.
SPLITWISE_PROMPT_W = 700.0
SPLITWISE_TOKEN_W = 380.0

# splitwise-sim's dgx-h100-pcap SKU: server TDP 7140 W instead of 10200 W, i.e. each GPU capped at 70%.
PCAP_POWER_W = 0.7 * 700.0

VIDUR_MODELS = ("Llama-2-70b-hf", "Llama-2-7b-hf")
VIDUR_BLOCK_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
MLENERGY_MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama3.1-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama3.1-70b",
}

# Mean prompt length of the ML.ENERGY V3 runs, which publish output lengths only. LM Arena chat prompts:
# LMSYS-Chat-1M reports 69.5 tokens per user prompt (Zheng et al., 2023); the Llama 3.1 chat template adds
# about 30. An assumption, not a measurement: docs/physics.md shows how the fit depends on it.
MLENERGY_PROMPT_TOKENS = {"lm-arena-chat": 100}


def is_validation(key: str) -> bool:
    """Deterministic split: held back iff CRC32(key) is a multiple of VALIDATION_EVERY."""
    return zlib.crc32(key.encode()) % VALIDATION_EVERY == 0


@dataclass(frozen=True, slots=True)
class VidurBlockRow:
    """vidur: one transformer block's linear-layer kernels (sum of op medians) at one token count and TP."""

    key: str
    arch: ModelArch
    tp: int
    num_tokens: int
    block_time_s: float


@dataclass(frozen=True, slots=True)
class AllReduceRow:
    key: str
    tp: int
    size_bytes: int
    time_s: float


@dataclass(frozen=True, slots=True)
class SplitwiseRow:
    """splitwise-sim perf_model.csv, llama2-70b on H100: one phase of one configuration, median over its
    repeats. A prefill configuration is (tp, prompt, batch): runs differing only in output length share it."""

    key: str
    phase: str  # "prefill" (prompt_time) or "decode" (token_time)
    hardware: str  # "h100-80gb" or "h100-80gb-pcap"
    tp: int
    prompt_tokens: int
    batch_size: int
    output_tokens: int  # decode rows only; 0 for prefill rows
    time_s: float
    repeats: int


@dataclass(frozen=True, slots=True)
class MlEnergyRow:
    """ML.ENERGY V3, one vLLM run of a Llama-3.1 model on H100 at default clocks."""

    key: str
    model: str
    task: str
    tp: int
    max_num_seqs: int
    avg_batch_size: float
    avg_output_tokens: float
    median_itl_s: float
    power_w_per_gpu: float


@dataclass(frozen=True, slots=True)
class ValidationRow:
    dataset: str
    quantity: str
    n: int
    median_rel_err: float
    max_rel_err: float
    target: float

    @property
    def ok(self) -> bool:
        return self.median_rel_err <= self.target


@dataclass(frozen=True, slots=True)
class CalibrationData:
    vidur: tuple[VidurBlockRow, ...]
    allreduce: tuple[AllReduceRow, ...]
    splitwise: tuple[SplitwiseRow, ...]
    mlenergy: tuple[MlEnergyRow, ...]


# ---------------------------------------------------------------------------------------------- reading


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header; line numbers count the header as line 1."""
    if not path.is_file():
        raise NotFoundError(f"calibration file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row


def _float(path: Path, line: int, row: dict[str, str], field: str) -> float:
    raw = row.get(field)
    if raw is None:
        raise DataFileError(str(path), line, field, "column missing")
    try:
        value = float(raw)
    except ValueError:
        raise DataFileError(str(path), line, field, f"not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise DataFileError(str(path), line, field, f"not finite: {raw!r}")
    return value


def _positive(path: Path, line: int, row: dict[str, str], field: str) -> float:
    value = _float(path, line, row, field)
    if value <= 0:
        raise DataFileError(str(path), line, field, f"must be > 0, got {value}")
    return value


def _int(path: Path, line: int, row: dict[str, str], field: str) -> int:
    value = _positive(path, line, row, field)
    if value != int(value):
        raise DataFileError(str(path), line, field, f"must be an integer, got {value}")
    return int(value)


def load_vidur(data_dir: Path) -> tuple[VidurBlockRow, ...]:
    """Per-block linear-layer time per (model, TP, tokens); repeated profiles of one point -> median."""
    groups: dict[tuple[str, int, int], tuple[ModelArch, list[float]]] = {}
    for name in VIDUR_MODELS:
        path = data_dir / "calibration" / "vidur" / "compute" / "h100" / name / "mlp.csv"
        for line, row in _rows(path):
            n_heads, n_kv = _int(path, line, row, "n_head"), _int(path, line, row, "n_kv_head")
            hidden, ffn = _int(path, line, row, "n_embd"), _int(path, line, row, "n_expanded_embd")
            vocab = _int(path, line, row, "vocab_size")
            if row.get("use_gated_mlp") != "True":
                raise DataFileError(str(path), line, "use_gated_mlp", "expected True (Llama blocks)")
            # One block of the model, for per-op timings; the context limit plays no part there.
            arch = ModelArch(name, 1, hidden, n_heads, n_kv, ffn, vocab, 2, max_context_tokens=0)
            tp = _int(path, line, row, "num_tensor_parallel_workers")
            tokens = _int(path, line, row, "num_tokens")
            block_ms = sum(_positive(path, line, row, f"time_stats.{op}.median") for op in VIDUR_BLOCK_OPS)
            groups.setdefault((name, tp, tokens), (arch, []))[1].append(block_ms * 1e-3)
    return tuple(
        VidurBlockRow(f"vidur/{name}/tp{tp}/n{tokens}", arch, tp, tokens, statistics.median(times))
        for (name, tp, tokens), (arch, times) in sorted(groups.items())
    )


def load_allreduce(data_dir: Path) -> tuple[AllReduceRow, ...]:
    """All-reduce time per (TP, bytes) on a DGX H100; repeated measurements of one point -> median."""
    path = data_dir / "calibration" / "vidur" / "network" / "h100_dgx" / "all_reduce.csv"
    groups: dict[tuple[int, int], list[float]] = defaultdict(list)
    for line, row in _rows(path):
        if row.get("collective") != "all_reduce":
            raise DataFileError(str(path), line, "collective", "expected all_reduce")
        tp = _int(path, line, row, "num_workers")
        size = _int(path, line, row, "size")
        groups[(tp, size)].append(_positive(path, line, row, "time_stats.all_reduce.median") * 1e-3)
    return tuple(
        AllReduceRow(f"allreduce/tp{tp}/b{size}", tp, size, statistics.median(times))
        for (tp, size), times in sorted(groups.items())
    )


def load_splitwise(data_dir: Path) -> tuple[SplitwiseRow, ...]:
    """Prefill and decode rows of llama2-70b on h100-80gb(-pcap). Runs whose KV cache cannot fit on the
    instance are left out: the engine cannot have run them as one batch (TP2 at batch 64 reports a
    prefill faster than at batch 32)."""
    path = data_dir / "calibration" / "splitwise-sim" / "perf_model.csv"
    arch, gpu = arch_for("llama2-70b"), gpu_for(GPU)
    prefill: dict[tuple[str, int, int, int], list[float]] = defaultdict(list)
    decode: dict[tuple[str, int, int, int, int], list[float]] = defaultdict(list)
    for line, row in _rows(path):
        for field in ("model", "hardware"):
            if not row.get(field):
                raise DataFileError(str(path), line, field, "empty")
        prompt_s = _positive(path, line, row, "prompt_time") * 1e-3
        token_s = _positive(path, line, row, "token_time") * 1e-3
        tp = _int(path, line, row, "tensor_parallel")
        prompt, batch = _int(path, line, row, "prompt_size"), _int(path, line, row, "batch_size")
        output = _int(path, line, row, "token_size")
        if row["model"] != "llama2-70b" or row["hardware"] not in ("h100-80gb", "h100-80gb-pcap"):
            continue
        if batch * (prompt + output) > kv_capacity_tokens(arch, gpu, tp):
            continue
        prefill[(row["hardware"], tp, prompt, batch)].append(prompt_s)
        decode[(row["hardware"], tp, prompt, batch, output)].append(token_s)
    out = [
        SplitwiseRow(
            f"splitwise/{hw}/prefill/tp{tp}/p{p}/b{b}",
            "prefill",
            hw,
            tp,
            p,
            b,
            0,
            statistics.median(t),
            len(t),
        )
        for (hw, tp, p, b), t in sorted(prefill.items())
    ]
    out += [
        SplitwiseRow(
            f"splitwise/{hw}/decode/tp{tp}/p{p}/b{b}/o{o}",
            "decode",
            hw,
            tp,
            p,
            b,
            o,
            statistics.median(t),
            len(t),
        )
        for (hw, tp, p, b, o), t in sorted(decode.items())
    ]
    return tuple(out)


def load_mlenergy(data_dir: Path) -> tuple[MlEnergyRow, ...]:
    path = data_dir / "calibration" / "ml-energy-leaderboard-v3" / "llm_configs_all_tasks.csv"
    out = []
    for line, row in _rows(path):
        model = MLENERGY_MODELS.get(row.get("model_id", ""))
        if model is None or row.get("gpu_model") != "H100":
            continue
        task = row.get("task", "")
        if task not in MLENERGY_PROMPT_TOKENS:
            raise DataFileError(
                str(path), line, "task", f"no prompt length known; known: {sorted(MLENERGY_PROMPT_TOKENS)}"
            )
        if row.get("weight_precision") != "bfloat16":
            raise DataFileError(str(path), line, "weight_precision", "expected bfloat16")
        tp = _int(path, line, row, "tensor_parallel")
        gpus = _int(path, line, row, "num_gpus")
        if gpus != tp:
            raise DataFileError(str(path), line, "num_gpus", f"expected one TP group ({tp} GPUs), got {gpus}")
        max_seqs = _int(path, line, row, "max_num_seqs")
        out.append(
            MlEnergyRow(
                key=f"mlenergy/{task}/{model}/tp{tp}/b{max_seqs}",
                model=model,
                task=task,
                tp=tp,
                max_num_seqs=max_seqs,
                avg_batch_size=_positive(path, line, row, "avg_batch_size"),
                avg_output_tokens=_positive(path, line, row, "avg_output_len"),
                median_itl_s=_positive(path, line, row, "median_itl_ms") * 1e-3,
                # avg_power_watts is the sum over the instance's GPUs
                power_w_per_gpu=_positive(path, line, row, "avg_power_watts") / gpus,
            )
        )
    return tuple(out)


def load_all(data_dir: Path) -> CalibrationData:
    if not (data_dir / "calibration").is_dir():
        raise NotFoundError(
            f"no calibration/ folder under {data_dir} (expected ../shared/data or --data-dir)"
        )
    return CalibrationData(
        load_vidur(data_dir), load_allreduce(data_dir), load_splitwise(data_dir), load_mlenergy(data_dir)
    )


# ------------------------------------------------------------------------------------------ predictions


def vidur_block_time_s(k: KernelParams, arch: ModelArch, tp: int, tokens: int) -> float:
    """Linear-layer kernels of one block at max clock: the per-block share of PerfModel's linear term."""
    p_layer = arch.params_per_layer
    compute_s = tokens * 2.0 * p_layer / tp / k.gemm_flops_per_s
    weights_s = p_layer * arch.bytes_per_param / tp / k.weight_bw_bytes_per_s
    p = k.roofline_sharpness
    linear_s = float((compute_s**p + weights_s**p) ** (1.0 / p))
    return linear_s + k.layer_floor_s + tokens * k.elementwise_s_per_token


def allreduce_time_s(params: PerfParams, row: AllReduceRow) -> float:
    ar = params.allreduce_for(row.tp)
    if ar is None:
        raise NotFoundError(f"no all-reduce parameters for tp={row.tp}")
    return ar.alpha_s + row.size_bytes / ar.bw_bytes_per_s


def splitwise_iteration_args(row: SplitwiseRow) -> tuple[int, int, int, int]:
    """Prefill: the whole batch of prompts in one iteration (splitwise-sim's prompt_time). Decode: one
    iteration of the batch at the mean context over the generation (token_time)."""
    if row.phase == "prefill":
        tokens = row.batch_size * row.prompt_tokens
        return tokens, tokens * row.prompt_tokens, 0, 0
    return 0, 0, row.batch_size, row.batch_size * (row.prompt_tokens + row.output_tokens // 2)


def splitwise_power_model_w(row: SplitwiseRow) -> float:
    return SPLITWISE_PROMPT_W if row.phase == "prefill" else SPLITWISE_TOKEN_W


def power_capped_clock_mhz(perf: PerfModel, cap_w: float, args: tuple[int, int, int, int]) -> float:
    """The clock a power-capped GPU settles at for this iteration: the highest one drawing <= cap_w."""
    if perf.iteration(perf.max_clock_mhz, *args)[1] <= cap_w:
        return float(perf.max_clock_mhz)
    lo, hi = float(perf.min_clock_mhz), float(perf.max_clock_mhz)
    if perf.iteration(lo, *args)[1] > cap_w:
        return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if perf.iteration(mid, *args)[1] <= cap_w:
            lo = mid
        else:
            hi = mid
    return lo


def splitwise_predict(perf: PerfModel, row: SplitwiseRow) -> float:
    """Latency_s of a splitwise row's iteration; pcap rows run at the clock their power cap allows."""
    args = splitwise_iteration_args(row)
    clock = float(perf.max_clock_mhz)
    if row.hardware == "h100-80gb-pcap":
        clock = power_capped_clock_mhz(perf, PCAP_POWER_W, args)
    return perf.iteration(clock, *args)[0]


def mlenergy_iteration_args(row: MlEnergyRow) -> tuple[int, int, int, int]:
    """The mean iteration of a saturated vLLM run: avg_batch_size sequences decoding at the mean context,
    plus the prompts that replace finished sequences (batch / output length of them per iteration)."""
    prompt = MLENERGY_PROMPT_TOKENS[row.task]
    batch = round(row.avg_batch_size)
    new_seqs_per_iter = row.avg_batch_size / row.avg_output_tokens
    prefill_tokens = round(new_seqs_per_iter * prompt)
    context = round(row.avg_batch_size * (prompt + row.avg_output_tokens / 2.0))
    return prefill_tokens, prefill_tokens * prompt, batch, context


def mlenergy_predict(perf: PerfModel, row: MlEnergyRow) -> tuple[float, float]:
    """(inter-token latency_s, power_w per GPU) at the default (max) clock."""
    return perf.iteration(perf.max_clock_mhz, *mlenergy_iteration_args(row))


# ------------------------------------------------------------------------------------------- validation


def rel_err(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def _perf_factory(params: Mapping[str, PerfParams] | None) -> Callable[[str, int], PerfModel]:
    cache: dict[tuple[str, int], PerfModel] = {}

    def get(model: str, tp: int) -> PerfModel:
        if (model, tp) not in cache:
            if params is None:
                cache[(model, tp)] = load_perf_model(model, GPU, tp)
            else:
                cache[(model, tp)] = PerfModel(arch_for(model), gpu_for(GPU), tp, params[model])
        return cache[(model, tp)]

    return get


@dataclass(frozen=True, slots=True)
class Errors:
    """Relative errors of one quantity of one data set on the rows checked."""

    dataset: str
    quantity: str
    target: float
    rel_errs: tuple[float, ...]

    def summary(self) -> ValidationRow:
        if not self.rel_errs:
            raise NotFoundError(f"no held-back rows for {self.dataset} {self.quantity}")
        errs = self.rel_errs
        return ValidationRow(
            self.dataset, self.quantity, len(errs), statistics.median(errs), max(errs), self.target
        )


def validation_errors(
    data: CalibrationData,
    params: Mapping[str, PerfParams] | None = None,
    held_out: Callable[[str], bool] = is_validation,
) -> list[Errors]:
    """Relative error of every held-out row, per data set and quantity.

    `params` (model name -> parameters) replaces the committed parameter files and `held_out` the split,
    for the fit script's cross-validation.
    """
    perf = _perf_factory(params)
    ref = perf("llama2-70b", 8).params
    out: list[Errors] = []

    def add(dataset: str, quantity: str, target: float, errs: list[float]) -> None:
        out.append(Errors(dataset, quantity, target, tuple(errs)))

    vidur = [r for r in data.vidur if held_out(r.key)]
    add(
        "vidur-h100-linear",
        "block_latency",
        LATENCY_TARGET,
        [rel_err(vidur_block_time_s(ref.kernels, r.arch, r.tp, r.num_tokens), r.block_time_s) for r in vidur],
    )
    ar_rows = [r for r in data.allreduce if held_out(r.key)]
    add(
        "vidur-h100-allreduce",
        "allreduce_latency",
        LATENCY_TARGET,
        [rel_err(allreduce_time_s(ref, r), r.time_s) for r in ar_rows],
    )

    for hw, name in (
        ("h100-80gb", "splitwise-llama2-70b-h100"),
        ("h100-80gb-pcap", "splitwise-llama2-70b-h100-pcap"),
    ):
        for phase in ("prefill", "decode"):
            rows = [r for r in data.splitwise if r.hardware == hw and r.phase == phase and held_out(r.key)]
            errs = [rel_err(splitwise_predict(perf("llama2-70b", r.tp), r), r.time_s) for r in rows]
            add(name, f"{phase}_latency", LATENCY_TARGET, errs)
    for phase in ("prefill", "decode"):
        rows = [
            r for r in data.splitwise if r.hardware == "h100-80gb" and r.phase == phase and held_out(r.key)
        ]
        errs = []
        for r in rows:
            m = perf("llama2-70b", r.tp)
            errs.append(
                rel_err(
                    m.iteration(m.max_clock_mhz, *splitwise_iteration_args(r))[1], splitwise_power_model_w(r)
                )
            )
        add("splitwise-sim-power-model-h100", f"{phase}_power", POWER_TARGET, errs)

    for model in ("llama3.1-8b", "llama3.1-70b"):
        ml_rows = [r for r in data.mlenergy if r.model == model and held_out(r.key)]
        pred = [mlenergy_predict(perf(model, r.tp), r) for r in ml_rows]
        name = f"mlenergy-v3-{model}-h100"
        add(
            name,
            "decode_latency",
            LATENCY_TARGET,
            [rel_err(p[0], r.median_itl_s) for p, r in zip(pred, ml_rows, strict=True)],
        )
        add(
            name,
            "power",
            POWER_TARGET,
            [rel_err(p[1], r.power_w_per_gpu) for p, r in zip(pred, ml_rows, strict=True)],
        )
    return out


def validate_data(
    data: CalibrationData, params: Mapping[str, PerfParams] | None = None
) -> list[ValidationRow]:
    """n, median and max relative error of the model on the held-back rows of each data set."""
    return [e.summary() for e in validation_errors(data, params)]


def validate(data_dir: Path, params: Mapping[str, PerfParams] | None = None) -> list[ValidationRow]:
    """Load the calibration data under `data_dir` and validate the model on its held-back rows."""
    return validate_data(load_all(data_dir), params)


def model_summary(model: str, gpu: str, tp: int) -> dict[str, object]:
    """The committed fitted parameters of one instance and what they imply (for `dctl model show`)."""
    perf = load_perf_model(model, gpu, tp)
    f_max = perf.max_clock_mhz
    examples = {
        "prefill_2048_tokens": (2048, 2048 * 2048, 0, 0),
        "decode_64_seqs_ctx_1024": (0, 0, 64, 64 * 1024),
    }
    return {
        "model": perf.model,
        "gpu": perf.gpu,
        "tp": perf.tp,
        "kv_capacity_tokens": perf.kv_capacity_tokens,
        "idle_power_w": perf.idle_power_w,
        "clocks_mhz": list(perf.profile_clocks_mhz),
        "params": params_to_json(perf.params, {}),
        "examples_at_clock_mhz": {
            name: {
                str(clock): dict(zip(("latency_s", "power_w"), perf.iteration(clock, *args), strict=True))
                for clock in (f_max, perf.min_clock_mhz)
            }
            for name, args in examples.items()
        },
    }
