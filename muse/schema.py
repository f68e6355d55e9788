"""The request body at the edge: validated with pydantic, turned into a GenerateRequest.

Every rejection becomes an InvalidRequest whose `param` names the offending field, in the words of
the front end that received it (a `Dialect`: its own field names and status), so no front end has to
rewrite an error after the fact.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from muse.errors import InvalidRequest
from muse.messages import GenerateRequest
from muse.model_info import Limits, ModelInfo
from muse.schedulers import MIN_STEPS, SCHEDULERS, canonical

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


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    quality: Literal["fast", "quality"] = "fast"
    # Before steps, which are checked against it.
    scheduler: str | None = Field(None, description="Sampler name, e.g. 'DDIM', 'Euler a' (default: the model's)")
    steps: int | None = Field(None, ge=1, le=150)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    # The served model's --max-side is checked in to_request; this is only a sanity ceiling.
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8)
    n: int = Field(1, ge=1, le=8)
    timeout_s: float | None = Field(None, gt=0, le=86400)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        name = canonical(value)
        if name is None:
            raise ValueError(f"unknown scheduler {value!r}; one of: {', '.join(SCHEDULERS)}")
        return name

    @field_validator("steps")
    @classmethod
    def _enough_steps_for_the_scheduler(cls, value: int | None, info: ValidationInfo) -> int | None:
        scheduler = info.data.get("scheduler") or ""
        least = MIN_STEPS.get(scheduler, 1)
        if value is not None and value < least:
            raise ValueError(f"the {scheduler} sampler needs at least {least} steps")
        return value

    def to_request(self, model: ModelInfo, dialect: Dialect | None = None) -> GenerateRequest:
        """The request with the model's defaults filled in, refused (in `dialect`) if over its cost limits."""
        request = GenerateRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps if self.steps is not None else QUALITY_STEPS[self.quality],
            seed=self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1),
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else model.guidance_scale,
            width=self.width or model.width,
            height=self.height or model.height,
            n=self.n,
            timeout_s=self.timeout_s,
            scheduler=self.scheduler or "",
        )
        check_limits(request, model.cost_limits, dialect or NATIVE)
        return request


def check_limits(request: GenerateRequest, limits: Limits, dialect: Dialect) -> None:
    def refuse(param: str, message: str) -> InvalidRequest:
        name = dialect.name(param)
        return InvalidRequest(f"{name}: {message}", param=name, code="over_limit", status=dialect.status)

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
        raise refuse("steps", f"{request.steps} steps is over this server's limit of {limits.max_steps} (--max-steps)")


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
