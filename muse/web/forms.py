"""The generate form as the pages see it: raw strings in, a validated GenerateRequest out, and errors as
readable messages that name the form control at fault."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any
from urllib.parse import urlencode

from muse import pictures
from muse.errors import InvalidRequest, MuseError
from muse.messages import GenerateRequest, LoraUse
from muse.model_info import ModelInfo
from muse.schema import DEFAULT_STRENGTH, GenerateBody, Picture, validate
from muse.words import Kind, in_words

TIMES = "\u00d7"  # the multiplication sign, for sizes as people write them

# Request fields → the label of the form control a person can fix.
LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "quality": "Quality",
    "steps": "Steps",
    "seed": "Seed",
    "size": "Size",
    "width": "Size",
    "height": "Size",
    "guidance_scale": "Guidance",
    "n": "Images",
    "scheduler": "Sampler",
    "init_image": "Picture",
    "mask_image": "Mask",
    "strength": "Strength",
    "loras": "LoRA",
    # The form sends one adapter, so the API's checks of its fields name the first.
    "loras.0.name": "LoRA",
    "loras.0.scale": "LoRA",
}

CLEARED = "cleared"

# A picture meets a Size it does not fit by being scaled to cover it and cropped in the middle (A1111's
# "crop and resize"): people expect their picture kept in proportion, not stretched.
CROP = 1


@dataclass(frozen=True)
class FormValues:
    """What the form shows, as typed: blank means "the default" (random seed, native size, …)."""

    prompt: str = ""
    negative_prompt: str = ""
    quality: str = "fast"
    steps: str = ""
    seed: str = ""
    size: str = ""
    guidance_scale: str = ""
    scheduler: str = ""
    n: str = "1"
    strength: str = ""  # only read with a picture
    # One adapter from --lora-dir (blank: none) and its scale (blank: 1); more go in the prompt as <lora:…> tags.
    lora: str = ""
    lora_scale: str = ""
    # The picture to start from when it is not uploaded: a gallery image's id, or the job whose picture to
    # start from again ("Generate again", "Reuse seed" on an image made from a picture).
    init_id: str = ""
    init_job: str = ""
    # The mask a named picture's job inpainted with: kept ("") unless the page's Clear mask set CLEARED.
    stored_mask: str = ""

    @classmethod
    def from_pairs(cls, pairs: Mapping[str, str]) -> FormValues:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in pairs.items() if k in known})

    @classmethod
    def from_request(cls, request: GenerateRequest, model: ModelInfo, *, keep_seed: bool, job: str = "") -> FormValues:
        """The form that asks for `request` again; `job`: its job's id, which carries its picture, if any."""
        quality = next((q for q in ("fast", "quality") if model.steps_for(q) == request.steps), None)
        native = (request.width, request.height) == (model.width, model.height)
        return cls(
            **adapter_fields(request.prompt, request.loras),
            negative_prompt=request.negative_prompt,
            quality=quality or "fast",
            steps="" if quality else str(request.steps),
            seed=str(request.seed) if keep_seed else "",
            size="" if native else f"{request.width}x{request.height}",
            guidance_scale="" if request.guidance_scale == model.guidance_scale else f"{request.guidance_scale:g}",
            scheduler=request.scheduler,
            n=str(request.n),
            strength=f"{request.source.strength:g}" if request.source and job else "",
            init_job=job if request.source else "",
        )

    @classmethod
    def starting_from(
        cls, image_id: str, prompt: str, negative_prompt: str, uses: Sequence[LoraUse] = ()
    ) -> FormValues:
        """A form that starts from a gallery image ("Use as init image"), with the prompt and adapters that made
        it: the seed and size are left to the new image."""
        return cls(**adapter_fields(prompt, uses), negative_prompt=negative_prompt, init_id=image_id)

    @property
    def advanced(self) -> bool:
        """Open the advanced section when any of its fields holds something."""
        return any(
            (
                self.negative_prompt,
                self.steps,
                self.seed,
                self.size,
                self.guidance_scale,
                self.n not in ("", "1"),
                self.lora,
                self.init_id,
                self.init_job,
            )
        )

    @property
    def picked(self) -> bool:
        """It starts from a picture it names (not an upload)."""
        return bool(self.init_id or self.init_job)

    def without_picture(self) -> FormValues:
        return replace(self, init_id="", init_job="", strength="", stored_mask="")

    def items(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in asdict(self).items() if v != ""]

    def query(self) -> str:
        return urlencode(self.items())

    def reproducing(self, seed: int) -> FormValues:
        """These settings with one image's seed, n=1: generating gives back exactly that image."""
        return replace(self, seed=str(seed), n="1")

    def to_request(self, model: ModelInfo, image: bytes | None = None, mask: bytes | None = None) -> GenerateRequest:
        """Validate like the JSON API does; raises InvalidRequest naming the field. `image` (and its `mask`): the
        picture to start from, as received; with Size left blank the image takes the picture's size (scaled down
        to the server's limits where it is over them), else the picture is cropped to fit the Size."""
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "quality": self.quality,
            "n": _integer("n", self.n or "1"),
        }
        for name in ("steps", "seed"):
            if value := getattr(self, name).strip():
                data[name] = _integer(name, value)
        if scheduler := self.scheduler.strip():
            data["scheduler"] = scheduler
        if guidance := self.guidance_scale.strip():
            data["guidance_scale"] = _number("guidance_scale", guidance)
        if lora := self.lora.strip():
            scale = _number("loras", self.lora_scale) if self.lora_scale.strip() else 1.0
            data["loras"] = [{"name": lora, "scale": scale}]
        if size := self.size.strip():
            width, _, height = size.lower().partition("x")
            data["width"], data["height"] = _integer("size", width), _integer("size", height)
        picture = None
        if image is not None:
            strength = self.strength.strip()
            if strength:
                data["strength"] = _number("strength", strength)  # checked against the API's range below
            if "width" not in data and (fitted := fitted_size(image, model, data["n"])):
                data["width"], data["height"] = fitted
        body: GenerateBody = validate(GenerateBody, data)
        if image is not None:
            strength_value = body.strength if body.strength is not None else DEFAULT_STRENGTH
            picture = Picture(image, mask, strength_value, resize_mode=CROP)
        return body.to_request(model, picture=picture)


