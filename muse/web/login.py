"""Signing in and out for browsers when API keys are set.

Login checks the key and starts a server-side session (its random id in an HttpOnly cookie; the key is
never stored in the browser). Both login and logout need the page's CSRF token, and login attempts are
limited per address, so a key cannot be guessed at speed.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from muse.core.ratelimit import RateLimiter
from muse.errors import RateLimited
from muse.http.auth import KeyRing, fingerprint
from muse.http.csrf import CSRF_HEADER, cookie_header, token_matches
from muse.http.sessions import SESSION_COOKIE, Sessions
from muse.web.render import render

LOGIN_ATTEMPTS_PER_MINUTE = 10


def safe_next(target: str) -> str:
    # Only local paths: a login form must not become an open redirect.
    return target if target.startswith("/") and not target.startswith("//") else "/"


def login_page(request: Request, error: str = "", status: int = 200) -> Response:
    context = {"next": safe_next(request.query_params.get("next", "/")), "error": error}
    return render(request, "login.html", context, status_code=status)


async def login_form(request: Request) -> Response:
    return login_page(request)


async def form_fields(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}


async def login(request: Request) -> Response:
    keys: KeyRing = request.app.state.keys
    sessions: Sessions = request.app.state.sessions
    attempts: RateLimiter = request.app.state.login_attempts
    fields = await form_fields(request)
    if not token_matches(request, fields.get("csrf_token", "")):
        return login_page(request, "Your session expired; please try again.", status=403)
    address = request.client.host if request.client else "unknown"
    try:
        attempts.take(address, 1)
    except RateLimited as limited:
        page = login_page(request, f"Too many attempts; try again in {limited.headers()['Retry-After']} s.", 429)
        page.headers.update(limited.headers())
        return page
    key = fields.get("key", "")
    if not keys.valid(key):
        return login_page(request, "That key is not valid.", status=401)
    session = sessions.create(f"key:{fingerprint(key)}", keys.is_admin(key))
    response = RedirectResponse(safe_next(fields.get("next", "/")), status_code=303)
    max_age = int(sessions.ttl)
    response.headers.append("set-cookie", cookie_header(SESSION_COOKIE, session, request, max_age=max_age).decode())
    return response


async def logout(request: Request) -> Response:
    """Revokes the session server-side (a copied cookie stops working too); needs the CSRF token."""
    sent = request.headers.get(CSRF_HEADER) or (await form_fields(request)).get("csrf_token", "")
    if not token_matches(request, sent):
        return login_page(request, "Sign out from Muse's own page.", status=403)
    sessions: Sessions = request.app.state.sessions
    sessions.revoke(request.cookies.get(SESSION_COOKIE, ""))
    response = RedirectResponse("/login", status_code=303)
    response.headers.append("set-cookie", cookie_header(SESSION_COOKIE, "", request, max_age=0).decode())
    return response


routes = [
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
