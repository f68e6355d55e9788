"""`/muse` text → a request body for `GenerateBody`. Pure: no Slack, no asyncio.

    /muse <prompt> [--quality|--fast] [--seed N] [--n K] [--steps N] [--negative "…"]

Options may sit anywhere in the text; what is left is the prompt. Slack clients often turn `--` into an
en or em dash and straight quotes into curly ones, so both are accepted. Range checks are not done
here: the body goes through the API's own validation, so Slack refuses exactly what the API refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from muse.schema import Dialect

HELP_WORDS = {"", "help", "--help", "-h", "?"}
FLAGS = {"quality", "fast"}
INTEGERS = {"seed", "n", "steps"}
TEXTS = {"negative"}
OPTION_SYNTAX = '--quality | --fast, --seed N, --n K, --steps N, --negative "…"'

# `--name` or `--name=value`, or the same with the em or en dash that a client's autocorrect made of `--`.
_OPTION = re.compile(r"^(?:--|\u2014|\u2013)([a-z][a-z-]*)(?:=(.*))?$", re.IGNORECASE)
# Quotes around --negative's text: straight, or curly as autocorrect makes them (and mixes them).
_QUOTE_FAMILIES = ('"\u201c\u201d', "'\u2018\u2019")
_INTEGER = re.compile(r"^[+-]?\d+$")
# More digits than any option takes (seeds are 32-bit). Python refuses to read an integer past 4,300 digits,
# with a ValueError that is no CommandError, and is slow to read one near that.
MAX_DIGITS = 20
SHOWN = 24  # characters of a bad value quoted back to the user

# GenerateBody's field names as the user typed them, so API validation errors name the option.
SLACK = Dialect(
    names={
        "prompt": "the prompt",
        "negative_prompt": "--negative",
        "quality": "--quality/--fast",
        "seed": "--seed",
        "n": "--n",
        "steps": "--steps",
    }
)


class CommandError(ValueError):
    """The text is not a valid `/muse` command; the message is meant for the user."""


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Generate:
    prompt: str
    negative: str | None = None
    quality: str | None = None
    seed: int | None = None
    n: int | None = None
    steps: int | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body `/api/generate` would receive for the same request."""
        body: dict[str, Any] = {"prompt": self.prompt}
        for key, value in (
            ("negative_prompt", self.negative),
            ("quality", self.quality),
            ("seed", self.seed),
            ("n", self.n),
            ("steps", self.steps),
        ):
            if value is not None:
                body[key] = value
        return body


def _option(token: str) -> tuple[str, str | None] | None:
    match = _OPTION.match(token)
    return None if match is None else (match.group(1).lower(), match.group(2) or None)


def _quoted(tokens: list[str], i: int) -> tuple[str, int] | None:
    """When tokens[i] opens a quote: the text up to its closing quote, and the index after that."""
    family = next((f for f in _QUOTE_FAMILIES if tokens[i][0] in f), None)
    if family is None:
        return None
    words = [tokens[i][1:]]
    j = i
    while not (words[-1] and words[-1][-1] in family):
        j += 1
        if j == len(tokens):
            raise CommandError("the quote after --negative is never closed")
        words.append(tokens[j])
    words[-1] = words[-1][:-1]
    return " ".join(words), j + 1


def _integer(name: str, value: str) -> int:
    shown = repr(value if len(value) <= SHOWN else value[:SHOWN] + "…")
    if not _INTEGER.match(value):
        raise CommandError(f"--{name} needs a whole number, not {shown}")
    if len(value.lstrip("+-")) > MAX_DIGITS:
        raise CommandError(f"--{name} needs a whole number of at most {MAX_DIGITS} digits, not {shown}")
    return int(value)


def parse(text: str) -> Help | Generate:
    if text.strip().lower() in HELP_WORDS:
        return Help()
    # Split on whitespace only: quotes and apostrophes in the prompt ("the cat's '90s hat") stay as typed.
    tokens = text.split()
    prompt: list[str] = []
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        option = _option(tokens[i])
        i += 1
        if option is None:
            prompt.append(tokens[i - 1])
            continue
        name, inline = option
        if name == "help":
            return Help()
        if name not in FLAGS | INTEGERS | TEXTS:
            raise CommandError(f"unknown option --{name}; the options are {OPTION_SYNTAX}")
        key = "quality" if name in FLAGS else name
        if key in values:
            raise CommandError("choose one of --quality or --fast" if key == "quality" else f"--{name} is given twice")
        if name in FLAGS:
            if inline is not None:
                raise CommandError(f"--{name} takes no value")
            values[key] = name
            continue
        if inline is not None:
            tokens.insert(i, inline)  # `--seed=5` reads like `--seed 5`
        value = ""
        if i < len(tokens) and _option(tokens[i]) is None:
            if name in INTEGERS:
                value, i = tokens[i], i + 1
            elif (quoted := _quoted(tokens, i)) is not None:
                value, i = quoted
            else:
                # Unquoted, --negative's text runs until the next option.
                start = i
                while i < len(tokens) and _option(tokens[i]) is None:
                    i += 1
                value = " ".join(tokens[start:i])
        value = value.strip()
        if not value:
            kind = "a whole number" if name in INTEGERS else 'some text, e.g. --negative "blurry, text"'
            raise CommandError(f"--{name} needs {kind}")
        if name in INTEGERS:
            values[key] = _integer(name, value)
        else:
            values[key] = value
    text_prompt = " ".join(prompt)
    if not text_prompt:
        return Help()
    return Generate(text_prompt, **values)
