"""The one table between dataselect errors and gRPC status codes.

The server maps exceptions to codes with it (in `interceptors`); the remote
client maps codes back to the same exception classes, so an error reads the
same whether scoring runs embedded or behind a server.
"""

from __future__ import annotations

import grpc

from dataselect.errors import (
    DataselectError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PluginError,
    ResourceExhausted,
)

#: Most specific first: the first matching class wins.
ERROR_CODES: tuple[tuple[type[DataselectError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PluginError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
    if isinstance(exc, DataselectError):
        return grpc.StatusCode.UNKNOWN, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}: {exc}"


def error_for(code: grpc.StatusCode) -> type[DataselectError] | None:
    """The exception class a status code stands for (None when no class does)."""
    for cls, mapped in ERROR_CODES:
        if mapped == code and cls is not PluginError:
            return cls
    return None
