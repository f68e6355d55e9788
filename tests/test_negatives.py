"""Negative prompts' embeddings are encoded once per text and read back after (muse.worker.families.negatives):
an admission whose negative prompt was seen runs the text encoder over its prompt alone, and gets the
conditioning a fresh encoding gives; rows with LoRAs (whose text-encoder parts change the embeddings) and
unguided images never read the cache. Pixels with cached negatives are checked against diffusers by
tests/test_engine.py (its images joining mid-way share negative prompts)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from muse.config import EMBEDDED_MODEL
from muse.messages import LoraUse
from muse.worker.engine import SlotRequest, StepEngine
from muse.worker.families.negatives import NegativeCache, Parts, encode_prompts
from muse.worker.pipeline import LoadedPipeline, load_pipeline


@pytest.fixture(scope="module", params=["embedded", "tiny-sdxl", "tiny-sd3"])
def loaded(request: pytest.FixtureRequest) -> LoadedPipeline:
    torch.set_num_threads(2)
    if request.param == "embedded":
        return load_pipeline(EMBEDDED_MODEL, "cpu")
    return load_pipeline(request.getfixturevalue(request.param.replace("-", "_") + "_model"), "cpu")


def request(slot_id: str, loaded: LoadedPipeline, **kw: Any) -> SlotRequest:
    side = 32 if hasattr(loaded.pipe, "transformer") else max(64, loaded.width)
    fields: dict[str, Any] = {"prompt": f"a red circle {slot_id}", "negative_prompt": "", "seed": 1, "steps": 4}
    fields |= {"guidance_scale": 3.0, "width": side, "height": side} | kw
    return SlotRequest(slot_id=slot_id, **fields)


@pytest.fixture
def encoder_calls(loaded: LoadedPipeline) -> Iterator[list[int]]:
    """The rows of each call of the pipeline's first text encoder."""
    calls: list[int] = []
    handle = loaded.pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    yield calls
    handle.remove()


def rows(engine: StepEngine, slot_id: str) -> dict[str, torch.Tensor]:
    (slot,) = [s for s in engine.slots if s.request.slot_id == slot_id]
    return slot.conditioning.rows


def test_a_negative_prompt_seen_before_is_not_encoded_again(loaded: LoadedPipeline, encoder_calls: list[int]) -> None:
    engine = StepEngine(loaded)
    engine.admit([request("first", loaded)])
    assert encoder_calls == [1, 1]  # the prompt, then the (empty) negative prompt
    engine.admit([request("second", loaded), request("third", loaded, guidance_scale=1.0, negative_prompt="new")])
    assert encoder_calls[2:] == [2]  # both prompts; "" is known and the unguided image needs no negative
    engine.admit([request("fourth", loaded, negative_prompt="blurry"), request("fifth", loaded)])
    assert encoder_calls[3:] == [2, 2]  # an unseen negative prompt: the pipeline's own two calls
    engine.admit([request("sixth", loaded, negative_prompt="blurry")])
    assert encoder_calls[5:] == [1]

    fresh = StepEngine(loaded)  # its own cache: everything encoded as the pipeline encodes it
    again: list[tuple[str, dict[str, Any]]] = [
        ("second", {}),
        ("sixth", {"negative_prompt": "blurry"}),
        ("third", {"guidance_scale": 1.0}),
    ]
    for slot_id, kw in again:
        fresh.admit([request(slot_id, loaded, **kw)])
        cached, encoded = rows(engine, slot_id), rows(fresh, slot_id)
        assert cached.keys() == encoded.keys()
        for key in cached:
            torch.testing.assert_close(cached[key], encoded[key], rtol=0, atol=1e-5)


def fake_encode(calls: list[tuple[list[str], list[str] | None]]) -> Any:
    def encode(prompts: list[str], negatives: list[str] | None) -> tuple[Parts, Parts | None]:
        calls.append((prompts, negatives))

        def embed(texts: list[str]) -> torch.Tensor:
            return torch.tensor([[float(len(t))] for t in texts])

        return (embed(prompts),), None if negatives is None else (embed(negatives),)

    return encode


def test_rows_with_loras_neither_read_nor_fill_the_cache() -> None:
    cache, calls = NegativeCache(), []  # type: ignore[var-annotated]
    plain = SlotRequest("plain", "a", "", 1, 4, 3.0, 64, 64)
    adapted = SlotRequest("adapted", "a", "", 1, 4, 3.0, 64, 64, loras=(LoraUse("style", 1.0),))
    encode_prompts(cache, [adapted], fake_encode(calls))
    assert "" not in cache
    encode_prompts(cache, [plain], fake_encode(calls))
    assert "" in cache
    encode_prompts(cache, [plain, adapted], fake_encode(calls))
    assert [negatives for _, negatives in calls] == [[""], [""], ["", ""]]  # the LoRA row's batch encodes both


def test_the_least_recently_used_negative_prompt_leaves_first() -> None:
    cache = NegativeCache(size=2)
    for text in ["a", "b"]:
        cache.put(text, (torch.zeros(1, 1),))
    cache.get("a")
    cache.put("c", (torch.zeros(1, 1),))
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
