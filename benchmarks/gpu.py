"""GPU scaling: Stable Diffusion 1.5's architecture at its real sizes, random weights, fp16.

    python benchmarks/gpu.py [--device cuda:0] [--batches 1,2,4,8,16] [--steps 25] [--size 512] [--openloop 0.8]
    python benchmarks/gpu.py --tiny          # CPU smoke test in seconds (CI-sized model)
    python benchmarks/gpu.py --model FOLDER  # a pipeline already built (benchmarks/gpu_check.py builds one for all)
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
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, muse_server
from openloop import open_loop, summarize
from pipelines import build_sd15, build_tiny
from scaling import direct, served


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
    parser.add_argument("--model", default="", help="a pipeline folder to measure instead of building one")
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
        if args.model:
            folder = Path(args.model)
        elif args.tiny:
            build_tiny(folder)
        else:
            build_sd15(folder, torch.float16)
        print(
            f"{args.model or ('tiny' if args.tiny else 'SD 1.5')} pipeline in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        d = direct(str(folder), args.device, batches, args.steps, args.size, args.reps)
        s = {b: served(str(folder), args.device, b, args.steps, args.size, args.duration) for b in batches}
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
