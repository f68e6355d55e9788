"""FLUX.1 on the step engine: packed latents (2x2 patches as tokens, with their image ids), one transformer
call over every slot's rows with its own timestep and, for guidance-distilled models (dev), its own
embedded guidance; no classifier-free guidance rows (a negative prompt is refused before it gets here).
Each slot's flow-matching schedule is shifted by its image's size (`mu`), as FluxPipeline does (and its
img2img and inpaint pipelines, whose start from a picture is muse.worker.families.flow.FlowPictures)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from muse.worker.families.base import Conditioning, VaeDecode
from muse.worker.families.flow import FlowPictures, decode_flow, is_flow, shift
from muse.worker.slots import SlotRequest

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length


class FluxFamily(FlowPictures):
    name = "flux"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.device = pipe._execution_device
        self.embeds_guidance = bool(pipe.transformer.config.guidance_embeds)
        self.channels = pipe.transformer.config.in_channels // 4
        self.text_ids: torch.Tensor | None = None  # the same for every prompt: its length is fixed
        self._image_ids: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def knows(pipe: Any) -> bool:
        has_transformer = getattr(pipe, "transformer", None) is not None
        return type(pipe).__name__ == "FluxPipeline" and has_transformer and is_flow(pipe)

    def encode(self, requests: list[SlotRequest]) -> list[Conditioning]:
        embeds, pooled, self.text_ids = self.pipe.encode_prompt(
            prompt=[r.prompt for r in requests], prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
        conditioning = []
        for i, request in enumerate(requests):
            rows = {"encoder_hidden_states": embeds[i : i + 1], "pooled_projections": pooled[i : i + 1]}
            if self.embeds_guidance:
                rows["guidance"] = torch.full([1], request.guidance_scale, device=self.device, dtype=torch.float32)
            conditioning.append(Conditioning(rows, guided=False))
        return conditioning

    def _latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the unpacked latents: even, as packing needs."""
        scale = self.pipe.vae_scale_factor
        return 2 * (height // (scale * 2)), 2 * (width // (scale * 2))

    def schedule(self, scheduler: Any, request: SlotRequest) -> None:
        steps = request.steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        height, width = self._latent_size(request.width, request.height)
        mu = shift(scheduler, (height // 2) * (width // 2), 1.15)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)

    def noise(self, request: SlotRequest, scheduler: Any, generator: torch.Generator, dtype: Any) -> torch.Tensor:
        height, width = self._latent_size(request.width, request.height)
        latents = randn_tensor((1, self.channels, height, width), generator=generator, device=self.device, dtype=dtype)
        return self.pack(latents)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) latents as 2x2 patches, (1, h/2 * w/2, 4C): FluxPipeline's `_pack_latents`."""
        _, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, 1, channels, height, width)

    def _ids(self, size: tuple[int, int], dtype: Any) -> torch.Tensor:
        if size not in self._image_ids:
            h, w = self._latent_size(*size)
            self._image_ids[size] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, dtype)
        return self._image_ids[size]

    def predict(
        self,
        model: Any,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        rows: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> torch.Tensor:
        # As FluxPipeline: the timestep in the latents' dtype, then divided (the transformer scales it back).
        return model(
            hidden_states=sample,
            timestep=timestep.to(sample.dtype) / 1000,
            guidance=rows.get("guidance"),
            pooled_projections=rows["pooled_projections"],
            encoder_hidden_states=rows["encoder_hidden_states"],
            txt_ids=self.text_ids,
            img_ids=self._ids(size, rows["encoder_hidden_states"].dtype),
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor, size: tuple[int, int], vae_decode: VaeDecode) -> torch.Tensor:
        width, height = size
        latents = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        return decode_flow(self.pipe, latents, vae_decode)
