"""The login page for browsers when API keys are set: the key goes into an HttpOnly cookie; logout clears it."""

from __future__ import annotations

import hmac
import html
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from muse.api.auth import KEY_COOKIE, KeyRing
from muse.api.csrf import CSRF_COOKIE, cookie_header


def safe_next(target: str) -> str:
    # Only local paths: a login form must not become an open redirect.
    return target if target.startswith("/") and not target.startswith("//") else "/"


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Muse — sign in</title><link rel="stylesheet" href="/static/style.css"></head>
<body><main class="login"><h1>Muse</h1>
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}"><input type="hidden" name="csrf_token" value="{csrf}">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>{error}
</form></main></body></html>"""


def login_page(request: Request, error: str = "", status: int = 200) -> HTMLResponse:
    body = LOGIN_PAGE.format(
        next=html.escape(safe_next(request.query_params.get("next", "/"))),
        csrf=html.escape(getattr(request.state, "csrf_token", "")),
        error=f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "",
    )
    return HTMLResponse(body, status_code=status)


async def login_form(request: Request) -> Response:
    return login_page(request)


async def login(request: Request) -> Response:
    keys: KeyRing = request.app.state.keys
    fields = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
    csrf = request.cookies.get(CSRF_COOKIE, "")
    if not csrf or not hmac.compare_digest(fields.get("csrf_token", "").encode(), csrf.encode()):
        return login_page(request, "Your session expired; please try again.", status=403)
    key = fields.get("key", "")
    if keys and not keys.valid(key):
        return login_page(request, "That key is not valid.", status=401)
    response = RedirectResponse(safe_next(fields.get("next", "/")), status_code=303)
    response.headers.append("set-cookie", cookie_header(KEY_COOKIE, key, request, max_age=30 * 86400).decode())
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.headers.append("set-cookie", cookie_header(KEY_COOKIE, "", request, max_age=0).decode())
    return response


routes = [
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
