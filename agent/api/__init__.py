"""The contract shared by agent and controller: generated wire code (`agent.api.v1`), the error tree
and logging set-up. The controller may import this package and nothing else of the agent (DESIGN §3).
"""
