"""LoRA adapters and pictures on the step engine, in one run: what mixing adapters and starting from a picture cost.

    python benchmarks/adapters.py [--model FOLDER] [--batch 8] [--duration 20] [--steps 25]
    python benchmarks/adapters.py --quick        # a few minutes

Four small LoRA files are made for the model (muse.demo_model.loras) and served from `--lora-dir`. Phases, on one
server (`--max-batch-size B`, closed loops of 2B clients):
1. one LoRA: every request names the same adapter; then four LoRAs: requests cycle through the four. Their
   throughput ratio is what mixing adapters in one model call costs (target >= 0.8);
2. idle latency (one request at a time, median of --tries): no LoRA, one LoRA (target <= 1.2 x without);
3. img2img at strength 0.5 against text-to-image at the same steps, idle and closed loop: a picture's request runs
   half the steps (target: about 0.5 x).
Prints a table, writes benchmarks/results/adapters.json and .png. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, muse_server, write_report
from load import run_level

STYLES = 4


def make_loras(model: str) -> Path:
    from muse.demo_model.loras import make_lora

    folder = Path(tempfile.mkdtemp(prefix="muse-bench-loras-"))
    for i in range(STYLES):
        make_lora(model, folder / f"style{i}.safetensors", seed=i, kohya=i % 2 == 1)
    return folder


def picture(side: int) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (30, 80, 190))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(230, 50, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def idle_ms(url: str, body: dict[str, Any], tries: int) -> float:
    """The median latency of one request at a time (after one unmeasured, which loads what it needs)."""
    took = []
    for i in range(tries + 1):
        start = time.perf_counter()
        response = httpx.post(url + "/api/generate", json=body | {"seed": i}, timeout=600)
        response.raise_for_status()
        if i:
            took.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(took), 1)


def closed(url: str, clients: int, duration: float, body: Any) -> float:
    level = asyncio.run(run_level(url, clients, duration, body, warmup=3.0))
    if level.errors:
        raise RuntimeError(f"errors under load: {level.errors}")
    return round(level.throughput, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a Stable Diffusion folder (default: the embedded model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per closed-loop phase")
    parser.add_argument("--tries", type=int, default=7, help="requests per idle-latency median")
    parser.add_argument("--quick", action="store_true", help="6 s phases, 3 tries")
    parser.add_argument("--out", default=str(RESULTS / "adapters"))
    args = parser.parse_args()
    from muse.config import EMBEDDED_MODEL
    from muse.model_info import inspect

    duration, tries = (6.0, 3) if args.quick else (args.duration, args.tries)
    model = args.model or EMBEDDED_MODEL
    side = max(64, inspect(model, EMBEDDED_MODEL).width)
    folder = make_loras(model)
    base = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": side, "height": side}
    clients = 2 * args.batch

    def one(_: int) -> dict[str, Any]:
        return base | {"loras": [{"name": "style0", "scale": 0.8}]}

    def four(n: int) -> dict[str, Any]:
        return base | {"loras": [{"name": f"style{n % STYLES}", "scale": 0.8}]}

    init = {"init_image": picture(side), "strength": 0.5}
    flags = ["--model", model, "--devices", "cpu", "--max-batch-size", str(args.batch), "--lora-dir", str(folder)]
    report: dict[str, Any] = {
        "config": {
            "model": args.model or "embedded",
            "side": side,
            "steps": args.steps,
            "batch": args.batch,
            "duration_s": duration,
            "cpu": os.cpu_count(),
        }
    }
    with muse_server(*flags) as served:
        url = served.url
        for i in range(STYLES):  # every adapter loaded before anything is timed
            httpx.post(url + "/api/generate", json=four(i) | {"steps": 2}, timeout=600).raise_for_status()
        report["closed_loop"] = {
            "no_lora": closed(url, clients, duration, base),
            "one_lora": closed(url, clients, duration, one),
            "four_loras": closed(url, clients, duration, four),
            "text": closed(url, clients, duration, base),
            "img2img_0.5": closed(url, clients, duration, base | init),
        }
        report["idle_ms"] = {
            "no_lora": idle_ms(url, base, tries),
            "one_lora": idle_ms(url, one(0), tries),
            "img2img_0.5": idle_ms(url, base | init, tries),
        }
    c, i = report["closed_loop"], report["idle_ms"]
    report["ratios"] = {
        "four_over_one_lora": round(c["four_loras"] / c["one_lora"], 3),
        "one_lora_over_none": round(c["one_lora"] / c["no_lora"], 3),
        "idle_lora_over_none": round(i["one_lora"] / i["no_lora"], 3),
        "idle_img2img_over_text": round(i["img2img_0.5"] / i["no_lora"], 3),
        "throughput_text_over_img2img": round(c["text"] / c["img2img_0.5"], 3),
    }
    print_table(report)
    write_report(report, Path(args.out), plot)


def print_table(report: dict[str, Any]) -> None:
    c, i, r = report["closed_loop"], report["idle_ms"], report["ratios"]
    cfg = report["config"]
    print(f"\n{cfg['model']} model, {cfg['side']} px, {cfg['steps']} steps, batch {cfg['batch']}")
    print(f"closed loop img/s: no LoRA {c['no_lora']}, one LoRA {c['one_lora']}, four LoRAs {c['four_loras']}")
    print(f"  four ÷ one LoRA          {r['four_over_one_lora']:.3f}  (target >= 0.8)")
    print(f"idle ms: no LoRA {i['no_lora']}, one LoRA {i['one_lora']}, img2img 0.5 {i['img2img_0.5']}")
    print(f"  LoRA ÷ none, idle        {r['idle_lora_over_none']:.3f}  (target <= 1.2)")
    print(f"  img2img 0.5 ÷ text, idle {r['idle_img2img_over_text']:.3f}  (about 0.5)")
    ratio = r["throughput_text_over_img2img"]
    print(f"  text ÷ img2img 0.5, img/s {ratio:.3f}  (about 0.5: a picture's image costs half the steps)")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    c = report["closed_loop"]
    names = ["no_lora", "one_lora", "four_loras", "img2img_0.5"]
    left.bar(names, [c[n] for n in names], color=["#999", "#3a7", "#37a", "#a73"])
    left.set_ylabel("images/s, closed loop")
    left.set_title(f"{report['config']['model']} model, batch {report['config']['batch']}")
    i = report["idle_ms"]
    idle = ["no_lora", "one_lora", "img2img_0.5"]
    right.bar(idle, [i[n] for n in idle], color=["#999", "#3a7", "#a73"])
    right.set_ylabel("ms, one request at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
