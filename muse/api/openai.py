"""OpenAI-compatible Images API: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.

Point the official `openai` client at `http://host:8000/v1`. Muse's own knobs travel in
`extra_body` (negative_prompt, seed, steps, guidance_scale; a negative prompt to a model without negative
conditioning, FLUX, is a 400 naming it). Errors use OpenAI's shape and status
codes so the client raises its typed exceptions; once a request is accepted, a failure carries
`x-should-retry: false` so the client does not submit a duplicate.

An edit is a multipart form: the picture (`image`, or one `image[]`), an optional `mask` of its size whose
fully transparent pixels are where to repaint, and the generation's fields as text. Without a mask, the
picture's own fully transparent pixels are the mask; a picture with none is an img2img at `strength` (an
extra field, 0.75 by default). Where there is a mask the masked area is repainted from noise (strength 1,
as OpenAI's edits replace it), unless `strength` says otherwise.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any, Literal

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse import pictures
from muse.api.masking import declares_alpha
from muse.core.service import Muse
from muse.errors import InvalidRequest, MuseError, NotFound
from muse.http.common import client_of, error_response, service, wait_unless_disconnected
from muse.links import LinkSigner
from muse.messages import GenerateRequest
from muse.model_info import Limits, ModelInfo
from muse.schema import (
    DEFAULT_STRENGTH,
    MAX_PROMPT,
    MAX_SEED,
    Dialect,
    GenerateBody,
    LoraBody,
    Picture,
    Prompt,
    parse_json,
    refusal,
    validate,
)

SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
HIGH_QUALITY = {"hd", "high", "xhigh", "max"}
# OpenAI answers every invalid parameter with 400, and a size is one field.
OPENAI = Dialect(
    status=400,
    names={"width": "size", "height": "size", "init_image": "image", "mask_image": "mask"},
    hints={"size": " (a size is WIDTHxHEIGHT, multiples of 8 from 64)"},
)
# An edit's form: the picture, its mask, and a few dozen text fields at most (OpenAI's and Muse's own).
MAX_FORM_FILES, MAX_FORM_FIELDS = 4, 64
PICTURE_FIELDS = ("image", "image[]", "mask")


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
    loras: list[LoraBody] | None = Field(
        None, description="LoRA adapters from the server's --lora-dir, as /api/generate's `loras` (GET /api/loras)"
    )


class EditRequest(ImagesRequest):
    """The text fields of an edit's form (the pictures are its files)."""

    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="How far from the picture to go: 1 repaints fully. Default 1 where a mask (or the picture's "
        "transparency) says what to repaint, 0.75 for a whole picture (img2img).",
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _form_boolean(cls, value: Any) -> Any:
        # A form's values are text: the client writes stream=False as "false".
        return False if isinstance(value, str) and value.strip().lower() == "false" else value

    @field_validator("loras", mode="before")
    @classmethod
    def _form_json(cls, value: Any) -> Any:
        # In a form, extra_body's list arrives as its JSON text.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError('a JSON list such as [{"name": "watercolor", "scale": 0.8}]') from None
        return value


class EditForm(EditRequest):
    """An edit as the form documents it: the files, then the text fields."""

    image: bytes = Field(description="The picture: PNG, JPEG or WebP (`image[]` is taken too, once)")
    mask: bytes | None = Field(
        None, description="A PNG of the picture's size, fully transparent where to edit (else the picture's own)"
    )


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
        "loras": [lora.model_dump() for lora in body.loras] if body.loras else None,
        "width": width,
        "height": height,
    }
    generate: GenerateBody = validate(GenerateBody, {k: v for k, v in fields.items() if v is not None}, OPENAI)
    return generate


def check_answerable(body: ImagesRequest, muse: Muse) -> None:
    """What the body asks of this server that it does not have: another model, links without a gallery."""
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


async def answer(request: Request, muse: Muse, body: ImagesRequest, generate: GenerateRequest) -> Response:
    """Submit, wait, and answer as OpenAI does: the images in base64, or links into the gallery."""
    ticket = muse.submit(generate, client=client_of(request), dialect=OPENAI)
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


async def generations(request: Request) -> Response:
    muse = service(request)
    body: ImagesRequest = validate(ImagesRequest, parse_json(await request.body()), OPENAI)
    check_answerable(body, muse)
    return await answer(request, muse, body, to_generate_body(body).to_request(muse.model, OPENAI))


