"""The server's sessions: one `ScoringSession` per id, shared by all worker threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import secrets
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from dataselect.errors import NotFound, ResourceExhausted
from dataselect.scoring import ScoringSession

log = logging.getLogger("dataselect.server")

DEFAULT_TTL_SECONDS = 3600.0


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.malloc_trim  # noqa: B018 - glibc only
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def release_memory() -> bool:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc `malloc_trim`).

    Freed tensors go back to malloc, which keeps them in its arenas; without a trim the
    server's RSS stays at its high-water mark after every session has closed. Returns
    False where there is no glibc (the collection still runs).
    """
    gc.collect()
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def tune_malloc(arenas: int = 0, mmap_threshold: int = 0) -> bool:
    """Make glibc's malloc give memory back; call before worker threads start allocating.

    `arenas` > 0 caps the malloc arenas (`M_ARENA_MAX`): each thread that allocates may
    get its own arena, and memory freed in one cannot serve another.
    `mmap_threshold` > 0 fixes the size from which blocks are mmapped (`M_MMAP_THRESHOLD`).
    By default glibc raises that threshold, up to 32 MiB, each time a large block is
    freed, and the trim threshold with it (to 64 MiB), so after a burst of scoring the
    activations of later micro-batches come from the arenas, and a thread's arena never
    shrinks again (`malloc_trim` does not shrink thread arenas' tops). Fixed, large
    tensors are mapped and unmapped, and freed arena tops are returned as they free.
    Returns False where there is no glibc.
    """
    if _LIBC is None:
        return False
    M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
    ok = True
    if arenas > 0:
        ok &= bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))
    if mmap_threshold > 0:
        ok &= bool(_LIBC.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    return ok


def session_bytes(session: ScoringSession) -> int:
    """Bytes of model state a session holds (its model, and its proxy's when that is a separate module)."""
    seen: set[int] = set()
    total = 0
    modules = [session.model] + ([session.proxy.model] if getattr(session, "proxy", None) is not None else [])
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            key = t.data_ptr() if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class SessionStore:
    """Thread-safe map from session id to `ScoringSession`.

    Ids come from `secrets.token_urlsafe`, so one trainer cannot guess and
    use another's session. Each session belongs to the caller that opened it
    (`owner`: a digest of its token, '' without authentication); any other
    caller is told the session does not exist, so ids cannot be probed.
    Sessions idle for longer than `ttl` seconds are closed by a reaper thread
    (`start_reaper`), so abandoned trainers do not hold models forever.

    Closing never waits for a call that is still running on the session: a busy
    session is not idle (the reaper passes it over until its call ends), and a
    session closed by its owner while busy is closed by a helper thread once its
    call has finished. After sessions close, free memory is handed back to the OS
    (`release_memory`, when `trim_memory`).

    Memory: `memory_budget` bounds the model bytes of all sessions together and
    `session_memory` those of one session (None: no bound); `reserve` claims bytes
    before a session is built.
    """

    def __init__(self, max_sessions: int = 64, ttl: float = DEFAULT_TTL_SECONDS, *,
                 memory_budget: int | None = None, session_memory: int | None = None, trim_memory: bool = True):
        self.max_sessions = max_sessions
        self.ttl = float(ttl)
        self.memory_budget = memory_budget
        self.session_memory = session_memory
        self.trim_memory = trim_memory
        self._sessions: dict[str, tuple[ScoringSession, str]] = {}
        self._bytes: dict[str, int] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._closing: list[threading.Thread] = []
        self._trim_wanted = threading.Event()
        self._trimmer: threading.Thread | None = None

    # -- memory budget ---------------------------------------------------------------------
    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(self._bytes.values()) + self._reserved

    def _check_budget(self, nbytes: int, what: str, credit: int = 0) -> None:
        """Under self._lock. `credit`: bytes already reserved for this same session."""
        mib = 2**20
        if self.session_memory is not None and nbytes > self.session_memory:
            raise ResourceExhausted(
                f"{what} needs {nbytes / mib:.0f} MiB of model state, more than the {self.session_memory / mib:.0f} MiB "
                "one session may hold (the server's --session-memory-mb); use a smaller model or model arguments")
        held = sum(self._bytes.values()) + self._reserved - credit
        if self.memory_budget is not None and held + nbytes > self.memory_budget:
            raise ResourceExhausted(
                f"{what} needs {nbytes / mib:.0f} MiB of model state; this server's sessions already hold "
                f"{held / mib:.0f} of its {self.memory_budget / mib:.0f} MiB (--memory-budget-mb): close unused "
                "sessions, use a smaller model, or start the server with a larger budget")

    @contextmanager
    def reserve(self, nbytes: int, what: str = "this session") -> Iterator[None]:
        """Claim `nbytes` of the budget while a session is being built (refused at once if it does not fit)."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            self._check_budget(nbytes, what)
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes

    # -- sessions ----------------------------------------------------------------------------
    def add(self, session: ScoringSession, owner: str = "", nbytes: int | None = None, *, reserved: int = 0) -> str:
        """Store `session`; `nbytes` (default: measured) counts against the memory budget, less the
        `reserved` bytes claimed for it while it was built (`reserve`, still held by the caller)."""
        nbytes = session_bytes(session) if nbytes is None else int(nbytes)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"this server already holds {self.max_sessions} sessions: close unused ones "
                    "(CloseSession) or start the server with a higher --max-sessions"
                )
            self._check_budget(nbytes, "this session", credit=max(0, int(reserved)))
            session_id = secrets.token_urlsafe(16)
            self._sessions[session_id] = (session, owner)
            self._bytes[session_id] = nbytes
            session.last_used = time.monotonic()
            return session_id

    def get(self, session_id: str, owner: str = "") -> ScoringSession:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is not None and entry[1] == owner:
                entry[0].last_used = time.monotonic()
                return entry[0]
        raise NotFound(self._unknown(session_id))

    def close(self, session_id: str, owner: str = "") -> None:
        """Remove the session now; it is closed at once, or when the call running on it ends."""
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or entry[1] != owner:
                raise NotFound(self._unknown(session_id))
            del self._sessions[session_id]
            self._bytes.pop(session_id, None)
        self._close_soon([entry[0]])

    def reap(self, now: float | None = None) -> int:
        """Close sessions idle for longer than the TTL; returns how many. Never waits for a busy session."""
        now = time.monotonic() if now is None else now
        with self._lock:
            # A session with a call running on it (its lock held) is in use, not idle.
            expired = [sid for sid, (s, _) in self._sessions.items()
                       if now - s.last_used > self.ttl and not s.lock.locked()]
            sessions = [self._sessions.pop(sid)[0] for sid in expired]
            for sid in expired:
                self._bytes.pop(sid, None)
        self._close_soon(sessions)
        if sessions:
            log.info("closed %d session(s) idle for more than %gs (--session-ttl)", len(sessions), self.ttl)
        return len(sessions)

    def _close_soon(self, sessions: list[ScoringSession]) -> None:
        """Close each session now if it is free, else on a helper thread once its call ends; then trim."""
        for session in sessions:
            if session.lock.acquire(blocking=False):
                session.lock.release()
                session.close()  # free a moment ago; at worst waits for a call that just started
            else:
                thread = threading.Thread(target=self._close_later, args=(session,), daemon=True,
                                          name="dataselect-session-close")
                thread.start()
                with self._lock:
                    self._closing = [t for t in self._closing if t.is_alive()] + [thread]
        if sessions:
            self.request_trim()

    def _close_later(self, session: ScoringSession) -> None:
        try:
            session.close()
        except Exception:  # noqa: BLE001
            log.exception("closing a session failed")
        self.request_trim()

    # -- handing memory back ------------------------------------------------------------------
    def request_trim(self) -> None:
        """Ask the trimming thread to hand freed memory back to the OS (coalesced, off the caller's thread)."""
        if not self.trim_memory:
            return
        self._trim_wanted.set()
        with self._lock:
            if self._trimmer is None or not self._trimmer.is_alive():
                self._trimmer = threading.Thread(target=self._trim_loop, name="dataselect-memory-trim", daemon=True)
                self._trimmer.start()

    def _trim_loop(self) -> None:
        while not self._stop.is_set():
            if not self._trim_wanted.wait(1.0):
                continue
            time.sleep(0.2)  # let a burst of closes finish, then trim once
            self._trim_wanted.clear()
            try:
                release_memory()
            except Exception:  # noqa: BLE001 - trimming is an optimisation
                log.exception("releasing memory failed")

    # -- lifecycle ------------------------------------------------------------------------------
    def start_reaper(self, interval: float | None = None) -> None:
        if self._reaper is not None:
            return
        interval = max(0.05, min(60.0, self.ttl / 4)) if interval is None else interval

        def run():
            while not self._stop.wait(interval):
                try:
                    self.reap()
                except Exception:  # noqa: BLE001 - the reaper must outlive one bad close
                    log.exception("session reaper failed")

        self._reaper = threading.Thread(target=run, name="dataselect-session-reaper", daemon=True)
        self._reaper.start()

    def close_all(self, timeout: float = 1.0) -> int:
        """Stop the reaper and close every session, waiting at most `timeout` s for busy ones.

        Returns how many sessions were still busy (they close on helper threads when their calls end).
        """
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None
        with self._lock:
            sessions = [s for s, _ in self._sessions.values()]
            self._sessions.clear()
            self._bytes.clear()
        self._close_soon(sessions)
        deadline = time.monotonic() + timeout
        with self._lock:
            closing = list(self._closing)
        for thread in closing:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(t.is_alive() for t in closing)
        if self.trim_memory:
            release_memory()
        return busy

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @staticmethod
    def _unknown(session_id: str) -> str:
        if not session_id:
            return "no session_id given: call OpenSession first and pass its session_id"
        return (f"unknown session {session_id[:64]!r}: it was closed, expired (--session-ttl) or the server "
                "restarted; open a new session (OpenSession)")
