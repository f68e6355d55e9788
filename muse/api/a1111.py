"""AUTOMATIC1111-compatible generation: txt2img and png-info (the server's state is in a1111_state).

Unsupported fields (hires fix, face restoration, …) are ignored, listed in a `Warning` header, never
a 500. Validation is Muse's own (prompt, sizes, steps, seeds), with errors in Muse's shape under
A1111's field names. Every PNG carries A1111's `parameters` text, as A1111's own API returns them.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse import infotext
from muse.errors import InvalidRequest
from muse.http.common import client_of, service, wait_unless_disconnected
from muse.schema import MAX_SEED, Dialect, GenerateBody, parse_json, validate

UNSAFE_IN_HEADER = re.compile(r'[^\x20-\x7e]|["\\]')
MAX_NAME, MAX_NAMES = 64, 40
# Muse's fields under A1111's names, so errors name what the client sent.
A1111 = Dialect(names={"guidance_scale": "cfg_scale", "scheduler": "sampler_name", "n": "batch_size"})


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


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def to_generate_body(body: Txt2ImgRequest) -> GenerateBody:
    n = body.batch_size * body.n_iter
    if n > 8:
        raise InvalidRequest("batch_size * n_iter: at most 8 images per request", param="n_iter")
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": None if body.seed == -1 else body.seed,
        "n": n,
        "scheduler": body.sampler_name or body.sampler_index,
    }
    generate: GenerateBody = validate(GenerateBody, {k: v for k, v in fields.items() if v is not None}, A1111)
    return generate


async def txt2img(request: Request) -> Response:
    muse = service(request)
    body: Txt2ImgRequest = validate(Txt2ImgRequest, parse_json(await request.body()), A1111)
    generate = to_generate_body(body).to_request(muse.model, A1111)
    ticket = muse.submit(generate, client=client_of(request), dialect=A1111)
    result = await wait_unless_disconnected(request, ticket, muse)
    seeds = [image.seed for image in result.images]
    sampler = generate.scheduler or "default"
    parameters = body.model_dump(exclude=set(body.model_extra or {})) | {
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
            generate.source.strength if generate.source is not None else 0.0,
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
        parameters=parameters,
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
    Route("/sdapi/v1/png-info", png_info, methods=["POST"]),
]
