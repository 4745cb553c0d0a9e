"""Exceptions become status codes here, and only here.

Servicer methods raise `dataselect.errors` exceptions; this interceptor turns
them into the matching code with the exception's message (which says what to
fix). Anything unexpected becomes INTERNAL and is logged with its traceback;
the server keeps serving because the exception never leaves the handler.

The same guard also:
* decodes requests itself: a body that is not a valid message (random bytes,
  a truncated message, invalid UTF-8 in a string field) is INVALID_ARGUMENT,
  where grpc's own decoding would answer INTERNAL before any handler runs;
* bounds client streams: a stream that sends nothing for `idle_seconds` is
  ended with DEADLINE_EXCEEDED, so a silent client cannot hold a call forever;
* counts the calls in flight (`InFlightLimit`), refuses new ones at once when
  too many are, and refuses them while the server drains before stopping.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from typing import Any, Callable, Iterator

import grpc

from dataselect.errors import DataselectError, InvalidArgument, ResourceExhausted
from dataselect.status import ShuttingDown, StreamStalled, clip, status_for

log = logging.getLogger("dataselect.server")

SERVICE_PREFIX = "/dataselect.v1.Selection/"
#: Default for how long a client stream may stay silent (between any two of its messages).
DEFAULT_STREAM_IDLE_SECONDS = 30.0


def _abort(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    code, message = status_for(exc)
    if not context.is_active():
        # The client cancelled or its deadline passed (reading its stream then fails): nobody to answer.
        # Aborting anyway ends the call cleanly (returning None would make grpc log a serialisation error).
        log.info("%s: the client went away (%s: %s)", method, type(exc).__name__, clip(str(exc), 200))
        context.abort(grpc.StatusCode.CANCELLED, "the client went away")
    if not isinstance(exc, DataselectError):
        log.exception("%s failed unexpectedly", method)
    elif code == grpc.StatusCode.INTERNAL:
        log.error("%s: %s", method, message)
    else:
        log.info("%s: %s: %s", method, code.name, clip(message, 300))
    context.abort(code, message)


class InFlightLimit:
    """At most `limit` Selection calls in flight (scoring or waiting for a scoring slot).

    Acquired without blocking: one call too many is answered RESOURCE_EXHAUSTED
    at once instead of queueing (and holding its request in memory) without bound.
    `drain` refuses new calls (UNAVAILABLE) and waits for those in flight to end.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._count = 0
        self._cond = threading.Condition()
        self.draining = False

    def acquire(self) -> None:
        with self._cond:
            if self.draining:
                raise ShuttingDown("dataselect-server is shutting down and takes no new calls; "
                                   "retry against another replica or once it has restarted")
            if self._count >= self.limit:
                raise ResourceExhausted(
                    f"server busy: {self.limit} requests already in flight (--workers + --max-queue); "
                    "retry with backoff, or start the server with a larger --max-queue")
            self._count += 1

    def release(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._count

    def drain(self, timeout: float | None) -> bool:
        """Refuse new calls from now on; wait up to `timeout` s for the calls in flight. True if none is left."""
        with self._cond:
            self.draining = True
            return self._cond.wait_for(lambda: self._count == 0, timeout)


class _NoLimit:
    draining = False
    in_flight = 0

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def drain(self, timeout: float | None) -> bool:
        return True


# -- decoding ----------------------------------------------------------------------------------
class Undecodable:
    """Stands in for a request whose bytes grpc handed over but that is not a valid message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def safe_deserializer(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns an `Undecodable` instead of raising (grpc would answer INTERNAL)."""
    if deserializer is None:
        return None
    what = getattr(getattr(deserializer, "__self__", None), "__name__", "the request message")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the caller's malformed request
            return Undecodable(f"{method.rsplit('/', 1)[-1]}: the request body ({len(data)} bytes) is not a valid "
                               f"{what} message ({type(exc).__name__}: {clip(str(exc), 200)}); send messages "
                               "encoded from dataselect/v1/selection.proto (strings must be valid UTF-8)")

    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidArgument(request.reason)
    return request


class StreamReader:
    """A client stream read on its own thread, so that waiting for the next message has a limit.

    Each `next()` waits at most `idle_seconds` for the client's next message and then raises
    `StreamStalled`; undecodable messages raise InvalidArgument. At most one message is read
    ahead (memory stays bounded). `close()` lets the reading thread go once the call ends.
    """

    _MESSAGE, _END, _ERROR = range(3)

    def __init__(self, requests: Iterator[Any], idle_seconds: float | None, method: str):
        self._requests = requests
        self.idle_seconds = idle_seconds
        self._method = method.rsplit("/", 1)[-1]
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self.received = 0

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        try:
            for message in self._requests:
                if not self._put((self._MESSAGE, message)):
                    return
            self._put((self._END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reading handler
            self._put((self._ERROR, exc))

    def __iter__(self) -> "StreamReader":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, name="dataselect-stream-reader", daemon=True)
            self._thread.start()
        try:
            kind, value = self._queue.get(timeout=self.idle_seconds)
        except queue.Empty:
            self._finished = True
            where = "its first message" if self.received == 0 else f"message {self.received + 1}"
            raise StreamStalled(f"{self._method}: the client sent nothing for {self.idle_seconds:g}s while the "
                                f"server waited for {where} (the server's --stream-idle-seconds); send a "
                                "stream's messages without pausing and close it when done") from None
        if kind == self._END:
            self._finished = True
            raise StopIteration
        if kind == self._ERROR:
            self._finished = True
            raise value
        self.received += 1
        return _checked(value)

    def close(self) -> None:
        self._closed.set()


# -- the guards --------------------------------------------------------------------------------
def _guard_unary_request(fn, method: str, limit):
    @functools.wraps(fn)
    def wrapper(request, context):
        try:
            limit.acquire()
            try:
                return fn(_checked(request), context)
            finally:
                limit.release()
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            _abort(exc, context, method)

    return wrapper


def _guard_stream_request(fn, method: str, limit, idle_seconds):
    @functools.wraps(fn)
    def wrapper(request_iterator, context):
        reader = StreamReader(request_iterator, idle_seconds, method)
        try:
            limit.acquire()
            try:
                return fn(reader, context)
            finally:
                limit.release()
        except Exception as exc:  # noqa: BLE001
            _abort(exc, context, method)
        finally:
            reader.close()

    return wrapper


def _guard_streaming_response(fn, method: str, limit, idle_seconds, stream_request: bool):
    @functools.wraps(fn)
    def wrapper(request, context):
        reader = StreamReader(request, idle_seconds, method) if stream_request else None
        try:
            limit.acquire()
            try:
                yield from fn(reader if stream_request else _checked(request), context)
            finally:
                limit.release()
        except Exception as exc:  # noqa: BLE001
            _abort(exc, context, method)
        finally:
            if reader is not None:
                reader.close()

    return wrapper


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Guards every method of dataselect.v1.Selection (health and reflection keep their own handling).

    With `limit`, the same guard also bounds the calls in flight (`InFlightLimit`);
    `stream_idle_seconds` bounds the wait for each message of a client stream (None: no limit).
    """

    def __init__(self, limit: InFlightLimit | None = None, *,
                 stream_idle_seconds: float | None = DEFAULT_STREAM_IDLE_SECONDS):
        self.limit = limit or _NoLimit()
        self.stream_idle_seconds = stream_idle_seconds

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        handler = handler._replace(request_deserializer=safe_deserializer(handler.request_deserializer, method))
        idle = self.stream_idle_seconds
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard_unary_request(handler.unary_unary, method, self.limit))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_guard_stream_request(handler.stream_unary, method, self.limit, idle))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guard_streaming_response(
                handler.unary_stream, method, self.limit, idle, stream_request=False))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_guard_streaming_response(
                handler.stream_stream, method, self.limit, idle, stream_request=True))
        return handler
