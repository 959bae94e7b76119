"""The one error tree of dynamollm, shared by agent, controller and dctl.

Every error raised on purpose by our code derives from `DynamoError`. `temporary` tells reconcile loops
whether retrying the same action later may succeed (kopf / controller-runtime style); entry points map
these errors to gRPC status codes and CLI exit codes in one place each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Values a caller sent are echoed into status messages, logs and the audit log at most this long: a
# 100 kB engine id must not become a 100 kB status message (it would overflow a client's 8-16 kB
# metadata limit and surface as RESOURCE_EXHAUSTED) nor a 100 kB log line.
ECHO_LIMIT_CHARS: Final = 200
# What the allowed values of a message may take (server-side text, normally far shorter).
ALLOWED_LIMIT_CHARS: Final = 2000


def clip(text: str, limit: int = ECHO_LIMIT_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def echo(value: object, limit: int = ECHO_LIMIT_CHARS) -> str:
    """How a received value is shown in a message: its repr, cut to `limit` characters."""
    if isinstance(value, str | bytes) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{repr(value[:limit])[:limit]}... ({len(value)} {unit})"
    return clip(repr(value), limit)


def _fmt_allowed(allowed: Iterable[object] | str) -> str:
    if isinstance(allowed, str):
        return clip(allowed, ALLOWED_LIMIT_CHARS)
    return clip(", ".join(str(a) for a in allowed), ALLOWED_LIMIT_CHARS)


class DynamoError(Exception):
    """Base of every error dynamollm raises deliberately."""

    temporary: bool = False


class InvalidArgumentError(DynamoError):
    """A value supplied by a caller (RPC field, CLI flag, config key) is not acceptable.

    The message names the field, the value received and the allowed values, so that an operator can
    fix the input without reading code. The value, and a field path that embeds received text (a map
    key), are echoed at most `ECHO_LIMIT_CHARS` long (`echo`).
    """

    def __init__(self, field: str, value: object, allowed: Iterable[object] | str) -> None:
        self.field = clip(field)
        self.value = value
        self.allowed = _fmt_allowed(allowed)
        super().__init__(f"{self.field}: got {echo(value)}; allowed: {self.allowed}")

    # Raised in a worker process (`dctl simulate --jobs`), the error travels back pickled: rebuilt from
    # its fields, not from the message Exception would pass to __init__.
    def __reduce__(self) -> tuple[type[InvalidArgumentError], tuple[str, object, str]]:
        return type(self), (self.field, self.value, self.allowed)


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

    def __reduce__(self) -> tuple[type[DataFileError], tuple[str, int | None, str | None, str]]:
        return type(self), (self.path, self.line, self.field, self.reason)


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
