"""What the step engine needs of one pipeline family, behind one small interface (the registry of families
is the package, muse.worker.families).

The engine (muse.worker.engine) knows slots, rows, guidance and samplers; a family knows its pipeline:
how prompts become conditioning rows, what the starting noise looks like (or the starting latents, for an
image that starts from a picture), how its scheduler is set up for an image, how its denoiser is called over
many rows (one timestep per row), and how latents become pixels. Each is written from the pipeline's own
`__call__`, so a slot gives the pixels `pipe(...)` gives.

Families on the step engine: SD 1.x/2.x and SDXL (UNet, muse.worker.families.sd), FLUX.1 and SD3.x
(transformers with flow matching, muse.worker.families.flux and .sd3). Any other pipeline runs whole calls.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from muse.worker.slots import SlotRequest

# The VAE's decode of (n, C, h, w) latents to (n, 3, H, W) in [-1, 1]: the pipeline's, or its compiled twin.
VaeDecode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conditioning:
    """One image's conditioning: each tensor has one row per model row of the image, the negative
    (unconditional) row first when the image is guided (classifier-free guidance doubles its rows)."""

    rows: dict[str, torch.Tensor]
    guided: bool


def guided_rows(negative: torch.Tensor, positive: torch.Tensor, guided: bool) -> torch.Tensor:
    """An image's rows of one conditioning tensor: the negative row, then the positive, when guided."""
    return torch.cat([negative, positive]) if guided else positive


@dataclass(eq=False)
class Blend:
    """Inpainting with a standard denoiser, as diffusers' inpaint pipelines do it: after each step, where the
    mask is black the latents are the picture's own, noised to the next timestep (exactly the picture's after
    the last step). This one noises as the UNet pipelines do (`add_noise`); flow matching's twin is
    muse.worker.families.flow.FlowBlend."""

    mask: torch.Tensor  # laid out like the latents (SD's (1, 1, h, w)): 1 = repaint
    image_latents: torch.Tensor
    noise: torch.Tensor

    def apply(self, scheduler: Any, latents: torch.Tensor, next_timestep: Any | None) -> torch.Tensor:
        kept = self.image_latents if next_timestep is None else self.noised(scheduler, next_timestep)
        return (1 - self.mask) * kept + self.mask * latents

    def noised(self, scheduler: Any, timestep: Any) -> torch.Tensor:
        """The picture's latents noised to `timestep`."""
        return scheduler.add_noise(self.image_latents, self.noise, torch.tensor([timestep]))


@dataclass(eq=False)
class Start:
    """Where an image that starts from a picture begins: its latents at its first timestep, and for
    inpainting the blend applied after every step."""

    latents: torch.Tensor
    blend: Blend | None = None


class Family(Protocol):
    name: str
    denoiser: torch.nn.Module  # called once per step over every slot's rows
    takes_images: bool  # whether `start` can begin an image from a picture (img2img, inpainting)

    def encode(self, requests: list[SlotRequest]) -> list[Conditioning]:
        """Conditioning for each request, their prompts encoded together."""
        ...

    def schedule(self, scheduler: Any, request: SlotRequest) -> None:
        """Set the image's own scheduler instance up as the pipeline sets up its scheduler."""
        ...

    def noise(self, request: SlotRequest, scheduler: Any, generator: torch.Generator, dtype: Any) -> torch.Tensor:
        """The image's starting latents, `(1, …)`: the draws `prepare_latents` makes from its generator."""
        ...

    def denoising_steps(self, steps: int, strength: float) -> int:
        """The steps an image starting from a picture runs, as the family's img2img pipelines cut them by the
        strength (muse.messages.denoising_steps)."""
        ...

    def start(
        self, request: SlotRequest, scheduler: Any, first_timestep: Any, generator: torch.Generator, dtype: Any
    ) -> Start:
        """For a request with a source picture: its starting latents at `first_timestep` (the scheduler's
        timesteps already cut to the steps it runs), with the generator's draws in the pipeline's order."""
        ...

    def extra_inputs(self, request: SlotRequest, generator: torch.Generator, dtype: Any) -> dict[str, torch.Tensor]:
        """What the denoiser takes beside the latents for this image, one row each (a 9-channel inpainting UNet's
        mask and masked picture), drawn after its starting latents; {} for most families."""
        ...

    def predict(
        self,
        model: Any,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        rows: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> torch.Tensor:
        """The denoiser's output for every row: `timestep` is float32, one per row, as the scheduler lists
        them; `rows` the conditioning laid out like `sample`; `size` the images' (width, height)."""
        ...

    def decode(self, latents: torch.Tensor, size: tuple[int, int], vae_decode: VaeDecode) -> torch.Tensor:
        """Finished latents to the image processor's denormalised `(n, C, H, W)` tensor in [0, 1]."""
        ...


def mask_processor(scale: int) -> VaeImageProcessor:
    """What the inpaint pipelines make of a mask: grayscale in [0, 1], then 0 or 1, at a multiple of `scale`
    (their image processor's)."""
    return VaeImageProcessor(vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def source_picture(processor: VaeImageProcessor, request: SlotRequest) -> torch.Tensor:
    """The request's picture as the pipelines preprocess it: (1, 3, H, W) float32 in [-1, 1], on the CPU."""
    assert request.source is not None
    image = Image.open(io.BytesIO(request.source.image)).convert("RGB")
    return processor.preprocess(image, height=request.height, width=request.width)


def source_mask(processor: VaeImageProcessor, request: SlotRequest) -> torch.Tensor:
    """The request's mask as `mask_processor` makes it: (1, 1, H, W) float32, 1 = repaint, on the CPU."""
    assert request.source is not None and request.source.mask is not None
    return processor.preprocess(Image.open(io.BytesIO(request.source.mask)), height=request.height, width=request.width)
