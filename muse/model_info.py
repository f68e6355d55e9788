"""What the parent needs to know about a model folder before any worker has loaded it.

Reads diffusers' JSON configs only (no torch), so defaults are known even when scaled to zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muse.schedulers import SCHEDULERS

EMBEDDED_NAME = "muse-demo"
# Stable Diffusion's own defaults, used when the folder says nothing (e.g. a hub id).
FALLBACK_SIZE = 512
FALLBACK_GUIDANCE = 7.5
DEFAULT_MAX_STEPS = 150
MIN_SIDE = 64
NATIVE_STEPS = 25  # a "fast" image: the unit of cost
# Text encoding, decoding, PNG and storage cost the same per image whatever its steps: 100 one-step images took
# as long as 10 native ones, so an image costs about its steps + 1.7 (a native one 26.7). Charging no fewer than
# 5 steps covers short runs (a 1-step image pays twice its cost, a 4-step one about its cost); from 5 steps on,
# the proportional charge falls short by a fifth at most.
FLOOR_STEPS = 5


@dataclass(frozen=True)
class Limits:
    """What one request may cost, checked before it is queued: a request over them is a 422."""

    max_side: int  # pixels, width and height each
    max_pixels: int  # width x height x n
    max_steps: int

    @classmethod
    def around(cls, width: int, height: int, *, max_side: int = 0, max_pixels: int = 0, max_steps: int = 0) -> Limits:
        """Limits derived from a model's native size where not given: sides up to twice the native
        (128 for a 64-px model, 1024 for a 512-px one; the API's smallest side, 64, counts as native for
        smaller models), and as many pixels as two such images, or eight native ones."""
        side = max_side or 2 * max(width, height, MIN_SIDE)
        return cls(side, max_pixels or 2 * side * side, max_steps or DEFAULT_MAX_STEPS)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    width: int
    height: int
    guidance_scale: float
    # The A1111 name of the scheduler stored with the model ("" when unknown), for image metadata.
    scheduler: str = ""
    limits: Limits | None = None  # None: derived from the native size

    @property
    def cost_limits(self) -> Limits:
        return self.limits or Limits.around(self.width, self.height)

    def cost(self, width: int, height: int, steps: int, n: int) -> float:
        """A request's cost in native-size, 25-step images (what --rate-limit counts), never under FLOOR_STEPS."""
        return n * (width * height) / (self.width * self.height) * max(steps, FLOOR_STEPS) / NATIVE_STEPS


def native_size(denoiser: Mapping[str, Any] | None, vae_scale: int) -> tuple[int, int]:
    """(width, height) a pipeline draws by default: its denoiser's `sample_size` (a UNet's or a transformer's
    config, an int or [h, w]) times the VAE's scale; Stable Diffusion's 512 when the config does not say."""
    sample = (denoiser or {}).get("sample_size")
    if sample is None:
        return FALLBACK_SIZE, FALLBACK_SIZE
    h, w = (sample, sample) if isinstance(sample, int) else sample
    return int(w * vae_scale), int(h * vae_scale)


def default_guidance(model: str) -> float:
    """The guidance a model serves by default: its `muse.json`'s, else Stable Diffusion's."""
    return float(read_defaults(model).get("guidance_scale", FALLBACK_GUIDANCE))


def read_defaults(model: str) -> dict[str, Any]:
    """The optional `muse.json` beside `model_index.json`: serving defaults stored with a model."""
    path = Path(model) / "muse.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def model_name(model: str, embedded: str) -> str:
    if Path(model).resolve() == Path(embedded).resolve():
        return EMBEDDED_NAME
    path = Path(model)
    return path.name if path.is_dir() else model


def inspect(model: str, embedded: str) -> ModelInfo:
    folder = Path(model)
    denoiser = _read_json(folder / "unet" / "config.json") or _read_json(folder / "transformer" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    # diffusers' own rule: the VAE halves the size at every block but the last.
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1) if vae else 8
    width, height = native_size(denoiser if vae else None, scale)
    return ModelInfo(model_name(model, embedded), width, height, default_guidance(model), stored_scheduler(folder))


def stored_scheduler(folder: Path) -> str:
    """The A1111 name of the scheduler class `model_index.json` names, or "" if Muse has no name for it."""
    index = _read_json(folder / "model_index.json") or {}
    entry = index.get("scheduler")
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    return next((name for name, known in SCHEDULERS.items() if known == cls), "")
