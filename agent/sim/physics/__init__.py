"""Performance and energy model of LLM inference iterations (docs/physics.md), fitted to public data.

    perf = load_perf_model(model="llama2-70b", gpu="h100-sxm", tp=8)
    latency_s, power_w = perf.iteration(clock_mhz, prefill_tokens, prefill_attn_tokens,
                                        decode_seqs, decode_context_tokens)

Used by the simulated engine (agent.sim), profile generation and the checks in controller.sim.calibration.
Parameters come from params/*.json (tools/fit_physics.py); equations and errors: docs/physics.md.
"""

from agent.sim.physics.model import PerfModel, PerfParams
from agent.sim.physics.params import load_perf_model
from agent.sim.physics.specs import GPU_NAMES, MODEL_NAMES

__all__ = ["GPU_NAMES", "MODEL_NAMES", "PerfModel", "PerfParams", "load_perf_model"]
