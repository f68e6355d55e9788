"""`--compile`'s gain: the direct pipeline eager and compiled, by batch, and Muse served with `--compile`.

    python benchmarks/fast.py                      # a GPU: SD 1.5's architecture, 512 px, fp16 -> gpu_fast.json
    python benchmarks/gpu.py --fast                # the same
    python benchmarks/fast.py --device cpu --model embedded --size 64 --batches 1,8   # -> fast_cpu.json
    python benchmarks/fast.py --tiny               # smoke test: tiny model, CPU, one batch size

Direct: `run_batch` (one whole pipeline call) in a loop at each batch size, first eager, then on a second
copy whose UNet is `muse.worker.fastpath.optimize`'s compiled one (channels-last, fused QKV,
torch.compile) and whose VAE decoder is compiled too (each compile happens in an untimed first call per
shape). Served: `muse serve --compile`
with one worker, batch cap = the largest batch, 2 x cap closed-loop clients; served ÷ compiled direct
at that batch (target >= 0.97 on a GPU), and the worker's idle time between UNet calls under that load
(muse_step_gap_seconds_total ÷ muse_unet_calls_total). Peak GPU memory per batch on CUDA. The direct
runs and the server share one compile cache, so the server's start reuses what the direct run
compiled. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, write_report
from pipelines import build_sd15, build_tiny
from scaling import direct, served

from muse.config import EMBEDDED_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument(
        "--model", default="sd15", help="sd15 (built at full size, random weights), embedded, or a path"
    )
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="timed direct batches per batch size")
    parser.add_argument("--duration", type=float, default=20.0, help="served closed-loop seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument(
        "--mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile's mode, for the compiled direct runs and the server (--compile-mode)",
    )
    parser.add_argument(
        "--served-batch", type=int, default=0, help="the served run's batch cap (default: the largest batch)"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny model on CPU, 2 steps, batch 2")
    parser.add_argument("--out", default="", help="path without extension (default results/gpu_fast or fast_cpu)")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.model, args.steps, args.size, args.reps, args.duration = "cpu", "tiny", 2, 64, 1, 4.0
        args.batches = "2"
    import torch

    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    out = Path(args.out) if args.out else RESULTS / ("gpu_fast" if cuda else "fast_cpu")
    batches = [int(b) for b in args.batches.split(",")]
    cap = args.served_batch or max(batches)
    if cap not in batches:
        parser.error(f"--served-batch {cap}: not one of --batches (served is compared with compiled direct)")
    with tempfile.TemporaryDirectory(prefix="muse-fast-") as tmp:
        model = args.model
        if model in ("sd15", "tiny"):
            model = str(Path(tmp) / "model")
            build_sd15(Path(model), torch.float16 if cuda else torch.float32) if args.model == "sd15" else build_tiny(
                Path(model)
            )
        elif model == "embedded":
            model = EMBEDDED_MODEL
        cache = str(Path(tmp) / "compile-cache")
        from muse.worker.fastpath import use_compile_cache

        use_compile_cache(cache)
        eager = {str(b): r for b, r in direct(model, args.device, batches, args.steps, args.size, args.reps).items()}
        compiled = {
            str(b): r
            for b, r in direct(
                model, args.device, batches, args.steps, args.size, args.reps, compiled=True, mode=args.mode
            ).items()
        }
        report = {
            "device": device_name,
            "torch": torch.__version__,
            "model": args.model,
            "compile_mode": args.mode,
            "size": args.size,
            "steps": args.steps,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "eager": {b: r["images_per_s"] for b, r in eager.items()},
            "compiled": {b: r["images_per_s"] for b, r in compiled.items()},
            "compiled_over_eager": {b: compiled[b]["images_per_s"] / eager[b]["images_per_s"] for b in eager},
            "served_over_direct": None,
            "idle_between_steps_ms": None,
            "peak_gib": {b: r["peak_gib"] for b, r in compiled.items()},
            "first_call_s": {b: r["first_call_s"] for b, r in compiled.items()},
            "served": None,
        }
        # Written now, and again with the served figures: a run cut off while the server compiles keeps these.
        write_report(report, out, plot)
        print(f"\n{device_name}, {args.model}, {args.size} px, {args.steps} steps")
        print(f"{'batch':>6}{'eager img/s':>13}{'compiled img/s':>16}{'ratio':>8}")
        for b in eager:
            print(
                f"{b:>6}{report['eager'][b]:>13.2f}{report['compiled'][b]:>16.2f}"
                f"{report['compiled_over_eager'][b]:>8.2f}",
                flush=True,
            )
        flags = ["--compile", "--compile-cache", cache, "--compile-mode", args.mode]
        if args.device == "cpu":
            flags += ["--threads-per-worker", str(args.threads)]
        # Compiling every shape before the worker is ready can take a long while on a GPU.
        serve = served(model, args.device, cap, args.steps, args.size, args.duration, *flags, ready_timeout=3600)
    report |= {
        "served_batch": cap,
        "served_over_direct": serve["images_per_s"] / compiled[str(cap)]["images_per_s"],
        "idle_between_steps_ms": serve["idle_between_steps_ms"],
        "served": serve,
    }
    idle = report["idle_between_steps_ms"]
    print(
        f"served --compile ÷ compiled direct at batch {cap}: {report['served_over_direct']:.3f}; "
        f"idle between UNet calls {'n/a' if idle is None else f'{idle:.1f} ms'}"
    )
    write_report(report, out, plot)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(report["eager"])
    x = range(len(batches))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar([i - 0.2 for i in x], [report["eager"][b] for b in batches], 0.4, label="eager")
    axis.bar([i + 0.2 for i in x], [report["compiled"][b] for b in batches], 0.4, label="compiled")
    axis.set_xticks(list(x), [f"batch {b}" for b in batches])
    axis.set_ylabel("images/s (direct)")
    axis.set_title(f"--compile on {report['device']} ({report['model']}, {report['size']} px)", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
