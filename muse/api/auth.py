"""API keys for every route that generates, lists or reads images; a login cookie for the pages.

- Clients send `Authorization: Bearer <key>`. Browsers log in once at /login and keep the key in an
  HttpOnly, SameSite=Strict cookie. Cookie-authenticated requests that change state must also send
  the CSRF token (double submit: `X-CSRF-Token` header equal to the `muse_csrf` cookie), which the
  pages render into `hx-headers` from `request.state.csrf_token`.
- Keys are compared in constant time (every key, every time) and never logged.
- Every request gets `request.state.identity`: the key's fingerprint, or the client address when
  no keys are configured, for rate limiting.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muse.errors import InvalidRequest, Unauthorized

KEY_COOKIE = "muse_key"
CSRF_COOKIE = "muse_csrf"
CSRF_HEADER = "x-csrf-token"
OPEN_PREFIXES = ("/healthz", "/readyz", "/static/", "/login", "/logout", "/openapi.json", "/favicon.ico")
API_PREFIXES = ("/api/", "/v1/", "/sdapi/", "/metrics")
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
FORM_TYPE = "application/x-www-form-urlencoded"


def load_keys(spec: str) -> list[str]:
    """`--api-keys`: a comma list, or `@path` to a file with one key per line (# comments allowed)."""
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("@"):
        lines = Path(spec[1:]).read_text().splitlines()
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    else:
        keys = [k.strip() for k in spec.split(",") if k.strip()]
    if not keys:
        raise ValueError("--api-keys is set but holds no key")
    return keys


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def valid(self, key: str | None) -> bool:
        if key is None:
            return False
        candidate = key.encode()
        # No early exit: the time taken does not depend on which key (if any) matched.
        matched = False
        for k in self.keys:
            matched |= hmac.compare_digest(candidate, k)
        return matched


class AccessControl:
    def __init__(self, app: ASGIApp, keys: KeyRing, *, public_metrics: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.public_metrics = public_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        state = scope.setdefault("state", {})
        csrf = request.cookies.get(CSRF_COOKIE) or ""
        new_csrf = "" if csrf else secrets.token_urlsafe(24)
        state["csrf_token"] = csrf or new_csrf
        client = request.client.host if request.client else "unknown"
        state["identity"] = f"addr:{client}"
        send = with_cookie(send, CSRF_COOKIE, new_csrf, request) if new_csrf else send

        path = scope["path"]
        if not self.keys or path.startswith(OPEN_PREFIXES) or (path == "/metrics" and self.public_metrics):
            await self.app(scope, receive, send)
            return
        bearer = bearer_token(request)
        key = bearer or request.cookies.get(KEY_COOKIE)
        if not self.keys.valid(key):
            response = self.refuse(request, path, "missing API key" if key is None else "invalid API key")
            await response(scope, receive, send)
            return
        if bearer is None and request.method in UNSAFE:
            sent = request.headers.get(CSRF_HEADER)
            if sent is None and request.headers.get("content-type", "").startswith(FORM_TYPE):
                # A plain form post (no JavaScript) carries the token as a field; replay the body.
                body = await read_all(receive)
                sent = parse_qs(body.decode(errors="replace")).get("csrf_token", [""])[0]
                receive = replay(body, receive)
            if not csrf or not hmac.compare_digest((sent or "").encode(), csrf.encode()):
                error = InvalidRequest("missing or wrong CSRF token", code="csrf_failed", status=403)
                error.type = "permission_error"
                await JSONResponse(error.to_dict(), status_code=403)(scope, receive, send)
                return
        state["identity"] = f"key:{fingerprint(key or '')}"
        await self.app(scope, receive, send)

    def refuse(self, request: Request, path: str, why: str) -> Response:
        wants_page = (
            request.method == "GET"
            and not path.startswith(API_PREFIXES)
            and "text/html" in request.headers.get("accept", "")
            and "hx-request" not in request.headers
        )
        if wants_page:
            return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        error = Unauthorized(f"{why}: send 'Authorization: Bearer <key>'")
        return JSONResponse(error.to_dict(), status_code=401, headers=error.headers())


async def read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, then: Receive) -> Receive:
    """The body already read, then the connection's own messages (a later disconnect stays visible)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def cookie_header(name: str, value: str, request: Request, *, max_age: int | None = None) -> bytes:
    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    if request.url.scheme == "https":
        morsel["secure"] = True
    if max_age is not None:
        morsel["max-age"] = max_age
    return morsel.OutputString().encode()


def with_cookie(send: Send, name: str, value: str, request: Request) -> Send:
    header = cookie_header(name, value, request)

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), (b"set-cookie", header)]
        await send(message)

    return wrapped


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