async def edits(request: Request) -> Response:
    muse = service(request)
    fields, image, mask = await read_edit_form(request, muse.model.cost_limits.max_upload)
    body: EditRequest = validate(EditRequest, fields, OPENAI)
    check_answerable(body, muse)
    generate = to_generate_body(body)
    # Decoding and fitting the pictures takes tens of milliseconds for large ones: off the event loop.
    prepared = await anyio.to_thread.run_sync(edit_request, generate, body.strength, image, mask, muse.model)
    return await answer(request, muse, body, prepared)


async def read_edit_form(request: Request, max_upload: int) -> tuple[dict[str, str], bytes, bytes | None]:
    """The form's text fields, the picture's bytes and the mask's (None without one)."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "multipart/form-data":
        raise InvalidRequest(
            f"an edit is sent as multipart/form-data (the picture as a file named image), not as "
            f"{content_type.partition(';')[0].strip()[:60] or 'a body without a Content-Type'}",
            code="invalid_content_type",
            status=400,
        )
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except HTTPException as exc:  # Starlette's answer to a form it cannot parse
        raise InvalidRequest(
            f"the multipart body cannot be read: {exc.detail}", code="invalid_multipart", status=400
        ) from None
    try:
        return await edit_form_parts(form, max_upload)
    finally:
        await form.close()  # its files: spooled to disk past a megabyte


async def edit_form_parts(form: FormData, max_upload: int) -> tuple[dict[str, str], bytes, bytes | None]:
    images = [*form.getlist("image"), *form.getlist("image[]")]
    if not images:
        raise refuse_field("image", "field required: the picture to edit, as a file")
    if len(images) > 1:
        raise refuse_field("image", f"{len(images)} pictures: an edit here starts from one")
    masks = form.getlist("mask")
    if len(masks) > 1:
        raise refuse_field("mask", "one mask per edit")
    image = await file_bytes("image", images[0], max_upload)
    mask = await file_bytes("mask", masks[0], max_upload) if masks else None
    fields = {name: value for name, value in form.multi_items() if name not in PICTURE_FIELDS}
    # Other files (gpt-image's `markup`) change nothing here, as other ignored fields.
    return {name: value for name, value in fields.items() if isinstance(value, str)}, image, mask


async def file_bytes(param: str, value: UploadFile | str, max_upload: int) -> bytes:
    if not isinstance(value, UploadFile):
        raise refuse_field(param, "send the picture as a file (a multipart part with a filename), not as text")
    # A byte more than the limit is enough for the picture to be refused by name as over it.
    return await value.read(max_upload + 1)


def refuse_field(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param, code="invalid_image", status=400)


def edit_request(
    generate: GenerateBody, strength: float | None, image: bytes, mask: bytes | None, model: ModelInfo
) -> GenerateRequest:
    area = edit_area(image, mask, model.cost_limits)
    default = 1.0 if area is not None else DEFAULT_STRENGTH
    picture = Picture(image, area, strength if strength is not None else default)
    return generate.to_request(model, OPENAI, picture)


def edit_area(image: bytes, mask: bytes | None, limits: Limits) -> bytes | None:
    """Where to repaint as Muse's mask (a PNG, white = repaint): the mask's fully transparent pixels, else the
    picture's; None for a whole-picture edit."""
    sizes = pictures.PictureLimits(limits.max_upload, limits.max_pixels)
    try:
        if mask is None:
            # Only a picture that can be transparent is decoded here (start_from decodes it again, fitting it).
            if not declares_alpha(image):
                return None
            area = pictures.alpha_mask(pictures.open_picture("init_image", image, sizes))
            return None if area is None else pictures.png(area)
        opened = pictures.open_picture("mask_image", mask, sizes)
        area = pictures.alpha_mask(opened)
        if area is None:
            has = "no fully transparent pixel" if declares_alpha(mask) else "no transparency (no alpha channel)"
            raise pictures.PictureError(
                "mask_image", f"the mask has {has}: its fully transparent pixels are where to edit"
            )
        return pictures.png(area)
    except pictures.PictureError as exc:
        raise refusal(OPENAI, exc.param, str(exc), "invalid_image") from None


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
    Route("/v1/images/edits", edits, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
