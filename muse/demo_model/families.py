"""Tiny random-weight pipelines of the families people self-host (SDXL, FLUX.1, SD3, SD inpainting), built offline
from configs.

They exercise every code path a real checkpoint of the family takes (two or three text encoders, pooled
projections, packed latents, flow-matching schedules) in seconds on a CPU: the tests and the benchmarks serve
them. The embedded model's CLIP tokenizer stands in for every tokenizer (T5's included: the T5 encoder here
is sized to its vocabulary).

    python -m muse.demo_model.families flux /tmp/tiny-flux
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

WIDTH = 32  # hidden width of every tiny part


def _tokenizer() -> CLIPTokenizer:
    from muse.config import EMBEDDED_MODEL

    return CLIPTokenizer.from_pretrained(Path(EMBEDDED_MODEL) / "tokenizer")


def _clip(tokenizer: CLIPTokenizer, hidden: int = WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, hidden_size=hidden,
        intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def _t5(tokenizer: CLIPTokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer), d_model=WIDTH, d_kv=8, d_ff=2 * WIDTH, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return T5EncoderModel(config)


def _vae(latent_channels: int, flow: bool) -> AutoencoderKL:
    """Two blocks: the VAE scales by 2. Flow-matching families' VAEs carry a shift factor."""
    extra: dict[str, Any] = {"shift_factor": 0.0609, "scaling_factor": 1.5035} if flow else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        **extra,
    )  # fmt: skip


def tiny_sdxl() -> Any:
    tokenizer = _tokenizer()
    text = _clip(tokenizer, 16)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=_vae(4, flow=False), text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    )  # fmt: skip


def tiny_sd_inpaint() -> Any:
    """An inpainting checkpoint's shape: a UNet of 9 input channels (latents, mask, masked picture's latents)."""
    tokenizer = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=WIDTH, norm_num_groups=8,
    )  # fmt: skip
    return StableDiffusionInpaintPipeline(
        vae=_vae(4, flow=False), text_encoder=CLIPTextModel(_clip(tokenizer)), tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def tiny_flux(guidance_embeds: bool = True) -> Any:
    """FLUX.1-dev shaped (guidance embedded in the transformer); `guidance_embeds=False` is schnell's shape.
    Latents of 4 channels pack 2x2 into 16-wide tokens."""
    tokenizer = _tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(4, flow=True), text_encoder=CLIPTextModel(_clip(tokenizer)),
        tokenizer=tokenizer, text_encoder_2=_t5(tokenizer), tokenizer_2=tokenizer, transformer=transformer,
    )  # fmt: skip


def tiny_sd3() -> Any:
    """SD3's 16 latent channels: diffusers' SD3 inpaint pipeline takes no other (it reads 16 as SD3's shape)."""
    tokenizer = _tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=WIDTH, joint_attention_dim=WIDTH, pooled_projection_dim=2 * WIDTH, out_channels=16,
    )  # fmt: skip
    clip = _clip(tokenizer)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, flow=True),
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tokenizer,
        text_encoder_3=_t5(tokenizer), tokenizer_3=tokenizer, transformer=transformer,
    )  # fmt: skip


BUILDERS: dict[str, Callable[[], Any]] = {
    "sdxl": tiny_sdxl,
    "flux": tiny_flux,
    "flux-schnell": lambda: tiny_flux(guidance_embeds=False),
    "sd3": tiny_sd3,
    "sd-inpaint": tiny_sd_inpaint,
}


def build(family: str, folder: str | Path, seed: int = 0, defaults: dict[str, Any] | None = None) -> Path:
    """Save a tiny pipeline of `family` (with random weights drawn from `seed`) to `folder`; `defaults`
    becomes its muse.json."""
    torch.manual_seed(seed)
    pipe = BUILDERS[family]()
    folder = Path(folder)
    pipe.save_pretrained(folder)
    if defaults:
        (folder / "muse.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a tiny random-weight pipeline of one family.")
    parser.add_argument("family", choices=sorted(BUILDERS))
    parser.add_argument("out", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.family, args.out, args.seed))


if __name__ == "__main__":
    main()
