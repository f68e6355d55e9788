"""Slow clients cannot starve others, and forwarded headers are believed only from trusted proxies."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.process import ServeProcess, serve_process
from tests.serving import wait_for

HELD = 300


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[ServeProcess]:
    flags = ["--model", tiny_model, "--devices", "cpu", "--threads-per-worker", "1"]
    flags += ["--header-timeout", "3", "--body-timeout", "3", "--rate-limit", "2"]
    with serve_process(*flags) as served:
        yield served


def half_sent(url: str, request: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(request)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_half_sent_requests_do_not_starve_others_and_are_cut_off(server: ServeProcess) -> None:
    partial_headers = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    partial_body = b'POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"prompt"'
    sockets = [half_sent(server.url, partial_headers if i % 2 else partial_body) for i in range(HELD)]
    try:
        with httpx.Client(timeout=10) as client:
            started = time.monotonic()
            assert client.get(server.url + "/healthz").status_code == 200
            assert time.monotonic() - started < 1.0
            started = time.monotonic()
            generated = client.post(server.url + "/api/generate", json={"prompt": "x", "steps": 1})
            assert generated.status_code == 200, generated.text
            assert time.monotonic() - started < 1.0
        held_at = time.monotonic()
        wait_for(lambda: all(closed_by_server(s) for s in sockets), 20, 0.2, "the half-sent requests to be cut off")
        assert time.monotonic() - held_at < 10
    finally:
        for s in sockets:
            s.close()


def test_a_new_x_forwarded_for_per_request_does_not_reset_the_bucket(server: ServeProcess) -> None:
    body = {"prompt": "x", "steps": 20}  # cost 0.8 of the 2 a minute: two fit beside the 0.2 spent above
    codes = [
        httpx.post(server.url + "/api/generate", json=body, headers={"X-Forwarded-For": f"10.0.0.{i}"}, timeout=60)
        for i in range(3)
    ]
    assert [c.status_code for c in codes] == [200, 200, 429], [c.text for c in codes]
