"""Judge a demo-model image from its pixels alone: colours, shape, size and position.

Deterministic and resolution-independent. Colours are named by the nearest palette entry; the shape
is read from a soft mask (each pixel's blend between background and foreground colour), whose
sub-pixel extent and area make the fill ratio that separates square (1), circle (pi/4) and
triangle (1/2) even for a shape 16 pixels wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from muse.demo_model.scenes import PALETTE, POSITIONS, parse

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)
# Midpoints between the size ranges and between the position cells (see scenes.py).
SMALL_BELOW = 0.445
CELL_EDGES = (0.35, 0.65)
SQUARE_ABOVE = 0.9
CIRCLE_ABOVE = 0.65
_GRID = {(int(x * 3), int(y * 3)): name for name, (x, y) in POSITIONS.items()}
FIELDS = ("fg", "bg", "shape", "size", "position")


@dataclass(frozen=True)
class Reading:
    bg: str
    fg: str | None = None  # None: no shape found
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    fill: float = 0.0
    extent: float = 0.0


@dataclass(frozen=True)
class Expectation:
    """The checkable claims of a prompt; None means the prompt leaves it open."""

    fg: str
    bg: str
    shape: str
    size: str | None = None
    position: str | None = None

    @classmethod
    def from_prompt(cls, prompt: str) -> Expectation | None:
        parsed = parse(prompt)
        if parsed is None:
            return None
        # A position implies a small shape, and a large shape is always centred.
        size = parsed.size or ("small" if parsed.position else None)
        position = parsed.position or ("center" if size == "large" else None)
        return cls(parsed.fg, parsed.bg, parsed.shape, size, position)


def _nearest(pixels: np.ndarray) -> np.ndarray:
    distances = ((pixels[..., None, :] - _COLOURS) ** 2).sum(-1)
    return distances.argmin(-1)


def _cell(value: float) -> int:
    return 0 if value < CELL_EDGES[0] else 2 if value > CELL_EDGES[1] else 1


def read(image: Image.Image | np.ndarray) -> Reading:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    height, width = pixels.shape[:2]
    labels = _nearest(pixels)
    ring = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(ring, minlength=len(_NAMES)).argmax())
    others = labels[labels != bg]
    if others.size < 4:
        return Reading(bg=_NAMES[bg])
    fg = int(np.bincount(others, minlength=len(_NAMES)).argmax())

    # Soft coverage: where each pixel lies on the segment from background to foreground colour.
    direction = _COLOURS[fg] - _COLOURS[bg]
    alpha = np.clip(((pixels - _COLOURS[bg]) @ direction) / (direction @ direction), 0.0, 1.0)
    components, count = ndimage.label(alpha > 0.5)
    if count == 0:
        return Reading(bg=_NAMES[bg], fg=_NAMES[fg])
    sizes = ndimage.sum_labels(np.ones_like(alpha), components, index=range(1, count + 1))
    biggest = components == 1 + int(np.argmax(sizes))
    # Keep the anti-aliased rim of the biggest blob, drop faint noise and other blobs.
    region = ndimage.binary_dilation(biggest, iterations=1)
    soft = np.where(region & (alpha > 0.15), alpha, 0.0)

    columns, rows = soft.max(axis=0), soft.max(axis=1)
    extent_w, extent_h = float(columns.sum()), float(rows.sum())
    fill = float(soft.sum()) / max(extent_w * extent_h, 1e-6)
    shape = "square" if fill > SQUARE_ABOVE else "circle" if fill > CIRCLE_ABOVE else "triangle"
    extent = max(extent_w / width, extent_h / height)
    size = "small" if extent < SMALL_BELOW else "large"
    # Centres of the row/column coverage profiles: the bounding-box centre, robust to the rim.
    cx = float((columns * (np.arange(width) + 0.5)).sum() / extent_w) / width
    cy = float((rows * (np.arange(height) + 0.5)).sum() / extent_h) / height
    position = _GRID[(_cell(cx), _cell(cy))]
    return Reading(_NAMES[bg], _NAMES[fg], shape, size, position, fill, extent)


def judge(image: Image.Image | np.ndarray, expected: Expectation) -> dict[str, bool]:
    """Per checked field, whether the image shows what was asked; fields left open are absent."""
    reading = read(image)
    verdict = {}
    for field in FIELDS:
        wanted = getattr(expected, field)
        if wanted is not None:
            verdict[field] = getattr(reading, field) == wanted
    return verdict
