"""Published facts the performance model starts from: model architectures and GPU data sheets.

Nothing here is fitted. `model.py` turns these into per-iteration work (FLOPs, bytes) and
`params/*.json` (written by tools/fit_physics.py) supplies the fitted efficiencies and overheads.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.api.errors import InvalidArgumentError


@dataclass(frozen=True, slots=True)
class ModelArch:
    """A dense decoder-only transformer (Llama family: gated MLP, grouped-query attention)."""

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int
    bytes_per_param: int  # 2 for bf16 weights, activations and KV cache
    # Longest input + output the model accepts (its trained context; vLLM's max_model_len default):
    # a longer request is refused at admission, never served.
    max_context_tokens: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def params_per_layer(self) -> int:
        """Linear-layer weights of one block: fused QKV, output projection, gate+up and down projections."""
        h = self.hidden_size
        kv = self.n_kv_heads * self.head_dim
        return h * (h + 2 * kv) + h * h + 3 * h * self.ffn_size

    @property
    def params_total(self) -> int:
        """All weights: blocks plus input embedding and LM head (untied in all three models)."""
        return self.n_layers * self.params_per_layer + 2 * self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.params_total * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_param


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Data-sheet values of one GPU type (per GPU)."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float  # dense, at max_clock_mhz
    memory_bw_bytes_per_s: float
    max_clock_mhz: int
    min_clock_mhz: int
    profile_clocks_mhz: tuple[int, ...]
    tdp_w: float


# Architectures from the models' Hugging Face config.json files.
ARCHS: dict[str, ModelArch] = {
    "llama2-70b": ModelArch("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 2, 4096),
    "llama3.1-8b": ModelArch("llama3.1-8b", 32, 4096, 32, 8, 14336, 128256, 2, 131072),
    "llama3.1-70b": ModelArch("llama3.1-70b", 80, 8192, 64, 8, 28672, 128256, 2, 131072),
}

# H100 SXM5 80 GB: 989.4 TFLOP/s dense BF16 and 3.35 TB/s HBM3 (NVIDIA data sheet), 700 W TDP,
# 1980 MHz max SM clock. Memory is what `nvidia-smi` reports as total (81559 MiB), not the marketing 80 GB.
# The lowest clock the model is stated for is the lowest profiled one (docs/physics.md).
GPUS: dict[str, GpuSpec] = {
    "h100-sxm": GpuSpec(
        name="h100-sxm",
        memory_bytes=81559 * 2**20,
        peak_bf16_flops=989.4e12,
        memory_bw_bytes_per_s=3.35e12,
        max_clock_mhz=1980,
        min_clock_mhz=800,
        profile_clocks_mhz=(800, 1000, 1200, 1400, 1600, 1800, 1980),
        tdp_w=700.0,
    ),
}

MODEL_NAMES: tuple[str, ...] = ("llama2-70b", "llama3.1-8b", "llama3.1-70b")
GPU_NAMES: tuple[str, ...] = tuple(GPUS)
TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8)

# Share of GPU memory the engine may use (vLLM's default gpu_memory_utilization) and the per-GPU
# reserve for activations and CUDA graphs that is not available to the KV cache.
GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES_PER_GPU = 2 * 2**30


def arch_for(model: str) -> ModelArch:
    try:
        return ARCHS[model]
    except KeyError:
        raise InvalidArgumentError("model", model, MODEL_NAMES) from None


def gpu_for(gpu: str) -> GpuSpec:
    try:
        return GPUS[gpu]
    except KeyError:
        raise InvalidArgumentError("gpu", gpu, GPU_NAMES) from None


def kv_capacity_tokens(arch: ModelArch, gpu: GpuSpec, tp: int) -> int:
    """KV-cache tokens that fit on `tp` GPUs after weights and the activation reserve (0 if none fit)."""
    free_per_gpu = (
        GPU_MEMORY_UTILIZATION * gpu.memory_bytes - arch.weight_bytes / tp - ACTIVATION_RESERVE_BYTES_PER_GPU
    )
    return max(0, int(free_per_gpu * tp // arch.kv_bytes_per_token))
