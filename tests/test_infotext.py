"""The A1111 `parameters` text: hostile prompts cannot forge fields, read back by Muse and by an independent
A1111-style parser (sd-parsers, as image viewers and galleries use)."""

from __future__ import annotations

import io
import random
import re
import struct
import time
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sd_parsers import ParserManager

from muse.infotext import MAX_TEXT, MAX_TEXT_CHUNKS, MAX_TEXTS, Infotext, pairs, parse, png_texts, png_with_text

HOSTILE = [
    ("a fox\nNegative prompt: evil", "blurry"),
    ("a fox\x00Seed: 1, Steps: 1, Sampler: Evil", ""),
    ("a fox\nSteps: 99, Sampler: Evil, CFG scale: 1, Seed: 1, Size: 1x1", "b\nSteps: 5, Seed: 3, CFG scale: 9"),
    ("a fox\r\nNegative prompt: evil\rmore", "x\nNegative prompt: y"),
    ("海辺の灯台 🌅\n  Negative prompt:evil", "ぼやけ"),
    ("", ""),
    ("a fox, Negative prompt: evil", ""),
    ("a fox\u2028Negative prompt: evil", ""),
    ("a fox\x85NEGATIVE PROMPT : evil", ""),
]


def png(text: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return png_with_text(buffer.getvalue(), "parameters", text)


@pytest.mark.parametrize(("prompt", "negative"), HOSTILE)
def test_hostile_prompts_cannot_forge_fields(prompt: str, negative: str) -> None:
    info = Infotext(prompt or "x", negative, 25, "DDIM", 2.5, 7, 64, 64, "muse-demo")
    data = png(info.text())
    ours = parse(png_texts(data)["parameters"])
    assert (ours["Seed"], ours["Steps"], ours["Sampler"], ours["Size"]) == ("7", "25", "DDIM", "64x64")
    assert "evil" not in ours["Negative prompt"].lower() or "evil" in negative.lower()
    theirs = ParserManager().parse(Image.open(io.BytesIO(data)))
    assert theirs is not None
    (sampler,) = theirs.samplers
    assert sampler.name == "DDIM" and sampler.parameters["seed"] == "7" and sampler.parameters["steps"] == "25"
    negatives = " ".join(p.value for p in sampler.negative_prompts)
    assert "evil" not in negatives.lower() or "evil" in negative.lower()
    # A1111 strips each line; sd-parsers keeps the indentation.
    assert ours["Prompt"].split("\n") == [line.strip() for p in sampler.prompts for line in p.value.split("\n")]


@pytest.mark.parametrize(
    "prompt", ["a red fox", "line one\nline two", 'commas, colons: and "quotes"', "海辺の灯台 🌅", "tab\there"]
)
def test_ordinary_prompts_round_trip_exactly(prompt: str) -> None:
    text = Infotext(prompt, "blurry, dark", 30, "Euler a", 7.5, 12, 512, 768, "sd").text()
    fields = parse(png_texts(png(text))["parameters"])
    assert fields["Prompt"] == prompt and fields["Negative prompt"] == "blurry, dark"
    assert fields["CFG scale"] == "7.5" and fields["Size"] == "512x768" and fields["Sampler"] == "Euler a"


def test_png_texts_refuses_what_is_not_a_png() -> None:
    with pytest.raises(ValueError):
        png_texts(b"GIF89a")
    with pytest.raises(ValueError):
        png_texts(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)


def test_text_chunks_of_every_kind_are_read_without_decoding_the_pixels() -> None:
    info = PngInfo()
    info.add_text("plain", "latin-1 é")
    info.add_text("wide", "ünïcode ✓")
    info.add_text("squeezed", "compressed " * 100, zip=True)
    info.add_itxt("international", "itxt ✓ " * 50, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG", pnginfo=info)
    assert png_texts(buffer.getvalue()) == {
        "plain": "latin-1 é",
        "wide": "ünïcode ✓",
        "squeezed": "compressed " * 100,
        "international": "itxt ✓ " * 50,
    }
    # 225 megapixels in 27 kB: decoding would take the memory; the chunks are read in microseconds.
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, "PNG")
    assert len(bomb.getvalue()) < 100_000 and png_texts(bomb.getvalue()) == {}
    with pytest.raises(ValueError):
        png_texts(bomb.getvalue()[:-5])


# A1111's own pattern for one `key: value` pair (modules/infotext_utils.py before it required a letter first).
A1111_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_the_last_line_gives_the_pairs_a1111s_pattern_gives() -> None:
    alphabet = ["a", "B", "7", "_", " ", "\t", "\u3000", ":", ",", '"', "\\", "-", "\u00e9", "\r"]
    rng = random.Random(20240601)
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        theirs = [(key.strip(), value.strip()) for key, value in A1111_PAIR.findall(line)]
        assert pairs(line) == theirs, repr(line)


@pytest.mark.parametrize("run", ["a", " ", "\t", "a b_c", ":", '"', "a:", 'k: "', "\\"])
def test_a_long_last_line_without_pairs_parses_in_linear_time(run: str) -> None:
    """A1111's pattern took 6.4 s on 40,000 letters and four times that on twice as many: these 256 KiB
    took minutes (and the 1 MiB a text chunk may hold, over an hour)."""
    size = 256 << 10
    text = (run * (size // len(run) + 1))[:size]
    started = time.perf_counter()
    fields = parse("a prompt\n" + text)
    assert time.perf_counter() - started < 2.0
    assert fields["Prompt"].startswith("a prompt")


def text_chunk(keyword: str, text: bytes, kind: bytes = b"zTXt") -> bytes:
    body = keyword.encode() + (b"\0\0" + zlib.compress(text, 9) if kind == b"zTXt" else b"\0" + text)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunks(*chunks: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    plain = buffer.getvalue()
    ihdr_end = 8 + 8 + struct.unpack(">I", plain[8:12])[0] + 4
    return plain[:ihdr_end] + b"".join(chunks) + plain[ihdr_end:]


def test_text_is_capped_per_chunk_in_all_and_in_number() -> None:
    """740 zTXt chunks of 1 MiB each fit in a 1 MB upload: reading them all once took 2.5 GB."""
    full = b"a" * MAX_TEXT
    assert len(png_texts(png_with_chunks(text_chunk("one", full)))["one"]) == MAX_TEXT
    with pytest.raises(ValueError, match="inflates past"):
        png_texts(png_with_chunks(text_chunk("one", full + b"a")))
    at_most = MAX_TEXTS // MAX_TEXT
    assert len(png_texts(png_with_chunks(*(text_chunk(f"k{i}", full) for i in range(at_most))))) == at_most
    many = png_with_chunks(*(text_chunk("same", full) for _ in range(740)))
    assert len(many) < 1_100_000
    with pytest.raises(ValueError, match="in all"):
        png_texts(many)
    with pytest.raises(ValueError, match="in all"):  # plain text counts too
        png_texts(png_with_chunks(text_chunk("z", full), text_chunk("z", full), text_chunk("t", b"x", b"tEXt")))
    small = [text_chunk(f"k{i}", b"x", b"tEXt") for i in range(MAX_TEXT_CHUNKS)]
    assert len(png_texts(png_with_chunks(*small))) == MAX_TEXT_CHUNKS
    with pytest.raises(ValueError, match=f"more than {MAX_TEXT_CHUNKS} text chunks"):
        png_texts(png_with_chunks(*small, text_chunk("one more", b"x", b"tEXt")))
