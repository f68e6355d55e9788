"""The drop-in APIs with real clients: the official `openai` package, an AUTOMATIC1111-style client,
API keys with the page login cookie and CSRF, rate limits, hardening and the OpenAPI document."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from muse.http.middleware import body_limit
from muse.model_info import DEFAULT_MAX_UPLOAD
from tests.serving import LiveServer, live_server, settings

KEY = "sk-test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(settings(tiny_model, api_keys=f"{KEY},another-key", rate_limit=30)) as s:
        yield s


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_openai_b64_with_n_and_seed_is_reproducible(client: openai.OpenAI) -> None:
    first = client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 11, "steps": 3})
    assert len(first.data) == 2 and first.data[0].revised_prompt is None
    again = client.images.generate(prompt="a red circle", n=1, extra_body={"seed": 11, "steps": 3})
    a, b = (base64.b64decode(d.b64_json or "") for d in (first.data[0], again.data[0]))
    assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(a) - pixels(base64.b64decode(first.data[1].b64_json or ""))).max() > 1


def test_openai_url_points_at_the_stored_png(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.images.generate(prompt="a blue square", response_format="url", extra_body={"steps": 2})
    url = response.data[0].url or ""
    assert url.startswith(server.url)
    fetched = httpx.get(url, headers=AUTH)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")


def test_openai_typed_errors(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="100x100")
    assert bad.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="dall-e-3")
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="x")
    assert [m.id for m in client.models.list()] == [server.read(lambda m: m.model.name)]


def test_rate_limit_raises_rate_limit_error_with_headers(tiny_model: str) -> None:
    with live_server(settings(tiny_model, api_keys=KEY, rate_limit=3)) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
            # Cost counts native 25-step images: three of them empty the bucket of 3.
            client.images.generate(prompt="one", n=3, extra_body={"steps": 25})
            with pytest.raises(openai.RateLimitError) as limited:
                client.images.generate(prompt="two", extra_body={"steps": 25})
        headers = limited.value.response.headers
        assert int(headers["retry-after"]) >= 1
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_a1111_round_trip(server: LiveServer) -> None:
    body = {
        "prompt": "a green triangle",
        "negative_prompt": "blur",
        "steps": 3,
        "cfg_scale": 5,
        "seed": 21,
        "batch_size": 2,
        "n_iter": 1,
        "sampler_name": "Euler a",
        "restore_faces": True,
        "enable_hr": False,
    }
    response = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["images"]) == 2
    assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).format == "PNG"
    info = json.loads(data["info"])
    assert info["seed"] == 21 and info["all_seeds"] == [21, 22] and info["sampler_name"] == "Euler a"
    assert data["parameters"]["steps"] == 3
    assert "restore_faces" in response.headers["x-muse-ignored-fields"]
    assert "Warning" in response.headers
    progress = httpx.get(server.url + "/sdapi/v1/progress", headers=AUTH).json()
    # Idle again, as A1111 reports it: nothing running, nothing queued.
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    samplers = [s["name"] for s in httpx.get(server.url + "/sdapi/v1/samplers", headers=AUTH).json()]
    assert "Euler a" in samplers and "DDIM" in samplers
    models = httpx.get(server.url + "/sdapi/v1/sd-models", headers=AUTH).json()
    assert models[0]["model_name"] == server.read(lambda m: m.model.name)
    random_seed = httpx.post(
        server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": -1}, headers=AUTH, timeout=120
    ).json()
    assert 0 <= json.loads(random_seed["info"])["seed"] < 2**32
    bad = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "sampler_name"


def test_keys_guard_image_routes_but_not_health_static_or_docs(server: LiveServer) -> None:
    for method, path in [
        ("POST", "/api/generate"),
        ("GET", "/api/jobs/x"),
        ("GET", "/metrics"),
        ("GET", "/sdapi/v1/samplers"),
        ("GET", "/v1/models"),
    ]:
        response = httpx.request(method, server.url + path, json={"prompt": "x"})
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
        wrong = httpx.request(method, server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_page_login_sets_an_httponly_strict_cookie_and_unsafe_requests_need_csrf(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as browser:
        page = browser.get("/login")
        assert page.status_code == 200 and 'name="key"' in page.text
        csrf = browser.cookies["muse_csrf"]
        refused = browser.post("/login", data={"key": "wrong", "csrf_token": csrf, "next": "/"})
        assert refused.status_code == 401
        logged_in = browser.post("/login", data={"key": KEY, "csrf_token": csrf, "next": "//evil.example"})
        assert logged_in.status_code == 303 and logged_in.headers["location"] == "/"
        set_cookie = logged_in.headers["set-cookie"]
        assert "muse_session=" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        assert KEY not in set_cookie, "the cookie holds a session id, never the key"
        assert browser.get("/api/jobs/unknown").status_code == 404, "the cookie authenticates reads"
        body = {"prompt": "x", "steps": 2}
        assert browser.post("/api/jobs", json=body).status_code == 403, "no CSRF token"
        assert browser.post("/api/jobs", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
        assert browser.post("/api/jobs", json=body, headers={"X-CSRF-Token": csrf}).status_code == 202


def test_body_over_the_limit_is_413_and_security_headers_are_set(server: LiveServer) -> None:
    over = body_limit(DEFAULT_MAX_UPLOAD)  # room for two base64 pictures of --max-upload's default, then some
    big = httpx.post(server.url + "/api/generate", content=b"{" + b" " * over + b"}", headers=AUTH)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(over // 65536 + 2):
            yield b" " * 65536

    streamed = httpx.post(server.url + "/api/generate", content=chunks(), headers=AUTH)
    assert streamed.status_code == 413
    health = httpx.get(server.url + "/healthz", headers={"Origin": "https://evil.example"})
    assert health.headers["x-content-type-options"] == "nosniff"
    assert health.headers["x-frame-options"] == "DENY"
    assert "access-control-allow-origin" not in health.headers, "CORS is off by default"


def test_cors_when_configured(tiny_model: str) -> None:
    with live_server(settings(tiny_model, cors_origins="https://app.example", min_workers=0), ready=False) as server:
        preflight = httpx.options(
            server.url + "/api/generate",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_openapi_describes_every_json_endpoint(server: LiveServer) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/api/generate", "/api/jobs", "/api/jobs/{id}", "/v1/images/generations", "/sdapi/v1/txt2img"):
        assert path in doc["paths"], path
    generate = doc["paths"]["/api/generate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("GenerateBody")
    assert {"200", "422", "503"} <= set(generate["responses"])
    assert "prompt" in doc["components"]["schemas"]["GenerateBody"]["properties"]


def test_plain_form_posts_carry_csrf_as_a_field(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as browser:
        csrf = browser.get("/login").cookies["muse_csrf"]
        browser.post("/login", data={"key": KEY, "csrf_token": csrf, "next": "/"})
        form = {"prompt": "a form post", "steps": "2"}
        assert browser.post("/jobs", data=form).status_code == 403
        accepted = browser.post("/jobs", data=form | {"csrf_token": csrf})
        assert accepted.status_code in (200, 202, 303), accepted.text


def test_csp_allows_exactly_the_inline_htmx_fallback() -> None:
    import base64
    import hashlib
    import re
    from pathlib import Path

    from muse.web.assets import FALLBACK_SCRIPT_HASH

    base = (Path(__file__).parent.parent / "templates" / "base.html").read_text()
    inline = re.findall(r"<script>(.*?)</script>", base)
    assert len(inline) == 1, "one inline script, allowed by its hash"
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"sha256-{digest}" == FALLBACK_SCRIPT_HASH
