"""What the plain diffusers pipeline call gives, to compare served images with (within 2/255)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from muse.worker.pipeline import LoadedPipeline

TOLERANCE = 2  # of 255


def plain(loaded: LoadedPipeline, body: dict[str, Any], seed: int) -> np.ndarray:
    """What `pipe(...)` gives for one image of this request alone."""
    loaded.use_scheduler(body.get("scheduler", ""))
    try:
        with torch.inference_mode():
            image = loaded.pipe(
                prompt=[body["prompt"]],
                negative_prompt=[body.get("negative_prompt", "")],
                num_inference_steps=body["steps"],
                guidance_scale=body.get("guidance_scale", loaded.guidance_scale),
                width=body.get("width", loaded.width),
                height=body.get("height", loaded.height),
                generator=[torch.Generator(device="cpu").manual_seed(seed)],
            ).images[0]
    finally:
        loaded.use_scheduler("")
    return np.asarray(image, dtype=np.int16)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def assert_plain(loaded: LoadedPipeline, body: dict[str, Any], job: dict[str, Any]) -> None:
    assert job["status"] == "succeeded", job
    for i, image in enumerate(job["result"]["images"]):
        difference = np.abs(pixels(image["png_base64"]) - plain(loaded, body, body["seed"] + i)).max()
        assert difference <= TOLERANCE, f"{body['prompt']!r} image {i}: off by {difference}"
