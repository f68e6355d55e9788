"""The step engine gives the plain pipeline's pixels (within 2/255), alone, joined mid-way, and sharing steps
with requests of other step counts, guidance scales, samplers and negative prompts: on the embedded model,
and tiny random SD, SDXL, FLUX.1 (dev and schnell shapes) and SD3 pipelines. Flow-matching families have
one sampler, their own."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from muse.config import EMBEDDED_MODEL
from muse.messages import Assignment, BatchKey, ImageSpec
from muse.worker.engine import SlotRequest, StepEngine, supports
from muse.worker.pipeline import LoadedPipeline, load_pipeline, run_batch

TOLERANCE = 2  # of 255

pytestmark = pytest.mark.device


@pytest.fixture(scope="module", params=["embedded", "tiny", "tiny-sdxl", "tiny-flux", "tiny-schnell", "tiny-sd3"])
def loaded(request: pytest.FixtureRequest, device: str) -> LoadedPipeline:
    torch.set_num_threads(2)
    if request.param == "embedded":
        return load_pipeline(EMBEDDED_MODEL, device)
    fixture = request.param.replace("-", "_") + "_model"  # tiny_model, tiny_sdxl_model, …
    return load_pipeline(request.getfixturevalue(fixture), device)


def flow(loaded: LoadedPipeline) -> bool:
    return hasattr(loaded.pipe, "transformer")


def sampler(loaded: LoadedPipeline, name: str) -> str:
    """The named sampler where the family has it; a flow-matching family's own otherwise."""
    return "" if flow(loaded) else name


def plain(loaded: LoadedPipeline, r: SlotRequest) -> np.ndarray:
    """What `pipe(...)` gives for this request alone."""
    loaded.use_scheduler(r.scheduler)
    try:
        with torch.inference_mode():
            image = loaded.pipe(
                prompt=[r.prompt],
                # An empty one is none: the pipeline's own default (SDXL's are zeros, not the empty text's).
                negative_prompt=[r.negative_prompt] if r.negative_prompt else None,
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                width=r.width,
                height=r.height,
                generator=[torch.Generator(device="cpu").manual_seed(r.seed)],
            ).images[0]
    finally:
        loaded.use_scheduler("")
    return np.asarray(image, dtype=np.int16)


def run(engine: StepEngine, joins: dict[int, list[SlotRequest]]) -> dict[str, np.ndarray]:
    """Step the engine, admitting `joins[k]` before step k, until every slot has left."""
    images: dict[str, np.ndarray] = {}
    step = 0
    while step in joins or engine.slots or any(k > step for k in joins):
        engine.admit(joins.get(step, []))
        finished = engine.step()
        for slot, image in zip(finished, engine.decode(finished), strict=True):
            images[slot.request.slot_id] = np.asarray(image, dtype=np.int16)
        step += 1
    return images


def request(slot_id: str, loaded: LoadedPipeline, **kw: Any) -> SlotRequest:
    side = 32 if flow(loaded) else max(64, loaded.width)  # flow families: 256 image tokens
    base: dict[str, Any] = {
        "prompt": "a red circle on a blue background",
        "negative_prompt": "",
        "seed": 7,
        "steps": 10,
        "guidance_scale": 2.5,
        "width": side,
        "height": side,
        "scheduler": "",
    }
    fields = base | kw
    fields["scheduler"] = sampler(loaded, fields["scheduler"])
    if type(loaded.pipe).__name__ == "FluxPipeline":
        fields["negative_prompt"] = ""  # no negative conditioning: refused before a worker sees it
    return SlotRequest(slot_id=slot_id, **fields)


def assert_same(engine_images: dict[str, np.ndarray], loaded: LoadedPipeline, requests: list[SlotRequest]) -> None:
    for r in requests:
        difference = np.abs(engine_images[r.slot_id] - plain(loaded, r)).max()
        assert difference <= TOLERANCE, f"{r.slot_id} ({r.scheduler or 'own'}, {r.steps} steps): off by {difference}"


def test_every_known_family_runs_on_the_step_engine(loaded: LoadedPipeline) -> None:
    assert supports(loaded.pipe)


def test_other_pipelines_run_whole_calls() -> None:
    class Other:
        unet = None

    assert not supports(Other())


