"""`--compile`: the worker's fast path. After load: channels-last weights, fused QKV projections where
diffusers offers them, and `torch.compile` of the UNet and the VAE decoder with static shapes. The step
engine calls the UNet with a varying number of rows (two per guided image), so it pads each call to a
small set of *row buckets* (1, then twice 1, 2, 4, 8, … images up to the capacity) and drops the padding
from the result: the compiled UNet then sees a handful of shapes, each compiled once at start-up at the
model's native size. The decoder sees one shape: finished images are decoded one by one (a VAE decode is
near-linear in its batch, so little is lost). Any other shape (another image size, an Assignment bigger than
the capacity) runs eager rather than stall the worker behind a compile. Compiled kernels are cached on
disk (`--compile-cache`), so a restart reuses them.

Nothing here knows about pipes; the worker (muse.worker.main) calls it before saying Ready.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("muse.worker")


def image_buckets(capacity: int) -> list[int]:
    """1, 2, 4, … below the capacity, then the capacity itself."""
    sizes, size = [], 1
    while size < capacity:
        sizes.append(size)
        size *= 2
    return [*sizes, max(1, capacity)]


def row_buckets(capacity: int) -> list[int]:
    """UNet batch sizes the step engine pads to: one unguided row, or two rows per guided image."""
    return sorted({1} | {2 * n for n in image_buckets(capacity)})


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `rows`; `rows` itself beyond the largest (an oversized first Assignment)."""
    return next((b for b in buckets if b >= rows), rows)


def use_compile_cache(directory: str) -> None:
    """Inductor's on-disk caches, set before the first compile."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(directory).resolve())
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")


class ShapeCompiled:
    """A function's compiled twin for the shapes warmed at start-up (static: one graph each), and the
    function itself, eager, for any other: a request of an unusual size or batch never stalls the worker
    behind a compile (tens of seconds on a GPU, minutes on a CPU) that could make its batch miss its
    deadline. Shapes are those of the first argument."""

    def __init__(self, eager: Callable[..., Any], mode: str = "default") -> None:
        """`mode`: torch.compile's (--compile-mode). Under CUDA graphs (reduce-overhead, max-autotune) the
        next replay overwrites a call's outputs, and samplers keep past predictions: outputs are copied."""
        import torch
        from torch._inductor import list_mode_options

        # One graph per warmed shape: more than dynamo's default of 8 per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=False, mode=mode)
        self.copy_outputs = bool(list_mode_options(mode).get("triton.cudagraphs"))
        self.shapes: set[tuple[int, ...]] = set()
        self.warming = False  # while True, every shape called is compiled and kept

    def __call__(self, sample: Any, *args: Any, **kwargs: Any) -> Any:
        shape = tuple(sample.shape)
        if self.warming:
            self.shapes.add(shape)
        if shape not in self.shapes:
            return self.eager(sample, *args, **kwargs)
        out = self.compiled(sample, *args, **kwargs)
        if self.copy_outputs:
            from torch.utils._pytree import tree_map

            out = tree_map(lambda x: x.clone() if hasattr(x, "clone") else x, out)
        return out


class CompiledUNet(ShapeCompiled):
    """The UNet in channels-last with fused QKV projections, compiled for the warmed row buckets."""

    def __init__(self, unet: Any, mode: str = "default") -> None:
        import torch

        unet.to(memory_format=torch.channels_last)
        if hasattr(unet, "fuse_qkv_projections"):
            try:
                unet.fuse_qkv_projections()
            except ValueError as exc:  # e.g. added KV projections: diffusers declines, eager attention stays
                log.info("QKV projections not fused: %s", exc)
        super().__init__(unet, mode)


def optimize(pipe: Any, mode: str = "default") -> CompiledUNet:
    """Channels-last and fused QKV on the pipeline's UNet (in place), and its compiled twin. Compiled
    outputs stay within float rounding of eager (tests/test_fastpath.py)."""
    return CompiledUNet(pipe.unet, mode)


def compile_decoder(pipe: Any, mode: str = "default") -> ShapeCompiled | None:
    """The VAE's decode (scaled latents → image tensor), compiled; None where the pipeline casts its VAE
    to float32 around each decode (SDXL with an fp16 VAE that asks for it; SD 1.x/2.x never does): a
    graph compiled for one dtype would recompile."""
    import torch

    vae = pipe.vae
    upcasts = type(pipe).__name__ == "StableDiffusionXLPipeline" and getattr(vae.config, "force_upcast", False)
    if upcasts and vae.dtype == torch.float16:
        return None

    def decode(latents: Any) -> Any:
        return vae.decode(latents, return_dict=False)[0]

    return ShapeCompiled(decode, mode)


@dataclass
class FastPath:
    """What the step engine runs with under --compile."""

    unet: CompiledUNet
    buckets: list[int]
    decoder: ShapeCompiled | None = None
