"""LoRA adapters on FLUX and SD3: images with different adapters (or none, or one adapter at different scales)
share each transformer call and each text encoding, and each gets the pixels of the pipeline with that one adapter
loaded by diffusers (within 2/255): whole calls too, an adapter whose rank and alpha are in its file's header, and
one with a T5 part, which diffusers leaves out. A LoRA whose layers do not fit this model is the request's error
and leaves nothing of it in the model."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from muse.demo_model.loras import make_lora
from muse.messages import Assignment, BatchKey, ImageSpec, LoraUse
from muse.worker.engine import SlotRequest, StepEngine
from muse.worker.loras import LoraError
from muse.worker.pipeline import LoadedPipeline, run_batch
from tests.loras import alone, ready, with_loras
from tests.test_engine import run

TOLERANCE = 2
SIDE = 32  # 256 image tokens: the tiny transformers' native size
PROMPT = "a red circle on a blue background"
T5 = {"tiny_flux_model": "text_encoder_2", "tiny_sd3_model": "text_encoder_3"}


@pytest.fixture(scope="module", params=sorted(T5))
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model(family: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(family))


def edited(source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """A copy of a LoRA file with its tensors edited."""
    from safetensors.torch import load_file, save_file

    save_file(edit(load_file(str(source))), str(target))


def pair(module: str, rank: int = 4, width: int = 32) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": torch.ones(rank, width), f"{module}.lora_B.weight": torch.ones(width, rank)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, family: str, model: str, request: pytest.FixtureRequest) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    ink = make_lora(model, folder / "ink.safetensors", seed=1)
    make_lora(model, folder / "glow.safetensors", seed=2, rank=2)
    make_lora(model, folder / "loud.safetensors", seed=3, alpha=8)  # rank 4: its deltas count twice
    make_lora(request.getfixturevalue("tiny_model"), folder / "unet.safetensors", seed=4)
    t5 = f"{T5[family]}.encoder.block.0.layer.0.SelfAttention.q"
    edited(ink, folder / "t5.safetensors", lambda layers: layers | pair(t5))
    # A deeper model's block (this one has a single joint block).
    edited(
        ink, folder / "deeper.safetensors", lambda layers: layers | pair("transformer.transformer_blocks.7.attn.to_q")
    )

    def wider_text(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The transformer's part fits and goes in first; a wider text encoder's then fails.
        return {
            k: torch.ones(4, 48) if k.startswith("text_encoder.") and "lora_A" in k else v for k, v in layers.items()
        }

    edited(ink, folder / "wider.safetensors", wider_text)
    return folder


@pytest.fixture(scope="module")
def loaded(model: str, folder: Path) -> Iterator[LoadedPipeline]:
    yield with_loras(model, folder)


def request(slot_id: str, seed: int, *loras: LoraUse, **kw: Any) -> SlotRequest:
    base: dict[str, Any] = {"steps": 6, "guidance_scale": 2.5, "width": SIDE, "height": SIDE}
    return SlotRequest(slot_id, PROMPT, "", seed, **(base | kw), loras=loras)


def test_different_adapters_share_every_call_and_each_image_is_its_adapters(
    loaded: LoadedPipeline, model: str, folder: Path
) -> None:
    ready(loaded, LoraUse("ink"), LoraUse("glow"))
    from peft.tuners.lora import LoraLayer

    for part in ("transformer", "text_encoder"):
        assert any(isinstance(m, LoraLayer) for m in getattr(loaded.pipe, part).modules()), part
    plain = request("plain", 1)
    ink = request("ink", 2, LoraUse("ink", 0.8))
    ink_half = request("ink-half", 3, LoraUse("ink", 0.4), guidance_scale=1.0)
    glow = request("glow", 4, LoraUse("glow", 1.0), steps=4)
    calls: list[int] = []
    transformer = loaded.pipe.transformer
    hook = transformer.register_forward_hook(
        lambda _m, _a, kw, _o: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        images = run(StepEngine(loaded, loras=loaded.loras), {0: [plain, ink], 2: [ink_half, glow]})
    finally:
        hook.remove()
    # SD3 guides with a second row (the unguided image has one); FLUX's guidance is embedded: a row each.
    guided = type(loaded.pipe).__name__ == "StableDiffusion3Pipeline"
    assert max(calls) == (2 * 3 + 1 if guided else 4), "the four images' rows shared calls"
    for r in (plain, ink, ink_half, glow):
        difference = np.abs(images[r.slot_id] - alone(model, folder, r)).max()
        assert difference <= TOLERANCE, (r.slot_id, difference)
    assert np.abs(images["ink"] - alone(model, folder, request("x", 2))).max() > 2 * TOLERANCE, "the adapter shows"


def test_a_whole_call_takes_its_adapters(loaded: LoadedPipeline, model: str, folder: Path) -> None:
    use = LoraUse("glow", 0.7)
    key = BatchKey(SIDE, SIDE, 6, 2.5, loras=(use,))
    pngs = run_batch(loaded, Assignment("a", [ImageSpec(PROMPT, "", 9, loras=(use,))], key), lambda step: True)
    assert pngs is not None
    image = np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB"), dtype=np.int16)
    assert np.abs(image - alone(model, folder, request("w", 9, use, steps=6))).max() <= TOLERANCE
    assert np.abs(image - alone(model, folder, request("w", 9, steps=6))).max() > 2 * TOLERANCE, "the adapter shows"


@pytest.mark.parametrize("name", ["loud", "t5"])
def test_a_headers_rank_and_alpha_and_a_t5_part_are_taken_as_diffusers_takes_them(
    loaded: LoadedPipeline, family: str, model: str, folder: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ready(loaded, LoraUse(name))
    r = request(name, 11, LoraUse(name, 0.9))
    images = run(StepEngine(loaded, loras=loaded.loras), {0: [r]})
    assert np.abs(images[name] - alone(model, folder, r)).max() <= TOLERANCE
    if name == "t5":
        assert any("(T5) layers are left out" in message for message in caplog.messages)
        t5 = getattr(loaded.pipe, T5[family])
        assert not any("lora" in module for module, _ in t5.named_modules()), "nothing went into the T5 encoder"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("deeper", "1 of its [0-9]+ transformer layers fit no layer"),
        ("wider", "size mismatch"),
        ("unet", "unet layers"),
    ],
)
def test_a_lora_for_another_model_is_the_requests_error(loaded: LoadedPipeline, name: str, why: str) -> None:
    with pytest.raises(LoraError, match=f"loras: '{name}' cannot be used with this model .*({why})"):
        ready(loaded, LoraUse(name))
    from peft.tuners.lora import LoraLayer

    leftovers = [
        m
        for part in ("transformer", "text_encoder")
        for m in getattr(loaded.pipe, part).modules()
        if isinstance(m, LoraLayer) and any(name in a for a in m.lora_A)
    ]
    assert leftovers == [], "nothing of it stays in the model"
    images = run(StepEngine(loaded, loras=loaded.loras), {0: [request("after", 5, LoraUse("ink"))]})
    assert set(images) == {"after"}, "the model still serves, with the adapters it has"


def test_a_file_of_the_transformers_layers_alone_without_their_owners_name_is_its_own(
    loaded: LoadedPipeline, folder: Path
) -> None:
    from safetensors.torch import load_file, save_file

    layers = load_file(str(folder / "ink.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in layers.items() if k.startswith("transformer.")}
    save_file(bare, str(folder / "bare.safetensors"))
    ready(loaded, LoraUse("ink"), LoraUse("bare"))
    loras = loaded.loras
    assert loras is not None
    (ink, _), (own, _) = loras.adapters([LoraUse("ink"), LoraUse("bare")])
    modules = list(loaded.pipe.transformer.modules())
    placed = [sum(1 for m in modules if a in getattr(m, "lora_A", {})) for a in (ink, own)]
    assert placed[0] == placed[1] > 0, placed
