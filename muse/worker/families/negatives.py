"""Negative prompts' embeddings, kept by their text.

Nearly every request of a service shares its negative prompt (most leave it empty), yet a pipeline's
`encode_prompt` runs the text encoders over it again for every image: on the step engine, where images are
admitted one at a time under open-loop traffic, that was 0.9 of the 2.0 ms an admission spends encoding text
(the embedded model, this project's 2-core CPU). The embeddings depend only on the text and the text
encoders' weights, which do not change while a worker runs; a row with LoRAs, whose text-encoder parts
change them, never reads or fills the cache (see the families' `encode`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from muse.worker.slots import SlotRequest

SIZE = 16  # distinct negative prompts kept: a handful in practice; an SDXL entry is ~0.3 MB in fp16


class NegativeCache:
    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.entries: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()

    def __contains__(self, text: str) -> bool:
        return text in self.entries

    def get(self, text: str) -> tuple[torch.Tensor, ...]:
        """A cached entry (KeyError if absent), now the most recently used."""
        self.entries.move_to_end(text)
        return self.entries[text]

    def put(self, text: str, tensors: tuple[torch.Tensor, ...]) -> None:
        """Keep one negative prompt's tensors (each `(1, …)`), evicting the least recently used past `size`."""
        self.entries[text] = tuple(t.detach().clone() for t in tensors)
        self.entries.move_to_end(text)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


Parts = tuple[torch.Tensor, ...]  # one prompt's tensors (its embeddings, and pooled embeddings where a family has them)
# A family's `encode_prompt`: prompts (and negative prompts, or None to skip them) -> each side's tensors, n rows.
EncodePrompts = Callable[[list[str], list[str] | None], tuple[Parts, Parts | None]]


def encode_prompts(
    cache: NegativeCache, requests: Sequence[SlotRequest], encode: EncodePrompts
) -> list[tuple[Parts, Parts | None]]:
    """Each request's positive tensors and, when it is guided, its negative prompt's (each `(1, …)`): the
    prompts encoded together, the negative prompts read from `cache` when every guided request's is there
    (else encoded with the prompts, as the pipeline does, and kept). Requests with LoRAs bypass the cache."""
    guided = [r.guidance_scale > 1 for r in requests]
    prompts = [r.prompt for r in requests]
    cacheable = not any(r.loras for r in requests)
    cached = cacheable and all(r.negative_prompt in cache for r, g in zip(requests, guided, strict=True) if g)
    if cached:
        positive, _ = encode(prompts, None)
        negatives = [cache.get(r.negative_prompt) if g else None for r, g in zip(requests, guided, strict=True)]
    else:
        positive, negative = encode(prompts, [r.negative_prompt for r in requests])
        assert negative is not None
        negatives = [_row(negative, i) for i in range(len(requests))]
        if cacheable:
            for request, parts, g in zip(requests, negatives, guided, strict=True):
                if g and parts is not None:
                    cache.put(request.negative_prompt, parts)
    return [(_row(positive, i), neg if g else None) for i, (neg, g) in enumerate(zip(negatives, guided, strict=True))]


def _row(parts: Parts, i: int) -> Parts:
    return tuple(t[i : i + 1] for t in parts)
