"""The drop-in routes that start from a picture, driven by the real clients, unchanged: A1111's
`/sdapi/v1/img2img` (webuiapi's `img2img`) and OpenAI's `/v1/images/edits` (the `openai` package's
`images.edit`). Each image is diffusers' own img2img / inpaint pipeline's for its seed (within 2/255), with
the picture and mask each front end's conventions make of what it was sent (A1111's fill and inverted masks,
OpenAI's transparent pixels); every bad picture is refused by its field's name, before anything is queued."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from muse.api.masking import fill_masked
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from tests.pixels import TOLERANCE, b64png, left_half, pixels, plain, scene
from tests.serving import LiveServer, live_server
from tests.serving import settings as muse_settings

SIDE = 64


def transparent_where(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with alpha 0 where `mask` is white: OpenAI's way of saying where to edit."""
    rgba = image.convert("RGBA")
    rgba.putalpha(ImageOps.invert(mask))
    return rgba


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model)) as s:
        yield s


@pytest.fixture(scope="module")
def direct(tiny_model: str) -> LoadedPipeline:
    return load_pipeline(tiny_model, "cpu")


@pytest.fixture
def api(server: LiveServer) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", steps=8)


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def assert_pipelines(direct: LoadedPipeline, body: dict[str, Any], served: list[np.ndarray]) -> None:
    """Image i of a request is the plain pipeline's for seed + i."""
    assert served, "no images"
    for i, image in enumerate(served):
        difference = np.abs(image - plain(direct, body, body["seed"] + i)).max()
        assert difference <= TOLERANCE, f"image {i}: off by {difference}"


def pil_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_nothing_queued(server: LiveServer) -> None:
    assert server.read(lambda m: len(m.batcher.queue)) == 0


# A1111 img2img ----------------------------------------------------------------------------------------------


def test_webuiapi_img2img_gives_the_img2img_pipelines_pixels(api: webuiapi.WebUIApi, direct: LoadedPipeline) -> None:
    result = api.img2img(
        images=[scene()],
        prompt="a sunset",
        denoising_strength=0.6,
        seed=21,
        cfg_scale=3.0,
        width=64,
        height=64,
        batch_size=2,
    )
    body = {"prompt": "a sunset", "steps": 8, "seed": 21, "guidance_scale": 3.0, "scheduler": "Euler a"}
    assert_pipelines(
        direct, body | {"strength": 0.6, "init_image": b64png(scene())}, list(map(pil_pixels, result.images))
    )
    assert result.info["all_seeds"] == [21, 22] and result.info["denoising_strength"] == 0.6
    assert all("Denoising strength: 0.6" in text for text in result.info["infotexts"])
    assert "Denoising strength: 0.6" in result.images[0].info["parameters"]
    # As A1111: the pictures are not echoed back unless include_init_images asks for them.
    assert result.parameters["init_images"] is None and result.parameters["denoising_strength"] == 0.6


@pytest.mark.parametrize("invert", [0, 1])
def test_webuiapi_inpainting_from_the_original_gives_the_inpaint_pipelines_pixels(
    api: webuiapi.WebUIApi, direct: LoadedPipeline, invert: int
) -> None:
    """inpainting_fill 1 starts from the picture as it is; an inverted mask with inpainting_mask_invert is the
    same mask."""
    mask = ImageOps.invert(left_half()) if invert else left_half()
    result = api.img2img(
        images=[scene()],
        mask_image=mask,
        inpainting_fill=1,
        mask_blur=0,
        inpainting_mask_invert=invert,
        prompt="a tree",
        denoising_strength=1.0,
        seed=22,
        cfg_scale=1.0,
        width=64,
        height=64,
    )
    body = {"prompt": "a tree", "steps": 8, "seed": 22, "guidance_scale": 1.0, "scheduler": "Euler a"}
    inpaint = body | {"strength": 1.0, "init_image": b64png(scene()), "mask_image": b64png(left_half())}
    assert_pipelines(direct, inpaint, [pil_pixels(result.image)])
    assert "Denoising strength: 1" in result.info["infotexts"][0]


