"""A webhook receiver on 127.0.0.1 for tests: records every delivery, verifies it with the Standard Webhooks
reference library, and answers what the test says (200 by default)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Delivery:
    at: float  # time.monotonic()
    headers: dict[str, str]
    body: bytes
    verified: bool  # the signature checked out with the receiver's secret
    status: int  # what the receiver answered

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    secret: str
    status: int = 200
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def verify(self, body: bytes, headers: dict[str, str]) -> bool:
        try:
            Webhook(self.secret).verify(body, headers)
        except Exception:
            return False
        return True

    def received(self, body: bytes, headers: dict[str, str]) -> int:
        with self.lock:
            status = self.status
            self.deliveries.append(Delivery(time.monotonic(), headers, body, self.verify(body, headers), status))
        return status

    def delivered(self) -> list[Delivery]:
        """The deliveries answered 2xx."""
        with self.lock:
            return [d for d in self.deliveries if 200 <= d.status < 300]


@contextmanager
def receiving(secret: str, status: int = 200, port: int = 0) -> Iterator[Receiver]:
    receiver = Receiver(secret, status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = receiver.received(body, {k.lower(): v for k, v in self.headers.items()})
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
