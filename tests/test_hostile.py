"""Hostile input that once got a 5xx or a dropped connection gets its documented 4xx (or a 200 with a valid header)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from muse.http.middleware import body_limit
from muse.model_info import DEFAULT_MAX_UPLOAD
from tests.serving import LiveServer, live_server
from tests.serving import settings as muse_settings

JSON_ROUTES = ["/api/generate", "/api/jobs", "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/png-info"]


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model)) as s:
        yield s


@pytest.mark.parametrize("size", ["\u00b2x\u00b2", "1" * 5000 + "x64", "64x" + "9" * 5000, "\u0664\u0660x64"])
def test_openai_sizes_in_other_digits_or_absurdly_long_are_400(server: LiveServer, size: str) -> None:
    response = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": size}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "size"


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_json_nested_past_the_recursion_limit_is_400(server: LiveServer, path: str) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("name", ["\u2603", "a\nb", 'say "hi"\\', "\x00", "x" * 500])
def test_unknown_a1111_fields_with_hostile_names_are_named_safely(server: LiveServer, name: str) -> None:
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64, name: 1}
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    warning = response.headers["Warning"]
    assert warning.startswith('299 muse "ignored unsupported fields: ') and warning.endswith('"')
    assert warning.isascii() and warning.isprintable() and warning.count('"') == 2
    assert len(response.json()["images"]) == 1


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_a_sampler_that_needs_more_steps_is_refused_before_it_runs(server: LiveServer, steps: int) -> None:
    for path, body in (
        ("/api/generate", {"prompt": "x", "scheduler": "PNDM", "steps": steps}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "PNDM", "steps": steps}),
    ):
        response = httpx.post(server.url + path, json=body, timeout=30)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "steps" and "PNDM" in response.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/api/generate", json={"prompt": "x", "scheduler": "PNDM", "steps": 4}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_a_chunked_form_over_the_limit_is_413_not_a_500_page(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"prompt="
        for _ in range(body_limit(DEFAULT_MAX_UPLOAD) // 65536 + 2):
            yield b"a" * 65536  # just over the body limit, with no Content-Length

    response = httpx.post(
        f"{server.url}/jobs",
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert response.status_code == 413, response.text[:500]


@pytest.fixture(scope="module")
def limited(tiny_model: str) -> Iterator[LiveServer]:
    # The tiny model is 32 px: its limits derive from 64 (the API's smallest side), so 128 px and 32,768
    # pixels a request; steps are capped lower here by the flag.
    with live_server(muse_settings(tiny_model, max_steps=20, rate_limit=10)) as s:
        yield s


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "flag"),
    [
        ("/api/generate", {"prompt": "x", "width": 136}, 422, "width", "--max-side"),
        ("/api/generate", {"prompt": "x", "height": 2048, "steps": 1}, 422, "height", "--max-side"),
        ("/api/generate", {"prompt": "x", "width": 128, "height": 128, "n": 3}, 422, "n", "--max-pixels"),
        ("/api/generate", {"prompt": "x", "steps": 21}, 422, "steps", "--max-steps"),
        ("/v1/images/generations", {"prompt": "x", "size": "2048x2048"}, 400, "size", "--max-side"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 128, "height": 128, "batch_size": 4}, 422, "batch_size", None),
    ],
)
def test_requests_over_the_cost_limits_are_refused_naming_the_field_and_limit(
    limited: LiveServer, path: str, body: dict[str, object], status: int, param: str, flag: str | None
) -> None:
    response = httpx.post(limited.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "over_limit"
    assert flag is None or flag in error["message"]


def test_the_largest_request_within_the_limits_is_served(limited: LiveServer) -> None:
    body = {"prompt": "x", "width": 128, "height": 128, "n": 2, "steps": 2}
    assert httpx.post(limited.url + "/api/generate", json=body, timeout=120).status_code == 200


def test_a_request_that_can_never_fit_the_rate_bucket_is_422_not_a_retryable_429(limited: LiveServer) -> None:
    # Cost counts native 25-step images: 128 px is 16x the tiny model's 32-px area, so 2 images at 20 steps
    # cost 2 * 16 * 20/25 = 25.6, over a bucket of 10 a minute: no wait would ever let it through.
    body = {"prompt": "x", "width": 128, "height": 128, "n": 2, "steps": 20, "scheduler": "DDIM"}
    response = httpx.post(limited.url + "/api/generate", json=body, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "over_rate_limit" and "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/images/generations", {"prompt": "x", "size": "128x128", "steps": 20}, 400, "n"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 128, "height": 128, "steps": 20}, 422, "batch_size"),
    ],
)
def test_the_rate_bucket_refusal_speaks_each_front_ends_dialect(
    limited: LiveServer, path: str, body: dict[str, object], status: int, param: str
) -> None:
    response = httpx.post(limited.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == "over_rate_limit" and error["param"] == param


CROSS_SITE = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://attacker.example"}]


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_without_keys_a_cross_site_form_cannot_create_jobs_or_delete_images(
    server: LiveServer, headers: dict[str, str]
) -> None:
    made = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "response_format": "url", "steps": 1})
    image_id = made.json()["data"][0]["url"].split("/gallery/")[1].split(".png")[0]
    form = {"prompt": "forged", "steps": "1"}
    refused = httpx.post(f"{server.url}/jobs", data=form, headers=headers)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_site"
    assert httpx.post(f"{server.url}/gallery/{image_id}/delete", headers=headers).status_code == 403
    assert httpx.post(f"{server.url}/api/jobs", json={"prompt": "forged"}, headers=headers).status_code == 403
    assert httpx.get(f"{server.url}/gallery/{image_id}.png").status_code == 200, "the image must still be there"
    # The same requests from this site (or from a client that is no browser) go through.
    same = {"Sec-Fetch-Site": "same-origin", "Origin": server.url}
    assert httpx.post(f"{server.url}/jobs", data=form, headers=same).status_code == 303
    assert httpx.post(f"{server.url}/gallery/{image_id}/delete", headers=same).status_code == 303


@pytest.mark.parametrize("host", ["attacker.example", "127.0.0.1.attacker.example", "evil:8000"])
def test_other_host_headers_get_400(server: LiveServer, host: str) -> None:
    assert httpx.get(f"{server.url}/gallery", headers={"Host": host}).status_code == 400
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_loopback_names_are_the_default_allowed_hosts(server: LiveServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    for host in ("localhost", "127.0.0.1", "[::1]"):
        assert httpx.get(f"{server.url}/healthz", headers={"Host": f"{host}:{port}"}).status_code == 200, host


def test_same_origin_by_the_browsers_word_passes_even_when_a_proxy_renamed_the_host(server: LiveServer) -> None:
    # Behind a proxy, Origin names the public host while Host (as Muse sees it) is the bound one.
    headers = {"Sec-Fetch-Site": "same-origin", "Origin": "https://muse.example"}
    response = httpx.post(f"{server.url}/jobs", data={"prompt": "via a proxy", "steps": "1"}, headers=headers)
    assert response.status_code == 303, response.text


def test_the_public_url_and_cors_origins_count_as_this_site(tiny_model: str) -> None:
    settings = muse_settings(tiny_model, public_url="https://muse.example", cors_origins="https://app.example")
    with live_server(settings) as s:
        for origin in ("https://muse.example", "https://app.example"):
            headers = {"Origin": origin, "Sec-Fetch-Site": "cross-site"}
            response = httpx.post(f"{s.url}/api/jobs", json={"prompt": "x", "steps": 1}, headers=headers)
            assert response.status_code == 202, (origin, response.text)
        proxied = httpx.get(f"{s.url}/healthz", headers={"Host": "muse.example"})
        assert proxied.status_code == 200, "the public URL's host is allowed"


def test_an_absurd_image_index_is_404_not_500(server: LiveServer) -> None:
    job = httpx.post(f"{server.url}/api/jobs", json={"prompt": "x", "steps": 1}).json()["id"]
    for index in ("9" * 5000, "-1", "\u0661", "99"):
        assert httpx.get(f"{server.url}/jobs/{job}/images/{index}.png").status_code == 404, index


def test_png_info_of_a_decompression_bomb_reads_the_chunks_only(server: LiveServer) -> None:
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, "PNG")
    body = {"image": base64.b64encode(bomb.getvalue()).decode()}
    response = httpx.post(f"{server.url}/sdapi/v1/png-info", json=body, timeout=30)
    assert response.status_code == 200 and response.json()["info"] == ""
