"""OpenAI-compatible Images API: `POST /v1/images/generations`, `GET /v1/models`.

Point the official `openai` client at `http://host:8000/v1`. Muse's own knobs travel in
`extra_body` (negative_prompt, seed, steps, guidance_scale; a negative prompt to a model without negative
conditioning, FLUX, is a 400 naming it). Errors use OpenAI's shape and status
codes so the client raises its typed exceptions; once a request is accepted, a failure carries
`x-should-retry: false` so the client does not submit a duplicate.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse.errors import InvalidRequest, MuseError, NotFound
from muse.http.common import client_of, error_response, service, wait_unless_disconnected
from muse.links import LinkSigner
from muse.model_info import ModelInfo
from muse.schema import MAX_PROMPT, MAX_SEED, Dialect, GenerateBody, Prompt, parse_json, validate

SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
HIGH_QUALITY = {"hd", "high", "xhigh", "max"}
# OpenAI answers every invalid parameter with 400, and a size is one field.
OPENAI = Dialect(
    status=400,
    names={"width": "size", "height": "size"},
    hints={"size": " (a size is WIDTHxHEIGHT, multiples of 8 from 64)"},
)


class ImagesRequest(BaseModel):
    # Fields of OpenAI's API that change nothing here (style, background, moderation…) are ignored.
    model_config = ConfigDict(extra="ignore")

    prompt: Prompt
    model: str | None = None
    n: int | None = Field(None, ge=1, le=8)
    size: str | None = None
    quality: Literal["standard", "low", "medium", "auto", "hd", "high", "xhigh", "max"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    stream: Literal[False] | None = None
    user: str | None = None
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    # ASCII digits only, and few of them: str.isdigit() takes "²", and int() of 5,000 digits raises.
    match = SIZE.fullmatch(size.lower())
    if match is None:
        raise InvalidRequest(f"size: {size[:40]!r} is not 'WIDTHxHEIGHT' or 'auto'", param="size", status=400)
    return int(match[1]), int(match[2])


def to_generate_body(body: ImagesRequest) -> GenerateBody:
    width, height = parse_size(body.size)
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "quality": "quality" if body.quality in HIGH_QUALITY else "fast",
        "n": body.n or 1,
        "steps": body.steps,
        "seed": body.seed,
        "guidance_scale": body.guidance_scale,
        "width": width,
        "height": height,
    }
    generate: GenerateBody = validate(GenerateBody, {k: v for k, v in fields.items() if v is not None}, OPENAI)
    return generate


async def generations(request: Request) -> Response:
    muse = service(request)
    body: ImagesRequest = validate(ImagesRequest, parse_json(await request.body()), OPENAI)
    if body.model not in (None, muse.model.name):
        raise NotFound(
            f"The model '{body.model}' does not exist; this server serves '{muse.model.name}'",
            param="model",
            code="model_not_found",
        )
    if body.response_format == "url" and muse.gallery is None:
        raise InvalidRequest(
            "response_format 'url' needs the gallery, which this server runs without (--no-gallery)",
            param="response_format",
            status=400,
        )
    ticket = muse.submit(
        to_generate_body(body).to_request(muse.model, OPENAI), client=client_of(request), dialect=OPENAI
    )
    try:
        result = await wait_unless_disconnected(request, ticket, muse)
    except MuseError as error:
        # Accepted, then failed: a retry by the client would generate a duplicate.
        return error_response(error, {"x-should-retry": "false"})
    headers = {}
    if body.response_format == "url" and len(ticket.saved) == len(result.images):
        base = muse.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        links: LinkSigner = request.app.state.links
        data = [ImageData(url=base + links.sign(f"/gallery/{image_id}.png")) for image_id in ticket.saved]
    else:
        if body.response_format == "url":
            # Storing failed (the log says why): the images themselves, never a 200 without them.
            headers["Warning"] = '299 muse "the images could not be stored: sent as b64_json, not url"'
        data = [ImageData(b64_json=base64.b64encode(image.png).decode()) for image in result.images]
    return JSONResponse(ImagesResponse(created=int(time.time()), data=data).model_dump(), headers=headers)


def model_card(model: ModelInfo) -> dict[str, Any]:
    """OpenAI's model object, and what Muse adds: the family (sd, sdxl, flux, sd3, or the pipeline class) and
    the pipeline class."""
    card = {"id": model.name, "object": "model", "created": 0, "owned_by": "muse"}
    return card | {"family": model.family, "pipeline": model.pipeline}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [model_card(service(request).model)]})


async def get_model(request: Request) -> Response:
    model = service(request).model
    if request.path_params["model"] != model.name:
        raise NotFound(
            f"The model '{request.path_params['model']}' does not exist", param="model", code="model_not_found"
        )
    return JSONResponse(model_card(model))


routes = [
    Route("/v1/images/generations", generations, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