def test_webuiapi_default_inpainting_fills_the_masked_area_from_its_surroundings(
    api: webuiapi.WebUIApi, direct: LoadedPipeline
) -> None:
    """webuiapi's defaults: inpainting_fill 0 (fill) and a mask blurred by 4 px. The pipeline starts from the
    picture with its (blurred) masked area painted over from the colours around it."""
    result = api.img2img(
        images=[scene()],
        mask_image=left_half(),
        prompt="a tree",
        denoising_strength=0.8,
        seed=23,
        cfg_scale=1.0,
        width=64,
        height=64,
    )
    blurred = left_half().filter(ImageFilter.GaussianBlur(4))
    body = {"prompt": "a tree", "steps": 8, "seed": 23, "guidance_scale": 1.0, "scheduler": "Euler a"}
    filled = b64png(fill_masked(scene(), blurred))
    inpaint = body | {"strength": 0.8, "init_image": filled, "mask_image": b64png(blurred)}
    assert_pipelines(direct, inpaint, [pil_pixels(result.image)])
    # The fill is not the original: the same request from the original gives other pixels.
    original = body | {"strength": 0.8, "init_image": b64png(scene()), "mask_image": b64png(blurred)}
    assert np.abs(pil_pixels(result.image) - plain(direct, original, 23)).max() > TOLERANCE


def test_fill_takes_the_colours_around_the_hole_and_keeps_the_rest() -> None:
    image = Image.new("RGB", (64, 64), (200, 0, 0))
    ImageDraw.Draw(image).rectangle((32, 0, 63, 63), fill=(0, 0, 200))
    ImageDraw.Draw(image).rectangle((24, 24, 40, 40), fill=(0, 255, 0))  # what the mask hides
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    filled = np.asarray(fill_masked(image, mask), dtype=np.int16)
    before, hole = np.asarray(image, dtype=np.int16), np.asarray(mask) == 255
    assert (filled[~hole] == before[~hole]).all(), "the kept pixels are kept"
    assert filled[hole][:, 1].max() < 60, "the hidden green leaks into the fill"
    left, right = filled[32, 21], filled[32, 43]
    assert left[0] > left[2] and right[2] > right[0], (left, right)


def post_img2img(server: LiveServer, **fields: Any) -> httpx.Response:
    body = {"prompt": "x", "steps": 4, "width": 64, "height": 64, "init_images": [b64png(scene())]} | fields
    return httpx.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


A1111_BAD = [
    ({"init_images": ["not base64!"]}, "init_images", "base64"),
    ({"init_images": [encoded(b"hello, not a picture")]}, "init_images", "not a picture"),
    ({"init_images": [encoded(png_bytes(scene(), "GIF"))]}, "init_images", "PNG, JPEG, WEBP"),
    ({"init_images": []}, "init_images", "one picture"),
    ({"init_images": [b64png(scene()), b64png(scene())]}, "init_images", "2 pictures"),
    ({"mask": b64png(left_half(32, 32))}, "mask", "32x32"),
    ({"mask": "%%%"}, "mask", "base64"),
    ({"mask": b64png(left_half()), "inpainting_fill": 2}, "inpainting_fill", "latent noise"),
    ({"mask": b64png(left_half()), "inpainting_fill": 3}, "inpainting_fill", "latent nothing"),
    ({"inpainting_fill": 7}, "inpainting_fill", ""),
    ({"denoising_strength": 0}, "denoising_strength", ""),
    ({"denoising_strength": 1.5}, "denoising_strength", ""),
    ({"denoising_strength": 0.1}, "denoising_strength", "runs no step"),
    ({"resize_mode": 4}, "resize_mode", ""),
    ({"mask_blur": 500}, "mask_blur", ""),
    ({"cfg_scale": 99}, "cfg_scale", ""),
]


@pytest.mark.parametrize(("fields", "param", "words"), A1111_BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(A1111_BAD)])
def test_img2img_refuses_bad_pictures_by_name(
    server: LiveServer, fields: dict[str, Any], param: str, words: str
) -> None:
    response = post_img2img(server, **fields)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert_nothing_queued(server)


