"""uvicorn as Muse runs it: read deadlines for slow clients, a limit on headers' size, a connection limit,
forwarded headers only from trusted proxies, a raised file-descriptor limit, and a first signal that drains
before the socket closes.

uvicorn closes idle keep-alive connections itself, but waits forever for a request that is only half
sent: thousands of those would hold every file descriptor. `guarded` adds two deadlines to its HTTP
protocol: a request's headers must arrive within `header_timeout` of its first byte (or of the
connection), and its body may pause at most `body_timeout` between two chunks. `capped` answers 431 to a
request whose line and headers pass MAX_HEADER_BYTES.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import resource
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from muse.config import Settings

if TYPE_CHECKING:
    from muse.core.service import Muse

log = logging.getLogger("muse")

MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers together; browsers send a few KiB, nginx allows 32


class HeadersTooLarge(Exception):
    """Raised in a parser callback to stop httptools reading a request refused for its headers' size."""


def guarded(base: type[Any], header_timeout: float, body_timeout: float) -> type[asyncio.Protocol]:
    """`base` (uvicorn's httptools or h11 protocol) closing connections that send a request too slowly."""

    class Guarded(base):
        _deadline: asyncio.TimerHandle | None = None  # the headers' deadline, or the body's next chunk

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm(header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # Waiting for (the rest of) a request's headers: the clock started with its first byte.
                if self._deadline is None and self.transport is not None and not self.transport.is_closing():
                    self._arm(header_timeout)
            elif cycle.more_body:
                self._arm(body_timeout)  # a chunk came: the body may pause this long again
            else:
                self._disarm()  # the whole request is in; the app takes its time

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            cycle = self.cycle
            if cycle is None or cycle.response_complete or cycle.more_body:
                self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def capped(base: type[Any], limit: int) -> type[Any]:
    """`base` (uvicorn's httptools protocol) answering 431 to a request whose line and headers pass `limit` bytes.

    httptools has no limit of its own (h11 has: `h11_max_incomplete_event_size`), and keeps a header it is
    reading in a bytes object that grows by copying; uvicorn only sees it whole. A 50 MB header was read to
    its end and answered 200. So the bytes that arrive while a request's headers are read are counted, and
    the request is refused once they pass the limit: at most the limit and a read or two (256 KiB each) are
    held. The read in which a request begins may end the previous one, so it is not counted; instead the
    headers' exact size is checked once they are complete, which also catches a request that came in one read.
    """

    class Capped(base):
        _reading_head = False  # between the first byte of a request and the end of its headers
        _began = False  # a request began in the data being parsed now
        _head_bytes = 0
        _too_large = False

        def data_received(self, data: bytes) -> None:
            self._began = False
            super().data_received(data)
            if self._reading_head and not self._began and not self._too_large:
                self._head_bytes += len(data)
                if self._head_bytes > limit:
                    self._refuse()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._reading_head, self._began, self._head_bytes = True, True, 0

        def on_headers_complete(self) -> None:
            self._reading_head = False
            if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > limit:
                self._too_large = True
                raise HeadersTooLarge  # httptools stops, and uvicorn answers with send_400_response
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._refuse()
            else:
                super().send_400_response(msg)

        def _refuse(self) -> None:
            self._too_large = True
            if self.transport.is_closing():
                return
            message = f"the request line and headers are over {limit} bytes"
            error = {"message": message, "type": "invalid_request_error", "param": None, "code": "headers_too_large"}
            body = json.dumps({"error": error}).encode()
            head = [b"HTTP/1.1 431 Request Header Fields Too Large"]
            head += [name + b": " + value for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            self.transport.close()

    Capped.__name__ = f"Capped{base.__name__}"
    return Capped


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """The protocol uvicorn's "auto" would pick (httptools when installed), with read deadlines and a limit on
    headers' size (h11's own is set in `uvicorn_config`)."""
    base: type[Any] = H11Protocol
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = capped(HttpToolsProtocol, MAX_HEADER_BYTES)
    return guarded(base, settings.header_timeout, settings.body_timeout)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    forwarded = settings.forwarded_allow_ips.strip()
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 5,
        "access_log": False,
        "http": http_protocol(settings),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,  # h11 answers 400 past it
        "limit_concurrency": settings.max_connections or None,
        # X-Forwarded-For/-Proto only from the proxies named; by default from nobody, so a client cannot
        # choose the address its rate limit is counted against.
        "proxy_headers": bool(forwarded),
        "forwarded_allow_ips": forwarded or None,
    }
    return uvicorn.Config(app, **(options | overrides))


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (often 1,024 of 1,048,576): each connection is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the service before the socket closes.

    While draining, /readyz and new requests answer 503 (a load balancer moves away) and accepted
    requests still finish. A second signal stops at once. The signal is not re-raised, so a drained
    exit is status 0.
    """

    def __init__(self, config: uvicorn.Config, muse: Muse) -> None:
        super().__init__(config)
        self.muse = muse

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.muse.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self.muse.drain()
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("serving on http://%s:%d", host, port)
