"""dynamollm central side: the controller's pure model and policy core, its loops, the router, the
cluster simulator and the operator CLI `dctl`. From the agent it imports only `agent.api`, except
`controller.sim`, which builds simulated clusters from `agent.sim` nodes (docs/architecture.md, layout).
"""
