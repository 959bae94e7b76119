"""The simulated inference engine as a real program: an OpenAI-compatible HTTP server timed by the physics.

    python -m agent.sim.engine --model llama2-70b --gpu h100-sxm --tp 8 --gpus 0,1,2,3,4,5,6,7 \
        --port 8000 --node-dir /run/dynamollm-agent/sim-node [--max-num-seqs 256 --max-num-batched-tokens 512]

Where it sits: the agent's engine driver (`agent.engine.driver`) starts it as a subprocess exactly like
`vllm serve`, polls `/health`, scrapes `/metrics` (vLLM's `vllm:*` names) and stops it with SIGTERM; clients
send `/v1/completions` and `/v1/chat/completions`. This module is the command line: options, start-up,
signals and shutdown. The HTTP face is `agent.sim.engine_http`; the engine behind it,
`agent.sim.realtime`, runs the cluster simulator's `SimEngine` core (`agent.sim.engine_core`) on the wall
clock, at the clock and power limit set on its GPUs in the simulated node directory (`agent.sim.node`,
which the agent's `agent.sim.gpu.SimulatedGpuBackend` writes), and writes its energy back there.

SIGTERM / SIGINT: stop admitting (503 + Retry-After) while accepted requests finish, wait up to
`--shutdown-grace-s` for them, then exit 0 (cutting what is left).

`--time-scale X` runs the engine X times faster than real time (simulated seconds = X x wall seconds;
agent.sim.realtime): iterations, the energy written per simulated second and the modelled delays
(`--startup-s`, `--shutdown-grace-s`, both simulated seconds) take 1/X of their wall time. Retry-After
stays in wall seconds (clients wait on the wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from agent.api.errors import DynamoError, InvalidArgumentError
from agent.sim.engine_core import EngineConfig
from agent.sim.engine_http import EngineServer, ServerOptions
from agent.sim.node import NodeDir
from agent.sim.physics import load_perf_model
from agent.sim.physics.specs import GPU_NAMES, MODEL_NAMES
from agent.sim.realtime import RealTimeEngine

# Largest --time-scale (simulated seconds per wall second); the agent's simulated.time_scale: the same.
MAX_TIME_SCALE = 1e6
# max_position_embeddings of each model's Hugging Face config: the longest request the model accepts.
_MODEL_CONTEXT_TOKENS = {"llama2-70b": 4096, "llama3.1-8b": 131072, "llama3.1-70b": 131072}


# ------------------------------------------------------------------------------------------ options
@dataclass(frozen=True, slots=True)
class EngineOptions:
    model: str
    served_model_name: str
    gpu: str
    tp: int
    gpu_indices: tuple[int, ...]
    host: str
    port: int
    node_dir: str | None
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None
    default_max_tokens: int
    startup_s: float
    shutdown_grace_s: float
    retry_after_s: int
    seed: int | None
    time_scale: float = 1.0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agent.sim.engine",
        description="Simulated OpenAI-compatible inference engine timed by the dynamollm physics model.",
    )
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--gpu", default="h100-sxm", help=f"GPU type, one of {', '.join(GPU_NAMES)}")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument(
        "--gpus", default=None, help="GPU indices, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES, else 0..tp-1)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged as engine_listening)")
    p.add_argument("--node-dir", default=None, help="simulated node directory (default: GPUs unlocked)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None, help="default: model context, bounded by KV")
    p.add_argument(
        "--default-max-tokens", type=int, default=16, help="answer length when max_tokens is absent"
    )
    p.add_argument(
        "--startup-s",
        type=float,
        default=0.2,
        help="imitated model loading, simulated seconds; /health is 503 meanwhile",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=30.0,
        help="SIGTERM: wait this long (simulated seconds) for requests",
    )
    p.add_argument("--retry-after-s", type=int, default=1, help="Retry-After of 503 answers while draining")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the per-iteration jitter (default: a fresh one)"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated seconds per wall second (1: real time; 20: an hour in 3 minutes)",
    )
    p.add_argument("--log-level", default="info")
    return p


def _parse_gpu_indices(text: str, field: str) -> tuple[int, ...]:
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgumentError(field, text, "comma-separated GPU indices, e.g. 0,1") from None
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise InvalidArgumentError(field, text, "distinct indices >= 0")
    return indices


def options_from_args(ns: argparse.Namespace, environ: dict[str, str]) -> EngineOptions:
    """Validated options; InvalidArgumentError names the flag."""
    if ns.gpus is not None:
        gpu_indices = _parse_gpu_indices(ns.gpus, "--gpus")
    elif environ.get("CUDA_VISIBLE_DEVICES"):
        gpu_indices = _parse_gpu_indices(environ["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES")
    else:
        gpu_indices = tuple(range(ns.tp))
    if len(gpu_indices) != ns.tp:
        raise InvalidArgumentError(
            "--gpus", ",".join(map(str, gpu_indices)), f"exactly --tp ({ns.tp}) indices"
        )
    checks: tuple[tuple[str, float, float, float], ...] = (
        ("--port", ns.port, 0, 65535),
        ("--max-num-seqs", ns.max_num_seqs, 1, 1 << 20),
        ("--max-num-batched-tokens", ns.max_num_batched_tokens, max(1, ns.max_num_seqs), 1 << 24),
        ("--default-max-tokens", ns.default_max_tokens, 1, 1 << 24),
        ("--startup-s", ns.startup_s, 0.0, 3600.0),
        ("--shutdown-grace-s", ns.shutdown_grace_s, 0.0, 3600.0),
        ("--retry-after-s", ns.retry_after_s, 0, 3600),
        ("--seed", 0 if ns.seed is None else ns.seed, 0, 2**63 - 1),
    )
    for flag, value, lo, hi in checks:
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InvalidArgumentError(flag, value, f"{lo:g}..{hi:g}")
    if not (math.isfinite(ns.time_scale) and 0.0 < ns.time_scale <= MAX_TIME_SCALE):
        raise InvalidArgumentError("--time-scale", ns.time_scale, f"> 0 and <= {MAX_TIME_SCALE:g}")
    if ns.max_model_len is not None and ns.max_model_len < 2:
        raise InvalidArgumentError("--max-model-len", ns.max_model_len, ">= 2")
    if ns.model not in MODEL_NAMES:
        raise InvalidArgumentError("--model", ns.model, MODEL_NAMES)
    if ns.gpu not in GPU_NAMES:
        raise InvalidArgumentError("--gpu", ns.gpu, GPU_NAMES)
    try:
        load_perf_model(ns.model, ns.gpu, ns.tp)  # the TP degrees the model is fitted for and fits on
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"--{err.field}", err.value, err.allowed) from None
    return EngineOptions(
        model=ns.model,
        served_model_name=ns.served_model_name or ns.model,
        gpu=ns.gpu,
        tp=ns.tp,
        gpu_indices=gpu_indices,
        host=ns.host,
        port=ns.port,
        node_dir=ns.node_dir,
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len,
        default_max_tokens=ns.default_max_tokens,
        startup_s=ns.startup_s,
        shutdown_grace_s=ns.shutdown_grace_s,
        retry_after_s=ns.retry_after_s,
        seed=ns.seed,
        time_scale=ns.time_scale,
    )


# ------------------------------------------------------------------------------------------- main
async def serve(opts: EngineOptions) -> int:
    """Run until SIGTERM/SIGINT; 0 after a graceful stop."""
    import structlog

    log = structlog.get_logger("agent.sim.engine")
    perf = load_perf_model(opts.model, opts.gpu, opts.tp)
    node: NodeDir | None = None
    if opts.node_dir is not None:
        node = NodeDir(opts.node_dir)
        spec = node.read_spec()
        if spec is not None:
            if spec.gpu != opts.gpu:
                raise InvalidArgumentError("--gpu", opts.gpu, [spec.gpu])
            bad = [i for i in opts.gpu_indices if i >= spec.gpus]
            if bad:
                raise InvalidArgumentError("--gpus", bad, f"indices 0..{spec.gpus - 1} of the node")
        else:
            node.path.mkdir(parents=True, exist_ok=True)
    config = EngineConfig(max_num_batched_tokens=opts.max_num_batched_tokens, max_num_seqs=opts.max_num_seqs)
    engine = RealTimeEngine(
        perf, opts.gpu, opts.gpu_indices, node, config, seed=opts.seed, time_scale=opts.time_scale
    )
    # A request alone on the engine must fit its KV cache below the admission watermark.
    max_model_len = opts.max_model_len or min(_MODEL_CONTEXT_TOKENS[opts.model], engine.max_request_tokens)
    if max_model_len > engine.max_request_tokens:
        raise InvalidArgumentError(
            "--max-model-len", max_model_len, f"<= {engine.max_request_tokens} (KV cache)"
        )
    server_opts = ServerOptions(
        model=opts.model,
        served_model_name=opts.served_model_name,
        default_max_tokens=opts.default_max_tokens,
        retry_after_s=opts.retry_after_s,
    )
    server = EngineServer(server_opts, engine, max_model_len)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    port = runner.addresses[0][1]
    log.info(
        "engine_listening",
        host=opts.host,
        port=port,
        model=opts.model,
        tp=opts.tp,
        gpus=list(opts.gpu_indices),
        time_scale=opts.time_scale,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop_task = asyncio.create_task(engine.run())
    try:
        try:
            await asyncio.wait_for(stop.wait(), engine.wall_s(opts.startup_s))
        except TimeoutError:
            server.ready = True
            engine.mark_loaded()
            log.info("engine_ready", port=port, startup_s=opts.startup_s, time_scale=opts.time_scale)
            await stop.wait()
        server.accepting = False
        log.info("engine_stopping", in_flight=server.in_flight, grace_s=opts.shutdown_grace_s)
        finished = await server.wait_idle(engine.wall_s(opts.shutdown_grace_s))
        if not finished:
            log.warning("engine_grace_expired", in_flight=server.in_flight)
            engine.abort_all()
            await server.wait_idle(1.0)
    finally:
        loop_task.cancel()
        await runner.cleanup()
        engine.release_gpus()
    log.info("engine_stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    ns = parser.parse_args(argv)
    from agent.api.log import configure_logging

    configure_logging(ns.log_level)
    try:
        opts = options_from_args(ns, dict(os.environ))
        return asyncio.run(serve(opts))
    except DynamoError as err:
        print(f"agent.sim.engine: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"agent.sim.engine: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
