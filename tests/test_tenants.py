"""With API keys, each key's jobs and images are its own (admin keys see all), and the queue is fair between keys."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.serving import LiveServer, live_server, wait_for
from tests.serving import settings as muse_settings

ONE, TWO, ADMIN = "sk-tenant-one", "sk-tenant-two", "sk-tenant-admin"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model, api_keys=f"{ONE},{TWO}", admin_keys=ADMIN)) as s:
        yield s


def test_jobs_belong_to_the_key_that_made_them(server: LiveServer) -> None:
    made = httpx.post(f"{server.url}/api/jobs", json={"prompt": "one's secret", "steps": 1}, headers=auth(ONE))
    job = made.json()["id"]
    wait_for(lambda: httpx.get(f"{server.url}/api/jobs/{job}", headers=auth(ONE)).json()["status"] == "succeeded")
    for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        other = httpx.request(method, f"{server.url}/api/jobs/{job}{path}", headers=auth(TWO))
        assert other.status_code == 404, (method, path, other.text)
        assert "one's secret" not in other.text
    for path in (f"/jobs/{job}", f"/jobs/{job}/images/0.png"):
        assert httpx.get(server.url + path, headers=auth(TWO)).status_code == 404, path
    assert httpx.get(f"{server.url}/api/jobs/{job}", headers=auth(ADMIN)).json()["prompt"] == "one's secret"


def test_gallery_images_belong_to_the_key_that_made_them(server: LiveServer) -> None:
    body = {"prompt": "one's picture", "response_format": "url", "steps": 1}
    made = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=auth(ONE), timeout=60)
    image = made.json()["data"][0]["url"].split("/gallery/")[1].split(".png")[0]
    html = {"Accept": "text/html"}
    assert image in httpx.get(f"{server.url}/gallery", headers=auth(ONE) | html).text
    assert image not in httpx.get(f"{server.url}/gallery", headers=auth(TWO) | html).text
    assert image not in httpx.get(f"{server.url}/gallery?q=picture", headers=auth(TWO) | html).text
    assert image not in httpx.get(f"{server.url}/", headers=auth(TWO) | html).text, "nor in the recent strip"
    assert httpx.get(f"{server.url}/gallery/{image}", headers=auth(TWO)).status_code == 404
    assert httpx.get(f"{server.url}/gallery/{image}.png", headers=auth(TWO)).status_code == 404
    assert httpx.post(f"{server.url}/gallery/{image}/delete", headers=auth(TWO)).status_code == 404
    assert httpx.get(f"{server.url}/gallery/{image}.png", headers=auth(ONE)).status_code == 200
    # An admin sees everyone's, and may delete it.
    assert image in httpx.get(f"{server.url}/gallery", headers=auth(ADMIN) | html).text
    assert httpx.post(f"{server.url}/gallery/{image}/delete", headers=auth(ADMIN)).status_code == 303
    assert httpx.get(f"{server.url}/gallery/{image}.png", headers=auth(ONE)).status_code == 404


def test_one_keys_backlog_does_not_hold_back_anothers_single_image(server: LiveServer) -> None:
    hog = [
        httpx.post(
            f"{server.url}/api/jobs", json={"prompt": f"hog {i}", "n": 8, "steps": 60}, headers=auth(ONE)
        ).json()["id"]
        for i in range(6)
    ]
    single = httpx.post(f"{server.url}/api/jobs", json={"prompt": "one image", "steps": 2}, headers=auth(TWO))
    job = single.json()["id"]
    status = httpx.get(f"{server.url}/api/jobs/{job}", headers=auth(TWO)).json()
    assert status["status"] == "running" or status["position"] == 0, status
    wait_for(lambda: httpx.get(f"{server.url}/api/jobs/{job}", headers=auth(TWO)).json()["status"] == "succeeded")
    states = [httpx.get(f"{server.url}/api/jobs/{h}", headers=auth(ONE)).json()["status"] for h in hog]
    assert states.count("succeeded") <= 2, f"the single image waited behind the backlog: {states}"
    for h in hog:
        httpx.delete(f"{server.url}/api/jobs/{h}", headers=auth(ONE))
    wait_for(lambda: server.read(lambda m: m.batcher.idle), 60, what="the batcher to be idle")
