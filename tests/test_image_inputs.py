"""Starting from a picture through the native API, end to end: img2img and inpainting served by real workers on
the step engine (sharing steps with text-to-image requests) and in whole calls (`--batching request`), each
image diffusers' own img2img / inpaint pipeline's for its seed (within 2/255); and every picture a server
should refuse refused by name (422), before anything is queued."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from muse.messages import Batching
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from tests.pixels import assert_plain, b64png, left_half, pixels, scene
from tests.serving import LiveServer, live_server, settings, submit_job, wait_job

SIDE = 64


IMG2IMG = {"prompt": "a sunset", "steps": 10, "seed": 21, "guidance_scale": 3.0, "strength": 0.6}
INPAINT = {"prompt": "a tree", "steps": 8, "seed": 22, "guidance_scale": 1.0, "strength": 1.0}


@pytest.fixture(scope="module", params=[Batching.STEP, Batching.REQUEST])
def server(request: pytest.FixtureRequest, tiny_model: str) -> Iterator[LiveServer]:
    overrides: dict[str, Any] = {"batching": request.param, "max_upload": 200_000}
    with live_server(settings(tiny_model, **overrides)) as s:
        yield s


@pytest.fixture(scope="module")
def direct(tiny_model: str) -> LoadedPipeline:
    return load_pipeline(tiny_model, "cpu")


def test_img2img_and_inpainting_give_the_pipelines_pixels(server: LiveServer, direct: LoadedPipeline) -> None:
    img2img = IMG2IMG | {"init_image": b64png(scene()), "n": 2}
    inpaint = INPAINT | {"init_image": b64png(scene()), "mask_image": b64png(left_half())}
    text = {"prompt": "plain text", "steps": 12, "seed": 23, "width": SIDE, "height": SIDE}
    jobs = [submit_job(server, body) for body in (text, img2img, inpaint)]
    results = [wait_job(server, job, {"succeeded", "failed"}) for job in jobs]
    for body, result in zip((text, img2img, inpaint), results, strict=True):
        assert_plain(direct, body, result)


def test_the_size_comes_from_the_picture_and_a_data_url_is_a_picture(server: LiveServer) -> None:
    body = IMG2IMG | {"init_image": "data:image/png;base64," + b64png(scene(96, 72)), "steps": 4}
    response = httpx.post(server.url + "/api/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert (data["width"], data["height"]) == (96, 72)
    assert pixels(data["images"][0]["png_base64"]).shape == (72, 96, 3)


def test_a_picture_not_a_multiple_of_8_is_fitted_as_resize_mode_says(server: LiveServer) -> None:
    for mode in (0, 1, 2):
        body = IMG2IMG | {"init_image": b64png(scene(90, 75)), "resize_mode": mode, "steps": 2, "width": 64}
        response = httpx.post(server.url + "/api/generate", json=body, timeout=120)
        assert response.status_code == 200, (mode, response.text)
        assert (response.json()["width"], response.json()["height"]) == (64, 72)


def test_exif_orientation_is_honoured(server: LiveServer) -> None:
    """A phone's portrait photo is stored landscape with an orientation tag: the request takes it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    scene(80, 64).save(buffer, format="JPEG", exif=exif)
    body = IMG2IMG | {"init_image": base64.b64encode(buffer.getvalue()).decode(), "steps": 2}
    response = httpx.post(server.url + "/api/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (64, 80)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG claiming a huge image, with a few bytes of pixel data: a decompression bomb's shape
    (decoded, its rows would take width x height x 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gif() -> str:
    buffer = io.BytesIO()
    scene().save(buffer, format="GIF")
    return encoded(buffer.getvalue())


def truncated() -> str:
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    return encoded(buffer.getvalue()[:200])


BAD = [
    ({"init_image": "not base64!"}, "init_image", "base64"),
    ({"init_image": encoded(b"hello, not a picture")}, "init_image", "not a picture"),
    ({"init_image": gif()}, "init_image", "PNG, JPEG, WEBP"),
    ({"init_image": truncated()}, "init_image", "truncated"),
    ({"init_image": encoded(png_declaring(100_000, 100_000))}, "init_image", "--max-pixels"),
    ({"init_image": encoded(png_declaring(400, 400))}, "init_image", "--max-pixels"),
    ({"init_image": encoded(b"\x89PNG" + b"\x00" * 250_000)}, "init_image", "--max-upload"),
    ({"mask_image": b64png(left_half())}, "mask_image", "init_image"),
    ({"strength": 0.5}, "strength", "init_image"),
    ({"init_image": b64png(scene()), "mask_image": b64png(left_half(32, 32))}, "mask_image", "32x32"),
    ({"init_image": b64png(scene()), "strength": 0}, "strength", ""),
    ({"init_image": b64png(scene()), "strength": 0.05, "steps": 10}, "strength", "runs no step"),
    ({"init_image": b64png(scene()), "resize_mode": 4}, "resize_mode", ""),
]


@pytest.mark.parametrize(("fields", "param", "words"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_pictures_are_refused_by_name(server: LiveServer, fields: dict[str, Any], param: str, words: str) -> None:
    body = {"prompt": "x", "steps": 10} | fields
    response = httpx.post(server.url + "/api/jobs", json=body, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert server.read(lambda m: len(m.batcher.queue)) == 0
