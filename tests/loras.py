"""LoRA test helpers: an adapter made ready in a worker's loaded pipeline, and what diffusers itself gives for a
request with its one adapter (the reference every served image with adapters is compared with, within 2/255)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from muse.messages import LoraUse
from muse.worker.loras import RowLoras
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from muse.worker.slots import SlotRequest


def with_loras(model: str, folder: Path) -> LoadedPipeline:
    """The model loaded as a worker loads it, taking adapters from `folder` (four kept loaded)."""
    torch.set_num_threads(2)
    loaded = load_pipeline(model, "cpu")
    loaded.loras = RowLoras(loaded.pipe, str(folder), cache=4)
    return loaded


def ready(loaded: LoadedPipeline, *uses: LoraUse) -> None:
    """Block until every adapter is loaded (LoraError for one that cannot be)."""
    loras = loaded.loras
    assert loras is not None
    while not loras.ready(uses):
        loras.wait(30)


def alone(model: str, folder: Path, r: SlotRequest) -> np.ndarray:
    """The plain pipeline with the request's one adapter (if any) loaded by diffusers, at its scale."""
    pipe = load_pipeline(model, "cpu").pipe
    extra: dict[str, Any] = {}
    if r.loras:
        (use,) = r.loras
        pipe.load_lora_weights(str(folder / f"{use.name}.safetensors"), adapter_name="only")
        # A UNet pipeline takes the scale with its cross-attention arguments, FLUX and SD3 with their joint ones.
        scale_with = "cross_attention_kwargs" if getattr(pipe, "unet", None) is not None else "joint_attention_kwargs"
        extra[scale_with] = {"scale": use.scale}
    with torch.inference_mode():
        image = pipe(
            [r.prompt],
            # An empty one is none: the pipeline's own default (SDXL's are zeros, not the empty text's).
            negative_prompt=[r.negative_prompt] if r.negative_prompt else None,
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            width=r.width,
            height=r.height,
            generator=[torch.Generator().manual_seed(r.seed)],
            **extra,
        ).images[0]
    return np.asarray(image, dtype=np.int16)
