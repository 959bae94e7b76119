"""Engines on one node: `driver` runs and reconfigures engine subprocesses, `metrics` reads their /metrics,
`options` types their option values, `ownership` keeps them owned (parent-death signal, the record file
read at start-up, adoption, which processes hold the GPUs).

The agent's control service and telemetry sampler use `agent.engine.driver.EngineDriver`; nothing here
imports a GPU backend (only the `GpuBackend` protocol's values and the per-GPU workers) or the gRPC layer.
"""
