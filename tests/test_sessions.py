"""Browser sign-in: a server-side session in the cookie (never the key), revoked by logout (which needs the
CSRF token), expiring, and login attempts limited per address."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from muse.http.sessions import Sessions
from tests.serving import LiveServer, live_server
from tests.serving import settings as muse_settings

KEY = "sk-session-test-key"


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model, api_keys=KEY)) as s:
        yield s


@contextmanager
def signed_in(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Accept": "text/html"}) as browser:
        csrf = browser.get("/login").cookies["muse_csrf"]
        answer = browser.post("/login", data={"key": KEY, "csrf_token": csrf, "next": "/"})
        assert answer.status_code == 303, answer.text
        yield browser


def test_the_cookie_holds_a_session_not_the_key(server: LiveServer) -> None:
    with signed_in(server) as browser:
        session = browser.cookies["muse_session"]
        assert KEY not in session and len(session) >= 32
        assert browser.get("/gallery", follow_redirects=False).status_code == 200
        assert "Sign out" in browser.get("/").text


def test_logout_needs_the_csrf_token_and_revokes_the_session_everywhere(server: LiveServer) -> None:
    with signed_in(server) as browser:
        stolen = browser.cookies["muse_session"]
        assert browser.post("/logout", follow_redirects=False).status_code == 403, "a cross-site logout"
        assert browser.get("/gallery", follow_redirects=False).status_code == 200, "still signed in"
        token = browser.cookies["muse_csrf"]
        assert browser.post("/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    with httpx.Client(base_url=server.url, headers={"Accept": "text/html"}) as thief:
        thief.cookies.set("muse_session", stolen)
        assert thief.get("/gallery", follow_redirects=False).status_code == 303, "a copied cookie must die too"
        assert thief.get("/api/jobs/x").status_code == 401


def test_login_attempts_are_limited_per_address(tiny_model: str) -> None:
    with live_server(muse_settings(tiny_model, api_keys=KEY)) as server, httpx.Client(base_url=server.url) as browser:
        csrf = browser.get("/login").cookies["muse_csrf"]
        codes = [browser.post("/login", data={"key": f"guess-{i}", "csrf_token": csrf}).status_code for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
        right = browser.post("/login", data={"key": KEY, "csrf_token": csrf}, follow_redirects=False)
        assert right.status_code == 429, "even the right key waits: the limit counts attempts"
        assert int(right.headers["Retry-After"]) >= 1


def test_sessions_expire_and_the_table_is_bounded() -> None:
    now = [1000.0]
    sessions = Sessions(ttl=60, clock=lambda: now[0])
    session = sessions.create("key:abc", admin=False)
    assert sessions.get(session) is not None
    now[0] += 61
    assert sessions.get(session) is None
    assert sessions.get(None) is None and sessions.get("made-up") is None
