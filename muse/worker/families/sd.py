"""Stable Diffusion 1.x/2.x and SDXL on the step engine: a UNet with classifier-free guidance; SDXL's UNet
also takes the pooled text embeddings and the size conditioning per row."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from muse.messages import denoising_steps
from muse.worker.families.base import (
    Blend,
    Conditioning,
    Start,
    VaeDecode,
    guided_rows,
    mask_processor,
    source_mask,
    source_picture,
)
from muse.worker.families.negatives import NegativeCache, Parts, encode_prompts
from muse.worker.slots import SlotRequest

# Pipeline class -> the UNet's extra conditioning it needs (addition_embed_type).
PIPELINES = {
    "StableDiffusionPipeline": None,
    "StableDiffusionXLPipeline": "text_time",
    # An inpainting checkpoint: a 9-channel UNet (latents, mask, masked picture), which draws from text too.
    "StableDiffusionInpaintPipeline": None,
}


class StableDiffusionFamily:
    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.xl = type(pipe).__name__ == "StableDiffusionXLPipeline"
        self.name = "sdxl" if self.xl else "sd"
        self.denoiser = pipe.unet
        self.device = pipe._execution_device
        self.inpainting = pipe.unet.config.in_channels == 9
        self.latent_channels = pipe.vae.config.latent_channels if self.inpainting else pipe.unet.config.in_channels
        self.takes_images = True
        self.masks = mask_processor(pipe.vae_scale_factor)  # StableDiffusionInpaintPipeline's
        self.negatives = NegativeCache()
        # An empty negative prompt is "none": where the checkpoint says so (SDXL's), its rows are zeros, as
        # `pipe(prompt)` makes them, not the empty text's embeddings.
        self.zeros_for_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

    @staticmethod
    def knows(pipe: Any) -> bool:
        name = type(pipe).__name__
        unet = getattr(pipe, "unet", None)
        return (
            name in PIPELINES
            and unet is not None
            and unet.config.get("time_cond_proj_dim") is None
            and unet.config.get("addition_embed_type") == PIPELINES[name]
        )

    def encode(self, requests: list[SlotRequest]) -> list[Conditioning]:
        conditioning = []
        for request, (positive, negative) in zip(
            requests, encode_prompts(self.negatives, requests, self._encode_prompts), strict=True
        ):
            guided = negative is not None
            if guided and self.zeros_for_empty and not request.negative_prompt:
                negative = tuple(torch.zeros_like(part) for part in positive)
            negative = negative or positive  # an unguided image has no negative rows
            rows = {"encoder_hidden_states": guided_rows(negative[0], positive[0], guided)}
            if self.xl:
                rows |= self._size_conditioning(request, positive[1], negative[1], guided)
            conditioning.append(Conditioning(rows, guided))
        return conditioning

    def _encode_prompts(self, prompts: list[str], negatives: list[str] | None) -> tuple[Parts, Parts | None]:
        """The pipeline's `encode_prompt`: embeddings (and SDXL's pooled embeddings) of the prompts, and of the
        negative prompts unless None."""
        pipe, device, guided = self.pipe, self.device, negatives is not None
        if self.xl:
            positive, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=negatives,
            )  # fmt: skip
            return (positive, pooled), ((negative, negative_pooled) if guided else None)
        positive, negative = pipe.encode_prompt(prompts, device, 1, guided, negatives)
        return (positive,), ((negative,) if guided else None)

    def _size_conditioning(
        self, request: SlotRequest, pooled: torch.Tensor, negative_pooled: torch.Tensor, guided: bool
    ) -> dict[str, torch.Tensor]:
        """SDXL's added conditioning for one image: pooled text embeddings and the size ids the pipeline
        makes by default (original and target size = the image's, no crop)."""
        pipe = self.pipe
        size = (request.height, request.width)
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=projection
        ).to(pooled.device)
        pooled_rows = guided_rows(negative_pooled, pooled, guided)
        return {"text_embeds": pooled_rows, "time_ids": guided_rows(time_ids, time_ids, guided)}

    def schedule(self, scheduler: Any, request: SlotRequest) -> None:
        scheduler.set_timesteps(request.steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def noise(self, request: SlotRequest, scheduler: Any, generator: torch.Generator, dtype: Any) -> torch.Tensor:
        """The generator's draws as `prepare_latents` makes them, scaled by the image's own scheduler (the
        pipeline's would scale by its own scheduler's init_noise_sigma)."""
        pipe = self.pipe
        scale = pipe.vae_scale_factor
        shape = (1, self.latent_channels, request.height // scale, request.width // scale)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype) * scheduler.init_noise_sigma

    def denoising_steps(self, steps: int, strength: float) -> int:
        return denoising_steps(steps, strength)

    def start(
        self, request: SlotRequest, scheduler: Any, first_timestep: Any, generator: torch.Generator, dtype: Any
    ) -> Start:
        """As StableDiffusionImg2ImgPipeline (no mask) or StableDiffusionInpaintPipeline with a 4-channel UNet
        (a mask) prepare their latents, with the generator's draws in their order: the picture's latents, the
        noise, then (inpainting) the masked picture's latents, drawn though a 4-channel UNet never reads them."""
        source = request.source
        assert source is not None and self.takes_images
        pipe = self.pipe
        picture = self._picture(request, dtype)
        if self.inpainting:
            return self._start_inpainting(request, scheduler, first_timestep, generator, dtype, picture)
        image_latents = self._encode(picture, generator, statistics=source.mask is None)
        noise = randn_tensor(image_latents.shape, generator=generator, device=self.device, dtype=dtype)
        if source.mask is None:
            return Start(scheduler.add_noise(image_latents, noise, first_timestep))
        if source.strength == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, first_timestep)
        mask = source_mask(self.masks, request)
        self._encode(picture * (mask < 0.5).to(picture.dtype), generator)  # its draws only (see above)
        scale = pipe.vae_scale_factor
        mask = torch.nn.functional.interpolate(mask, size=(request.height // scale, request.width // scale))
        return Start(latents, Blend(mask.to(device=self.device, dtype=dtype), image_latents, noise))

    def _start_inpainting(
        self,
        request: SlotRequest,
        scheduler: Any,
        first_timestep: Any,
        generator: torch.Generator,
        dtype: Any,
        picture: torch.Tensor,
    ) -> Start:
        """A 9-channel UNet's start, as StableDiffusionInpaintPipeline makes it: below full strength the picture's
        latents then the noise, at full strength the noise alone; the UNet keeps the picture itself (its
        masked picture is one of its inputs), so nothing is blended after the steps."""
        assert request.source is not None
        shape = (
            1,
            self.latent_channels,
            request.height // self.pipe.vae_scale_factor,
            request.width // self.pipe.vae_scale_factor,
        )
        if request.source.strength == 1.0:
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
            return Start(noise * scheduler.init_noise_sigma)
        image_latents = self._encode(picture, generator)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return Start(scheduler.add_noise(image_latents, noise, first_timestep))

    def extra_inputs(self, request: SlotRequest, generator: torch.Generator, dtype: Any) -> dict[str, torch.Tensor]:
        """A 9-channel UNet's mask (1 = repaint) and masked picture's latents, at latent size. From text, or
        from a picture without a mask, everything is repainted: the mask is all ones and the masked picture
        black, as the inpaint pipeline makes them for a white mask."""
        if not self.inpainting:
            return {}
        height, width = request.height, request.width
        source = request.source
        if source is not None and source.mask is not None:
            mask = source_mask(self.masks, request)
        else:
            mask = torch.ones(1, 1, height, width)
        picture = self._picture(request, dtype) if source is not None else torch.zeros(1, 3, height, width)
        masked = picture.to(device=self.device, dtype=dtype) * (mask < 0.5).to(device=self.device, dtype=dtype)
        masked_latents = self._encode(masked, generator)
        scale = self.pipe.vae_scale_factor
        mask = torch.nn.functional.interpolate(mask, size=(height // scale, width // scale))
        return {"mask": mask.to(device=self.device, dtype=dtype), "masked_image_latents": masked_latents}

    def _picture(self, request: SlotRequest, dtype: Any) -> torch.Tensor:
        """The request's picture as the pipelines preprocess it: (1, 3, H, W) in [-1, 1] on the device."""
        return source_picture(self.pipe.image_processor, request).to(device=self.device, dtype=dtype)

    def _encode(self, picture: torch.Tensor, generator: torch.Generator, statistics: bool = False) -> torch.Tensor:
        """The VAE's latents for a picture in [-1, 1] (a sample, drawn from the generator), scaled as the
        pipelines scale them. SDXL's pipelines encode in float32 when the VAE asks (force_upcast), and its img2img
        (`statistics`, not its inpainting) normalises by the VAE's latent statistics when it has them."""
        vae, dtype = self.pipe.vae, picture.dtype
        upcast = self.xl and vae.config.force_upcast
        if upcast:
            picture = picture.float()
            vae.to(dtype=torch.float32)
        latents = retrieve_latents(vae.encode(picture), generator=generator)
        if upcast:
            vae.to(dtype)
        latents = latents.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.xl and statistics and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, dtype)
            return (latents - mean) * vae.config.scaling_factor / std
        return vae.config.scaling_factor * latents

    def predict(
        self,
        model: Any,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        rows: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> torch.Tensor:
        added = {"text_embeds": rows["text_embeds"], "time_ids": rows["time_ids"]} if self.xl else None
        hidden = rows["encoder_hidden_states"]
        if self.inpainting:
            sample = torch.cat([sample, rows["mask"], rows["masked_image_latents"]], dim=1)
        return model(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    def decode(self, latents: torch.Tensor, size: tuple[int, int], vae_decode: VaeDecode) -> torch.Tensor:
        pipe = self.pipe
        if self.xl:
            return self._decode_xl(latents, vae_decode)
        image = vae_decode(latents / pipe.vae.config.scaling_factor)
        image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=denormalize)

    def _decode_xl(self, latents: torch.Tensor, vae_decode: VaeDecode) -> torch.Tensor:
        """As StableDiffusionXLPipeline decodes: the VAE upcast in fp16 when it asks, its latent statistics
        when it has them, the watermark when one is installed."""
        pipe, vae = self.pipe, self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae_decode(latents)
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pt")
