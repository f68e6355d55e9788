"""Images that start from a picture give diffusers' own img2img and inpaint pipelines' pixels (within 2/255):
alone, joined mid-way, and sharing steps with text-to-image images, for the samplers that keep state
(Euler a draws from the image's generator; DPM++ 2M keeps history), on the embedded model and tiny random SD."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw

from muse.config import EMBEDDED_MODEL
from muse.messages import SourceImage
from muse.worker.engine import SlotRequest, StepEngine
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from tests.test_engine import run

TOLERANCE = 2  # of 255


@pytest.fixture(scope="module", params=["embedded", "tiny"])
def loaded(request: pytest.FixtureRequest) -> LoadedPipeline:
    torch.set_num_threads(2)
    if request.param == "embedded":
        return load_pipeline(EMBEDDED_MODEL, "cpu")
    return load_pipeline(request.getfixturevalue("tiny_model"), "cpu")


def side(loaded: LoadedPipeline) -> int:
    return max(64, loaded.width)


def picture(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 90, 200))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 30))
    return image


def mask(size: int) -> Image.Image:
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).rectangle((0, 0, size // 2, size), fill=255)  # repaint the left half
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request(
    slot_id: str, loaded: LoadedPipeline, strength: float | None, masked: bool = False, **kw: Any
) -> SlotRequest:
    size = side(loaded)
    source = None
    if strength is not None:
        source = SourceImage(png(picture(size)), strength, png(mask(size)) if masked else None)
    base: dict[str, Any] = {
        "prompt": "a red circle on a blue background",
        "negative_prompt": "",
        "seed": 11,
        "steps": 10,
        "guidance_scale": 2.5,
        "width": size,
        "height": size,
        "source": source,
    }
    return SlotRequest(slot_id, **(base | kw))


def plain(loaded: LoadedPipeline, r: SlotRequest) -> np.ndarray:
    """What diffusers' img2img or inpaint pipeline, built from the same components, gives for the request."""
    assert r.source is not None
    loaded.use_scheduler(r.scheduler)
    components = loaded.pipe.components
    arguments: dict[str, Any] = {
        "prompt": [r.prompt],
        "negative_prompt": [r.negative_prompt],
        "image": Image.open(io.BytesIO(r.source.image)),
        "strength": r.source.strength,
        "num_inference_steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "generator": [torch.Generator(device="cpu").manual_seed(r.seed)],
    }
    try:
        with torch.inference_mode():
            if r.source.mask is None:
                pipe: Any = StableDiffusionImg2ImgPipeline(**components)
            else:
                pipe = StableDiffusionInpaintPipeline(**components)
                arguments |= {"mask_image": Image.open(io.BytesIO(r.source.mask)), "width": r.width, "height": r.height}
            pipe.set_progress_bar_config(disable=True)
            image = pipe(**arguments).images[0]
    finally:
        loaded.use_scheduler("")
    return np.asarray(image, dtype=np.int16)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpaint"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_alone(loaded: LoadedPipeline, strength: float, masked: bool) -> None:
    r = request("a", loaded, strength, masked)
    images = run(StepEngine(loaded), {0: [r]})
    assert worst(images["a"], plain(loaded, r)) <= TOLERANCE


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M"])
def test_sharing_steps_with_text_to_image(loaded: LoadedPipeline, sampler: str) -> None:
    """A picture's images join text-to-image ones mid-way and leave at their own step: each is its own
    pipeline's image."""
    text = request("text", loaded, None, steps=12, scheduler=sampler)
    img2img = request("img2img", loaded, 0.6, seed=3, scheduler=sampler, prompt="a green square")
    inpaint = request("inpaint", loaded, 0.8, masked=True, seed=5, guidance_scale=1.0, scheduler=sampler)
    images = run(StepEngine(loaded), {0: [text], 2: [img2img], 3: [inpaint]})
    assert worst(images["img2img"], plain(loaded, img2img)) <= TOLERANCE
    assert worst(images["inpaint"], plain(loaded, inpaint)) <= TOLERANCE
    # The text-to-image image is unchanged by its company: the same image as when it ran alone.
    assert worst(images["text"], run(StepEngine(loaded), {0: [text]})["text"]) <= TOLERANCE


def test_strength_runs_fewer_steps_and_counts_the_skipped_ones(loaded: LoadedPipeline) -> None:
    engine = StepEngine(loaded)
    (slot,) = engine.admit([request("a", loaded, 0.5, steps=10)])
    assert len(slot.timesteps) == 5
    assert slot.progress == (5, 10)
    engine.step()
    assert slot.progress == (6, 10)