def test_img2img_lists_what_it_ignores_and_echoes_the_pictures_when_asked(server: LiveServer) -> None:
    response = post_img2img(server, inpaint_full_res=True, image_cfg_scale=1.5, include_init_images=True, seed=3)
    assert response.status_code == 200, response.text
    ignored = response.headers["x-muse-ignored-fields"]
    assert "inpaint_full_res" in ignored and "image_cfg_scale" in ignored and "mask_blur" not in ignored
    data = response.json()
    assert data["parameters"]["init_images"] == [b64png(scene())]
    info = json.loads(data["info"])
    assert info["seed"] == 3 and info["denoising_strength"] == 0.75 and (info["width"], info["height"]) == (64, 64)


# OpenAI edits -----------------------------------------------------------------------------------------------


def b64_pixels(data: openai.types.ImagesResponse) -> list[np.ndarray]:
    return [pixels(item.b64_json or "") for item in data.data or []]


def test_openai_edit_with_a_mask_inpaints_its_transparent_area(client: openai.OpenAI, direct: LoadedPipeline) -> None:
    mask = transparent_where(Image.new("RGB", (SIDE, SIDE), (255, 255, 255)), left_half())
    edited = client.images.edit(
        image=("scene.png", png_bytes(scene()), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a tree",
        n=2,
        size="64x64",
        extra_body={"seed": 5, "steps": 4},
    )
    served = b64_pixels(edited)
    assert [image.shape for image in served] == [(SIDE, SIDE, 3)] * 2
    # A mask repaints its area from noise (strength 1), as OpenAI's edits do.
    body = {"prompt": "a tree", "steps": 4, "seed": 5, "strength": 1.0}
    assert_pipelines(direct, body | {"init_image": b64png(scene()), "mask_image": b64png(left_half())}, served)


def test_openai_edit_of_a_transparent_picture_repaints_where_it_is_transparent(
    client: openai.OpenAI, direct: LoadedPipeline
) -> None:
    picture = transparent_where(scene(), left_half())
    edited = client.images.edit(
        image=[("scene.png", png_bytes(picture), "image/png")],  # a list: sent as `image[]`, as newer clients do
        prompt="a tree",
        n=1,
        extra_body={"seed": 6, "steps": 4, "strength": 0.9},
    )
    served = b64_pixels(edited)
    assert [image.shape for image in served] == [(SIDE, SIDE, 3)], "the size defaults to the picture's"
    body = {"prompt": "a tree", "steps": 4, "seed": 6, "strength": 0.9}
    rgb = b64png(picture.convert("RGB"))
    assert_pipelines(direct, body | {"init_image": rgb, "mask_image": b64png(left_half())}, served)


def test_openai_edit_of_an_opaque_picture_is_img2img(
    client: openai.OpenAI, direct: LoadedPipeline, server: LiveServer
) -> None:
    edited = client.images.edit(
        image=("scene.jpg", png_bytes(scene(96, 80), "JPEG"), "image/jpeg"),
        prompt="a sunset",
        size="64x64",
        extra_body={"seed": 7, "steps": 5},
    )
    served = b64_pixels(edited)
    assert [image.shape for image in served] == [(SIDE, SIDE, 3)]
    jpeg = Image.open(io.BytesIO(png_bytes(scene(96, 80), "JPEG"))).convert("RGB")
    fitted = b64png(jpeg.resize((SIDE, SIDE), Image.Resampling.LANCZOS))
    assert_pipelines(direct, {"prompt": "a sunset", "steps": 5, "seed": 7, "init_image": fitted}, served)
    linked = client.images.edit(
        image=("scene.png", png_bytes(scene()), "image/png"),
        prompt="x",
        response_format="url",
        stream=False,  # sent as the text "false"
        extra_body={"steps": 4},
    )
    fetched = httpx.get((linked.data or [])[0].url or "")
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")


OPENAI_BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"image": ("x.png", b"hello, not a picture", "image/png")}, "image", "not a picture"),
    ({"image": ("x.gif", png_bytes(scene(), "GIF"), "image/gif")}, "image", "PNG, JPEG, WEBP"),
    ({"mask": ("m.png", png_bytes(transparent_where(scene(32, 32), left_half(32, 32))), "image/png")}, "mask", "32x32"),
    ({"mask": ("m.png", png_bytes(left_half()), "image/png")}, "mask", "no transparency"),
    ({"mask": ("m.png", png_bytes(scene().convert("RGBA")), "image/png")}, "mask", "no fully transparent pixel"),
    ({"mask": ("m.png", b"\x89PNG garbage", "image/png")}, "mask", "not a picture"),
    (
        {"image": [("a.png", png_bytes(scene()), "image/png"), ("b.png", png_bytes(scene()), "image/png")]},
        "image",
        "2 pictures",
    ),
    ({"size": "100x100"}, "size", "multiples of 8"),
    ({"extra_body": {"strength": 2}}, "strength", ""),
]


