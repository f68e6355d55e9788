"""What the drop-in front ends do to a mask that Muse's own API leaves to the client: A1111's inverted masks and
its "fill" (the masked area painted from its surroundings before the picture is encoded), and telling whether a
picture can carry OpenAI's kind of mask (fully transparent pixels are where to edit).

Both A1111 steps work on the picture and mask as the worker gets them (fitted to the request's size, the mask
blurred), which is where A1111 applies them too.
"""

from __future__ import annotations

import io
from dataclasses import replace

from PIL import Image, ImageFilter, ImageOps

from muse import pictures
from muse.messages import SourceImage

# Coarse to fine: each finer layer covers the coarser ones wherever the kept pixels are close enough to give it
# colour, so a pixel deep inside a large hole still gets the average colour around it.
FILL_RADII = (256, 64, 16, 4, 2)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with its masked area (white in `mask`) replaced by the colours around it.

    A normalised blur: the kept pixels, weighted by how much they are kept, blurred, then divided by the blurred
    weight (PIL's premultiplied "RGBa" to "RGBA" conversion does the division), so that masked pixels never
    contribute their own colour. The kept pixels themselves end on top, unchanged."""
    kept = image.convert("RGB")
    kept.putalpha(ImageOps.invert(mask.convert("L")))
    weighted = kept.convert("RGBa")
    filled = Image.new("RGBA", image.size)
    for radius in FILL_RADII:
        filled.alpha_composite(weighted.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA"))
    filled.alpha_composite(kept)
    return filled.convert("RGB")


def repaint_area(source: SourceImage, *, invert: bool, fill: bool) -> SourceImage:
    """A1111's `inpainting_mask_invert` (repaint the black of the mask instead) and `inpainting_fill` 0, on the
    fitted picture and mask. Blurring and resizing are linear, so inverting after them is inverting before."""
    if source.mask is None or not (invert or fill):
        return source
    mask = Image.open(io.BytesIO(source.mask)).convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    image = source.image
    if fill:
        image = pictures.png(fill_masked(Image.open(io.BytesIO(source.image)), mask))
    return replace(source, image=image, mask=pictures.png(mask) if invert else source.mask)


def declares_alpha(data: bytes) -> bool:
    """Whether a picture's header says it can be transparent (one that cannot be read says no)."""
    found = pictures.header(data)
    return found is not None and found.alpha
