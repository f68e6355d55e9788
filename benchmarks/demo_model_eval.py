"""Prompt adherence of the demo model, judged from pixels by muse.demo_model.checker.

    python benchmarks/demo_model_eval.py                       # the shipped model, its own defaults
    python benchmarks/demo_model_eval.py --sweep 2,3,4,6       # pick the default guidance

Held-out random prompts (their own seed, never the training captions' stream) in two categories:
``basic`` (a <colour> <shape> on a <colour> background: colours and shape are judged) and
``size+position`` (a small/large shape, small ones in one of nine cells: all five fields judged).
Each prompt has a fixed noise seed. A "clean" row scores the checker on exact renders of the same
prompts, which must be 100 %. Writes a table to stdout, JSON and a PNG grid of samples.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muse.demo_model.checker import FIELDS, Expectation, judge
from muse.demo_model.scenes import COLOURS, POSITIONS, SHAPES, render, scene_for_prompt
from muse.model_info import FALLBACK_GUIDANCE, read_defaults

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "muse" / "demo_model" / "pipeline"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "demo_model_eval"
CATEGORIES = ("basic", "size+position")
TARGETS = {"basic": 0.95, "size+position": 0.85}


def make_prompts(category: str, count: int, seed: int) -> list[str]:
    rng = random.Random(f"{category}/{seed}")
    prompts = []
    for _ in range(count):
        fg = rng.choice(COLOURS)
        bg = rng.choice([c for c in COLOURS if c != fg])
        shape = rng.choice(SHAPES)
        if category == "basic":
            prompts.append(f"a {fg} {shape} on a {bg} background")
        elif rng.random() < 1 / 3:
            prompts.append(f"a large {fg} {shape} on a {bg} background")
        else:
            position = rng.choice(list(POSITIONS))
            prompts.append(f"a small {fg} {shape} in the {position} on a {bg} background")
    return prompts


def clean_render(prompt: str, seed: int, size: int) -> Image.Image:
    scene = scene_for_prompt(prompt, random.Random(seed))
    assert scene is not None, prompt
    return render(scene, size)


def load(model: Path, threads: int) -> Any:
    from diffusers import DiffusionPipeline

    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def serving_guidance(model: Path) -> float:
    return float(read_defaults(str(model)).get("guidance_scale", FALLBACK_GUIDANCE))


def generate(pipe: Any, prompts: list[str], args: argparse.Namespace, guidance: float) -> list[Image.Image]:
    images: list[Image.Image] = []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(chunk))]
        out = pipe(
            chunk,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            generator=generators,
            height=args.size,
            width=args.size,
        )
        images.extend(out.images)
    return images


def score(prompts: list[str], images: list[Image.Image]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for prompt, image in zip(prompts, images, strict=True):
        expected = Expectation.from_prompt(prompt)
        assert expected is not None, prompt
        verdict = judge(image, expected)
        rows.append({"prompt": prompt, "ok": all(verdict.values()), **verdict})
    summary: dict[str, Any] = {"n": len(rows), "fully_right": sum(r["ok"] for r in rows) / len(rows)}
    for field in FIELDS:
        judged = [r[field] for r in rows if field in r]
        summary[field] = sum(judged) / len(judged) if judged else None
    return {"summary": summary, "rows": rows}


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'row':<34}{'n':>5}{'fully right':>13}" + "".join(f"{f:>10}" for f in FIELDS)
    lines = [head, "-" * len(head)]
    for name, result in results.items():
        s = result["summary"]
        cells = "".join(f"{'-' if s[f] is None else f'{100 * s[f]:.1f}%':>10}" for f in FIELDS)
        lines.append(f"{name:<34}{s['n']:>5}{100 * s['fully_right']:>12.1f}%{cells}")
    return "\n".join(lines)


def grid(samples: list[tuple[str, Image.Image, bool]], columns: int = 8, cell: int = 128) -> Image.Image:
    """Samples upscaled with their prompts underneath; a wrong one's caption is red."""
    caption_h = 48
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, image, ok) in enumerate(samples):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_h)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        text = "\n".join(textwrap.wrap(prompt, 22)[:4])
        draw.multiline_text((x + 2, y + cell + 1), text, fill="black" if ok else "red", spacing=0)
    return sheet


def evaluate(pipe: Any, args: argparse.Namespace, guidance: float) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        prompts = make_prompts(category, args.n, args.prompt_seed)
        started = time.perf_counter()
        images = generate(pipe, prompts, args, guidance)
        result = score(prompts, images)
        result["seconds"] = time.perf_counter() - started
        result["images"] = images
        results[f"{category} (g={guidance:g}, {args.steps} steps)"] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, help="default: the model's muse.json")
    parser.add_argument("--sweep", help="comma-separated guidance scales to compare instead")
    parser.add_argument("--n", type=int, default=100, help="prompts per category")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1000, help="first noise seed")
    parser.add_argument("--prompt-seed", type=int, default=2024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)

    pipe = load(args.model, args.threads)
    if args.sweep:
        scales = [float(g) for g in args.sweep.split(",")]
    else:
        scales = [args.guidance if args.guidance is not None else serving_guidance(args.model)]
    results: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        prompts = make_prompts(category, args.n, args.prompt_seed)
        clean = [clean_render(p, i, args.size) for i, p in enumerate(prompts)]
        results[f"{category} (clean renders)"] = {**score(prompts, clean), "seconds": 0.0}
    for scale in scales:
        results.update(evaluate(pipe, args, scale))
    print(table(results))

    model_rows = [(name, r) for name, r in results.items() if "clean" not in name]
    passed = all(
        r["summary"]["fully_right"] >= TARGETS[name.split(" (")[0]] for name, r in model_rows[-len(CATEGORIES) :]
    )
    print(f"targets {TARGETS}: {'met' if passed else 'NOT met'} (last guidance row)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(args.model),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "targets_met": passed,
        "results": {name: {k: v for k, v in r.items() if k != "images"} for name, r in results.items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    samples = [
        (row["prompt"], image, row["ok"])
        for _, r in model_rows[-len(CATEGORIES) :]
        for row, image in list(zip(r["rows"], r["images"], strict=True))[:24]
    ]
    grid(samples).save(args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
