"""Generated code of proto/controller/api/v1 (tools/gen_proto.py); do not edit."""
