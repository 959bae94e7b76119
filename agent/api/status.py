"""The one mapping between dynamollm's error tree and gRPC status codes, shared by the agent's servicers
(error -> status, `status_for`) and the typed client (status -> error, `ERROR_FOR_STATUS`), so that an
error raised on the node comes back to dctl or the controller as the same error type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import grpc

from agent.api.errors import (
    ConflictError,
    DataFileError,
    DynamoError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedError,
)

# Most specific first: the first matching type decides (OutOfRangeError is an InvalidArgumentError).
STATUS_BY_ERROR: tuple[tuple[type[DynamoError], grpc.StatusCode], ...] = (
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (ConflictError, grpc.StatusCode.ABORTED),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (DataFileError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InternalError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status an error is answered with; anything outside our tree is INTERNAL."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


# The inverse of STATUS_BY_ERROR, for callers. Several codes only a transport or
# a foreign server produces (DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, ...) land on the nearest meaning.
ERROR_FOR_STATUS: Final[Mapping[grpc.StatusCode, type[DynamoError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: UnavailableError,
    grpc.StatusCode.CANCELLED: UnavailableError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}
