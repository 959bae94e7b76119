"""The one error tree of dynamollm, shared by agent, controller and dctl.

Every error raised on purpose by our code derives from `DynamoError`. `temporary` tells reconcile loops
whether retrying the same action later may succeed (kopf / controller-runtime style); entry points map
these errors to gRPC status codes and CLI exit codes in one place each.
"""

from __future__ import annotations

from collections.abc import Iterable


def _fmt_allowed(allowed: Iterable[object] | str) -> str:
    if isinstance(allowed, str):
        return allowed
    return ", ".join(str(a) for a in allowed)


class DynamoError(Exception):
    """Base of every error dynamollm raises deliberately."""

    temporary: bool = False


class InvalidArgumentError(DynamoError):
    """A value supplied by a caller (RPC field, CLI flag, config key) is not acceptable.

    The message names the field, the value received and the allowed values, so that an operator can
    fix the input without reading code.
    """

    def __init__(self, field: str, value: object, allowed: Iterable[object] | str) -> None:
        self.field = field
        self.value = value
        self.allowed = _fmt_allowed(allowed)
        super().__init__(f"{field}: got {value!r}; allowed: {self.allowed}")


class OutOfRangeError(InvalidArgumentError):
    """A query falls outside the domain covered by measured data (e.g. profile extrapolation)."""


class DataFileError(DynamoError):
    """A data file (trace, profile, calibration, carbon) is malformed; names file, line and field."""

    def __init__(self, path: str, line: int | None, field: str | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.reason = reason
        where = path if line is None else f"{path}:{line}"
        what = reason if field is None else f"field {field!r}: {reason}"
        super().__init__(f"{where}: {what}")


class NotFoundError(DynamoError):
    """A named thing (GPU, engine, dataset, file) does not exist."""


class PermissionDeniedError(DynamoError):
    """The caller or the process lacks the privilege for the action."""


class UnauthenticatedError(DynamoError):
    """The caller presented no valid credentials."""


class UnsupportedError(DynamoError):
    """The device or engine does not support the operation (e.g. locked clocks before Volta)."""


class ConflictError(DynamoError):
    """A desired-state request is stale: its generation is older than the one in force."""


class FailedPreconditionError(DynamoError):
    """The request is valid but the system is not in a state where it can be carried out."""


class UnavailableError(DynamoError):
    """A dependency is not reachable right now; retrying later may succeed."""

    temporary = True


class InternalError(DynamoError):
    """A broken invariant inside dynamollm: a bug, reported rather than hidden."""
