"""dynamollm node side: the agent daemon, its GPU backends, engine driver and the simulated node.

`agent.api` is the contract shared with the controller; everything else here runs on a GPU host
(or, for `agent.sim`, inside the cluster simulator standing in for one).
"""