@pytest.mark.parametrize(
    ("fields", "param", "words"), OPENAI_BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(OPENAI_BAD)]
)
def test_openai_edit_refuses_bad_pictures_by_name(
    client: openai.OpenAI, server: LiveServer, fields: dict[str, Any], param: str, words: str
) -> None:
    call: dict[str, Any] = {"image": ("scene.png", png_bytes(scene()), "image/png"), "prompt": "x"} | fields
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(**call)
    error = bad.value.body
    assert isinstance(error, dict) and error["param"] == param and words in error["message"], error
    assert_nothing_queued(server)


def test_openai_edit_refuses_what_is_not_a_form_with_a_picture(client: openai.OpenAI, server: LiveServer) -> None:
    url = server.url + "/v1/images/edits"
    as_json = httpx.post(url, json={"prompt": "x", "image": b64png(scene())})
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]
    as_text = httpx.post(url, data={"prompt": "x", "image": b64png(scene())}, files={"other": b"x"})
    assert as_text.status_code == 400 and as_text.json()["error"]["param"] == "image", as_text.text
    without = httpx.post(url, data={"prompt": "x"}, files={"mask": ("m.png", png_bytes(left_half()))})
    assert without.status_code == 400 and without.json()["error"]["param"] == "image", without.text
    no_prompt = httpx.post(url, files={"image": ("s.png", png_bytes(scene()))})
    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "prompt", no_prompt.text
    broken = httpx.post(url, content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert broken.status_code == 400, broken.text
    with pytest.raises(openai.NotFoundError):
        client.images.edit(image=("s.png", png_bytes(scene()), "image/png"), prompt="x", model="dall-e-2")
    assert_nothing_queued(server)


CONTENT_TYPES = [
    "multipart/form-data; boundary=x", "multipart/form-data", "multipart/form-data; boundary=x; charset=\u00ff",
    "multipart/form-data; boundary=x; charset=nope", "application/json", "", "text/plain",
]  # fmt: skip
PARTS = st.lists(
    st.tuples(
        st.sampled_from(["image", "image[]", "mask", "prompt", "n", "size", "strength", "steps"]),
        st.one_of(st.binary(max_size=40), st.sampled_from([b"x", b"1", b"64x64", b"\x89PNG\r\n\x1a\n"])),
        st.booleans(),  # sent as a file
    ),
    max_size=5,
)


def multipart(parts: list[tuple[str, bytes, bool]]) -> bytes:
    chunks = []
    for name, value, is_file in parts:
        filename = '; filename="f.png"' if is_file else ""
        chunks.append(f'--x\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode() + value)
    return b"\r\n".join(chunks) + b"\r\n--x--\r\n"


@pytest.mark.parametrize("path", ["/v1/images/edits", "/sdapi/v1/img2img"])
def test_any_body_never_5xx(server: LiveServer, path: str) -> None:
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        body=st.one_of(st.binary(max_size=64), PARTS.map(multipart)),
        content_type=st.sampled_from(CONTENT_TYPES),
    )
    def check(body: bytes, content_type: str) -> None:
        headers = [(b"Content-Type", content_type.encode("latin-1"))]
        response = httpx.post(server.url + path, content=body, headers=headers, timeout=60)
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])

    check()


def test_the_document_describes_both_routes_bodies(server: LiveServer) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    edits = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert edits == {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/EditForm"}}}
    assert doc["components"]["schemas"]["EditForm"]["properties"]["image"]["format"] == "binary"
    img2img = doc["paths"]["/sdapi/v1/img2img"]["post"]["requestBody"]["content"]
    assert img2img == {"application/json": {"schema": {"$ref": "#/components/schemas/Img2ImgRequest"}}}
    assert {"init_images", "mask", "inpainting_fill"} <= set(
        doc["components"]["schemas"]["Img2ImgRequest"]["properties"]
    )
