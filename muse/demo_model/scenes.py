"""The demo model's little world: a grammar of prompts and the PIL scenes they describe.

Grammar: ``a [small|large] <colour> <shape> [in the <position>] on a <colour> background``.
A prompt with neither a size nor a position means a large, centred shape; a position implies a
small shape. The same module renders the training data and the clean references for the checker.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated, unambiguous shades: the checker names colours by the nearest entry, so these must be
# what a person would call the name, and far apart from each other.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 35),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (130, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3x3 grid; the value is the centre of the cell as (x, y) fractions of the side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "center": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}
# Shape side as a fraction of the image side. The gap between the ranges is what lets the checker
# tell the sizes apart with margin to spare.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.25, 0.33), "large": (0.56, 0.72)}
POSITION_JITTER = 0.04
LARGE_JITTER = 0.03
# Shape boxes have their edges on this grid (fractions of the side), one cell in from the border.
# At 64 pixels it is the 4-pixel grid of the VAE's latents, so no edge falls inside a latent pixel:
# with edges anywhere, the UNet drew small squares with wobbly, rounded sides that read as circles.
EDGE_GRID = 16

# Words the tokenizer learns as whole tokens; anything else falls back to byte pieces.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "an", "the", "in", "on", "of", "at", "with", "and", "background", "centre", "middle"}
        | set(COLOURS)
        | set(SHAPES)
        | set(SIZES)
        | {word for name in POSITIONS for word in name.split()}
    )
)


@dataclass(frozen=True)
class Scene:
    fg: str
    bg: str
    shape: str
    size: str
    position: str
    # Actual geometry, as fractions of the side, so a scene renders the same at any resolution.
    scale: float
    cx: float
    cy: float


def sample_scene(rng: random.Random, small_fraction: float = 0.6) -> Scene:
    fg = rng.choice(COLOURS)
    bg = rng.choice([c for c in COLOURS if c != fg])
    shape = rng.choice(SHAPES)
    size = "small" if rng.random() < small_fraction else "large"
    position = rng.choice(list(POSITIONS)) if size == "small" else "center"
    return place(fg, bg, shape, size, position, rng)


def place(fg: str, bg: str, shape: str, size: str, position: str, rng: random.Random) -> Scene:
    """Geometry for a described scene, with the jitter the training data uses, snapped to EDGE_GRID."""
    low, high = SIZE_RANGE[size]
    # Whole cells, kept inside the size range: rounding alone could step just outside it.
    cells = round(rng.uniform(low, high) * EDGE_GRID)
    cells = min(max(cells, math.ceil(low * EDGE_GRID)), int(high * EDGE_GRID))
    side = cells / EDGE_GRID
    jitter = POSITION_JITTER if size == "small" else LARGE_JITTER
    x, y = POSITIONS[position]

    def centre(middle: float) -> float:
        first = round((middle + rng.uniform(-jitter, jitter) - side / 2) * EDGE_GRID)
        first = min(max(first, 1), EDGE_GRID - 1 - cells)
        return first / EDGE_GRID + side / 2

    cx, cy = centre(x), centre(y)
    return Scene(fg, bg, shape, size, position, side, cx, cy)


@dataclass(frozen=True)
class Parsed:
    """What a grammatical prompt states; None where it leaves a choice."""

    fg: str
    bg: str
    shape: str
    size: str | None
    position: str | None


def parse(prompt: str) -> Parsed | None:
    words = prompt.lower().strip().rstrip(".").split()
    if len(words) < 7 or words[0] != "a" or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        return None
    bg, body = words[-2], words[1:-4]
    size = body.pop(0) if body and body[0] in SIZES else None
    if bg not in PALETTE or len(body) < 2 or body[0] not in PALETTE or body[1] not in SHAPES:
        return None
    fg, shape, rest = body[0], body[1], body[2:]
    position = None
    if rest:
        if rest[:2] != ["in", "the"] or " ".join(rest[2:]) not in POSITIONS:
            return None
        position = " ".join(rest[2:])
    return Parsed(fg, bg, shape, size, position)


def scene_for_prompt(prompt: str, rng: random.Random) -> Scene | None:
    """The scene a grammatical prompt describes (random where it leaves a choice), else None."""
    parsed = parse(prompt)
    if parsed is None:
        return None
    size = parsed.size or ("small" if parsed.position else "large")
    position = parsed.position or (rng.choice(list(POSITIONS)) if size == "small" else "center")
    return place(parsed.fg, parsed.bg, parsed.shape, size, position, rng)


def caption(scene: Scene, rng: random.Random) -> str:
    """A training caption; optional words are dropped at random, but a small shape always says so
    (by its size word or its position) so that the bare prompt keeps meaning "large, centred"."""
    say_size = rng.random() < 0.5 if scene.size == "large" else rng.random() < 0.8
    say_position = scene.size == "small" and rng.random() < 0.8
    if scene.size == "small" and not (say_size or say_position):
        say_size = True
    return describe(scene, with_size=say_size, with_position=say_position)


def describe(scene: Scene, with_size: bool = True, with_position: bool = True) -> str:
    size = f"{scene.size} " if with_size else ""
    where = f" in the {scene.position}" if with_position and scene.size == "small" else ""
    return f"a {size}{scene.fg} {scene.shape}{where} on a {scene.bg} background"


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw at twice the size and downsample, so edges are anti-aliased like a real image's."""
    big = 2 * size
    image = Image.new("RGB", (big, big), PALETTE[scene.bg])
    draw = ImageDraw.Draw(image)
    half = scene.scale * big / 2
    # PIL fills the far edge's pixels too: one pixel in keeps a shape exactly scale wide.
    left, top = scene.cx * big - half, scene.cy * big - half
    right, bottom = scene.cx * big + half - 1, scene.cy * big + half - 1
    colour = PALETTE[scene.fg]
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
    return image.reduce(2)


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    return np.asarray(render(scene, size), dtype=np.uint8)
