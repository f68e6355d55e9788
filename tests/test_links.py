"""OpenAI `response_format: "url"`: signed, expiring links that work without a key, built from --public-url,
and never a 200 without the images."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from muse.links import LinkSigner, load_secret
from tests.serving import live_server
from tests.serving import settings as muse_settings

KEY = "sk-links-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"prompt": "a red circle", "response_format": "url", "n": 2, "steps": 1}


def test_links_work_without_a_key_for_that_image_only_until_they_expire(tiny_model: str) -> None:
    settings = muse_settings(tiny_model, api_keys=KEY, public_url="https://muse.example/")
    with live_server(settings) as server:
        made = httpx.post(f"{server.url}/v1/images/generations", json=BODY, headers=AUTH, timeout=60)
        assert made.status_code == 200, made.text
        urls = [item["url"] for item in made.json()["data"]]
        assert len(urls) == 2 and all(u.startswith("https://muse.example/gallery/") for u in urls)
        path_and_query = [u.removeprefix("https://muse.example") for u in urls]
        for link in path_and_query:
            fetched = httpx.get(server.url + link)  # no key
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
        first, second = (urlsplit(link) for link in path_and_query)
        # Another image's path with this signature, a forged signature, or no signature at all: refused.
        assert httpx.get(f"{server.url}{second.path}?{first.query}").status_code == 403
        assert httpx.get(f"{server.url}{first.path}?expires=9999999999&sig=00").status_code == 403
        assert httpx.get(server.url + first.path).status_code == 401
        # Signed with the server's own secret an hour and a bit ago: expired.
        signer = LinkSigner(load_secret(Path(settings.data_dir)), ttl=3600)
        old = signer.sign(first.path, now=time.time() - 3700)
        assert parse_qs(urlsplit(old).query)["sig"] != parse_qs(first.query)["sig"]
        assert httpx.get(server.url + old).status_code == 403


def test_when_storing_fails_url_falls_back_to_the_images(tiny_model: str) -> None:
    settings = muse_settings(tiny_model)
    with live_server(settings) as server:
        images = Path(settings.data_dir) / "images"
        shutil.rmtree(images)
        images.write_text("not a folder: every save now fails")
        made = httpx.post(f"{server.url}/v1/images/generations", json=BODY, timeout=60)
        assert made.status_code == 200, made.text
        data = made.json()["data"]
        assert len(data) == 2 and all(item["b64_json"] and item["url"] is None for item in data)
        assert "b64_json" in made.headers["Warning"]
