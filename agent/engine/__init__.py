"""Engines on one node: `driver` runs and reconfigures engine subprocesses, `metrics` reads their /metrics.

The agent's control service and telemetry sampler use `agent.engine.driver.EngineDriver`; nothing here
imports the GPU backends or the gRPC layer.
"""
