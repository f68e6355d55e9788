"""CSRF: no state changes on behalf of another site, with API keys or without.

- Every state-changing request not authenticated by a Bearer key must come from this site, as the browser
  says: `Sec-Fetch-Site` other than cross-site/same-site, and an `Origin` (when sent) naming this host or
  one of `--cors-origins`. Clients that are not browsers send neither header and pass; a cross-site form
  or fetch on someone's laptop (or a DNS-rebinding page) does not.
- Every request gets a token (the `muse_csrf` cookie, set when missing) in `request.state.csrf_token`;
  the pages render it into `hx-headers` and into a hidden form field. A state-changing request that
  was authenticated by the key cookie (muse.http.auth runs first and says so) must also send the same
  token back, in the `X-CSRF-Token` header or, for a plain form post without JavaScript (urlencoded, or
  multipart with a picture), as the `csrf_token` field (the body is read and replayed to the route).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Collection
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muse.errors import Forbidden
from muse.http.common import error_response

CSRF_COOKIE = "muse_csrf"
CSRF_HEADER = "x-csrf-token"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
FORM_TYPE = "application/x-www-form-urlencoded"
MULTIPART_TYPE = "multipart/form-data"  # the page's form without JavaScript, with a file to upload


class CsrfCheck:
    def __init__(self, app: ASGIApp, *, allowed_origins: Collection[str] = ()) -> None:
        self.app = app
        self.allowed_origins = {o.rstrip("/") for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        state = scope.setdefault("state", {})
        csrf = request.cookies.get(CSRF_COOKIE) or ""
        if not csrf:
            state["csrf_token"] = secrets.token_urlsafe(24)
            send = with_cookie(send, CSRF_COOKIE, state["csrf_token"], request)
        else:
            state["csrf_token"] = csrf
        if request.method in UNSAFE and state.get("authenticated_by") != "bearer":
            why = self.foreign(request)
            if why:
                await error_response(Forbidden(f"cross-site request refused: {why}", code="cross_site"))(
                    scope, receive, send
                )
                return
        if state.get("authenticated_by") == "cookie" and request.method in UNSAFE:
            sent = request.headers.get(CSRF_HEADER)
            kind = request.headers.get("content-type", "")
            if sent is None and kind.startswith((FORM_TYPE, MULTIPART_TYPE)):
                body = await read_all(receive)
                sent = await form_token(scope, body) if kind.startswith(MULTIPART_TYPE) else url_token(body)
                receive = replay(body, receive)
            if not token_matches(request, sent or ""):
                await error_response(Forbidden("missing or wrong CSRF token", code="csrf_failed"))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def foreign(self, request: Request) -> str | None:
        """Why the browser says this request comes from another site; None when it does not."""
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") in self.allowed_origins:
            return None  # a site allowed by --cors-origins (or this server's --public-url)
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            # The browser's own verdict wins: behind a proxy the Host it was sent to may not be the one we see.
            return None if site in ("same-origin", "none") else f"Sec-Fetch-Site: {site}"
        if origin is None:
            return None
        if origin == "null" or urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
            return f"Origin {origin[:100]!r} is not this server"
        return None


def url_token(body: bytes) -> str:
    return parse_qs(body.decode(errors="replace")).get("csrf_token", [""])[0]


async def form_token(scope: Scope, body: bytes) -> str:
    """The `csrf_token` field of a multipart body (the route reads the body again, replayed); "" when it has
    none or cannot be parsed (the route's own reading then says what is wrong, if the token was right)."""

    async def disconnected() -> Message:
        return {"type": "http.disconnect"}

    form = None
    try:
        form = await Request(scope, replay(body, disconnected)).form(max_files=4, max_fields=64)
        token = form.get("csrf_token")
        return token if isinstance(token, str) else ""
    except (HTTPException, MultiPartException, ClientDisconnect):  # a body that does not parse has no token
        return ""
    finally:
        if form is not None:
            await form.close()


def token_matches(request: Request, sent: str) -> bool:
    """Whether `sent` is this browser's CSRF token (the cookie's), compared in constant time."""
    csrf = request.cookies.get(CSRF_COOKIE, "")
    return bool(csrf) and hmac.compare_digest(sent.encode(), csrf.encode())


async def read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect  # a cut-off form is no form: the route must not see half of it
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
