"""Images/s of one pipeline at a batch size, measured two ways that gpu.py and fast.py put side by side: the
direct pipeline (whole calls in this process) and `muse serve` with one worker under closed-loop clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from common import metric, muse_server
from load import run_level


def direct(
    model: str,
    device: str,
    batches: list[int],
    steps: int,
    size: int,
    reps: int,
    compiled: bool = False,
    mode: str = "default",
) -> dict[int, dict[str, Any]]:
    """Images/s of whole pipeline calls by batch size (and peak GPU memory). `compiled`: through
    `muse.worker.fastpath`'s compiled UNet, each shape compiled in its untimed first call; `mode`:
    torch.compile's."""
    import torch

    from muse.messages import Assignment, BatchKey, ImageSpec
    from muse.worker.fastpath import optimize
    from muse.worker.heap import keep_freed_memory
    from muse.worker.pipeline import load_pipeline, run_batch

    keep_freed_memory()  # as a Muse worker does
    loaded = load_pipeline(model, device)
    if compiled:  # what `muse serve --compile` compiles: the UNet and the VAE decoder
        loaded.pipe.unet = optimize(loaded.pipe, mode).compiled
        loaded.pipe.vae.decoder = torch.compile(loaded.pipe.vae.decoder, dynamic=False, mode=mode)
    cuda = device.startswith("cuda")
    results = {}
    for batch in batches:
        images = [ImageSpec("a photo of a cat", "", i) for i in range(batch)]
        job = Assignment("direct", images, BatchKey(size, size, steps, 7.5))
        start = time.perf_counter()
        run_batch(loaded, job, lambda step: True)  # warm-up at this shape (its compile, when compiled)
        first_s = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(reps):
            run_batch(loaded, job, lambda step: True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        results[batch] = {"images_per_s": batch * reps / elapsed, "peak_gib": memory, "first_call_s": first_s}
        label = "compiled " if compiled else ""
        print(f"direct {label}batch {batch:>2}: {results[batch]['images_per_s']:.2f} img/s", flush=True)
    del loaded
    if cuda:
        torch.cuda.empty_cache()
    return results


def served(
    model: str,
    device: str,
    batch: int,
    steps: int,
    size: int,
    duration: float,
    *flags: str,
    ready_timeout: float = 240.0,
) -> dict[str, Any]:
    """Muse with one worker and batch cap `batch` (plus `flags`) under 2 x `batch` closed-loop clients for
    `duration` seconds, after an untimed warm-up; also the worker's idle time between UNet calls under that load
    (muse_step_gap_seconds_total ÷ muse_unet_calls_total)."""
    flags = ("--model", model, "--devices", device, "--max-batch-size", str(batch), "--max-queue", "1024", *flags)
    body = {"prompt": "a photo of a cat", "steps": steps, "width": size, "height": size}
    start = time.perf_counter()
    with muse_server(*flags, timeout=ready_timeout) as server:
        ready_s = time.perf_counter() - start
        asyncio.run(run_level(server.url, 2 * batch, min(duration, 5.0), body))  # fill the pipeline
        before = httpx.get(server.url + "/metrics").text
        row = asyncio.run(run_level(server.url, 2 * batch, duration, body))
        after = httpx.get(server.url + "/metrics").text
    calls = metric(after, "muse_unet_calls_total") - metric(before, "muse_unet_calls_total")
    gaps = metric(after, "muse_step_gap_seconds_total") - metric(before, "muse_step_gap_seconds_total")
    print(
        f"served cap {batch:>2}: {row.throughput:.2f} img/s (ready after {ready_s:.0f} s, batches seen "
        f"{row.batch_sizes})",
        flush=True,
    )
    return {
        "images_per_s": row.throughput,
        "p50_ms": row.p50_ms,
        "p99_ms": row.p99_ms,
        "batch_sizes": row.batch_sizes,
        "errors": row.errors,
        "ready_s": ready_s,
        "idle_between_steps_ms": gaps / calls * 1000 if calls else None,
    }