def test_outside_the_mask_the_picture_is_kept() -> None:
    """Inpainting at full strength repaints the left half; the right half stays near the picture (the VAE's
    round trip is all that changes it: the embedded model's, as a random VAE's is noise)."""
    loaded = load_pipeline(EMBEDDED_MODEL, "cpu")
    r = request("a", loaded, 1.0, masked=True)
    image = run(StepEngine(loaded), {0: [r]})["a"]
    size = side(loaded)
    original = np.asarray(picture(size), dtype=np.int16)
    # Away from the mask's edge, where the VAE's receptive field mixes the two halves.
    kept, repainted = slice(3 * size // 4, size), slice(0, size // 4)
    assert (
        np.abs(image[:, kept] - original[:, kept]).mean() < np.abs(image[:, repainted] - original[:, repainted]).mean()
    )


# ---- an inpainting checkpoint (9-channel UNet) -------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting(tiny_inpainting_model: str) -> LoadedPipeline:
    torch.set_num_threads(2)
    return load_pipeline(tiny_inpainting_model, "cpu")


def inpainting_plain(loaded: LoadedPipeline, r: SlotRequest) -> np.ndarray:
    """What the checkpoint's own StableDiffusionInpaintPipeline gives: from text (or from a picture without a
    mask) with a white mask, everything repainted."""
    size = (r.width, r.height)
    source = r.source
    image = Image.open(io.BytesIO(source.image)) if source else Image.new("RGB", size)
    mask = Image.open(io.BytesIO(source.mask)) if source and source.mask else Image.new("L", size, 255)
    with torch.inference_mode():
        result = loaded.pipe(
            prompt=[r.prompt],
            negative_prompt=[r.negative_prompt],
            image=image,
            mask_image=mask,
            strength=source.strength if source else 1.0,
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            width=r.width,
            height=r.height,
            generator=[torch.Generator(device="cpu").manual_seed(r.seed)],
        ).images[0]
    return np.asarray(result, dtype=np.int16)


def test_an_inpainting_checkpoint_draws_from_text_and_pictures_in_one_batch(inpainting: LoadedPipeline) -> None:
    text = request("text", inpainting, None, steps=9)
    masked = request("masked", inpainting, 1.0, masked=True, seed=4)
    partial = request("partial", inpainting, 0.6, masked=True, seed=5, guidance_scale=1.0)
    whole = request("whole", inpainting, 0.7, seed=6)
    images = run(StepEngine(inpainting), {0: [text, masked], 2: [partial, whole]})
    for r in (text, masked, partial, whole):
        assert worst(images[r.slot_id], inpainting_plain(inpainting, r)) <= TOLERANCE, r.slot_id


def test_an_inpainting_checkpoint_in_whole_calls(inpainting: LoadedPipeline) -> None:
    from muse.messages import Assignment, BatchKey, ImageSpec
    from muse.worker.pipeline import run_batch

    for r in (request("text", inpainting, None), request("masked", inpainting, 0.8, masked=True)):
        key = BatchKey(r.width, r.height, r.steps, r.guidance_scale, "", r.source.kind if r.source else "",
                       r.source.strength if r.source else 1.0)  # fmt: skip
        spec = ImageSpec(r.prompt, r.negative_prompt, r.seed, r.source)
        pngs = run_batch(inpainting, Assignment("a", [spec], key), lambda step: True)
        assert pngs is not None
        image = np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB"), dtype=np.int16)
        assert worst(image, inpainting_plain(inpainting, r)) <= TOLERANCE, r.slot_id


# ---- SDXL: its img2img and inpaint pipelines (the VAE's upcast, img2img's latent statistics) ----------


@pytest.fixture(scope="module", params=["plain", "statistics"])
def xl(request: pytest.FixtureRequest, tiny_sdxl_model: str) -> LoadedPipeline:
    """The tiny SDXL, and the same with latent statistics in its VAE's config (as some SDXL-derived models
    have: img2img normalises by them, inpainting does not)."""
    torch.set_num_threads(2)
    loaded = load_pipeline(tiny_sdxl_model, "cpu")
    if request.param == "statistics":
        loaded.pipe.vae.register_to_config(latents_mean=[0.2, -0.3, 0.1, 0.0], latents_std=[0.8, 1.3, 0.9, 1.1])
    return loaded


def xl_plain(loaded: LoadedPipeline, r: SlotRequest) -> np.ndarray:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    assert r.source is not None
    arguments: dict[str, Any] = {
        "prompt": [r.prompt],
        "negative_prompt": [r.negative_prompt] if r.negative_prompt else None,  # none: SDXL's zeros
        "image": Image.open(io.BytesIO(r.source.image)),
        "strength": r.source.strength,
        "num_inference_steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "generator": [torch.Generator(device="cpu").manual_seed(r.seed)],
    }
    with torch.inference_mode():
        if r.source.mask is None:
            pipe: Any = StableDiffusionXLImg2ImgPipeline(**loaded.pipe.components)
        else:
            pipe = StableDiffusionXLInpaintPipeline(**loaded.pipe.components)
            arguments |= {"mask_image": Image.open(io.BytesIO(r.source.mask)), "width": r.width, "height": r.height}
        pipe.set_progress_bar_config(disable=True)
        image = pipe(**arguments).images[0]
    return np.asarray(image, dtype=np.int16)


def test_sdxl_pictures_are_its_own_pipelines_images_beside_text(xl: LoadedPipeline) -> None:
    text = request("text", xl, None, steps=9)
    img2img = request("img2img", xl, 0.6, seed=3, prompt="a green square")
    inpaint = request("inpaint", xl, 0.8, masked=True, seed=5, guidance_scale=1.0)
    images = run(StepEngine(xl), {0: [text, img2img], 2: [inpaint]})
    assert worst(images["img2img"], xl_plain(xl, img2img)) <= TOLERANCE
    assert worst(images["inpaint"], xl_plain(xl, inpaint)) <= TOLERANCE
    assert worst(images["text"], run(StepEngine(xl), {0: [text]})["text"]) <= TOLERANCE
