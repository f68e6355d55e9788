"""Holes a red-team review found, each shut: png-info's event-loop freeze and memory bomb, headers without a size
limit, /metrics open to every tenant, and rate-limit costs that ignored each image's fixed work."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from muse import infotext
from muse.config import Settings
from muse.model_info import NATIVE_STEPS, ModelInfo
from muse.server import MAX_HEADER_BYTES, uvicorn_config
from tests.serving import LiveServer
from tests.serving import settings as muse_settings

TENANT, ADMIN = "tenant-key", "admin-key"
AS_TENANT = {"Authorization": f"Bearer {TENANT}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


class MuseServer(LiveServer):
    """A live server under uvicorn as `muse serve` configures it (muse.server's protocol), not uvicorn's own."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.server.config = uvicorn_config(
            self.app, settings, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[MuseServer]:
    # No worker: nothing here generates, and booting one would cost seconds.
    started = MuseServer(muse_settings(tiny_model, min_workers=0, api_keys=TENANT, admin_keys=ADMIN)).start()
    try:
        yield started
    finally:
        started.stop()


# ---- png-info ----------------------------------------------------------------------------------------------


def png_with(*chunks: tuple[str, bytes]) -> str:
    """An 8-pixel PNG carrying a zTXt chunk per (keyword, text), base64-encoded for png-info."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    plain = buffer.getvalue()
    ihdr_end = 8 + 8 + struct.unpack(">I", plain[8:12])[0] + 4
    encoded = b""
    for keyword, text in chunks:
        body = keyword.encode() + b"\0\0" + zlib.compress(text, 9)
        encoded += struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    return base64.b64encode(plain[:ihdr_end] + encoded + plain[ihdr_end:]).decode()


def test_png_info_parses_a_long_colon_free_text_off_the_event_loop(
    server: MuseServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zTXt `parameters` of 40,000 letters in a 188-byte PNG froze every route for 6.4 s: its last line was
    parsed in quadratic time, on the event loop."""
    threads: list[int] = []
    parse: Callable[[str], dict[str, str]] = infotext.parse

    def spy(text: str) -> dict[str, str]:
        threads.append(threading.get_ident())
        return parse(text)

    monkeypatch.setattr(infotext, "parse", spy)
    text = b"a" * infotext.MAX_TEXT
    response = httpx.post(
        f"{server.url}/sdapi/v1/png-info", json={"image": png_with(("parameters", text))}, headers=AS_TENANT
    )
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["Prompt"] == text.decode()
    assert threads and server.thread.ident not in threads, "parsed on the event loop's thread"


def test_png_info_refuses_text_that_inflates_past_the_cap_naming_the_image(server: MuseServer) -> None:
    """740 zTXt chunks of 1 MiB each in a 1 MB upload took the server from 263 MB to 2.5 GB, and were all
    answered (776 MB). Eight are enough to show the cap: they answered 8 MiB."""
    mebibyte = b"a" * infotext.MAX_TEXT
    bomb = png_with(*((f"chunk {i}", mebibyte) for i in range(8)))
    response = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": bomb}, headers=AS_TENANT)
    assert response.status_code == 422 and len(response.content) < 1000, response.text[:1000]
    assert response.json()["error"]["param"] == "image" and "in all" in response.json()["error"]["message"]
    within = png_with(("parameters", b"a fox\nSteps: 4, Seed: 7, Size: 64x64"), ("workflow", mebibyte))
    answer = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": within}, headers=AS_TENANT)
    assert answer.status_code == 200, answer.text[:1000]
    assert answer.json()["parameters"]["Seed"] == "7" and answer.json()["items"] == {"workflow": mebibyte.decode()}
    assert len(answer.content) < infotext.MAX_TEXTS


# ---- headers -----------------------------------------------------------------------------------------------


def exchange(server: MuseServer, request: bytes) -> bytes:
    """What the server answers to `request` sent on a raw socket, until it closes the connection. The server may
    close while the request is still being sent (it refused it): what it answered first is still read."""
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def healthz(*headers: bytes, end: bool = True) -> bytes:
    lines = [b"GET /healthz HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close", *headers]
    return b"\r\n".join(lines) + (b"\r\n\r\n" if end else b"\r\n")


@pytest.mark.parametrize(
    "request_",
    [
        healthz(b"X-Big: " + b"a" * 1_000_000),  # complete: it was answered 200
        healthz(b"X-Big: " + b"a" * 1_000_000, end=False),  # never complete: refused before it is all held
        healthz(*(b"X-Many-%d: " % i + b"b" * 1000 for i in range(100))),  # 100 KB in one read, likely
        b"GET /healthz?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # the request line counts
    ],
    ids=["one-megabyte", "one-megabyte-unfinished", "a-hundred-headers", "long-url"],
)
def test_headers_past_the_limit_get_431(server: MuseServer, request_: bytes) -> None:
    answer = exchange(server, request_)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "headers_too_large" and str(MAX_HEADER_BYTES) in error["message"]


def test_headers_within_the_limit_are_served(server: MuseServer) -> None:
    for request in (healthz(), healthz(b"Cookie: " + b"c" * (MAX_HEADER_BYTES // 2))):
        assert exchange(server, request).startswith(b"HTTP/1.1 200 ")
    # Bodies are not headers, and the second request on a connection is counted from its own start.
    with httpx.Client(base_url=server.url) as client:
        for _ in range(2):
            big = client.post("/sdapi/v1/png-info", json={"image": "x" * 300_000}, headers=AS_TENANT)
            assert big.status_code == 422 and big.json()["error"]["param"] == "image"


# ---- /metrics ----------------------------------------------------------------------------------------------


def test_metrics_cover_every_tenant_so_only_admins_read_them(server: MuseServer) -> None:
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    refused = httpx.get(f"{server.url}/metrics", headers=AS_TENANT)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only", refused.text
    admin = httpx.get(f"{server.url}/metrics", headers=AS_ADMIN)
    assert admin.status_code == 200 and "muse_" in admin.text


def test_public_metrics_are_still_public(tiny_model: str) -> None:
    settings: dict[str, Any] = {"min_workers": 0, "api_keys": TENANT, "public_metrics": True}
    public = MuseServer(muse_settings(tiny_model, **settings)).start()
    try:
        assert httpx.get(f"{public.url}/metrics").status_code == 200
        assert httpx.get(f"{public.url}/metrics", headers=AS_TENANT).status_code == 200
    finally:
        public.stop()


# ---- cost --------------------------------------------------------------------------------------------------


def test_a_one_step_image_pays_for_its_fixed_work() -> None:
    """100 one-step images took as long as 10 native 25-step ones, and were charged 4."""
    model = ModelInfo("m", 64, 64, 7.5)
    native = model.cost(64, 64, NATIVE_STEPS, 1)
    assert native == 1.0
    assert model.cost(64, 64, 1, 100) >= 10 * native
    assert model.cost(64, 64, 50, 1) == 2.0, "past the floor, cost is still proportional to steps"
