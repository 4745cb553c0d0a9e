"""The server's sessions: one `ScoringSession` per id, shared by all worker threads."""

from __future__ import annotations

import logging
import secrets
import threading
import time

from dataselect.errors import NotFound, ResourceExhausted
from dataselect.scoring import ScoringSession

log = logging.getLogger("dataselect.server")

DEFAULT_TTL_SECONDS = 3600.0


class SessionStore:
    """Thread-safe map from session id to `ScoringSession`.

    Ids come from `secrets.token_urlsafe`, so one trainer cannot guess and
    use another's session. Each session belongs to the caller that opened it
    (`owner`: a digest of its token, '' without authentication); any other
    caller is told the session does not exist, so ids cannot be probed.
    Sessions idle for longer than `ttl` seconds are closed by a reaper thread
    (`start_reaper`), so abandoned trainers do not hold models forever.
    """

    def __init__(self, max_sessions: int = 64, ttl: float = DEFAULT_TTL_SECONDS):
        self.max_sessions = max_sessions
        self.ttl = float(ttl)
        self._sessions: dict[str, tuple[ScoringSession, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def add(self, session: ScoringSession, owner: str = "") -> str:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"this server already holds {self.max_sessions} sessions: close unused ones "
                    "(CloseSession) or start the server with a higher --max-sessions"
                )
            session_id = secrets.token_urlsafe(16)
            self._sessions[session_id] = (session, owner)
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
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or entry[1] != owner:
                raise NotFound(self._unknown(session_id))
            del self._sessions[session_id]
        entry[0].close()

    def reap(self, now: float | None = None) -> int:
        """Close sessions idle for longer than the TTL; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [sid for sid, (s, _) in self._sessions.items() if now - s.last_used > self.ttl]
            sessions = [self._sessions.pop(sid)[0] for sid in expired]
        for session in sessions:
            session.close()  # waits for a call still running on it (the session lock)
        if sessions:
            log.info("closed %d session(s) idle for more than %gs (--session-ttl)", len(sessions), self.ttl)
        return len(sessions)

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

    def close_all(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None
        with self._lock:
            sessions = [s for s, _ in self._sessions.values()]
            self._sessions.clear()
        for session in sessions:
            session.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    @staticmethod
    def _unknown(session_id: str) -> str:
        if not session_id:
            return "no session_id given: call OpenSession first and pass its session_id"
        return (f"unknown session {session_id[:64]!r}: it was closed, expired (--session-ttl) or the server "
                "restarted; open a new session (OpenSession)")
