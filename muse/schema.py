"""The request body at the edge: validated with pydantic, turned into a GenerateRequest.

Every rejection becomes an InvalidRequest whose `param` names the offending field, in the words of
the front end that received it (a `Dialect`: its own field names and status), so no front end has to
rewrite an error after the fact.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from muse import pictures
from muse.errors import InvalidRequest
from muse.messages import GenerateRequest, LoraUse, SourceImage, denoising_steps
from muse.model_info import Limits, ModelInfo
from muse.schedulers import MIN_STEPS, canonical

# Stable Diffusion's presets; a model's own are ModelInfo.steps_for(quality).
QUALITY_STEPS = {"fast": 25, "quality": 50}
MAX_PROMPT = 2000
MAX_SEED = 2**32 - 1
MAX_SIDE = 8192


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be empty")
    return value


# Shared by every API that takes a prompt, so all refuse the same prompts the same way.
Prompt = Annotated[str, Field(max_length=MAX_PROMPT), AfterValidator(_not_blank)]


# A1111's prompt syntax for an adapter: <lora:name> or <lora:name:scale> (a text-encoder/UNet pair of scales
# takes the first).
LORA_TAG = re.compile(r"<lora:([^:<>]+?)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)
MAX_LORA_SCALE = 4.0


class LoraBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200, description="A file's name in --lora-dir, without .safetensors")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


def split_tags(prompt: str) -> tuple[str, list[LoraUse]]:
    """A prompt without its <lora:…> tags, and the adapters they name (scale 1 when they give none)."""
    uses = []
    for match in LORA_TAG.finditer(prompt):
        name, scale = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            value = float(scale) if scale else 1.0
        except ValueError:
            raise InvalidRequest(
                f"prompt: {match.group(0)} has no number for its scale", param="prompt", code="invalid_value"
            ) from None
        uses.append(LoraUse(name, value))
    if not uses:
        return prompt, []
    return " ".join(LORA_TAG.sub(" ", prompt).split()), uses


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    quality: Literal["fast", "quality"] = "fast"
    scheduler: str | None = Field(
        None,
        max_length=100,
        description="Sampler name, e.g. 'DDIM', 'Euler a' (default: the model's own). Flow-matching models (FLUX, "
        "SD3) and pipelines Muse has no step loop for run only their own: 'default' or its class name.",
    )
    steps: int | None = Field(None, ge=1, le=150)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    # The served model's --max-side is checked in to_request; this is only a sanity ceiling.
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    n: int = Field(1, ge=1, le=8)
    timeout_s: float | None = Field(None, gt=0, le=86400)
    init_image: str | None = Field(
        None,
        description="A picture to start from (img2img): PNG, JPEG or WebP, in base64 or as a data: URL. The "
        "request's width and height default to its size (down to a multiple of 8).",
    )
    mask_image: str | None = Field(
        None, description="Inpainting: a mask of init_image's size, white where to repaint (same encodings)."
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="How far from init_image to go: 1 repaints fully; default 0.75."
    )
    resize_mode: int = Field(
        0, ge=0, le=3, description="How init_image meets width x height: 0 stretch, 1 crop, 2 fill, as A1111."
    )
    loras: list[LoraBody] | None = Field(
        None,
        description="LoRA adapters from the server's --lora-dir, each at a scale (GET /api/loras lists them); "
        "a prompt's A1111 tags (<lora:name:0.8>) count too.",
    )

    @field_validator("scheduler")
    @classmethod
    def _canonical_scheduler(cls, value: str | None) -> str | None:
        # Names Muse knows become their canonical spelling; whether the served model can run the name is
        # for to_request to say, which knows the model.
        name = canonical(value)
        return value if name is None else name

    def adapters(self, model: ModelInfo, dialect: Dialect) -> tuple[str, tuple[LoraUse, ...]]:
        """The prompt without its <lora:…> tags, and every adapter asked for (the `loras` field's, then the
        tags'), each checked against the LoRA folder as it is now."""
        try:
            prompt, tagged = split_tags(self.prompt)
        except InvalidRequest as exc:
            raise refusal(dialect, "prompt", exc.message.removeprefix("prompt: "), "invalid_value") from None
        uses = [LoraUse(lora.name, lora.scale) for lora in self.loras or []] + tagged
        if not uses:
            return self.prompt, ()
        if not prompt.strip():
            raise refusal(dialect, "prompt", "nothing but LoRA tags: describe the picture too", "invalid_value")

        def refuse(message: str) -> InvalidRequest:
            return refusal(dialect, "loras", message, "invalid_value")

        if model.loras is None:
            where = "no LoRA folder (--lora-dir)" if model.takes_loras else f"no LoRAs for {model.label} models"
            raise refuse(f"this server has {where}; leave out loras and <lora:…> tags")
        limit = model.cost_limits.max_loras
        if len(uses) > limit:
            raise refuse(f"{len(uses)} LoRAs, over this server's limit of {limit} (--max-loras-per-request)")
        seen: set[str] = set()
        for use in uses:
            if use.name not in model.loras:
                known = ", ".join(model.loras[:20]) or "none"
                raise refuse(f"no LoRA named {use.name!r} (GET /api/loras lists them: {known})")
            if use.name in seen:
                raise refuse(f"{use.name!r} is named twice")
            if not -MAX_LORA_SCALE <= use.scale <= MAX_LORA_SCALE or use.scale != use.scale:
                raise refuse(
                    f"{use.name!r} at scale {use.scale:g}: scales go from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}"
                )
            seen.add(use.name)
        return prompt, tuple(uses)

    def picture(self, limits: Limits, dialect: Dialect) -> Picture | None:
        """The picture this body starts from (base64 fields decoded), or None."""
        for param in ("mask_image", "strength"):
            if getattr(self, param) is not None and self.init_image is None:
                raise refusal(dialect, param, "only with init_image (the picture to start from)", "invalid_value")
        if self.init_image is None:
            return None
        sizes = pictures.PictureLimits(limits.max_upload, limits.max_pixels)
        try:
            image = pictures.from_base64("init_image", self.init_image, sizes)
            mask = pictures.from_base64("mask_image", self.mask_image, sizes) if self.mask_image is not None else None
        except pictures.PictureError as exc:
            raise refusal(dialect, exc.param, str(exc), "invalid_image") from None
        strength = self.strength if self.strength is not None else DEFAULT_STRENGTH
        return Picture(image, mask, strength, self.resize_mode)

    def to_request(
        self, model: ModelInfo, dialect: Dialect | None = None, picture: Picture | None = None
    ) -> GenerateRequest:
        """The request with the model's defaults filled in, refused (in `dialect`) if the model cannot do what
        it asks or it is over the model's cost limits. `picture`: what a front end that takes files received
        (else the body's own base64 fields are read)."""
        dialect = dialect or NATIVE
        steps = self.steps if self.steps is not None else model.steps_for(self.quality)
        scheduler = check_model(self, steps, model, dialect)
        picture = picture or self.picture(model.cost_limits, dialect)
        source, size = None, (model.width, model.height)
        if picture is not None:
            source, size = start_from(picture, self, steps, model, dialect)
        prompt, loras = self.adapters(model, dialect)
        request = GenerateRequest(
            prompt=prompt,
            negative_prompt=self.negative_prompt if model.negative_prompt else "",
            steps=steps,
            seed=self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1),
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else model.guidance_scale,
            width=self.width or size[0],
            height=self.height or size[1],
            n=self.n,
            timeout_s=self.timeout_s,
            scheduler=scheduler,
            source=source,
            loras=loras,
        )
        check_limits(request, model.cost_limits, dialect)
        return request


