"""API keys for every route that generates, lists or reads images.

- Clients send `Authorization: Bearer <key>`; browsers log in once (muse.web.login) and keep a
  session id (muse.http.sessions) in an HttpOnly, SameSite=Strict cookie. Which of the two
  authenticated a request is recorded in `request.state.authenticated_by`
  ("bearer" or "cookie"), for the CSRF check that runs after this.
- Keys are compared in constant time (every key, every time) and never logged.
- Every request gets `request.state.identity`: the key's fingerprint, or the client address when
  no keys are configured, for rate limiting.
- /metrics counts every tenant's traffic: with keys it needs an admin key (or `--public-metrics`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from muse.core.tickets import EVERYONE, Viewer
from muse.errors import Forbidden, Unauthorized
from muse.http.common import error_response
from muse.http.sessions import SESSION_COOKIE, Sessions

OPEN_PREFIXES = ("/healthz", "/readyz", "/static/", "/login", "/logout", "/openapi.json", "/favicon.ico")
# A stored image's file, fetched with a signed link (muse.links) instead of a key.
SIGNED_PATH = re.compile(r"/gallery/[0-9a-f]{16}\.png")
API_PREFIXES = ("/api/", "/v1/", "/sdapi/", "/metrics")


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
    """The API keys; admin keys are keys too, and see and delete every tenant's jobs and images."""

    def __init__(self, keys: list[str], admins: list[str] | None = None) -> None:
        self.keys = [k.encode() for k in [*keys, *(admins or [])]]
        self.admins = [k.encode() for k in admins or []]

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

    def is_admin(self, key: str) -> bool:
        candidate, admin = key.encode(), False
        for k in self.admins:
            admin |= hmac.compare_digest(candidate, k)
        return admin


def viewer_of(request: Request) -> Viewer:
    """Who is asking, for what they may see: everyone sees everything without keys."""
    state = request.state
    if getattr(state, "authenticated_by", None) is None:
        return EVERYONE
    return Viewer(state.identity, admin=getattr(state, "admin", False))


class ApiKeyAuth:
    """Refuses requests without a valid key (401, or a redirect to /login for a page) when keys are set."""

    def __init__(self, app: ASGIApp, keys: KeyRing, sessions: Sessions, *, public_metrics: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.sessions = sessions
        self.public_metrics = public_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        state = scope.setdefault("state", {})
        client = request.client.host if request.client else "unknown"
        state["identity"] = f"addr:{client}"
        state["authenticated_by"] = None
        state["admin"] = False
        path = scope["path"]
        signed = SIGNED_PATH.fullmatch(path) is not None and "sig" in request.query_params  # the route checks it
        if not self.keys or path.startswith(OPEN_PREFIXES) or signed or (path == "/metrics" and self.public_metrics):
            await self.app(scope, receive, send)
            return
        bearer = bearer_token(request)
        if bearer is not None:
            if not self.keys.valid(bearer):
                await self.refuse(request, path, "invalid API key")(scope, receive, send)
                return
            state["authenticated_by"] = "bearer"
            state["identity"] = f"key:{fingerprint(bearer)}"
            state["admin"] = self.keys.is_admin(bearer)
        else:
            cookie = request.cookies.get(SESSION_COOKIE)
            session = self.sessions.get(cookie)
            if session is None:
                why = "missing API key" if cookie is None else "expired or signed-out session"
                await self.refuse(request, path, why)(scope, receive, send)
                return
            state["authenticated_by"] = "cookie"
            state["identity"] = session.identity
            state["admin"] = session.admin
        if path == "/metrics" and not state["admin"]:
            refusal = Forbidden("/metrics covers every key's requests: it needs an admin key", code="admin_only")
            await error_response(refusal)(scope, receive, send)
            return
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
        return error_response(Unauthorized(f"{why}: send 'Authorization: Bearer <key>'"))


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
