"""The A1111 `parameters` text: hostile prompts cannot forge fields, read back by Muse and by an independent
A1111-style parser (sd-parsers, as image viewers and galleries use)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sd_parsers import ParserManager

from muse.infotext import Infotext, parse, png_texts, png_with_text

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