class JobBody(GenerateBody):
    """POST /api/jobs: a request, and where to say when it ends."""

    webhook_url: str | None = Field(
        None,
        description="Where to POST the job's end (Standard Webhooks: job.succeeded, job.failed, job.cancelled, "
        "signed with the server's whsec_ secret): http(s), at most 2,048 bytes, a public address unless the "
        "server's --webhook-allow-hosts lists it.",
    )


DEFAULT_STRENGTH = 0.75


@dataclass(frozen=True, repr=False)
class Picture:
    """A picture a request starts from, as a front end received it (bytes not yet decoded)."""

    image: bytes
    mask: bytes | None = None
    strength: float = DEFAULT_STRENGTH
    resize_mode: int = 0
    mask_blur: int = 0
    # OpenAI's edits: without a mask, the image's fully transparent pixels are what to repaint.
    mask_from_alpha: bool = False


def start_from(
    picture: Picture, body: GenerateBody, steps: int, model: ModelInfo, dialect: Dialect
) -> tuple[SourceImage, tuple[int, int]]:
    """The decoded, checked and fitted picture, and the size the request takes from it where it names none."""
    if not model.image_inputs:
        raise refusal(
            dialect,
            "init_image",
            f"this model ({model.label}, {model.pipeline or 'its pipeline'}) starts from text only here; "
            "img2img and inpainting serve Stable Diffusion 1.x/2.x, SDXL, FLUX.1 and SD3.x models",
            "unsupported_by_model",
        )
    if denoising_steps(steps, picture.strength, model.flow_matching) < 1:
        raise refusal(
            dialect,
            "strength",
            f"{picture.strength:g} x {steps} steps runs no step: raise the strength or the steps",
            "invalid_value",
        )
    limits = model.cost_limits
    sizes = pictures.PictureLimits(limits.max_upload, limits.max_pixels)
    try:
        image = pictures.open_picture("init_image", picture.image, sizes)
        mask = pictures.open_picture("mask_image", picture.mask, sizes) if picture.mask is not None else None
        if mask is None and picture.mask_from_alpha:
            mask = pictures.alpha_mask(image)
        natural = pictures.natural_size(image)
        size = (body.width or natural[0], body.height or natural[1])
        source = pictures.source(
            image,
            mask,
            picture.strength,
            size,
            picture.resize_mode,
            picture.mask_blur,
            picture_param=dialect.name("init_image") or "init_image",
        )
        source = replace(source, flow=model.flow_matching)  # what the queue's estimates count
    except pictures.PictureError as exc:
        raise refusal(dialect, exc.param, str(exc), "invalid_image") from None
    return source, size


