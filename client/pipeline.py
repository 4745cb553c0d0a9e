"""Overlapped scoring: a scorer's calls on one background thread, in submission order.

With `--overlap` the trainer hands every scorer call (checkpoint pushes,
Selects, Reports) to a `ScorerPipeline` instead of making it itself. One
worker thread runs them strictly in the order they were submitted, so:

* a Select submitted after a push is scored with that push's weights;
* the scorer object is only ever used by one thread (no locking needed in
  `RemoteScorer` or `EmbeddedScorer`);
* the trainer asks for pool t+1's selection *before* it trains step t, and
  while it trains, the server (or, embedded, the worker thread) scores.

gRPC and torch release the GIL while they wait or compute, so the trainer's
own step runs in parallel with the worker. The pipeline measures how long the
worker was busy and how long the trainer waited for it; the difference is the
scoring time that was hidden behind training.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Timed:
    """A finished call's result and the worker time it took."""

    value: Any
    seconds: float


class ScorerPipeline:
    """One worker thread that runs submitted calls in order; see the module docstring."""

    def __init__(self, name: str = "dataselect-scorer"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        #: Worker seconds spent in calls, by kind ("select", "push", "report").
        self.busy_seconds: dict[str, float] = {}
        #: Seconds the trainer spent blocked in `wait`, by kind.
        self.wait_seconds: dict[str, float] = {}
        self._closed = False

    def submit(self, kind: str, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)`; the future's result is a `Timed`.

        A call that raises makes every later `wait` on *its* future raise; calls
        queued after it still run (the trainer decides whether to go on).
        """
        if self._closed:
            raise RuntimeError("this ScorerPipeline is closed")

        def run() -> Timed:
            t0 = time.perf_counter()
            try:
                return Timed(fn(*args, **kwargs), time.perf_counter() - t0)
            finally:
                with self._lock:
                    self.busy_seconds[kind] = self.busy_seconds.get(kind, 0.0) + time.perf_counter() - t0

        fut = self._pool.submit(run)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(fut)
        return fut

    def wait(self, kind: str, fut: Future) -> Timed:
        """Block until `fut` is done; the blocked time counts as the trainer's wait."""
        t0 = time.perf_counter()
        try:
            return fut.result()
        finally:
            self.wait_seconds[kind] = self.wait_seconds.get(kind, 0.0) + time.perf_counter() - t0

    def drain(self) -> None:
        """Wait for every queued call; the first failure among them is raised."""
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for fut in pending:
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def close(self, *, wait: bool = True) -> None:
        """Stop the worker (after the queued calls when `wait`); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not wait:
            with self._lock:
                for fut in self._pending:
                    fut.cancel()
        self._pool.shutdown(wait=True)

    def hidden_fraction(self, kind: str = "select") -> float:
        """Share of the worker's `kind` time the trainer did not wait for (0..1)."""
        busy = self.busy_seconds.get(kind, 0.0)
        if busy <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.wait_seconds.get(kind, 0.0) / busy))
