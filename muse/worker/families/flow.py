"""What the flow-matching transformer families (FLUX.1, SD3.x) share: the shift of the sigma schedule with
the image's size, the VAE's shifted latent space, and starting an image from a picture as their img2img and
inpaint pipelines do (FluxImg2ImgPipeline, FluxInpaintPipeline, StableDiffusion3Img2ImgPipeline,
StableDiffusion3InpaintPipeline with a 16-channel transformer)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from muse.messages import denoising_steps
from muse.worker.families.base import Blend, Start, VaeDecode, mask_processor, source_mask, source_picture
from muse.worker.slots import SlotRequest

FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}


def is_flow(pipe: Any) -> bool:
    """Whether the pipeline's scheduler is the flow-matching one its family's step is written for."""
    return type(getattr(pipe, "scheduler", None)).__name__ in FLOW_SCHEDULERS


def shift(scheduler: Any, image_tokens: int, max_shift: float) -> float:
    """`mu`: how far the schedule shifts toward noise for an image of this many tokens (dynamic shifting),
    with the pipeline's own defaults where the scheduler's config says nothing."""
    config = scheduler.config
    return float(
        calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift),
        )
    )


def decode_flow(pipe: Any, latents: torch.Tensor, vae_decode: VaeDecode) -> torch.Tensor:
    """Unscaled, unshifted latents through the VAE, then the image processor's denormalising."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return pipe.image_processor.postprocess(vae_decode(latents), output_type="pt")


@dataclass(eq=False)
class FlowBlend(Blend):
    """Inpainting as the flow-matching inpaint pipelines blend: the picture's latents noised by the scheduler's
    `scale_noise` to the next timestep, `sigma * noise + (1 - sigma) * picture`. The pipelines' scheduler
    knows that sigma by its step index; a slot's scheduler may never be stepped (its per-row twin steps it,
    muse.worker.samplers), so the sigma is found by the timestep instead."""

    def noised(self, scheduler: Any, timestep: Any) -> torch.Tensor:
        sigmas = scheduler.sigmas.to(device=self.image_latents.device, dtype=self.image_latents.dtype)
        sigma = sigmas[scheduler.index_for_timestep(timestep)]
        return sigma * self.noise + (1.0 - sigma) * self.image_latents


class FlowPictures(ABC):
    """Starting an image from a picture as a flow-matching family's img2img and inpaint pipelines do (the family
    gives its `pipe`, `device`, latent size and the transformer's layout, `pack`), with the generator's draws
    in their order: the picture's latents (a sample of the VAE's, shifted and scaled), then noise of the
    latents' shape. The start is their mix by `scale_noise` at the first timestep the strength leaves (at full
    strength the noise itself: the schedule's first sigma is 1). Inpainting keeps both, to blend the picture
    back where the mask is black after every step (FlowBlend).

    The inpaint pipelines then draw once more, for the masked picture's latents, which a 16-channel
    transformer never reads; nothing draws from the generator after that (they pass none to the scheduler's
    step), so that VAE encode is left out."""

    pipe: Any
    device: Any
    takes_images = True

    @abstractmethod
    def _latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of an image's latents before packing."""

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) latents as the transformer takes them: as they are, unless the family packs them."""
        return latents

    def denoising_steps(self, steps: int, strength: float) -> int:
        return denoising_steps(steps, strength, flow=True)

    def extra_inputs(self, request: SlotRequest, generator: torch.Generator, dtype: Any) -> dict[str, torch.Tensor]:
        return {}

    def start(
        self, request: SlotRequest, scheduler: Any, first_timestep: Any, generator: torch.Generator, dtype: Any
    ) -> Start:
        source = request.source
        assert source is not None
        picture = source_picture(self.pipe.image_processor, request).to(device=self.device, dtype=dtype)
        image_latents = self._encode(picture, generator)
        shape = (1, self.pipe.vae.config.latent_channels, *self._latent_size(request.width, request.height))
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        latents = self.pack(scheduler.scale_noise(image_latents, first_timestep, noise))
        if source.mask is None:
            return Start(latents)
        mask = self._latent_mask(request, shape, dtype)
        return Start(latents, FlowBlend(mask, self.pack(image_latents), self.pack(noise)))

    def _encode(self, picture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The VAE's latents for a picture in [-1, 1] (a sample, drawn from the generator), shifted and scaled
        as the pipelines' `_encode_vae_image` does."""
        config = self.pipe.vae.config
        latents = retrieve_latents(self.pipe.vae.encode(picture), generator=generator)
        return (latents - config.shift_factor) * config.scaling_factor

    def _latent_mask(self, request: SlotRequest, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
        """The mask at the latents' size and layout (1 = repaint), as the pipelines' `prepare_mask_latents`
        make it: their mask processor works at their image processor's multiple."""
        mask = torch.nn.functional.interpolate(source_mask(self.masks, request), size=shape[2:])
        mask = mask.to(device=self.device, dtype=dtype)
        return self.pack(mask.repeat(1, shape[1], 1, 1))

    @cached_property
    def masks(self) -> VaeImageProcessor:
        """The inpaint pipeline's mask processor: at its image processor's multiple (FLUX's is twice the VAE's)."""
        return mask_processor(self.pipe.image_processor.config.vae_scale_factor)
