"""What the parent needs to know about a model folder before any worker has loaded it.

Reads diffusers' JSON configs only (no torch), so defaults are known even when scaled to zero: the pipeline
class (`model_index.json`'s `_class_name`) and with it the family (sd, sdxl, flux, sd3, or the class itself),
the native size, default guidance and steps, the samplers that work, whether a negative prompt means anything,
and what the page suggests as prompts. The `muse.json` beside `model_index.json` may override each of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from muse.schedulers import SCHEDULERS, canonical

EMBEDDED_NAME = "muse-demo"
# Stable Diffusion's own defaults, used when the folder says nothing (e.g. a hub id).
FALLBACK_SIZE = 512
FALLBACK_GUIDANCE = 7.5
DEFAULT_MAX_STEPS = 150
MIN_SIDE = 64
NATIVE_STEPS = 25  # a "fast" image: the unit of cost, and Stable Diffusion's default steps here
# Text encoding, decoding, PNG and storage cost the same per image whatever its steps: 100 one-step images took
# as long as 10 native ones, so an image costs about its steps + 1.7 (a native one 26.7). Charging no fewer than
# 5 steps covers short runs (a 1-step image pays twice its cost, a 4-step one about its cost); from 5 steps on,
# the proportional charge falls short by a fifth at most.
FLOOR_STEPS = 5


DEFAULT_MAX_UPLOAD = 8 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may cost, checked before it is queued: a request over them is a 422."""

    max_side: int  # pixels, width and height each
    max_pixels: int  # width x height x n
    max_steps: int
    steps_from_model: bool = False  # max_steps is the model's muse.json's, not --max-steps
    max_upload: int = DEFAULT_MAX_UPLOAD  # bytes of one uploaded picture (--max-upload)
    max_loras: int = 4  # LoRA adapters one request may name (--max-loras-per-request)

    @classmethod
    def around(
        cls,
        width: int,
        height: int,
        *,
        max_side: int = 0,
        max_pixels: int = 0,
        max_steps: int = 0,
        model_steps: int = 0,
        max_upload: int = 0,
        max_loras: int = 4,
    ) -> Limits:
        """Limits derived from a model's native size where not given: sides up to twice the native
        (128 for a 64-px model, 1024 for a 512-px one; the API's smallest side, 64, counts as native for
        smaller models), and as many pixels as two such images, or eight native ones.

        `model_steps`: the `max_steps` of the model's muse.json, which holds unless --max-steps says
        otherwise (left at 0, its default, it leaves the model's own limit in place)."""
        side = max_side or 2 * max(width, height, MIN_SIDE)
        from_model = bool(model_steps) and not max_steps
        steps = model_steps if from_model else max_steps or DEFAULT_MAX_STEPS
        return cls(side, max_pixels or 2 * side * side, steps, from_model, max_upload or DEFAULT_MAX_UPLOAD, max_loras)


@dataclass(frozen=True)
class Prompts:
    """What the page suggests: the prompt box's placeholder and a few prompts to try."""

    placeholder: str
    examples: tuple[str, ...] = ()


GENERIC_PROMPTS = Prompts(
    "a lighthouse on a cliff at dusk, oil painting",
    (
        "a lighthouse on a cliff at dusk, oil painting",
        "a red fox asleep in fresh snow, soft morning light",
        "a bowl of ramen on a wooden table, studio photograph",
    ),
)


@dataclass(frozen=True)
class Family:
    """What a pipeline class means for a request, from diffusers' own `__call__` defaults."""

    name: str  # sd, sdxl, flux, sd3; any other class is its own family, named by its class
    label: str  # for people
    guidance_scale: float
    steps: int
    negative_prompt: bool = True  # it has negative conditioning
    # Muse's samplers (muse.schedulers) are UNet noise-prediction schedulers; flow-matching families and
    # classes Muse does not know run only the scheduler stored with the model.
    own_sampler_only: bool = False
    uses_guidance: bool = True
    # The latent side the pipeline draws when its denoiser's config has no `sample_size` (FLUX's has none).
    default_sample_size: int | None = None
    # It can start from a picture (img2img, inpainting): on the step engine and in whole calls alike.
    image_inputs: bool = False
    takes_loras: bool = False  # LoRA adapters from --lora-dir


SD = Family("sd", "Stable Diffusion", FALLBACK_GUIDANCE, NATIVE_STEPS, image_inputs=True, takes_loras=True)
FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": SD,
    # Muse served SDXL at SD's guidance before it knew families; it still does (diffusers' own is 5.0).
    "StableDiffusionXLPipeline": Family(
        "sdxl", "Stable Diffusion XL", FALLBACK_GUIDANCE, NATIVE_STEPS, image_inputs=True, takes_loras=True
    ),
    "FluxPipeline": Family(
        "flux",
        "FLUX.1",
        3.5,
        28,
        negative_prompt=False,
        own_sampler_only=True,
        default_sample_size=128,
        image_inputs=True,
        takes_loras=True,
    ),
    "StableDiffusion3Pipeline": Family(
        "sd3", "Stable Diffusion 3", 7.0, 28, own_sampler_only=True, image_inputs=True, takes_loras=True
    ),
    "StableDiffusionInpaintPipeline": Family(
        "sd-inpaint",
        "Stable Diffusion inpainting",
        FALLBACK_GUIDANCE,
        NATIVE_STEPS,
        image_inputs=True,
        takes_loras=True,
    ),
}
# Families whose pipelines are flow matching: a picture's strength cuts their steps their own way
# (muse.messages.denoising_steps).
FLOW_FAMILIES = frozenset({"flux", "sd3"})
# A FluxPipeline whose transformer embeds no guidance (FLUX.1 schnell): guidance does nothing, 4 steps suffice.
SCHNELL = replace(FAMILIES["FluxPipeline"], label="FLUX.1 schnell", guidance_scale=0.0, steps=4, uses_guidance=False)


