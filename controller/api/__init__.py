"""The controller's admin API: generated code of proto/controller/api/v1 and its typed client."""
