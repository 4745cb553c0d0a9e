"""The server's sessions: one `ScoringSession` per id, shared by all worker threads."""

from __future__ import annotations

import secrets
import threading

from dataselect.errors import NotFound, ResourceExhausted
from dataselect.scoring import ScoringSession


class SessionStore:
    """Thread-safe map from session id to `ScoringSession`.

    Ids come from `secrets.token_urlsafe`, so one trainer cannot guess and
    use another's session.
    """

    def __init__(self, max_sessions: int = 64):
        self.max_sessions = max_sessions
        self._sessions: dict[str, ScoringSession] = {}
        self._lock = threading.Lock()

    def add(self, session: ScoringSession) -> str:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"this server already holds {self.max_sessions} sessions: close unused ones "
                    "(CloseSession) or start the server with a higher session limit"
                )
            session_id = secrets.token_urlsafe(16)
            self._sessions[session_id] = session
            return session_id

    def get(self, session_id: str) -> ScoringSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(self._unknown(session_id))
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(self._unknown(session_id))
        session.close()

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
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
        return (f"unknown session {session_id!r}: it was closed or the server restarted; "
                "open a new session (OpenSession)")
