"""Bounded property-based fuzz of every route that takes input, with any body and any header values: never a
5xx, never a dropped connection. (tests/test_fuzz.py checks the JSON bodies against their schemas.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving import LiveServer, live_server
from tests.serving import settings as muse_settings

ROUTES = [
    ("POST", "/api/generate"),
    ("POST", "/api/jobs"),
    ("POST", "/v1/images/generations"),
    ("POST", "/sdapi/v1/txt2img"),
    ("POST", "/sdapi/v1/png-info"),
    ("POST", "/sdapi/v1/interrupt"),
    ("POST", "/jobs"),
    ("POST", "/jobs/0123456789abcdef/cancel"),
    ("POST", "/gallery/0123456789abcdef/delete"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("DELETE", "/api/jobs/0123456789abcdef"),
    ("GET", "/"),
    ("GET", "/gallery"),
    ("GET", "/api/jobs/0123456789abcdef"),
    ("GET", "/sdapi/v1/progress"),
]
HEADER_NAMES = [
    "Content-Type", "Authorization", "Cookie", "X-Forwarded-For", "X-Forwarded-Proto", "Sec-Fetch-Site", "Origin",
    "HX-Request", "HX-History-Restore-Request", "Accept", "X-CSRF-Token", "Accept-Encoding", "Range", "Referer",
    "If-None-Match", "Transfer-Encoding-Hint", "X-Unknown",
]  # fmt: skip
CONTENT_TYPES = [
    "application/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain",
    "application/json; charset=utf-16", "", "*/*", "application/x-www-form-urlencoded; charset=\u00ff",
]  # fmt: skip
VISIBLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
HEADERS = st.dictionaries(st.sampled_from(HEADER_NAMES), st.one_of(VISIBLE, st.sampled_from(CONTENT_TYPES)), max_size=5)
FORM_VALUES = st.one_of(
    st.text(max_size=12), st.sampled_from(["1", "0", "-1", "1e309", "nan", "64x64", "\u00b2", "9" * 400, "DDIM"])
)
FORM = st.dictionaries(
    st.sampled_from(["prompt", "steps", "seed", "size", "n", "guidance_scale", "scheduler", "quality", "x", "csrf"]),
    FORM_VALUES,
    max_size=6,
).map(lambda fields: httpx.QueryParams(fields).__str__().encode())
BODIES = st.one_of(
    st.binary(max_size=64),
    st.just(b"[" * 5000 + b"]" * 5000),
    st.just(b'{"prompt": "a red circle", "steps": 1}'),
    st.just(b"prompt=a+red+circle&steps=1"),
    FORM,
)


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model, request_timeout=10, max_queue=64)) as s:
        yield s


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_any_body_and_headers_never_5xx_nor_a_dropped_connection(server: LiveServer, method: str, path: str) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=BODIES, headers=HEADERS)
    def check(body: bytes, headers: dict[str, Any]) -> None:
        content = body if method in ("POST", "DELETE") else None
        try:
            raw = {name: value.encode("latin-1") for name, value in headers.items()}  # any byte a header may hold
            response = httpx.request(method, server.url + path, content=content, headers=raw, timeout=60)
        except httpx.TransportError as exc:
            raise AssertionError(f"connection dropped: {type(exc).__name__}: {exc}") from exc
        assert response.status_code < 500, (response.status_code, response.text[:300])

    check()
