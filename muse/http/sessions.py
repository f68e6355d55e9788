"""Browser sessions: a random id in an HttpOnly cookie, kept server-side with who it is and when it expires.

The key itself never leaves the login form: a stolen cookie is worth one session, which logout (or the
expiry) revokes. Sessions live in memory, so a restart signs everyone out.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "muse_session"
MAX_SESSIONS = 10_000  # the oldest are dropped beyond this, so logins cannot fill the memory


@dataclass(frozen=True)
class Session:
    identity: str  # "key:<fingerprint>"
    admin: bool
    expires: float


class Sessions:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def create(self, identity: str, admin: bool) -> str:
        if len(self._by_id) >= MAX_SESSIONS:
            self._forget_expired()
            while len(self._by_id) >= MAX_SESSIONS:
                del self._by_id[next(iter(self._by_id))]  # dicts keep insertion order: the oldest
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = Session(identity, admin, self.clock() + self.ttl)
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is not None and session.expires < self.clock():
            self.revoke(session_id or "")
            return None
        return session

    def revoke(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _forget_expired(self) -> None:
        now = self.clock()
        for session_id, session in list(self._by_id.items()):
            if session.expires < now:
                del self._by_id[session_id]
