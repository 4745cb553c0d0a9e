"""Errors that carry a message saying what to fix.

Each class maps onto one gRPC status code in the server and onto a one-line
CLI error in the trainer, so the same check gives the same message on both
transports.
"""


class DataselectError(Exception):
    """Base class: the message says what was wrong and how to fix it."""


class InvalidArgument(DataselectError, ValueError):
    """The request or input is malformed (gRPC INVALID_ARGUMENT)."""


class NotFound(DataselectError, LookupError):
    """A named thing (session, strategy, model, file) does not exist (NOT_FOUND)."""


class FailedPrecondition(DataselectError):
    """The call is valid but not now, e.g. Select before any checkpoint (FAILED_PRECONDITION)."""


class ResourceExhausted(DataselectError):
    """Out of memory, queue space or message size (RESOURCE_EXHAUSTED)."""


class PluginError(DataselectError):
    """A plugin raised or returned something unusable; the message names the plugin (INTERNAL)."""


class Cancelled(DataselectError):
    """The caller gave up (its deadline passed or it cancelled): the work was stopped (CANCELLED)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (cut to `limit` characters), or `Type` alone, for an error message."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}" if line else type(exc).__name__