def refusal(dialect: Dialect, param: str, message: str, code: str) -> InvalidRequest:
    """An InvalidRequest made at the edge, naming the field the way the front end does."""
    name = dialect.name(param)
    return InvalidRequest(f"{name}: {message}", param=name, code=code, status=dialect.status)


def check_model(body: GenerateBody, steps: int, model: ModelInfo, dialect: Dialect) -> str:
    """What the model's family cannot do is refused before it is queued: a negative prompt where there is no
    negative conditioning (FLUX), a sampler it cannot run (flow-matching families run only their own), too
    few steps for the sampler. Returns the sampler as the worker gets it ("" for the model's own)."""
    if body.negative_prompt.strip() and not model.negative_prompt:
        raise refusal(
            dialect,
            "negative_prompt",
            f"this model ({model.label}, {model.pipeline or 'its pipeline'}) has no negative conditioning, so a "
            "negative prompt would be ignored; leave it empty and describe what you want instead",
            "unsupported_by_model",
        )
    scheduler = model.sampler(body.scheduler)
    if scheduler is None:
        if model.samplers:
            message = f"unknown scheduler {body.scheduler!r}; one of: {', '.join(model.samplers)}"
        else:
            own = model.scheduler
            message = (
                f"{body.scheduler!r} does not work with this {model.label} model, which samples only with its own "
                f"scheduler{f' ({own})' if own else ''}: leave the field out, or send 'default'"
                + (f" or {own!r}" if own else "")
            )
        raise refusal(dialect, "scheduler", message, "unsupported_by_model")
    least = MIN_STEPS.get(scheduler, 1)
    if steps < least:
        raise refusal(dialect, "steps", f"the {scheduler} sampler needs at least {least} steps", "invalid_value")
    return scheduler


def check_limits(request: GenerateRequest, limits: Limits, dialect: Dialect) -> None:
    def refuse(param: str, message: str) -> InvalidRequest:
        return refusal(dialect, param, message, "over_limit")

    for param, side in (("width", request.width), ("height", request.height)):
        if side > limits.max_side:
            raise refuse(param, f"{side} px is over this server's limit of {limits.max_side} px (--max-side)")
    pixels = request.width * request.height * request.n
    if pixels > limits.max_pixels:
        raise refuse(
            "n" if request.n > 1 else "width",
            f"{request.width}x{request.height} x {request.n} image(s) is {pixels:,} pixels, over this server's "
            f"limit of {limits.max_pixels:,} per request (--max-pixels)",
        )
    if request.steps > limits.max_steps:
        where = (
            "this model's limit of {} (max_steps in its muse.json; --max-steps overrides it)"
            if limits.steps_from_model
            else "this server's limit of {} (--max-steps)"
        )
        raise refuse("steps", f"{request.steps} steps is over {where.format(limits.max_steps)}")


@dataclass(frozen=True)
class Dialect:
    """How a front end names request fields, and the status it answers invalid input with."""

    status: int = 422
    names: Mapping[str, str] = field(default_factory=dict)  # model field -> the front end's name
    hints: Mapping[str, str] = field(default_factory=dict)  # front end's name -> words added to its errors

    def name(self, param: str | None) -> str | None:
        return None if param is None else self.names.get(param, param)


NATIVE = Dialect()


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", code="invalid_json", status=400) from exc
    except RecursionError:
        raise InvalidRequest("body is nested too deeply", code="invalid_json", status=400) from None


def validate(model_cls: type[BaseModel], data: Any, dialect: Dialect = NATIVE) -> Any:
    """Validate `data` against `model_cls`; the first problem becomes an InvalidRequest in `dialect`."""
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object", code="invalid_json", status=400)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, dialect) from None


def from_validation_error(exc: ValidationError, dialect: Dialect = NATIVE) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    param = dialect.name(".".join(str(part) for part in error["loc"]) or None)
    kind = error["type"]
    message = error["msg"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "field required"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    if param is not None:
        message = f"{param}: {message}{dialect.hints.get(param, '')}"
    return InvalidRequest(message, param=param, code=kind, status=dialect.status)
