"""AUTOMATIC1111's `parameters` text ("infotext"), written into every PNG Muse makes and read back from any.

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: DDIM, CFG scale: 2.5, Seed: 7, Size: 64x64, Model: muse-demo

A1111's PNG Info tab, its /sdapi/v1/png-info and other tools read the last line as `key: value` pairs
and the lines before it as the prompts. The chunk goes in right after IHDR without re-encoding the image.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYWORD = "parameters"
DEFAULT_SAMPLER = "Default"  # what A1111-style metadata says when the model's own scheduler ran
NEGATIVE = "Negative prompt: "
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
FULLWIDTH_COLON = "\uff1a"
# A1111's own pattern for one `key: value` pair of the last line (a value may be "quoted, with commas").
PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class Infotext:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # "" = the model's own
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str

    def text(self) -> str:
        lines = [inert(self.prompt)]
        if self.negative_prompt:
            lines.append(f"{NEGATIVE}{inert(self.negative_prompt)}")
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler or DEFAULT_SAMPLER}, CFG scale: {self.cfg_scale:g}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {self.model}"
        )
        return "\n".join(lines)


def inert(prompt: str) -> str:
    """A prompt that cannot forge fields: newlines stay (A1111 keeps multi-line prompts), but no line may
    start a negative prompt (its colon becomes a full-width one), and control characters that cut or hide
    text in PNG readers (NUL, carriage returns…) are dropped."""
    prompt = prompt.replace("\r\n", "\n").replace("\r", "\n")
    prompt = CONTROL.sub("", prompt)
    return "\n".join(
        FULLWIDTH_COLON.join(line.split(":", 1)) if line.strip().startswith(NEGATIVE.strip()) else line
        for line in prompt.split("\n")
    )


def parse(text: str) -> dict[str, str]:
    """The fields of an infotext as A1111's parse_generation_parameters reads them: Prompt, Negative
    prompt, then the last line's pairs (lines are stripped, as A1111 does)."""
    *head, last = text.strip().split("\n")
    pairs = PAIR.findall(last)
    if len(pairs) < 3:  # A1111 too: a last line with fewer pairs is part of the prompt
        head, pairs = [*head, last], []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in (line.strip() for line in head):
        if line.startswith(NEGATIVE.strip()):
            in_negative = True
            line = line[len(NEGATIVE.strip()) :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    fields.update((key.strip(), value.strip()) for key, value in pairs)
    return fields


def png_with_text(png: bytes, keyword: str, text: str) -> bytes:
    """Insert a text chunk right after IHDR without re-encoding the image (microseconds, not milliseconds).

    Latin-1 text goes in a tEXt chunk, anything else in an uncompressed UTF-8 iTXt chunk, as Pillow does.
    """
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    try:
        kind, data = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, data = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def png_texts(data: bytes) -> dict[str, str]:
    """Every text chunk of a PNG (tEXt, zTXt, iTXt), read by Pillow; ValueError if it is not a PNG."""
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # text chunks after the image data are only read by load()
            return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable PNG image: {exc}") from exc
