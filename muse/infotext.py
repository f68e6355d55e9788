"""AUTOMATIC1111's `parameters` text ("infotext"), written into every PNG Muse makes and read back from any.

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: DDIM, CFG scale: 2.5, Seed: 7, Size: 64x64, Model: muse-demo

A1111's PNG Info tab, its /sdapi/v1/png-info and other tools read the last line as `key: value` pairs
and the lines before it as the prompts. The chunk goes in right after IHDR without re-encoding the image.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# Text in metadata can be a zip bomb: one chunk may not inflate past MAX_TEXT (Pillow's limit too), nor all of
# them together past MAX_TEXTS, nor may there be more than MAX_TEXT_CHUNKS (a 1 MB upload of 740 chunks of
# 1 MiB each once took the server to 2.5 GB). A1111's own images carry one; ComfyUI's two (workflow and prompt).
MAX_TEXT = 1 << 20
MAX_TEXTS = 2 << 20
MAX_TEXT_CHUNKS = 64
KEYWORD = "parameters"
DEFAULT_SAMPLER = "Default"  # what A1111-style metadata says when the model's own scheduler ran
NEGATIVE = "Negative prompt: "
LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines() splits on
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x9f]")
NEGATIVE_MARK = re.compile(r"negative\s*prompt\s*:", re.IGNORECASE)
FULLWIDTH_COLON = "\uff1a"
# One `key: value` pair of the last line (a value may be "quoted, with commas"). A1111's own pattern starts with
# `\s*([\w ]+):`, which retries from every character of a run of key characters that no colon ends: quadratic
# in a long colon-free line (40,000 letters froze the server for 6 s). Here a key may only start where such a run
# does, so each run is scanned once; the pairs found are the same once stripped (tests/test_infotext.py).
PAIR = re.compile(r'(?<![\w ])([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


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
    strength: float = 0.0  # an image started from a picture: its denoising strength (0: from text)
    lora_tags: str = ""  # its LoRAs as A1111 writes them in the prompt: "<lora:name:0.8> …"

    def text(self) -> str:
        lines = [inert(self.prompt) + (f" {self.lora_tags}" if self.lora_tags else "")]
        if self.negative_prompt:
            lines.append(f"{NEGATIVE}{inert(self.negative_prompt)}")
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler or DEFAULT_SAMPLER}, CFG scale: {self.cfg_scale:g}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {self.model}"
            + (f", Denoising strength: {self.strength:g}" if self.strength else "")
        )
        return "\n".join(lines)


def inert(prompt: str) -> str:
    """A prompt that cannot forge fields: newlines stay (A1111 keeps multi-line prompts), but no line may
    start a negative prompt (its colon becomes a full-width one), and control characters that cut or hide
    text in PNG readers (NUL, carriage returns…) are dropped."""
    prompt = LINE_BREAKS.sub("\n", prompt)
    prompt = CONTROL.sub("", prompt)
    # Anywhere, in any case: some readers split the whole text on it, not only at line starts.
    return NEGATIVE_MARK.sub(lambda m: m[0][:-1] + FULLWIDTH_COLON, prompt)


def parse(text: str) -> dict[str, str]:
    """The fields of an infotext as A1111's parse_generation_parameters reads them: Prompt, Negative
    prompt, then the last line's pairs (lines are stripped, as A1111 does)."""
    *head, last = text.strip().split("\n")
    found = pairs(last)
    if len(found) < 3:  # A1111 too: a last line with fewer pairs is part of the prompt
        head, found = [*head, last], []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in (line.strip() for line in head):
        if line.startswith(NEGATIVE.strip()):
            in_negative = True
            line = line[len(NEGATIVE.strip()) :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    fields.update(found)
    return fields


def pairs(line: str) -> list[tuple[str, str]]:
    """The `key: value` pairs of an infotext's last line, stripped, in time linear in its length."""
    return [(key.strip(), value.strip()) for key, value in PAIR.findall(line)]


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
    """Every text chunk of a PNG (tEXt, zTXt, iTXt); ValueError if it is not a well-formed PNG, or if its text
    goes past MAX_TEXT a chunk, MAX_TEXTS in all or MAX_TEXT_CHUNKS chunks.

    Reads the chunks, never the pixels: a small file can declare an image of gigapixels, and decoding it
    would take the memory and the event loop's time."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG image")
    texts: dict[str, str] = {}
    left, chunks = MAX_TEXTS, 0
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        crc = data[at + 8 + length : at + 12 + length]
        if len(body) != length or len(crc) != 4 or zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
            raise ValueError(f"not a readable PNG image: chunk {kind!r} is cut off or corrupt")
        if kind == b"IEND":
            return texts
        if kind in TEXT_CHUNKS:
            chunks += 1
            if chunks > MAX_TEXT_CHUNKS:
                raise ValueError(f"not a readable PNG image: more than {MAX_TEXT_CHUNKS} text chunks")
            try:
                keyword, text, size = _text_chunk(kind, body, min(MAX_TEXT, left))
            except _TooLong:
                raise ValueError(
                    f"not a readable PNG image: its text inflates past {MAX_TEXT} bytes a chunk or {MAX_TEXTS} in all"
                ) from None
            left -= size
            texts[keyword] = text
        at += 12 + length
    raise ValueError("not a readable PNG image: no end chunk")


class _TooLong(Exception):
    """A text chunk holds more than the bytes it may take."""


def _text_chunk(kind: bytes, body: bytes, limit: int) -> tuple[str, str, int]:
    """The keyword, the text and the text's size in bytes; _TooLong past `limit` bytes of text."""
    keyword, _, rest = body.partition(b"\0")
    try:
        if kind == b"tEXt":
            raw, encoding = rest, "latin-1"
        elif kind == b"zTXt":
            raw, encoding = _inflate(rest[1:], limit), "latin-1"
        else:
            compressed, rest = rest[0], rest[2:]  # flag, method
            _language, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            raw, encoding = (_inflate(text, limit) if compressed else text), "utf-8"
        if len(raw) > limit:
            raise _TooLong
        return keyword.decode("latin-1"), raw.decode(encoding), len(raw)
    except (IndexError, UnicodeDecodeError, zlib.error) as exc:
        raise ValueError(f"not a readable PNG image: bad {kind.decode()} chunk") from exc


def _inflate(data: bytes, limit: int) -> bytes:
    """At most `limit` + 1 bytes: enough to tell a text that is too long, never all of a bomb."""
    return zlib.decompressobj().decompress(data, limit + 1)
