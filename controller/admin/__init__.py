"""The controller's admin gRPC servicers (thin: auth, validation, then the running controller)."""
