"""What the plain diffusers pipeline call gives, to compare served images with (within 2/255)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw

from muse.worker.pipeline import LoadedPipeline

TOLERANCE = 2  # of 255
SIDE = 64


def scene(width: int = SIDE, height: int = SIDE) -> Image.Image:
    """A picture to start from: a red disc on blue."""
    image = Image.new("RGB", (width, height), (30, 80, 190))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(230, 50, 20))
    return image


def left_half(width: int = SIDE, height: int = SIDE) -> Image.Image:
    """A mask that repaints the left half."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, width // 2, height), fill=255)
    return mask


def plain(loaded: LoadedPipeline, body: dict[str, Any], seed: int) -> np.ndarray:
    """What `pipe(...)` gives for one image of this request alone; for a body with an `init_image` (a picture
    already of the request's size), diffusers' img2img or inpaint pipeline over the same components."""
    loaded.use_scheduler(body.get("scheduler", ""))
    arguments: dict[str, Any] = {
        "prompt": [body["prompt"]],
        "negative_prompt": [body.get("negative_prompt", "")],
        "num_inference_steps": body["steps"],
        "guidance_scale": body.get("guidance_scale", loaded.guidance_scale),
        "width": body.get("width", loaded.width),
        "height": body.get("height", loaded.height),
        "generator": [torch.Generator(device="cpu").manual_seed(seed)],
    }
    pipe: Any = loaded.pipe
    if "init_image" in body:
        arguments |= {"image": picture(body["init_image"]), "strength": body.get("strength", 0.75)}
        if "mask_image" in body:
            pipe = StableDiffusionInpaintPipeline(**loaded.pipe.components)
            size = arguments["image"].size
            arguments |= {"mask_image": picture(body["mask_image"]), "width": size[0], "height": size[1]}
        else:
            pipe = StableDiffusionImg2ImgPipeline(**loaded.pipe.components)
            del arguments["width"], arguments["height"]
        pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            image = pipe(**arguments).images[0]
    finally:
        loaded.use_scheduler("")
    return np.asarray(image, dtype=np.int16)


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def assert_plain(loaded: LoadedPipeline, body: dict[str, Any], job: dict[str, Any]) -> None:
    assert job["status"] == "succeeded", job
    for i, image in enumerate(job["result"]["images"]):
        difference = np.abs(pixels(image["png_base64"]) - plain(loaded, body, body["seed"] + i)).max()
        assert difference <= TOLERANCE, f"{body['prompt']!r} image {i}: off by {difference}"