def adapter_fields(prompt: str, uses: Sequence[LoraUse]) -> dict[str, str]:
    """The Prompt, LoRA and LoRA scale fields that ask for `prompt` with these adapters again: the first in the
    LoRA control, the others as tags after the prompt. The API takes the `loras` field's adapters before the
    prompt's tags (GenerateBody.adapters), so the form sends the same adapters in the same order."""
    if not uses:
        return {"prompt": prompt}
    first, *others = uses
    return {
        "prompt": " ".join([prompt, *(use.tag for use in others)]),
        "lora": first.name,
        "lora_scale": "" if first.scale == 1 else f"{first.scale:g}",
    }


def _integer(name: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise InvalidRequest(f"{name}: must be a whole number, not {value!r}", param=name) from None


def _number(name: str, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InvalidRequest(f"{name}: must be a number, not {value!r}", param=name)
    return number


def fitted_size(data: bytes, model: ModelInfo, n: int) -> tuple[int, int] | None:
    """The size of an image started from this picture when the form names none: None for the picture's own
    (as the API takes it), or the largest size in its proportions within the server's limits where it is over
    them. Reads only the picture's header; a picture it cannot read is refused later, by name."""
    limits = model.cost_limits
    found = pictures.header(data)
    if found is None:
        return None
    width, height = found.width, found.height
    if width * height > limits.max_pixels or min(width, height) < 1:
        return None  # refused as a picture (--max-pixels), whatever size the image would take
    natural_w, natural_h = max(pictures.MIN_SIDE, width), max(pictures.MIN_SIDE, height)
    scale = min(
        1.0,
        limits.max_side / natural_w,
        limits.max_side / natural_h,
        math.sqrt(limits.max_pixels / max(1, n) / (natural_w * natural_h)),
    )
    if scale >= 1.0:
        return None
    step = pictures.MULTIPLE
    return (
        max(pictures.MIN_SIDE, int(natural_w * scale) // step * step),
        max(pictures.MIN_SIDE, int(natural_h * scale) // step * step),
    )


def sampler_options(model: ModelInfo) -> list[tuple[str, str]]:
    """(value, label) of the sampler select: the model's own first (the blank value), then the others it runs."""
    own = f"{model.scheduler} (the model's own)" if not model.samplers and model.scheduler else "Model default"
    return [("", own), *((name, name) for name in model.samplers)]


def size_options(model: ModelInfo) -> list[tuple[str, str]]:
    """Native size first (the blank value), then wider, taller and larger ones that the API accepts."""
    options = [("", f"{model.width}{TIMES}{model.height} (native)")]
    for fw, fh in ((1.5, 1), (1, 1.5), (1.5, 1.5), (2, 2)):
        width, height = round(model.width * fw / 8) * 8, round(model.height * fh / 8) * 8
        value = f"{width}x{height}"
        side = model.cost_limits.max_side
        fits = 64 <= width <= side and 64 <= height <= side and (width, height) != (model.width, model.height)
        if fits and value not in dict(options):
            options.append((value, f"{width}{TIMES}{height}"))
    return options


@dataclass(frozen=True)
class Problem:
    """An error as a person reads it in a card."""

    title: str
    message: str
    tone: str  # "error", "busy" or "muted": how loudly the card says it
    status: int
    field: str | None = None
    retry_after: int | None = None
    retryable: bool = False


# Each kind of trouble as a card's title, and how loudly the card says it (invalid input is titled by its field).
CARDS = {
    Kind.BUSY: ("Muse is busy", "busy"),
    Kind.RATE_LIMITED: ("Slow down", "busy"),
    Kind.RESTARTING: ("Muse is restarting", "busy"),
    Kind.UNAVAILABLE: ("No worker is available", "busy"),
    Kind.TIMED_OUT: ("Took too long", "error"),
    Kind.CRASHED: ("A worker crashed", "error"),
    Kind.FAILED: ("Generation failed", "error"),
    Kind.CANCELLED: ("Cancelled", "muted"),
    Kind.NOT_FOUND: ("Not found", "muted"),
}


def in_sentence(label: str) -> str:
    """A label inside a sentence: "the negative prompt", but "the LoRA" (a name that keeps its capitals)."""
    return label if any(c.isupper() for c in label[1:]) else label.lower()


def problem(error: MuseError) -> Problem:
    words = in_words(error, LABELS)
    message = words.detail[:1].upper() + words.detail[1:]
    if words.kind is Kind.INVALID:
        title = f"Check the {in_sentence(words.field)}" if words.field else "Can't generate that"
        return Problem(title, message, "error", error.status, field=words.field)
    title, tone = CARDS.get(words.kind, ("Something went wrong", "error"))
    return Problem(title, message, tone, error.status, retry_after=words.retry_after, retryable=words.retryable)
