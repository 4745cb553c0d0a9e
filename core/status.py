"""The one table between dataselect errors and gRPC status codes.

The server maps exceptions to codes with it (in `interceptors`); the remote
client maps codes back to the same exception classes, so an error reads the
same whether scoring runs embedded or behind a server.

Status messages are bounded (`MAX_DETAILS_BYTES`): a message that echoes what
the caller sent (a 1 MiB strategy name, a long exception text) is cut, so it
always fits the client's metadata limit and the caller sees the real error
rather than RESOURCE_EXHAUSTED about the trailer.
"""

from __future__ import annotations

import grpc

from dataselect.errors import (
    Cancelled,
    DataselectError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PluginError,
    ResourceExhausted,
)

#: Longest status message sent, in UTF-8 bytes. grpc percent-encodes non-ASCII bytes in the
#: trailer (up to 3x), and clients refuse trailers over 8 KiB by default.
MAX_DETAILS_BYTES = 1024


class StreamStalled(DataselectError):
    """A client stream sent nothing for longer than the server's --stream-idle-seconds (DEADLINE_EXCEEDED)."""


class ShuttingDown(DataselectError):
    """The server is draining before it stops: no new calls (UNAVAILABLE, so clients reconnect elsewhere or later)."""


#: Most specific first: the first matching class wins.
ERROR_CODES: tuple[tuple[type[DataselectError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (StreamStalled, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (PluginError, grpc.StatusCode.INTERNAL),
)
#: Classes a client never raises from a code: the code has its own client-side meaning.
_SERVER_ONLY = (PluginError, StreamStalled, ShuttingDown)


def clip(text: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, saying how much was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    head = data[: max(0, limit - 48)].decode("utf-8", "ignore")
    return f"{head}... [{len(text) - len(head)} more characters cut]"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and (bounded) message a failed call answers with."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code, clip(str(exc) or cls.__name__)
    if isinstance(exc, DataselectError):
        return grpc.StatusCode.UNKNOWN, clip(str(exc))
    return grpc.StatusCode.INTERNAL, clip(f"internal server error: {type(exc).__name__}: {exc}")


def error_for(code: grpc.StatusCode) -> type[DataselectError] | None:
    """The exception class a status code stands for (None when no class does)."""
    for cls, mapped in ERROR_CODES:
        if mapped == code and cls not in _SERVER_ONLY:
            return cls
    return None