def test_one_image_alone_matches_the_pipeline(loaded: LoadedPipeline) -> None:
    alone = request("alone", loaded, steps=12, scheduler="DDIM")
    assert_same(run(StepEngine(loaded), {0: [alone]}), loaded, [alone])


def test_images_joining_mid_way_with_other_samplers_steps_and_guidance_match(loaded: LoadedPipeline) -> None:
    first = request("ddim", loaded, steps=12, scheduler="DDIM", seed=1)
    euler = request("euler", loaded, steps=8, scheduler="Euler", guidance_scale=4.0, seed=2, negative_prompt="red")
    dpm = request("dpm", loaded, steps=6, scheduler="DPM++ 2M", seed=3, prompt="a green square on a black background")
    ancestral = request("euler-a", loaded, steps=7, scheduler="Euler a", seed=4, guidance_scale=6.0)
    unguided = request("unguided", loaded, steps=5, guidance_scale=1.0, seed=5)
    requests = [first, euler, dpm, ancestral, unguided]
    images = run(StepEngine(loaded), {0: [first], 3: [euler, dpm], 5: [ancestral, unguided]})
    assert sorted(images) == sorted(r.slot_id for r in requests)
    assert_same(images, loaded, requests)


def test_an_image_without_a_negative_prompt_is_the_same_whatever_its_batch_mates_ask(loaded: LoadedPipeline) -> None:
    """In one whole call with an image that has a negative prompt, and on the step engine, an image without
    one gets `pipe(prompt)`'s pixels: on SDXL, whose "none" is zeros, diffusers would encode the empty text."""
    bare = request("bare", loaded, steps=6, seed=21)
    negated = request("negated", loaded, steps=6, seed=22, negative_prompt="blue")  # FLUX: none (request)
    key = BatchKey(bare.width, bare.height, bare.steps, bare.guidance_scale, bare.scheduler)
    specs = [ImageSpec(r.prompt, r.negative_prompt, r.seed) for r in (bare, negated)]
    pngs = run_batch(loaded, Assignment("whole", specs, key), lambda step: True)
    assert pngs is not None
    pixels = [np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in pngs]
    assert_same(dict(zip(["bare", "negated"], pixels, strict=True)), loaded, [bare, negated])
    assert_same(run(StepEngine(loaded), {0: [bare, negated]}), loaded, [bare, negated])


def test_a_removed_slot_leaves_between_steps_and_the_others_are_unchanged(loaded: LoadedPipeline) -> None:
    kept = request("kept", loaded, steps=8, seed=11)
    dropped = request("dropped", loaded, steps=8, seed=12)
    engine = StepEngine(loaded)
    engine.admit([kept, dropped])
    engine.step()
    assert [s.request.slot_id for s in engine.remove(["dropped"])] == ["dropped"]
    images = run(engine, {})
    assert sorted(images) == ["kept"]
    assert_same(images, loaded, [kept])


def test_one_latent_shape_at_a_time(loaded: LoadedPipeline) -> None:
    engine = StepEngine(loaded)
    engine.admit([request("a", loaded)])
    with pytest.raises(AssertionError):
        engine.admit([request("b", loaded, width=loaded.width * 2 + 8)])


def test_padding_to_a_bucket_leaves_every_image_unchanged(loaded: LoadedPipeline) -> None:
    """--compile pads UNet calls to a bucket (here 3 guided images + 1 unguided = 7 rows, padded to 8):
    the padding rows are dropped and the real ones give the pipeline's pixels."""
    from muse.worker.fastpath import row_buckets

    guided = 6 if type(loaded.pipe).__name__ == "FluxPipeline" else 3  # FLUX has no guidance rows: 7 rows
    requests = [request(f"g{i}", loaded, seed=i) for i in range(guided)] + [request("u", loaded, guidance_scale=1.0)]
    rows: list[int] = []
    denoiser = getattr(loaded.pipe, "unet", None) or loaded.pipe.transformer

    def count(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    hook = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        images = run(StepEngine(loaded, row_buckets(8)), {0: requests})
    finally:
        hook.remove()
    assert set(rows) == {8}, f"every call padded to the 8-row bucket, not {sorted(set(rows))}"
    assert_same(images, loaded, requests)
