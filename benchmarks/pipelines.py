"""The pipelines gpu.py and fast.py measure, saved to a folder as diffusers checkpoints: Stable Diffusion 1.5's
architecture at its real sizes (random weights: timings do not depend on weight values), and a tiny one for CI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).parent / "sd15"


def build_sd15(folder: Path, dtype: Any) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from muse.demo_model.architecture import DEMO_SPEC, build_tokenizer, save_pipeline

    torch.manual_seed(0)
    read = lambda name: json.loads((CONFIGS / f"{name}.json").read_text())  # noqa: E731
    text_config = {k: v for k, v in read("text_encoder").items() if k != "architectures"}
    # No hub: the tokenizer is Muse's own small BPE, padded to CLIP's 77 tokens; the text encoder
    # keeps CLIP's full 49,408-token embedding table, so its size and cost are real.
    tokenizer = build_tokenizer(dataclasses.replace(DEMO_SPEC, max_tokens=77))
    built: Any = StableDiffusionPipeline(  # Any: diffusers' stubs do not show the pipeline's `to`
        vae=AutoencoderKL.from_config(read("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_config(read("unet")),
        scheduler=PNDMScheduler.from_config(read("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(built.to(dtype=dtype), folder, {"guidance_scale": 7.5})


def build_tiny(folder: Path) -> None:
    from muse.demo_model.architecture import TINY_SPEC, build_pipeline, save_pipeline

    save_pipeline(build_pipeline(TINY_SPEC), folder, {"guidance_scale": 7.5})
