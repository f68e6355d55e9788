"""Stable Diffusion 3.x on the step engine: a joint-attention transformer over CLIP-L, CLIP-G and T5 text
(pooled projections per row), classifier-free guidance rows as SD's, a flow-matching schedule (shifted by
the image's size only when the scheduler asks for dynamic shifting, as StableDiffusion3Pipeline does), and
pictures started as its img2img and inpaint pipelines start them (muse.worker.families.flow.FlowPictures)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from muse.worker.families.base import Conditioning, VaeDecode, guided_rows
from muse.worker.families.flow import FlowPictures, decode_flow, is_flow, shift
from muse.worker.families.negatives import NegativeCache, Parts, encode_prompts
from muse.worker.slots import SlotRequest

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


class SD3Family(FlowPictures):
    name = "sd3"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.device = pipe._execution_device
        self.negatives = NegativeCache()

    @staticmethod
    def knows(pipe: Any) -> bool:
        return (
            type(pipe).__name__ == "StableDiffusion3Pipeline"
            and getattr(pipe, "transformer", None) is not None
            and is_flow(pipe)
        )

    def encode(self, requests: list[SlotRequest]) -> list[Conditioning]:
        conditioning = []
        for positive, negative in encode_prompts(self.negatives, requests, self._encode_prompts):
            guided = negative is not None
            negative = negative or positive  # an unguided image has no negative rows
            rows = {
                "encoder_hidden_states": guided_rows(negative[0], positive[0], guided),
                "pooled_projections": guided_rows(negative[1], positive[1], guided),
            }
            conditioning.append(Conditioning(rows, guided))
        return conditioning

    def _encode_prompts(self, prompts: list[str], negatives: list[str] | None) -> tuple[Parts, Parts | None]:
        guided = negatives is not None
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negatives, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
        return (embeds, pooled), ((negative, negative_pooled) if guided else None)

    def _latent_size(self, width: int, height: int) -> tuple[int, int]:
        scale = self.pipe.vae_scale_factor
        return height // scale, width // scale

    def schedule(self, scheduler: Any, request: SlotRequest) -> None:
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting"):
            patch = self.pipe.transformer.config.patch_size
            height, width = self._latent_size(request.width, request.height)
            kwargs["mu"] = shift(scheduler, (height // patch) * (width // patch), 1.16)
        scheduler.set_timesteps(request.steps, device=self.device, **kwargs)

    def noise(self, request: SlotRequest, scheduler: Any, generator: torch.Generator, dtype: Any) -> torch.Tensor:
        shape = (1, self.pipe.transformer.config.in_channels, *self._latent_size(request.width, request.height))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

    def predict(
        self,
        model: Any,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        rows: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> torch.Tensor:
        return model(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=rows["encoder_hidden_states"],
            pooled_projections=rows["pooled_projections"],
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor, size: tuple[int, int], vae_decode: VaeDecode) -> torch.Tensor:
        return decode_flow(self.pipe, latents, vae_decode)
