"""What the flow-matching transformer families (FLUX.1, SD3.x) share: the shift of the sigma schedule with
the image's size, and the VAE's shifted latent space."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from muse.worker.families.base import VaeDecode

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