def family_of(pipeline: str, denoiser: Mapping[str, Any] | None) -> Family:
    """The family of a pipeline class ("" when unknown, e.g. a hub id: Stable Diffusion, as before)."""
    if not pipeline:
        return SD
    family = FAMILIES.get(pipeline)
    if family is None:
        # Whole calls, each with its batch's adapters on every row: a worker given --lora-dir boots only where
        # the diffusers class loads LoRAs (muse.worker.main.take_loras), and names what it cannot.
        return Family(pipeline, pipeline, FALLBACK_GUIDANCE, NATIVE_STEPS, own_sampler_only=True, takes_loras=True)
    # FluxTransformer2DModel's own default is no guidance embedding: a config without the key is schnell-shaped.
    if family.name == "flux" and denoiser is not None and not denoiser.get("guidance_embeds", False):
        return SCHNELL
    return family


@dataclass(frozen=True)
class ModelInfo:
    """The served model as the parent knows it (from `inspect`, then a ready worker's report of size and
    guidance): its defaults, what a request may ask of it, and what its cost limits allow."""

    name: str
    width: int
    height: int
    guidance_scale: float
    # The scheduler stored with the model, for image metadata and the sampler lists: its A1111 name for
    # Stable Diffusion ("" when Muse has none for it); for other families, which run only that one, its class.
    scheduler: str = ""
    limits: Limits | None = None  # None: derived from the native size
    family: str = "sd"
    pipeline: str = ""  # model_index.json's _class_name ("" when unknown)
    label: str = SD.label  # the family for people: "FLUX.1 schnell"
    steps: int = NATIVE_STEPS  # "fast"
    quality_steps: int = 2 * NATIVE_STEPS  # "quality"
    max_steps: int = 0  # muse.json's own limit (0: none; --max-steps then)
    negative_prompt: bool = True
    uses_guidance: bool = True
    image_inputs: bool = True  # it takes init_image / mask_image
    takes_loras: bool = True  # its family loads LoRA adapters
    # The LoRA adapters requests may name now (--lora-dir), None without a folder or for a family that takes none.
    loras: tuple[str, ...] | None = None
    # Sampler names a request may pick besides the model's own (which "" or "default" asks for).
    samplers: tuple[str, ...] = tuple(SCHEDULERS)
    prompts: Prompts = field(default=GENERIC_PROMPTS)

    @property
    def flow_matching(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def cost_limits(self) -> Limits:
        return self.limits or Limits.around(self.width, self.height, model_steps=self.max_steps)

    def cost(self, width: int, height: int, steps: int, n: int) -> float:
        """A request's cost in native-size, 25-step images (what --rate-limit counts), never under FLOOR_STEPS."""
        return n * (width * height) / (self.width * self.height) * max(steps, FLOOR_STEPS) / NATIVE_STEPS

    def steps_for(self, quality: str) -> int:
        """The steps of a quality preset: "fast" is the model's default, "quality" more."""
        return self.quality_steps if quality == "quality" else self.steps

    def sampler(self, name: str | None) -> str | None:
        """What a request's sampler name means here: a name of `samplers`, "" for the model's own (asked for
        by "", "default", or the own scheduler's name), or None when this model cannot run it."""
        if name is None or not name.strip() or name.strip().lower() == "default":
            return ""
        if self.scheduler and name.strip().lower() == self.scheduler.lower() and self.scheduler not in self.samplers:
            return ""
        known = canonical(name)
        if known and not self.samplers and SCHEDULERS[known] == self.scheduler:
            return ""  # the own scheduler by its A1111 name
        return known if known in self.samplers else None


def native_size(
    denoiser: Mapping[str, Any] | None, vae_scale: int, default_sample: int | None = None
) -> tuple[int, int]:
    """(width, height) a pipeline draws by default: its denoiser's `sample_size` (a UNet's or a transformer's
    config, an int or [h, w]) times the VAE's scale; else the pipeline's `default_sample` (FluxPipeline's 128)
    times it; else Stable Diffusion's 512."""
    sample = (denoiser or {}).get("sample_size") or default_sample
    if sample is None:
        return FALLBACK_SIZE, FALLBACK_SIZE
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return int(w * vae_scale), int(h * vae_scale)


def default_guidance(model: str) -> float:
    """The guidance a model serves by default: its `muse.json`'s, else its family's."""
    folder = Path(model)
    index = _read_json(folder / "model_index.json") or {}
    family = family_of(str(index.get("_class_name") or ""), _denoiser(folder))
    return float(read_defaults(model).get("guidance_scale", family.guidance_scale))


def read_defaults(model: str) -> dict[str, Any]:
    """The optional `muse.json` beside `model_index.json`: serving defaults stored with a model.

    Keys: guidance_scale, num_inference_steps (the "fast" steps), quality_steps, max_steps, width, height,
    negative_prompt (false: refuse one), prompts ({"placeholder": "…", "examples": ["…", …]})."""
    path = Path(model) / "muse.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _denoiser(folder: Path) -> dict[str, Any] | None:
    return _read_json(folder / "unet" / "config.json") or _read_json(folder / "transformer" / "config.json")


def model_name(model: str, embedded: str) -> str:
    if Path(model).resolve() == Path(embedded).resolve():
        return EMBEDDED_NAME
    path = Path(model)
    return path.name if path.is_dir() else model


def local_folder(model: str) -> Path:
    """The folder to read: `model` itself, or a hub id's snapshot where a worker has already fetched it into the
    user's cache (the parent never downloads; before the first fetch a hub id reads as an empty folder)."""
    folder = Path(model).expanduser()
    if folder.is_dir() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return folder


def inspect(model: str, embedded: str) -> ModelInfo:
    folder = local_folder(model)
    index = _read_json(folder / "model_index.json") or {}
    pipeline = str(index.get("_class_name") or "")
    denoiser = _denoiser(folder)
    family = family_of(pipeline, denoiser)
    vae = _read_json(folder / "vae" / "config.json")
    # diffusers' own rule: the VAE halves the size at every block but the last.
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1) if vae else 8
    width, height = native_size(denoiser if vae else None, scale, family.default_sample_size if vae else None)
    own = stored_scheduler_class(folder)
    scheduler = stored_scheduler(folder) if not family.own_sampler_only else own
    info = ModelInfo(
        model_name(model, embedded),
        width,
        height,
        family.guidance_scale,
        scheduler,
        family=family.name,
        pipeline=pipeline,
        label=family.label,
        steps=family.steps,
        quality_steps=2 * family.steps,
        negative_prompt=family.negative_prompt,
        uses_guidance=family.uses_guidance,
        image_inputs=family.image_inputs,
        takes_loras=family.takes_loras,
        samplers=() if family.own_sampler_only else tuple(SCHEDULERS),
    )
    return with_defaults(info, read_defaults(str(folder)))


