"""Worker side: load a diffusers pipeline on one device and run batches of it.

Nothing here knows about asyncio or HTTP; it runs inside a worker subprocess.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from muse.messages import Assignment, BatchKey, ImageSpec
from muse.model_info import default_guidance, native_size
from muse.schedulers import SCHEDULERS


@dataclass
class LoadedPipeline:
    pipe: Any
    model: str
    device: str
    width: int
    height: int
    guidance_scale: float
    schedulers: dict[str, Any] = field(default_factory=dict)
    # Never-used instances to copy: `from_config` costs ~1 ms (it inspects signatures), a copy ~0.1 ms,
    # and the step engine makes one scheduler per image.
    _pristine: dict[str, Any] = field(default_factory=dict, repr=False)

    def new_scheduler(self, name: str) -> Any:
        """A new instance of the named scheduler ("" = the model's own) from the model's scheduler config."""
        if name not in self._pristine:
            import diffusers

            base = self.schedulers[""]
            cls = type(base) if not name else getattr(diffusers, SCHEDULERS[name])
            self._pristine[name] = cls.from_config(base.config)
        return copy.deepcopy(self._pristine[name])

    def use_scheduler(self, name: str) -> None:
        """Swap in the named scheduler, built once."""
        if name not in self.schedulers:
            self.schedulers[name] = self.new_scheduler(name)
        self.pipe.scheduler = self.schedulers[name]


def load_pipeline(model: str, device: str) -> LoadedPipeline:
    # Half precision on GPUs; on CPU the checkpoint's float32 as saved.
    kwargs = {"torch_dtype": torch.float16} if device.startswith("cuda") else {}
    pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # The denoiser is a UNet (SD, SDXL) or a transformer (FLUX, SD3, …): whichever the pipeline has.
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    width, height = native_size(None if denoiser is None else denoiser.config, getattr(pipe, "vae_scale_factor", 8))
    guidance = default_guidance(model)
    return LoadedPipeline(pipe, model, device, width, height, guidance, {"": pipe.scheduler})


def warm_up(loaded: LoadedPipeline) -> None:
    """One tiny call so the first real request does not pay for lazy initialisation."""
    key = BatchKey(loaded.width, loaded.height, 1, loaded.guidance_scale)
    run_batch(loaded, Assignment("warm-up", [ImageSpec("warm up", "", 0)], key), lambda step: True)


def run_batch(loaded: LoadedPipeline, batch: Assignment, on_step: Callable[[int], bool]) -> list[bytes] | None:
    """Run one batch; `on_step(step)` is called after each denoising step and returns False to stop.

    Returns PNG bytes per image, or None when interrupted.
    """
    # CPU generators, one per image: the same seed gives the same latents on any device and
    # whatever else shares the batch.
    key = batch.key
    loaded.use_scheduler(key.scheduler)
    generators = [torch.Generator(device="cpu").manual_seed(spec.seed) for spec in batch.images]
    interrupted = False

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal interrupted
        if not on_step(step + 1):
            interrupted = True
            pipe._interrupt = True
        return kwargs

    with torch.inference_mode():
        output = loaded.pipe(
            prompt=[spec.prompt for spec in batch.images],
            negative_prompt=[spec.negative_prompt for spec in batch.images],
            num_inference_steps=key.steps,
            guidance_scale=key.guidance_scale,
            width=key.width,
            height=key.height,
            generator=generators,
            callback_on_step_end=callback,
        )
    if interrupted:
        return None
    return [encode_png(image) for image in output.images]


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
