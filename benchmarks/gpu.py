"""GPU scaling: Stable Diffusion 1.5's architecture at its real sizes, random weights, fp16.

    python benchmarks/gpu.py [--device cuda:0] [--batches 1,2,4,8,16] [--steps 25] [--size 512] [--openloop 0.8]
    python benchmarks/gpu.py --tiny          # CPU smoke test in seconds (CI-sized model)
    python benchmarks/gpu.py --fast          # eager vs --compile instead: benchmarks/fast.py -> gpu_fast.json

Builds the UNet, VAE and CLIP text encoder from the configs in benchmarks/sd15/ (timings do not
depend on weight values), saves the pipeline, then measures images/s by batch size for the direct
pipeline and for `muse serve` with one worker on the same device (2B closed-loop clients, batch cap
B), and prints served ÷ direct. `--openloop F`: then Poisson arrivals at F x the direct capacity at the
largest batch, Muse with step batching vs `--batching request` at that cap (p50/p99, throughput).
Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, muse_server
from load import run_level
from openloop import open_loop, summarize

CONFIGS = Path(__file__).parent / "sd15"


def build_sd15(folder: Path, dtype: Any) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from muse.demo_model.architecture import DEMO_SPEC, build_tokenizer, save_pipeline

    torch.manual_seed(0)
    read = lambda name: json.loads((CONFIGS / f"{name}.json").read_text())  # noqa: E731
    text_config = {k: v for k, v in read("text_encoder").items() if k != "architectures"}
    # No hub: the tokenizer is Muse's own small BPE, padded to CLIP's 77 tokens; the text encoder
    # keeps CLIP's full 49,408-token embedding table, so its size and cost are real.
    tokenizer = build_tokenizer(dataclasses.replace(DEMO_SPEC, max_tokens=77))
    built: Any = StableDiffusionPipeline(  # Any: diffusers' stubs do not show the pipeline's `to`
        vae=AutoencoderKL.from_config(read("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_config(read("unet")),
        scheduler=PNDMScheduler.from_config(read("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(built.to(dtype=dtype), folder, {"guidance_scale": 7.5})


def build_tiny(folder: Path) -> None:
    from muse.demo_model.architecture import TINY_SPEC, build_pipeline, save_pipeline

    save_pipeline(build_pipeline(TINY_SPEC), folder, {"guidance_scale": 7.5})


def direct(
    model: str,
    device: str,
    batches: list[int],
    steps: int,
    size: int,
    reps: int,
    compiled: bool = False,
    mode: str = "default",
) -> dict[int, Any]:
    """Images/s of whole pipeline calls by batch size (and peak GPU memory). `compiled`: through
    `muse.worker.fastpath`'s compiled UNet, each shape compiled in its untimed first call; `mode`:
    torch.compile's."""
    import torch

    from muse.messages import Batch, BatchKey, ImageSpec
    from muse.worker.fastpath import optimize
    from muse.worker.pipeline import load_pipeline, run_batch

    loaded = load_pipeline(model, device)
    if compiled:  # what `muse serve --compile` compiles: the UNet and the VAE decoder
        loaded.pipe.unet = optimize(loaded.pipe, mode).compiled
        loaded.pipe.vae.decoder = torch.compile(loaded.pipe.vae.decoder, dynamic=False, mode=mode)
    results = {}
    for batch in batches:
        images = [ImageSpec("a photo of a cat", "", i) for i in range(batch)]
        job = Batch("direct", images, BatchKey(size, size, steps, 7.5))
        start = time.perf_counter()
        run_batch(loaded, job, lambda step: True)  # warm-up at this shape (its compile, when compiled)
        first_s = time.perf_counter() - start
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(reps):
            run_batch(loaded, job, lambda step: True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        results[batch] = {"images_per_s": batch * reps / elapsed, "peak_gib": memory, "first_call_s": first_s}
        label = "compiled " if compiled else ""
        print(f"direct {label}batch {batch:>2}: {results[batch]['images_per_s']:.2f} img/s", flush=True)
    del loaded
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def served(model: str, device: str, batches: list[int], steps: int, size: int, duration: float) -> dict[int, Any]:
    results = {}
    body = {"prompt": "a photo of a cat", "steps": steps, "width": size, "height": size}
    for batch in batches:
        flags = ["--model", model, "--devices", device, "--max-batch-size", str(batch), "--max-queue", "1024"]
        with muse_server(*flags) as server:
            asyncio.run(run_level(server.url, 2 * batch, min(duration, 5.0), body))  # warm-up
            row = asyncio.run(run_level(server.url, 2 * batch, duration, body))
        results[batch] = {
            "images_per_s": row.throughput,
            "p50_ms": row.p50_ms,
            "p99_ms": row.p99_ms,
            "batch_sizes": row.batch_sizes,
            "errors": row.errors,
        }
        print(f"served batch {batch:>2}: {row.throughput:.2f} img/s (batches seen {row.batch_sizes})", flush=True)
    return results


def open_loop_runs(
    model: str, device: str, batch: int, rate: float, steps: int, size: int, duration: float
) -> dict[str, Any]:
    """Step vs request batching under the same Poisson arrivals."""
    results = {}
    for mode in ("step", "request"):
        flags = ["--model", model, "--devices", device, "--max-batch-size", str(batch), "--batching", mode]
        with muse_server(*flags, "--max-queue", "1024") as server:
            window = open_loop(server.url, "/api/generate", rate, duration, min(5.0, duration / 2), steps, False, size)
            row = summarize(rate, [asyncio.run(window)])
        results[mode] = row
        print(
            f"open loop {rate:.2f}/s, {mode:<7}: p50 {row['p50_ms'] or 0:.0f} ms, p99 {row['p99_ms'] or 0:.0f} ms, "
            f"{row['throughput']:.2f} img/s, errors {row['errors']}",
            flush=True,
        )
    return results


def main() -> None:
    if "--fast" in sys.argv[1:]:
        sys.argv.remove("--fast")
        from fast import main as fast_main

        fast_main()  # its own flags (see benchmarks/fast.py --help)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="run benchmarks/fast.py (eager vs --compile) instead")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="direct batches timed per batch size")
    parser.add_argument("--duration", type=float, default=20.0, help="served seconds per batch size")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 2 steps, 64 px")
    parser.add_argument(
        "--openloop", type=float, default=0.0, help="also Poisson arrivals at this fraction of capacity (e.g. 0.8)"
    )
    parser.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = parser.parse_args()
    if args.tiny:
        # A 2-second window once saw no completed request while the 2 CPU cores were shared.
        args.device, args.steps, args.size, args.reps, args.duration = "cpu", 2, 64, 1, 5.0
        args.batches = "1,2"
    batches = [int(b) for b in args.batches.split(",")]
    import torch

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory(prefix="muse-sd15-") as tmp:
        folder = Path(tmp) / "model"
        start = time.perf_counter()
        if args.tiny:
            build_tiny(folder)
        else:
            build_sd15(folder, torch.float16)
        print(f"built {'tiny' if args.tiny else 'SD 1.5'} pipeline in {time.perf_counter() - start:.0f} s", flush=True)
        d = direct(str(folder), args.device, batches, args.steps, args.size, args.reps)
        s = served(str(folder), args.device, batches, args.steps, args.size, args.duration)
        loop = None
        if args.openloop:
            largest = max(batches)
            rate = args.openloop * d[largest]["images_per_s"]
            loop = {
                "fraction": args.openloop,
                "batch": largest,
                "rate": rate,
                **open_loop_runs(str(folder), args.device, largest, rate, args.steps, args.size, args.duration),
            }
    rows = []
    print(f"\n{device_name}: {args.size}x{args.size}, {args.steps} steps, fp16 on GPU")
    print(f"{'batch':>6}{'direct img/s':>14}{'served img/s':>14}{'ratio':>8}{'peak GiB':>10}")
    for b in batches:
        ratio = s[b]["images_per_s"] / d[b]["images_per_s"]
        peak = d[b]["peak_gib"]
        print(
            f"{b:>6}{d[b]['images_per_s']:>14.2f}{s[b]['images_per_s']:>14.2f}{ratio:>8.3f}"
            f"{peak if peak is None else round(peak, 1)!s:>10}"
        )
        rows.append({"batch": b, "direct": d[b], "served": s[b], "ratio": ratio})
    report = {
        "device": device_name,
        "size": args.size,
        "steps": args.steps,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
        "openloop": loop,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
