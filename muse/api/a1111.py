"""AUTOMATIC1111-compatible generation: txt2img, img2img and png-info (the server's state is in a1111_state).

Unsupported fields (hires fix, face restoration, …) are ignored, listed in a `Warning` header, never
a 500. Validation is Muse's own (prompt, sizes, steps, seeds), with errors in Muse's shape under
A1111's field names. Every PNG carries A1111's `parameters` text, as A1111's own API returns them.

img2img takes one picture (`init_images`, a list as A1111's; more than one is refused rather than cycled over
the batch), fitted to width x height as `resize_mode` says, and for inpainting a `mask` (white = repaint,
blurred by `mask_blur`, inverted by `inpainting_mask_invert`). `inpainting_fill` 1 starts from the picture as it
is, 0 (A1111's default) from the masked area painted over with the colours around it; 2 and 3 (latent noise,
latent nothing) are refused. The whole picture is inpainted: `inpaint_full_res` ("only masked") and its padding
are ignored, as are `image_cfg_scale` and `initial_noise_multiplier`.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import replace
from typing import Any

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse import infotext, pictures
from muse.api.masking import repaint_area
from muse.core.service import Muse
from muse.errors import InvalidRequest
from muse.http.common import client_of, service, wait_unless_disconnected
from muse.messages import GenerateRequest
from muse.model_info import ModelInfo
from muse.schema import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    Dialect,
    GenerateBody,
    Picture,
    parse_json,
    refusal,
    validate,
)

UNSAFE_IN_HEADER = re.compile(r'[^\x20-\x7e]|["\\]')
MAX_NAME, MAX_NAMES = 64, 40
# Muse's fields under A1111's names, so errors name what the client sent.
A1111 = Dialect(
    names={
        "guidance_scale": "cfg_scale",
        "scheduler": "sampler_name",
        "n": "batch_size",
        "init_image": "init_images",
        "mask_image": "mask",
        "strength": "denoising_strength",
    }
)
# A1111's slider goes to 64; PIL's blur costs the same at any radius, so this only keeps masks meaningful.
MAX_MASK_BLUR = 64
FILL, ORIGINAL = 0, 1  # the inpainting_fill values Muse runs


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=8)
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older spelling of sampler_name

    def generate_fields(self) -> dict[str, Any]:
        """The native body's fields, where this body sets them."""
        n = self.batch_size * self.n_iter
        if n > 8:
            raise InvalidRequest("batch_size * n_iter: at most 8 images per request", param="n_iter")
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.cfg_scale,
            "width": self.width,
            "height": self.height,
            "seed": None if self.seed == -1 else self.seed,
            "n": n,
            "scheduler": self.sampler_name or self.sampler_index,
        }


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(
        default_factory=list, description="One picture (PNG, JPEG or WebP), base64 or a data: URL"
    )
    denoising_strength: float = Field(DEFAULT_STRENGTH, description="How far from the picture to go: 1 repaints")
    resize_mode: int = Field(0, description="0 stretch, 1 crop, 2 fill the rest with the edges, 3 as 0")
    mask: str | None = Field(None, description="Inpainting: a mask of the picture's size, white where to repaint")
    mask_blur: int = Field(4, ge=0, le=MAX_MASK_BLUR, description="The mask's blur radius, in pixels")
    inpainting_fill: int = Field(
        FILL, ge=0, le=3, description="0 the masked area painted from its surroundings, 1 the picture as it is"
    )
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint where the mask is black")
    include_init_images: bool = Field(False, description="Echo init_images and mask in `parameters`")

    def generate_fields(self) -> dict[str, Any]:
        return super().generate_fields() | {"strength": self.denoising_strength, "resize_mode": self.resize_mode}

    def picture(self, model: ModelInfo) -> Picture:
        """The picture and mask, decoded from base64 (not yet as pictures: GenerateBody.to_request does that)."""

        def refuse(param: str, message: str) -> InvalidRequest:
            return refusal(A1111, param, message, "invalid_value")

        if not self.init_images:
            raise refuse("init_image", "send one picture to start from (PNG, JPEG or WebP, in base64)")
        if len(self.init_images) > 1:
            raise refuse("init_image", f"{len(self.init_images)} pictures: Muse starts every image from one")
        if self.mask and self.inpainting_fill not in (FILL, ORIGINAL):
            raise refuse(
                "inpainting_fill",
                f"{self.inpainting_fill} (latent {'noise' if self.inpainting_fill == 2 else 'nothing'}) is not "
                f"supported: {FILL} (fill from the surroundings) or {ORIGINAL} (the original)",
            )
        limits = model.cost_limits
        sizes = pictures.PictureLimits(limits.max_upload, limits.max_pixels)
        try:
            image = pictures.from_base64("init_image", self.init_images[0], sizes)
            mask = pictures.from_base64("mask_image", self.mask, sizes) if self.mask else None
        except pictures.PictureError as exc:
            raise refusal(A1111, exc.param, str(exc), "invalid_image") from None
        return Picture(image, mask, self.denoising_strength, self.resize_mode, self.mask_blur)


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def to_generate_body(body: Txt2ImgRequest) -> GenerateBody:
    generate: GenerateBody = validate(
        GenerateBody, {k: v for k, v in body.generate_fields().items() if v is not None}, A1111
    )
    return generate


def img2img_request(body: Img2ImgRequest, generate: GenerateBody, model: ModelInfo) -> GenerateRequest:
    request = generate.to_request(model, A1111, body.picture(model))
    if request.source is None or request.source.mask is None:
        return request
    fill = body.inpainting_fill == FILL
    return replace(request, source=repaint_area(request.source, invert=body.inpainting_mask_invert == 1, fill=fill))


