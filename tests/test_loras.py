"""LoRA adapters in the worker: images with different adapters (or none, or one adapter at different scales) share
each model call and each get the pixels of the pipeline with that one adapter loaded alone (within 2/255), in
diffusers' and kohya's key layouts; whole calls too; the cache unloads what no image uses; a file that is not a
LoRA for this model is the request's error, not the worker's."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from muse.config import EMBEDDED_MODEL
from muse.demo_model.loras import make_lora
from muse.messages import Assignment, BatchKey, ImageSpec, LoraUse
from muse.worker.engine import SlotRequest, StepEngine
from muse.worker.loras import LoraError, RowLoras, failure
from muse.worker.pipeline import LoadedPipeline, load_pipeline, run_batch
from tests.loras import alone, ready, with_loras
from tests.test_engine import run
from tests.test_loading import copy_of, edit_index

TOLERANCE = 2
SIDE = 64
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    make_lora(tiny_model, folder / "ink.safetensors", seed=1)
    make_lora(tiny_model, folder / "glow.safetensors", seed=2, kohya=True)
    make_lora(EMBEDDED_MODEL, folder / "other.safetensors", seed=3)  # another UNet's shapes
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_model: str, folder: Path) -> Iterator[LoadedPipeline]:
    yield with_loras(tiny_model, folder)


def request(slot_id: str, seed: int, *loras: LoraUse, **kw: Any) -> SlotRequest:
    base: dict[str, Any] = {"steps": 8, "guidance_scale": 2.5, "width": SIDE, "height": SIDE}
    return SlotRequest(slot_id, PROMPT, "", seed, **(base | kw), loras=loras)


def test_different_adapters_share_every_call_and_each_image_is_its_adapters(
    loaded: LoadedPipeline, tiny_model: str, folder: Path
) -> None:
    ready(loaded, LoraUse("ink"), LoraUse("glow"))
    from peft.tuners.lora import LoraLayer

    assert any(isinstance(m, LoraLayer) for m in loaded.pipe.text_encoder.modules()), "the text encoder's part too"
    plain = request("plain", 1)
    ink = request("ink", 2, LoraUse("ink", 0.8))
    ink_half = request("ink-half", 3, LoraUse("ink", 0.4), guidance_scale=1.0)
    glow = request("glow", 4, LoraUse("glow", 1.0), steps=6)
    calls: list[int] = []
    hook = loaded.pipe.unet.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        images = run(StepEngine(loaded, loras=loaded.loras), {0: [plain, ink], 2: [ink_half, glow]})
    finally:
        hook.remove()
    assert max(calls) == 2 * 3 + 1, "the four images' rows shared calls (three guided, one not)"
    for r in (plain, ink, ink_half, glow):
        expected = alone(tiny_model, folder, r)
        assert np.abs(images[r.slot_id] - expected).max() <= TOLERANCE, r.slot_id
    assert np.abs(images["ink"] - alone(tiny_model, folder, request("x", 2))).max() > 2 * TOLERANCE, "the adapter shows"


def test_a_whole_call_takes_its_adapters(loaded: LoadedPipeline, tiny_model: str, folder: Path) -> None:
    use = LoraUse("glow", 0.7)
    key = BatchKey(SIDE, SIDE, 8, 2.5, loras=(use,))
    pngs = run_batch(loaded, Assignment("a", [ImageSpec(PROMPT, "", 9, loras=(use,))], key), lambda step: True)
    assert pngs is not None
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB"), dtype=np.int16)
    assert np.abs(image - alone(tiny_model, folder, request("w", 9, use))).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["other", "broken", "missing"])
def test_a_file_that_is_no_lora_for_this_model_is_the_requests_error(loaded: LoadedPipeline, name: str) -> None:
    with pytest.raises(LoraError, match="loras: ") as raised:
        ready(loaded, LoraUse(name))
    assert failure("x", raised.value).param == "loras"
    with pytest.raises(LoraError):  # remembered: not read again while the file is unchanged
        ready(loaded, LoraUse(name))
    images = run(StepEngine(loaded, loras=loaded.loras), {0: [request("after", 5)]})
    assert set(images) == {"after"}, "the model still serves"


def test_the_cache_unloads_the_least_recently_used_adapter_no_image_uses(tiny_model: str, folder: Path) -> None:
    loaded = load_pipeline(tiny_model, "cpu")
    loras = loaded.loras = RowLoras(loaded.pipe, str(folder), cache=1)
    ready(loaded, LoraUse("ink"))
    ready(loaded, LoraUse("glow"))
    loras.evict(in_use={"ink", "glow"})
    assert list(loras.loaded) == ["ink", "glow"], "in use: kept beyond the cache's size"
    loras.evict(in_use={"glow"})
    assert list(loras.loaded) == ["glow"]
    assert all("ink" not in name for name in loaded.pipe.unet.peft_config), "unloaded from the model"


def test_a_file_deleted_while_its_images_run_leaves_them_as_they_were(
    tiny_model: str, folder: Path, tmp_path: Path
) -> None:
    """Once loaded the adapter is in memory: deleting its file mid-image changes nothing for that image (a new
    request for it is refused by the parent, which lists the folder as it is; a worker asked to read it again
    fails that request by name: the "missing" case above)."""

    shutil.copy(folder / "ink.safetensors", tmp_path / "brief.safetensors")
    loaded = load_pipeline(tiny_model, "cpu")
    loaded.loras = RowLoras(loaded.pipe, str(tmp_path), cache=1)
    ready(loaded, LoraUse("brief"))
    engine = StepEngine(loaded, loras=loaded.loras)
    engine.admit([request("brief", 2, LoraUse("brief", 0.8))])
    engine.step()
    (tmp_path / "brief.safetensors").unlink()
    images = run(engine, {})
    expected = alone(tiny_model, folder, request("x", 2, LoraUse("ink", 0.8)))
    assert np.abs(images["brief"] - expected).max() <= TOLERANCE


def test_sdxl_takes_adapters_in_both_layouts_with_both_text_encoders(
    tiny_sdxl_model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("sdxl-loras")
    make_lora(tiny_sdxl_model, folder / "ink.safetensors", seed=1, strength=2.0)
    make_lora(tiny_sdxl_model, folder / "glow.safetensors", seed=2, strength=2.0, kohya=True)  # lora_te2_ too
    loaded = with_loras(tiny_sdxl_model, folder)
    ready(loaded, LoraUse("ink"), LoraUse("glow"))
    from peft.tuners.lora import LoraLayer

    for encoder in (loaded.pipe.text_encoder, loaded.pipe.text_encoder_2):
        assert sum(isinstance(m, LoraLayer) for m in encoder.modules()) > 0, "each text encoder takes its part"
    ink, glow = request("ink", 2, LoraUse("ink", 0.8)), request("glow", 3, LoraUse("glow", 1.2))
    images = run(StepEngine(loaded, loras=loaded.loras), {0: [ink, glow]})
    for r in (ink, glow):
        assert np.abs(images[r.slot_id] - alone(tiny_sdxl_model, folder, r)).max() <= TOLERANCE, r.slot_id
    plain = alone(tiny_sdxl_model, folder, request("plain", 2))
    assert np.abs(images["ink"] - plain).max() > 2 * TOLERANCE, "the adapter shows"


def test_a_pipeline_muse_has_no_family_for_takes_adapters_in_whole_calls(
    tiny_model: str, folder: Path, tmp_path: Path
) -> None:
    unknown = copy_of(tiny_model, tmp_path)
    edit_index(unknown, _class_name="StableDiffusionPAGPipeline")
    loaded = with_loras(str(unknown), folder)
    assert type(loaded.pipe).__name__ == "StableDiffusionPAGPipeline"
    use = LoraUse("glow", 0.7)
    key = BatchKey(SIDE, SIDE, 8, 2.5, loras=(use,))
    pngs = run_batch(loaded, Assignment("a", [ImageSpec(PROMPT, "", 9, loras=(use,))], key), lambda step: True)
    assert pngs is not None
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB"), dtype=np.int16)
    assert np.abs(image - alone(str(unknown), folder, request("w", 9, use))).max() <= TOLERANCE
    assert np.abs(image - alone(str(unknown), folder, request("w", 9))).max() > 2 * TOLERANCE, "the adapter shows"