def with_defaults(info: ModelInfo, defaults: Mapping[str, Any]) -> ModelInfo:
    """`info` with what a muse.json says; a value of the wrong kind is an error naming it."""

    def number(key: str, kind: type[int] | type[float], least: float) -> Any:
        value = defaults.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < least:
            raise ValueError(f"muse.json: {key} must be a number of at least {least:g}, not {value!r}")
        if kind is int and value != int(value):
            raise ValueError(f"muse.json: {key} must be a whole number, not {value!r}")
        return kind(value)

    steps = number("num_inference_steps", int, 1)
    max_steps = number("max_steps", int, 1)
    changes: dict[str, Any] = {
        "guidance_scale": number("guidance_scale", float, 0),
        "width": number("width", int, 8),
        "height": number("height", int, 8),
        "steps": steps,
        "quality_steps": number("quality_steps", int, 1) or (2 * steps if steps else None),
        "max_steps": max_steps,
    }
    negative = defaults.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, bool):
            raise ValueError(f"muse.json: negative_prompt must be true or false, not {negative!r}")
        changes["negative_prompt"] = negative
    if "prompts" in defaults:
        changes["prompts"] = read_prompts(defaults["prompts"])
    info = replace(info, **{k: v for k, v in changes.items() if v is not None})
    if info.max_steps:
        # A preset never asks for more than the model allows.
        info = replace(
            info, steps=min(info.steps, info.max_steps), quality_steps=min(info.quality_steps, info.max_steps)
        )
    return info


def read_prompts(value: Any) -> Prompts:
    placeholder = value.get("placeholder") if isinstance(value, dict) else None
    examples = value.get("examples", []) if isinstance(value, dict) else None
    if (
        not isinstance(placeholder, str)
        or not isinstance(examples, list)
        or not all(isinstance(e, str) and e.strip() for e in examples)
    ):
        raise ValueError('muse.json: prompts must be {"placeholder": "…", "examples": ["…", …]}')
    return Prompts(placeholder, tuple(examples))


def stored_scheduler_class(folder: Path) -> str:
    """The class name of the scheduler `model_index.json` names ("" if it names none)."""
    index = _read_json(folder / "model_index.json") or {}
    entry = index.get("scheduler")
    return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[1] else ""


def stored_scheduler(folder: Path) -> str:
    """The A1111 name of the scheduler class `model_index.json` names, or "" if Muse has no name for it."""
    cls = stored_scheduler_class(folder)
    return next((name for name, known in SCHEDULERS.items() if known == cls), "")
