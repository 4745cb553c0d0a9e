"""Exceptions become status codes here, and only here.

Servicer methods raise `dataselect.errors` exceptions; this interceptor turns
them into the matching code with the exception's message (which says what to
fix). Anything unexpected becomes INTERNAL and is logged with its traceback;
the server keeps serving because the exception never leaves the handler.
"""

from __future__ import annotations

import functools
import logging
import threading

import grpc

from dataselect.errors import DataselectError, ResourceExhausted
from dataselect.server.status import status_for

log = logging.getLogger("dataselect.server")

SERVICE_PREFIX = "/dataselect.v1.Selection/"


def _abort(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    if not context.is_active():
        # The client cancelled or its deadline passed (reading its stream then fails): nobody to answer.
        log.info("%s: the client went away (%s: %s)", method, type(exc).__name__, exc)
        return
    code, message = status_for(exc)
    if not isinstance(exc, DataselectError):
        log.exception("%s failed unexpectedly", method)
    elif code == grpc.StatusCode.INTERNAL:
        log.error("%s: %s", method, message)
    else:
        log.info("%s: %s: %s", method, code.name, message)
    context.abort(code, message)


class InFlightLimit:
    """At most `limit` Selection calls in flight (scoring or waiting for a scoring slot).

    Acquired without blocking: one call too many is answered RESOURCE_EXHAUSTED
    at once instead of queueing (and holding its request in memory) without bound.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._sem = threading.BoundedSemaphore(self.limit)

    def acquire(self) -> None:
        if not self._sem.acquire(blocking=False):
            raise ResourceExhausted(
                f"server busy: {self.limit} requests already in flight (--workers + --max-queue); "
                "retry with backoff, or start the server with a larger --max-queue")

    def release(self) -> None:
        self._sem.release()


class _NoLimit:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def _guard_unary(fn, method: str, limit):
    @functools.wraps(fn)
    def wrapper(request, context):
        try:
            limit.acquire()
            try:
                return fn(request, context)
            finally:
                limit.release()
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            _abort(exc, context, method)

    return wrapper


def _guard_streaming_response(fn, method: str, limit):
    @functools.wraps(fn)
    def wrapper(request, context):
        try:
            limit.acquire()
            try:
                yield from fn(request, context)
            finally:
                limit.release()
        except Exception as exc:  # noqa: BLE001
            _abort(exc, context, method)

    return wrapper


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Guards every method of dataselect.v1.Selection (health and reflection keep their own handling).

    With `limit`, the same guard also bounds the calls in flight (`InFlightLimit`).
    """

    def __init__(self, limit: InFlightLimit | None = None):
        self.limit = limit or _NoLimit()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, method, self.limit))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_guard_unary(handler.stream_unary, method, self.limit))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guard_streaming_response(handler.unary_stream, method, self.limit))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_guard_streaming_response(handler.stream_stream, method, self.limit))
        return handler
