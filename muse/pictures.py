"""Pictures a request starts from (img2img, inpainting), read at the edge: every refusal names its field.

A picture arrives as base64 (or a data URL) in JSON, or as a file in a multipart form. It is refused before
it is decoded when its bytes are over --max-upload, when it is not PNG, JPEG or WebP, or when its header
declares more pixels than --max-pixels (a decompression bomb is a small file declaring a huge image); a
truncated or corrupt one is refused when decoded. Its EXIF orientation is applied, then it is fitted to the
request's size as A1111's `resize_mode` says, and sent to the worker as a PNG of exactly that size.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from muse.messages import SourceImage

FORMATS = ("PNG", "JPEG", "WEBP")
# A1111's resize modes, by their number; 3 ("latent upscale") resizes pixels here, as 0 does.
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", "just resize (latent upscale)")
DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
MIN_SIDE = 64
MULTIPLE = 8


class PictureError(ValueError):
    """A picture refused: `param` is the field it came in (the request model's name for it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class PictureLimits:
    max_bytes: int  # --max-upload, per picture
    max_pixels: int  # --max-pixels: its decoded width x height


def from_base64(param: str, value: str, limits: PictureLimits) -> bytes:
    """The bytes of a base64 picture, plain or as a data URL; too long is refused before decoding."""
    text = DATA_URL.sub("", value.strip(), count=1)
    if len(text) * 3 // 4 > limits.max_bytes + 2:
        raise PictureError(
            param, f"the picture is over this server's limit of {_size(limits.max_bytes)} (--max-upload)"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PictureError(param, "not base64 (send the picture's bytes in base64, or a data: URL)") from None


def open_picture(param: str, data: bytes, limits: PictureLimits) -> Image.Image:
    """The decoded picture, upright (EXIF orientation applied). Errors call a mask a mask."""
    noun = "mask" if param == "mask_image" else "picture"
    if len(data) > limits.max_bytes:
        raise PictureError(param, f"the {noun} is over this server's limit of {_size(limits.max_bytes)} (--max-upload)")
    if not data:
        raise PictureError(param, f"the {noun} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise PictureError(
                    param,
                    f"the {noun} is {width}x{height}, {width * height:,} pixels, over this server's limit of "
                    f"{limits.max_pixels:,} (--max-pixels)",
                )
            image.load()
    except PictureError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PictureError(param, f"the {noun} declares more pixels than this server decodes (--max-pixels)") from None
    except Image.UnidentifiedImageError:
        raise PictureError(param, f"not a picture this server reads: send {', '.join(FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PictureError(param, f"the {noun} is truncated or corrupt ({exc})") from None
    return ImageOps.exif_transpose(image)


EXIF_ORIENTATION = 0x0112
SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Header:
    """What a picture's header says, read without decoding its pixels."""

    width: int  # upright: EXIF orientation applied
    height: int
    alpha: bool  # it can be transparent


def header(data: bytes) -> Header | None:
    """The picture's header; None for one it cannot read, which is refused by name where it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
                if image.getexif().get(EXIF_ORIENTATION) in SIDEWAYS:
                    width, height = height, width
                alpha = "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info)
                return Header(width, height, alpha)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def natural_size(image: Image.Image) -> tuple[int, int]:
    """The size a request takes from its picture when it names none: the picture's, down to a multiple of 8."""
    width, height = image.size
    return max(MIN_SIDE, width - width % MULTIPLE), max(MIN_SIDE, height - height % MULTIPLE)


def fit(
    image: Image.Image, width: int, height: int, resize_mode: int, resample: int = Image.Resampling.LANCZOS
) -> Image.Image:
    """The picture at exactly width x height, as A1111's resize modes make it: 0 (and 3) stretch it; 1 scales
    it to cover and crops the middle; 2 scales it to fit and fills the rest by stretching its edges."""
    if image.size == (width, height):
        return image
    if resize_mode == 1:
        return ImageOps.fit(image, (width, height), method=resample)
    if resize_mode != 2:
        return image.resize((width, height), resample)
    scale = min(width / image.width, height / image.height)
    inner = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    canvas = image.resize((width, height), resample)
    left, top = (width - inner.width) // 2, (height - inner.height) // 2
    if inner.height < height:  # bands above and below: the first and last rows, stretched
        canvas.paste(inner.crop((0, 0, inner.width, 1)).resize((width, top + 1)), (0, 0))
        canvas.paste(
            inner.crop((0, inner.height - 1, inner.width, inner.height)).resize(
                (width, height - top - inner.height + 1)
            ),
            (0, top + inner.height - 1),
        )
    if inner.width < width:  # bands left and right: the first and last columns, stretched
        canvas.paste(inner.crop((0, 0, 1, inner.height)).resize((left + 1, height)), (0, 0))
        canvas.paste(
            inner.crop((inner.width - 1, 0, inner.width, inner.height)).resize(
                (width - left - inner.width + 1, height)
            ),
            (left + inner.width - 1, 0),
        )
    canvas.paste(inner, (left, top))
    return canvas


def source(
    picture: Image.Image,
    mask: Image.Image | None,
    strength: float,
    size: tuple[int, int],
    resize_mode: int = 0,
    mask_blur: int = 0,
    *,
    picture_param: str = "init_image",
) -> SourceImage:
    """What the worker gets: the picture (and mask: white = repaint, blurred by `mask_blur` pixels) fitted to
    `size`, as PNGs."""
    width, height = size
    fitted = fit(picture.convert("RGB"), width, height, resize_mode)
    mask_png = None
    if mask is not None:
        if mask.size != picture.size:
            raise PictureError(
                "mask_image",
                f"the mask is {mask.width}x{mask.height}, the picture ({picture_param}) "
                f"{picture.width}x{picture.height}: send a mask of the picture's size",
            )
        gray = mask.convert("L")
        if mask_blur > 0:
            gray = gray.filter(ImageFilter.GaussianBlur(mask_blur))
        mask_png = png(fit(gray, width, height, resize_mode, Image.Resampling.BILINEAR))
    return SourceImage(png(fitted), strength, mask_png)


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """OpenAI's convention: where a picture is fully transparent is what to repaint (as a white-on-black mask),
    None when it has no transparent pixel."""
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    low = alpha.getextrema()[0]  # one band: (least, most)
    if not isinstance(low, int | float) or low > 0:
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _size(count: int) -> str:
    return f"{count / (1 << 20):g} MiB" if count >= 1 << 20 else f"{count:,} bytes"
