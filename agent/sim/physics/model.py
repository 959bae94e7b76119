"""The equations of the performance and energy model: one engine iteration -> (latency, power per GPU).

Sits under the simulated engine (agent/sim/engine_core.py), which calls `PerfModel.iteration` once per
iteration (about a million times per simulated hour), so the hot path is plain float arithmetic on
coefficients precomputed in `PerfModel.__init__`. The same code evaluates candidate parameters in
tools/fit_physics.py, so the fitted model and the simulated one cannot drift apart. Equations and the
origin of each parameter: docs/physics.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError, OutOfRangeError
from agent.sim.physics.specs import GpuSpec, ModelArch, kv_capacity_tokens


@dataclass(frozen=True, slots=True)
class KernelParams:
    """Linear layers of one transformer block on this GPU type, at max clock (fitted to vidur op times)."""

    gemm_flops_per_s: float  # effective dense GEMM throughput per GPU
    weight_bw_bytes_per_s: float  # effective weight-streaming bandwidth per GPU
    roofline_sharpness: float  # p of the smooth max (a^p + b^p)^(1/p) joining the two roofs
    layer_floor_s: float  # per-block time of the small kernels at one token (norms, rope, act, add)
    elementwise_s_per_token: float  # per-block, per-token time of the kernels TP does not split


@dataclass(frozen=True, slots=True)
class AllReduceParams:
    """One all-reduce among `tp` GPUs: latency_s = alpha_s + bytes / bw_bytes_per_s (vidur network data)."""

    tp: int
    alpha_s: float
    bw_bytes_per_s: float


@dataclass(frozen=True, slots=True)
class AttentionParams:
    """Attention kernels on this GPU type at max clock (vidur has none: fitted to engine measurements)."""

    prefill_flops_per_s: float  # effective prefill attention throughput per GPU
    kv_read_bytes_per_s: float  # effective KV-cache read bandwidth per GPU in decode attention
    per_seq_layer_s: float  # decode attention cost per sequence per layer beyond its KV bytes


@dataclass(frozen=True, slots=True)
class EngineParams:
    """What the serving engine adds on top of the kernels (fitted to end-to-end engine measurements)."""

    source: str  # data set the engine terms were fitted to
    iteration_overhead_s: float  # GPU idle per iteration: scheduling, sampling, launch gaps
    prefill_overhead_s: float  # more of it when the iteration computes prompt tokens (no CUDA graph)
    per_seq_overhead_s: float  # GPU idle per decoding sequence per iteration (CPU-side batching)
    per_token_overhead_s: float  # GPU work per token that tensor parallelism does not split
    comm_latency_scale: float  # engine all-reduce latency / NCCL microbenchmark latency
    comm_hop_s: float  # engine all-reduce latency beyond that, per ring step (2 (tp - 1) steps)
    comm_bw_scale: float  # engine all-reduce bandwidth / NCCL microbenchmark bandwidth


@dataclass(frozen=True, slots=True)
class ClockParams:
    """How time and power depend on the SM clock f (r = f_max / f)."""

    memory_time_exponent: float  # memory-bound time scales as r**exponent (compute-bound as r)
    voltage_at_min_clock: float  # V(f_min) / V(f_max); V is linear in f in between


@dataclass(frozen=True, slots=True)
class PowerParams:
    """Per GPU: idle + (f/f_max)(V/V_max)^2 * (busy_w while kernels run, comm_w while all-reducing,
    gap_w in the engine's host-side gaps) + (V/V_max)^2 * energy per FLOP * FLOP rate + energy per HBM
    byte * byte rate, capped at the TDP. Switching power scales with f V^2, energy per operation with V^2;
    HBM energy does not depend on the SM clock.
    """

    idle_w: float
    busy_w: float
    comm_w: float
    gap_w: float
    energy_per_flop_j: float
    energy_per_byte_j: float


@dataclass(frozen=True, slots=True)
class PerfParams:
    """Everything fitted for one (model, GPU type); stored as params/<model>__<gpu>.json."""

    model: str
    gpu: str
    kernels: KernelParams
    attention: AttentionParams
    allreduce: tuple[AllReduceParams, ...]
    engine: EngineParams
    clock: ClockParams
    power: PowerParams

    def allreduce_for(self, tp: int) -> AllReduceParams | None:
        for a in self.allreduce:
            if a.tp == tp:
                return a
        return None


def clock_factors(params: PerfParams, gpu: GpuSpec, clock_mhz: float) -> tuple[float, float, float, float]:
    """(compute time factor r = f_max/f, memory time factor r**e, switching power factor (f/f_max)(V/V_max)^2,
    energy-per-operation factor (V/V_max)^2) at `clock_mhz`."""
    f_max = float(gpu.max_clock_mhz)
    ratio = f_max / clock_mhz
    v0 = params.clock.voltage_at_min_clock
    v_rel = v0 + (1.0 - v0) * (clock_mhz - gpu.min_clock_mhz) / (f_max - gpu.min_clock_mhz)
    v2 = v_rel * v_rel
    return ratio, ratio**params.clock.memory_time_exponent, (clock_mhz / f_max) * v2, v2


class PerfModel:
    """The model of one instance: a model served with tensor parallelism `tp` on GPUs of one type."""

    __slots__ = (
        "_attn_pair_flops",
        "_attn_pair_s",
        "_attn_seq_s",
        "_busy_w",
        "_clock_cache",
        "_comm_alpha_s",
        "_comm_token_s",
        "_comm_w",
        "_e_byte",
        "_e_flop",
        "_floor_s",
        "_gap_w",
        "_gemm_seq_flops",
        "_gemm_seq_s",
        "_gemm_token_flops",
        "_gemm_token_s",
        "_iter_overhead_s",
        "_kv_token_bytes",
        "_kv_token_s",
        "_memory_token_s",
        "_p",
        "_params",
        "_prefill_overhead_s",
        "_seq_overhead_s",
        "_spec",
        "_token_overhead_s",
        "_weight_bytes",
        "_weights_s",
        "arch",
        "gpu",
        "idle_power_w",
        "kv_capacity_tokens",
        "max_clock_mhz",
        "min_clock_mhz",
        "model",
        "profile_clocks_mhz",
        "tdp_w",
        "tp",
    )

    def __init__(self, arch: ModelArch, gpu: GpuSpec, tp: int, params: PerfParams) -> None:
        capacity = kv_capacity_tokens(arch, gpu, tp)
        if capacity <= 0:
            raise InvalidArgumentError(
                "tp", tp, f"a degree whose GPUs hold {arch.name}'s weights plus a KV cache (larger than {tp})"
            )
        ar = params.allreduce_for(tp)
        if tp > 1 and ar is None:
            raise InvalidArgumentError("tp", tp, [1, *sorted(a.tp for a in params.allreduce)])
        self.model = arch.name
        self.gpu = gpu.name
        self.tp = tp
        self.arch = arch
        self._spec = gpu
        self._params = params
        self.profile_clocks_mhz = gpu.profile_clocks_mhz
        self.max_clock_mhz = gpu.max_clock_mhz
        self.min_clock_mhz = gpu.min_clock_mhz
        self.idle_power_w = params.power.idle_w
        self.tdp_w = gpu.tdp_w
        self.kv_capacity_tokens = capacity

        k, a, e, pw = params.kernels, params.attention, params.engine, params.power
        h, n_layers, nbytes = arch.hidden_size, arch.n_layers, arch.bytes_per_param
        block_params = arch.params_per_layer * n_layers
        head_params = arch.vocab_size * h
        # Linear layers: 2 FLOPs per weight per token; the LM head runs only for sampled tokens.
        self._gemm_token_flops = 2.0 * block_params / tp
        self._gemm_seq_flops = 2.0 * head_params / tp
        self._gemm_token_s = self._gemm_token_flops / k.gemm_flops_per_s
        self._gemm_seq_s = self._gemm_seq_flops / k.gemm_flops_per_s
        self._weight_bytes = (block_params + head_params) * nbytes / tp
        self._weights_s = self._weight_bytes / k.weight_bw_bytes_per_s
        self._p = k.roofline_sharpness
        self._floor_s = n_layers * k.layer_floor_s
        self._memory_token_s = n_layers * k.elementwise_s_per_token
        # Attention: QK^T and PV are 4*hidden FLOPs per (query, key) pair per layer; decode reads the KV.
        self._attn_pair_flops = 4.0 * h * n_layers / tp
        self._attn_pair_s = self._attn_pair_flops / a.prefill_flops_per_s
        self._kv_token_bytes = arch.kv_bytes_per_token / tp
        self._kv_token_s = self._kv_token_bytes / a.kv_read_bytes_per_s
        self._attn_seq_s = n_layers * a.per_seq_layer_s
        # Two all-reduces per block (after attention and after the MLP) of tokens x hidden activations.
        if ar is None:
            self._comm_alpha_s = 0.0
            self._comm_token_s = 0.0
        else:
            self._comm_alpha_s = (
                2.0 * n_layers * (ar.alpha_s * e.comm_latency_scale + 2 * (tp - 1) * e.comm_hop_s)
            )
            self._comm_token_s = 2.0 * n_layers * h * nbytes / (ar.bw_bytes_per_s * e.comm_bw_scale)
        self._iter_overhead_s = e.iteration_overhead_s
        self._prefill_overhead_s = e.prefill_overhead_s
        self._seq_overhead_s = e.per_seq_overhead_s
        self._token_overhead_s = e.per_token_overhead_s
        self._busy_w = pw.busy_w
        self._comm_w = pw.comm_w
        self._gap_w = pw.gap_w
        self._e_flop = pw.energy_per_flop_j
        self._e_byte = pw.energy_per_byte_j
        self._clock_cache: tuple[float, float, float, float, float] = (-1.0, 1.0, 1.0, 1.0, 1.0)

    @property
    def params(self) -> PerfParams:
        return self._params

    @property
    def gpu_spec(self) -> GpuSpec:
        return self._spec

    def _factors(self, clock_mhz: float) -> tuple[float, float, float, float, float]:
        cached = self._clock_cache
        if cached[0] == clock_mhz:
            return cached
        if not self.min_clock_mhz <= clock_mhz <= self.max_clock_mhz:
            raise OutOfRangeError(
                "clock_mhz", clock_mhz, f"{self.min_clock_mhz}..{self.max_clock_mhz} MHz for {self.gpu}"
            )
        r, rm, pf, v2 = clock_factors(self._params, self._spec, clock_mhz)
        self._clock_cache = (clock_mhz, r, rm, pf, v2)
        return self._clock_cache

    def iteration(
        self,
        clock_mhz: float,
        prefill_tokens: int,
        prefill_attn_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
    ) -> tuple[float, float]:
        """(latency_s, power_w per GPU) of one engine iteration at `clock_mhz`. Deterministic.

        prefill_tokens: prompt tokens computed this iteration; prefill_attn_tokens: sum over prefill
        chunks of chunk length x context length after the chunk; decode_seqs: sequences producing one
        token each; decode_context_tokens: sum of their context lengths.
        """
        _, r, rm, switching, v2 = self._factors(clock_mhz)
        tokens = prefill_tokens + decode_seqs
        # Linear layers: smooth roofline of GEMM compute (slows as 1/f) and weight streaming (barely).
        compute_s = (tokens * self._gemm_token_s + decode_seqs * self._gemm_seq_s) * r
        weights_s = self._weights_s * rm
        p = self._p
        linear_s = (compute_s**p + weights_s**p) ** (1.0 / p)
        busy_s = (
            linear_s
            + prefill_attn_tokens * self._attn_pair_s * r
            + tokens * self._token_overhead_s * r
            + (
                self._floor_s
                + tokens * self._memory_token_s
                + decode_seqs * self._attn_seq_s
                + decode_context_tokens * self._kv_token_s
            )
            * rm
        )
        comm_s = self._comm_alpha_s + tokens * self._comm_token_s
        gap_s = self._iter_overhead_s + decode_seqs * self._seq_overhead_s
        if prefill_tokens:
            gap_s += self._prefill_overhead_s
        latency_s = busy_s + comm_s + gap_s
        flops = (
            tokens * self._gemm_token_flops
            + decode_seqs * self._gemm_seq_flops
            + prefill_attn_tokens * self._attn_pair_flops
        )
        hbm_bytes = self._weight_bytes + decode_context_tokens * self._kv_token_bytes
        power_w = (
            self.idle_power_w
            + (
                switching * (self._busy_w * busy_s + self._comm_w * comm_s + self._gap_w * gap_s)
                + v2 * self._e_flop * flops
                + self._e_byte * hbm_bytes
            )
            / latency_s
        )
        return latency_s, (power_w if power_w < self.tdp_w else self.tdp_w)

    def decode_iterations(
        self, clock_mhz: float, decode_seqs: int, first_context_tokens: int, count: int
    ) -> tuple[list[float], list[float]]:
        """`iteration(clock_mhz, 0, 0, decode_seqs, first_context_tokens + k * decode_seqs)` for k in
        0..count-1 as (latencies_s, powers_w): a run of decode-only iterations, each of whose sequences
        adds one token to its context. The engine advances over such runs in one call (agent/sim/
        engine_core.py). Bit-identical to `iteration`: the same operations in the same order, with
        what does not depend on the context computed once."""
        _, r, rm, switching, v2 = self._factors(clock_mhz)
        n = decode_seqs
        compute_s = (n * self._gemm_token_s + n * self._gemm_seq_s) * r
        weights_s = self._weights_s * rm
        p = self._p
        linear_s = (compute_s**p + weights_s**p) ** (1.0 / p)
        busy0_s = linear_s + 0 * self._attn_pair_s * r + n * self._token_overhead_s * r
        floor_s = self._floor_s + n * self._memory_token_s + n * self._attn_seq_s
        comm_s = self._comm_alpha_s + n * self._comm_token_s
        gap_s = self._iter_overhead_s + n * self._seq_overhead_s
        flop_j = (
            v2
            * self._e_flop
            * (n * self._gemm_token_flops + n * self._gemm_seq_flops + 0 * self._attn_pair_flops)
        )
        kv_token_s, kv_token_bytes, weight_bytes = self._kv_token_s, self._kv_token_bytes, self._weight_bytes
        busy_w, comm_part_w, gap_part_w = self._busy_w, self._comm_w * comm_s, self._gap_w * gap_s
        e_byte, idle_w, tdp_w = self._e_byte, self.idle_power_w, self.tdp_w
        latencies_s: list[float] = []
        powers_w: list[float] = []
        ctx = first_context_tokens
        for _ in range(count):
            busy_s = busy0_s + (floor_s + ctx * kv_token_s) * rm
            latency_s = busy_s + comm_s + gap_s
            power_w = (
                idle_w
                + (
                    switching * (busy_w * busy_s + comm_part_w + gap_part_w)
                    + flop_j
                    + e_byte * (weight_bytes + ctx * kv_token_bytes)
                )
                / latency_s
            )
            latencies_s.append(latency_s)
            powers_w.append(power_w if power_w < tdp_w else tdp_w)
            ctx += n
        return latencies_s, powers_w
