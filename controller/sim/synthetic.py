"""Built-in synthetic workloads `synthetic:conversation`, `synthetic:coding` and `synthetic:long-context`,
so the demo needs no download: the fitted workload models and the request generator.

Where it sits: a leaf under `controller.sim.traces`, which dispatches `--trace synthetic:KIND` to
`traces.synthetic_trace`; that calls `synthetic_requests` here and wraps the arrays in a `Trace`, which
the simulator then treats like a file trace. Profiling (`controller.sim.profiling`) draws request lengths
from the same models (`sample_lengths`). This module imports no other simulator module (so there is no
import cycle with `traces`): it only generates arrays.

Every constant below was fitted by `tools/fit_synthetic.py` to the Azure LLM inference traces of
2023-11-16 (AzureLLMInferenceTrace_conv.csv, 19,366 requests; AzureLLMInferenceTrace_code.csv, 8,819
requests; Patel et al., Splitwise, ISCA 2024, CC-BY-4.0); rerun it to reproduce them.

Arrivals: an ON/OFF modulated Poisson process. ON and OFF periods alternate (starting ON) with
exponential lengths; a gap of more than GAP_THRESHOLD_S between requests in the real trace counts as an
OFF period (the coding service comes in bursts separated by silences of up to 217 s; the conversation
service has no such gap). While ON, the rate is `on_rate_rps` times a per-minute multiplier drawn from a
Gamma distribution of mean 1 whose coefficient of variation is the real trace's per-minute rate
variation with the Poisson part removed. This reproduces the mean rate, the minute-scale burstiness and
the inter-arrival CV (1.09 conversation, 13.2 coding) to within sampling noise; it does not reproduce
the real hour's slow trend (conversation rises from ~190 to ~500 requests per minute and falls back).

Token lengths: each service's empirical quantiles at QUANTILE_LEVELS, interpolated linearly in log
tokens (so the published p50/p99 are met exactly in expectation); input and output lengths are coupled
by a Gaussian copula whose correlation gives the real Spearman rank correlation, 2 sin(pi rho_s / 6).

`conversation-2day` is two days of the conversation service (lengths and minute-scale burstiness) on a
daily rate curve the Azure hours do not have: 4x from trough to peak, peaking at 20:00 UTC (mean rate
unchanged over a day). `long-context` is not fitted to a trace: it is a workload of another shape for
evaluating on what the policies were not tuned on, prompts close to the model's context (Llama-2-70B:
4,096 tokens; median prompt 2,900, a quarter above 3,600, 9% beyond the context with their answers and
refused), answers like the conversation service's but shorter, at 2.5 requests/s with the
conversation service's minute-scale burstiness. Profiles draw their lengths from the two fitted
services only (`PROFILED_SERVICES`).

Defaults: one hour (DEFAULT_DURATION_S; two days for `conversation-2day`), and t = 0 at the real
trace's first request (`start_unix_s`), so carbon intensity and prices line up with the real hour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from agent.api.errors import InvalidArgumentError

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_KINDS = ("conversation", "coding", "long-context", "conversation-2day")
# The services whose fitted length models profiles are measured with (controller.sim.profiling).
PROFILED_SERVICES = ("conversation", "coding")
DEFAULT_DURATION_S = 3600.0  # the Azure 2023 traces are one hour each
GAP_THRESHOLD_S = 10.0  # longest gap of the conversation trace is 4.3 s; coding has 45 gaps above 10 s
MODULATION_BIN_S = 60.0  # rate multiplier resolution: per minute, as the traces' published rate plots
QUANTILE_LEVELS = (
    0.0,
    0.01,
    0.05,
    0.10,
    0.20,
    0.25,
    0.30,
    0.40,
    0.50,
    0.60,
    0.70,
    0.75,
    0.80,
    0.90,
    0.95,
    0.99,
    0.999,
    1.0,
)


@dataclass(frozen=True, slots=True)
class WorkloadParams:
    """Fitted description of one service's workload (see the module docstring for the model)."""

    start_unix_s: float
    rate_rps: float
    on_mean_s: float
    off_mean_s: float
    modulation_cv: float
    copula_rho: float
    input_quantiles_tokens: tuple[float, ...]
    output_quantiles_tokens: tuple[float, ...]
    # A daily rate curve (1: none): the rate is multiplied by 1 + a cos(2 pi (hour - peak) / 24) with a
    # set so that its peak is this many times its trough (mean 1 over a day).
    daily_peak_to_trough: float = 1.0
    daily_peak_utc_hour: float = 0.0
    default_duration_s: float = DEFAULT_DURATION_S

    def daily_factor(self, unix_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        r = self.daily_peak_to_trough
        a = (r - 1.0) / (r + 1.0)
        hour = (unix_s / 3600.0) % 24.0
        return np.asarray(1.0 + a * np.cos(2.0 * np.pi * (hour - self.daily_peak_utc_hour) / 24.0))

    @property
    def on_rate_rps(self) -> float:
        """Rate while ON such that the long-run mean rate is `rate_rps`."""
        return self.rate_rps * (self.on_mean_s + self.off_mean_s) / self.on_mean_s


WORKLOADS: dict[str, WorkloadParams] = {
    "conversation": WorkloadParams(
        # first TIMESTAMP of AzureLLMInferenceTrace_conv.csv, 2023-11-16 18:15:46.68059 UTC
        start_unix_s=1700158546.68059,
        # 19,366 requests / 3,501.72 s between first and last request of the conv trace
        rate_rps=5.5304,
        # conv has no gap > GAP_THRESHOLD_S: one ON period spanning the whole trace
        on_mean_s=3501.72,
        off_mean_s=0.0,
        # CV of the conv trace's per-minute request count, Poisson variance removed
        modulation_cv=0.2131,
        # Spearman(ContextTokens, GeneratedTokens) = 0.0728 in the conv trace -> 2 sin(pi * 0.0728 / 6)
        copula_rho=0.0762,
        # ContextTokens quantiles of the conv trace at QUANTILE_LEVELS (p50 1020, p99 4142 as published)
        input_quantiles_tokens=(
            2,
            29,
            181,
            207,
            387,
            396,
            403,
            703,
            1020,
            1071,
            1130,
            1189,
            1315,
            2734.5,
            4083,
            4142,
            6179.15,
            14050,
        ),
        # GeneratedTokens quantiles of the conv trace at QUANTILE_LEVELS (p50 129, p99 601 as published)
        output_quantiles_tokens=(
            7,
            16,
            41,
            54,
            77,
            85,
            91,
            103,
            129,
            177,
            384,
            395,
            400,
            424,
            451,
            601,
            954,
            1000,
        ),
    ),
    "coding": WorkloadParams(
        # first TIMESTAMP of AzureLLMInferenceTrace_code.csv, 2023-11-16 18:17:03.97996 UTC
        start_unix_s=1700158623.97996,
        # 8,819 requests / 3,435.95 s between first and last request of the code trace
        rate_rps=2.5667,
        # code trace: 45 gaps > GAP_THRESHOLD_S, mean 52.83 s; the 46 ON stretches between average 23.01 s
        on_mean_s=23.01,
        off_mean_s=52.83,
        # CV of the code trace's per-minute ON rate (minutes at least half ON), Poisson variance removed
        modulation_cv=0.2586,
        # Spearman(ContextTokens, GeneratedTokens) = -0.0215 in the code trace -> 2 sin(pi * -0.0215 / 6)
        copula_rho=-0.0225,
        # ContextTokens quantiles of the code trace at QUANTILE_LEVELS (p50 1469, p99 7436 as published)
        input_quantiles_tokens=(
            3,
            17,
            75,
            147,
            385.6,
            578,
            770,
            1075,
            1469,
            1909,
            2433,
            2744.5,
            3192.4,
            5187.6,
            7303.3,
            7436,
            7437,
            7437,
        ),
        # GeneratedTokens quantiles of the code trace at QUANTILE_LEVELS (p50 13, p99 251.46 ~ published 252)
        output_quantiles_tokens=(6, 6, 6, 7, 8, 9, 9, 11, 13, 16, 20, 24, 29, 55, 90, 251.46, 825.274, 1899),
    ),
}
# Prompts close to the context on the conversation service's arrivals (module docstring).
WORKLOADS["long-context"] = replace(
    WORKLOADS["conversation"],
    rate_rps=2.5,
    on_mean_s=3600.0,
    copula_rho=0.0,
    input_quantiles_tokens=(
        200,
        600,
        1200,
        1600,
        2100,
        2300,
        2450,
        2700,
        2900,
        3100,
        3350,
        3600,
        3750,
        3950,
        4020,
        4070,
        4090,
        4095,
    ),
    output_quantiles_tokens=(2, 8, 20, 30, 45, 52, 60, 75, 95, 120, 170, 210, 260, 350, 420, 600, 900, 1000),
)
# Two days of the conversation service (its lengths and minute-scale burstiness) on a daily curve the
# Azure hours do not have: 4x from trough to peak, peaking at 20:00 UTC (US afternoon).
WORKLOADS["conversation-2day"] = replace(
    WORKLOADS["conversation"],
    on_mean_s=2 * 86400.0,
    daily_peak_to_trough=4.0,
    daily_peak_utc_hour=20.0,
    default_duration_s=2 * 86400.0,
)


@dataclass(frozen=True, slots=True)
class SyntheticRequests:
    """The requests of one synthetic run: arrival times (s from t = 0, sorted) over [0, duration_s) with
    their prompt and output token counts; t = 0 is the real trace's first request (`start_unix_s`)."""

    name: str
    arrival_s: npt.NDArray[np.float64]
    input_tokens: npt.NDArray[np.int32]
    output_tokens: npt.NDArray[np.int32]
    start_unix_s: float
    duration_s: float


def synthetic_requests(
    kind: str, duration_s: float = DEFAULT_DURATION_S, seed: int = 0, rate_rps: float | None = None
) -> SyntheticRequests:
    """The requests of `kind` ("conversation" | "coding") over [0, duration_s); deterministic per seed.

    `rate_rps` replaces the fitted mean rate (burst structure and lengths unchanged).
    """
    if kind not in WORKLOADS:
        raise InvalidArgumentError(
            "--trace", f"{SYNTHETIC_PREFIX}{kind}", [f"{SYNTHETIC_PREFIX}{k}" for k in SYNTHETIC_KINDS]
        )
    if not (math.isfinite(duration_s) and duration_s > 0.0):
        raise InvalidArgumentError("--duration", duration_s, "a positive number of seconds")
    if rate_rps is not None and not (math.isfinite(rate_rps) and rate_rps > 0.0):
        raise InvalidArgumentError("rate_rps", rate_rps, "a positive finite request rate")
    params = WORKLOADS[kind]
    rng = np.random.default_rng(seed)
    mean_rate_rps = params.rate_rps if rate_rps is None else rate_rps
    on_rate_rps = params.on_rate_rps * mean_rate_rps / params.rate_rps
    arrival_s = _arrivals(params, on_rate_rps, duration_s, rng)
    input_tokens, output_tokens = sample_lengths(params, len(arrival_s), rng)
    return SyntheticRequests(
        f"{SYNTHETIC_PREFIX}{kind}", arrival_s, input_tokens, output_tokens, params.start_unix_s, duration_s
    )


def _arrivals(
    params: WorkloadParams, on_rate_rps: float, duration_s: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    # Alternating ON/OFF period boundaries; even-numbered intervals are ON.
    period_mean_s = params.on_mean_s + params.off_mean_s
    lengths_s: list[npt.NDArray[np.float64]] = []
    total_s = 0.0
    while total_s < duration_s:
        n_pairs = 2 * math.ceil(duration_s / period_mean_s) + 4
        pairs = np.column_stack(
            (rng.exponential(params.on_mean_s, n_pairs), rng.exponential(params.off_mean_s, n_pairs))
            if params.off_mean_s > 0.0
            else (rng.exponential(params.on_mean_s, n_pairs), np.zeros(n_pairs))
        ).ravel()
        lengths_s.append(pairs)
        total_s += float(pairs.sum())
    switch_s = np.cumsum(np.concatenate(lengths_s))
    switch_s = switch_s[switch_s < duration_s]
    n_bins = math.ceil(duration_s / MODULATION_BIN_S)
    shape = 1.0 / params.modulation_cv**2
    multiplier = rng.gamma(shape, 1.0 / shape, n_bins)
    bin_edges_s = np.arange(1, n_bins) * MODULATION_BIN_S
    edges_s = np.unique(np.concatenate(([0.0, duration_s], switch_s, bin_edges_s[bin_edges_s < duration_s])))
    piece_start_s = edges_s[:-1]
    piece_len_s = np.diff(edges_s)
    middle_s = piece_start_s + piece_len_s / 2
    is_on = np.searchsorted(switch_s, middle_s) % 2 == 0
    bin_index = np.minimum((middle_s // MODULATION_BIN_S).astype(np.int64), n_bins - 1)
    daily = params.daily_factor(params.start_unix_s + middle_s)
    rate_rps = np.where(is_on, on_rate_rps * multiplier[bin_index] * daily, 0.0)
    counts = rng.poisson(rate_rps * piece_len_s)
    arrivals = np.repeat(piece_start_s, counts) + rng.random(int(counts.sum())) * np.repeat(
        piece_len_s, counts
    )
    return np.sort(arrivals)


def sample_lengths(
    params: WorkloadParams, n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """`n` (input, output) token-length pairs of the service `params` describes (also used by profiling,
    which samples the Azure length mix within each request class's bins)."""
    z_in = rng.standard_normal(n)
    z_out = params.copula_rho * z_in + math.sqrt(1.0 - params.copula_rho**2) * rng.standard_normal(n)
    levels = np.asarray(QUANTILE_LEVELS)
    out: list[npt.NDArray[np.int32]] = []
    for z, quantiles in ((z_in, params.input_quantiles_tokens), (z_out, params.output_quantiles_tokens)):
        u = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        tokens = np.exp(np.interp(u, levels, np.log(np.asarray(quantiles, dtype=np.float64))))
        out.append(np.maximum(np.rint(tokens), 1).astype(np.int32))
    return out[0], out[1]


_erf = np.vectorize(math.erf, otypes=[np.float64])
