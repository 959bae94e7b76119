"""The simulated node: a stand-in for a GPU host running inference engines, without GPUs.

`agent.sim.physics` models one engine iteration (latency and per-GPU power) from public measurements;
`agent.sim.engine_core.SimEngine` is a vLLM-like engine on a virtual clock built on it, which the cluster
simulator (controller.sim) runs for every instance. On a live simulated node the same core runs on the
wall clock inside the simulated engine program (`python -m agent.sim.engine`: engine, engine_http,
realtime, engine_metrics), and the agent's simulated GPU backend (`agent.sim.gpu`) shares the node's
state with it through a directory (`agent.sim.node`). The agent's production modules never import this
package; only its composition root (`agent.app.make_backend`) plugs the simulated backend in.
"""
