"""GPU access on the node: the `GpuBackend` protocol (`base`), the NVML backend (`nvml`, the only module
importing pynvml), the simulated backend (`simulated`), and the per-GPU serial worker the agent uses to
call them off the event loop.
"""
