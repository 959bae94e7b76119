"""Generated Python code of the agent's wire contract, package `dynamollm.agent.v1` (docs/wire.md).

Sources: proto/agent/api/v1/*.proto. Regenerate with `python tools/gen_proto.py`; never edit the
`*_pb2*.py(i)` files by hand (CI fails when they drift from the .proto files). The node agent serves these
services; the controller's fleet layer is the client. See docs/wire.md.
"""
