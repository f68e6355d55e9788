"""Middleware that every response passes through: a body size limit and security headers."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from muse.errors import PayloadTooLarge
from muse.http.common import error_response

MAX_BODY_BYTES = 1 << 20  # prompts are at most 2,000 characters; a body without pictures never comes close


def body_limit(max_upload: int) -> int:
    """The largest body: room for a picture and its mask of --max-upload bytes each, in base64 (4 characters
    per 3 bytes), besides everything else. A picture over --max-upload in a body under this is refused by
    name (422), not as a body (413)."""
    return MAX_BODY_BYTES + 2 * (max_upload * 4 // 3 + 4)


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class TooLarge(PayloadTooLarge):
    """Raised while a route reads a streamed body past the limit: a route that catches Muse's errors (a page)
    answers it as a 413 of its own kind; BodyLimit answers it for any other."""


class BodyLimit:
    """413 for a body over the limit, whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self.refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(f"request body over {self.limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except TooLarge:
            if not started:
                await self.refuse(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(PayloadTooLarge(f"request body over {self.limit} bytes"))(scope, receive, send)


class SecurityHeaders:
    """Security headers on every response; `page_csp` (the web side's policy) on HTML ones."""

    def __init__(self, app: ASGIApp, page_csp: bytes = b"default-src 'none'; frame-ancestors 'none'") -> None:
        self.app = app
        self.page_csp = page_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(SECURITY_HEADERS)
                content_type = dict(headers).get(b"content-type", b"")
                if content_type.startswith(b"text/html"):
                    headers.append((b"content-security-policy", self.page_csp))
                message = dict(message) | {"headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
