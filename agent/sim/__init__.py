"""The simulated node: a stand-in for a GPU host running an inference engine, on a virtual clock.

`agent.sim.physics` models one engine iteration (latency and per-GPU power) from public measurements;
the simulated engine built on it replaces a real engine inside the cluster simulator (controller.sim)
and in tests, so policies can be evaluated without GPUs.
"""
