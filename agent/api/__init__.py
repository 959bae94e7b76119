"""The contract shared by agent and controller: generated wire code (`agent.api.v1`), the typed client, the
error tree and its status table, the clock seam, the generation rule of desired-state calls
(`agent.api.generations`) and logging set-up; and the daemon plumbing both daemons' entry points reuse:
authorization (`agent.api.auth`), configuration machinery (`agent.api.config`), binding the server
(`agent.api.serving`), serving Prometheus metrics (`agent.api.metrics_http`), the MQTT publisher and
subscriber (`agent.api.mqtt`) and systemd notices (`agent.api.systemd`). The controller may import this
package and nothing else of the agent, and this package imports nothing else of the agent
(docs/architecture.md, layout).
"""
