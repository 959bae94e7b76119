"""The contract shared by agent and controller: generated wire code (`agent.api.v1`), the typed client,
the error tree and its status table, the clock seam, the generation rule of desired-state calls
(`agent.api.generations`) and logging set-up. The controller may import this package and nothing else of
the agent, and this package imports nothing else of the agent (docs/architecture.md, layout).
"""