async def txt2img(request: Request) -> Response:
    muse = service(request)
    body: Txt2ImgRequest = validate(Txt2ImgRequest, parse_json(await request.body()), A1111)
    return await answer(request, muse, body, to_generate_body(body).to_request(muse.model, A1111))


async def img2img(request: Request) -> Response:
    muse = service(request)
    body: Img2ImgRequest = validate(Img2ImgRequest, parse_json(await request.body()), A1111)
    generate = to_generate_body(body)
    # Decoding, fitting (and filling) the pictures takes tens of milliseconds for large ones: off the event loop.
    prepared = await anyio.to_thread.run_sync(img2img_request, body, generate, muse.model)
    parameters: dict[str, Any] = {"denoising_strength": body.denoising_strength}
    if not body.include_init_images:  # as A1111: megabytes of pictures are not echoed unless asked for
        parameters |= {"init_images": None, "mask": None}
    return await answer(request, muse, body, prepared, parameters)


async def answer(
    request: Request,
    muse: Muse,
    body: Txt2ImgRequest,
    generate: GenerateRequest,
    parameters: dict[str, Any] | None = None,
) -> Response:
    """Submit, wait, and answer as A1111 does: the PNGs (each with its infotext), the parameters as used, and
    the `info` JSON."""
    ticket = muse.submit(generate, client=client_of(request), dialect=A1111)
    result = await wait_unless_disconnected(request, ticket, muse)
    seeds = [image.seed for image in result.images]
    sampler = generate.scheduler or "default"
    strength = generate.source.strength if generate.source is not None else 0.0
    used = {
        "steps": generate.steps,
        "cfg_scale": generate.guidance_scale,
        "width": generate.width,
        "height": generate.height,
        "seed": generate.seed,
        "sampler_name": sampler,
    }
    info = {
        "prompt": generate.prompt,
        "all_prompts": [generate.prompt] * len(seeds),
        "negative_prompt": generate.negative_prompt,
        "all_negative_prompts": [generate.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "steps": generate.steps,
        "cfg_scale": generate.guidance_scale,
        "width": generate.width,
        "height": generate.height,
        "sampler_name": sampler,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "sd_model_name": muse.model.name,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "timings": {"queued_ms": result.timings.queued_ms, "compute_ms": result.timings.compute_ms},
    }
    if generate.source is not None:
        info["denoising_strength"] = strength
    texts = [
        infotext.Infotext(
            generate.prompt,
            generate.negative_prompt,
            generate.steps,
            generate.scheduler or muse.model.scheduler,
            generate.guidance_scale,
            image.seed,
            generate.width,
            generate.height,
            muse.model.name,
            strength,
            " ".join(use.tag for use in generate.loras),
        ).text()
        for image in result.images
    ]
    pngs = [
        infotext.png_with_text(image.png, infotext.KEYWORD, text)
        for image, text in zip(result.images, texts, strict=True)
    ]
    info["infotexts"] = texts
    response = Txt2ImgResponse(
        images=[base64.b64encode(png).decode() for png in pngs],
        parameters=body.model_dump(exclude=set(body.model_extra or {})) | used | (parameters or {}),
        info=json.dumps(info),
    )
    return JSONResponse(response.model_dump(), headers=ignored_fields(body.model_extra or {}))


def ignored_fields(extra: dict[str, Any]) -> dict[str, str]:
    """The `Warning` header naming the fields Muse ignored. Names come from the client, so only printable
    ASCII without quotes survives (a newline would end the header, a non-Latin-1 name fail to encode)."""
    if not extra:
        return {}
    names = sorted(UNSAFE_IN_HEADER.sub("?", name)[:MAX_NAME] for name in extra)
    shown = ", ".join(names[:MAX_NAMES]) + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")
    return {"Warning": f'299 muse "ignored unsupported fields: {shown}"', "X-Muse-Ignored-Fields": shown}


class PngInfoRequest(BaseModel):
    image: str = Field("", description="A PNG, base64-encoded (a data: URL is fine)")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, str]
    parameters: dict[str, str]


def decode_image(data: str) -> bytes:
    payload = data.partition(",")[2] if data.startswith("data:") else data
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise InvalidRequest("image: not base64 (or a data: URL)", param="image", code="invalid_image") from None


async def png_info(request: Request) -> Response:
    """The `parameters` text of a PNG (Muse's own, A1111's, any other tool's), its fields, and its other text:
    what A1111 answers, with the text bounded by infotext.png_texts."""
    body: PngInfoRequest = validate(PngInfoRequest, parse_json(await request.body()), A1111)
    # Decoding, inflating and parsing up to megabytes of text takes a while: off the event loop, which serves
    # every other request meanwhile.
    return await run_in_threadpool(read_png_info, body.image)


def read_png_info(image: str) -> Response:
    if not image.strip():
        return JSONResponse(PngInfoResponse(info="", items={}, parameters={}).model_dump())
    try:
        texts = infotext.png_texts(decode_image(image))
    except ValueError as exc:
        raise InvalidRequest(f"image: {exc}", param="image", code="invalid_image") from None
    text = texts.pop(infotext.KEYWORD, "")
    parameters = infotext.parse(text) if text else {}
    return JSONResponse(PngInfoResponse(info=text, items=texts, parameters=parameters).model_dump())


routes = [
    Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
    Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
    Route("/sdapi/v1/png-info", png_info, methods=["POST"]),
]
