"""`/muse` parsing, the bot's replies and token redaction: pure functions, no Slack and no server."""

from __future__ import annotations

import logging

import pytest

from muse.errors import (
    Cancelled,
    GenerationFailed,
    InvalidRequest,
    Overloaded,
    ShuttingDown,
    TimedOut,
    Unavailable,
    WorkerDied,
)
from muse.messages import GenerateRequest
from muse.schema import GenerateBody, validate
from muse.slack.bot import token_problem
from muse.slack.command import SLACK, CommandError, Generate, Help, parse
from muse.slack.redact import REDACTED, Redact, protect
from muse.slack.replies import comment, failed, queued, refused, usage


@pytest.mark.parametrize("text", ["", "   ", "help", "HELP", "--help", "-h", "?", "--seed 3", "a cat --help"])
def test_help(text: str) -> None:
    assert parse(text) == Help()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red fox", Generate("a red fox")),
        ("a red fox --seed 42", Generate("a red fox", seed=42)),
        ("--seed 42 a red fox", Generate("a red fox", seed=42)),
        ("a red fox --quality --n 3", Generate("a red fox", quality="quality", n=3)),
        ("a red fox --fast --steps=4", Generate("a red fox", quality="fast", steps=4)),
        ('a fox --negative "blurry, dark" in snow', Generate("a fox in snow", negative="blurry, dark")),
        ("a fox --negative blurry dark --seed 1", Generate("a fox", negative="blurry dark", seed=1)),
        # What Slack clients make of "--" and straight quotes.
        ("a fox \u2014seed 5 \u2013n 2", Generate("a fox", seed=5, n=2)),
        ("a fox --negative \u201crain, fog\u201d", Generate("a fox", negative="rain, fog")),
        # Quotes and apostrophes inside the prompt stay as typed.
        ('a sign that says "open" --seed 1', Generate('a sign that says "open"', seed=1)),
        ("the cat's hat, 12\" vinyl", Generate("the cat's hat, 12\" vinyl")),
        ("a '90s poster of the 80's --seed 2 'tis", Generate("a '90s poster of the 80's 'tis", seed=2)),
        ("a fox --negative 'rain' --n 2", Generate("a fox", negative="rain", n=2)),
        ('a fox --negative="blurry, dark" at night', Generate("a fox at night", negative="blurry, dark")),
        ("a fox --negative people's faces", Generate("a fox", negative="people's faces")),
        ("a -- b", Generate("a -- b")),
        ("a fox --SEED 9", Generate("a fox", seed=9)),
    ],
)
def test_parse(text: str, expected: Generate) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a fox --seed", "--seed needs a whole number"),
        ("a fox --seed --n 2", "--seed needs a whole number"),
        ("a fox --seed 1.5", "--seed needs a whole number, not '1.5'"),
        ("a fox --n two", "--n needs a whole number, not 'two'"),
        ("a fox --negative", "--negative needs some text"),
        ('a fox --negative ""', "--negative needs some text"),
        ('a fox --negative "rain --seed 2', "the quote after --negative is never closed"),
        ("a fox --seed=", "--seed needs a whole number"),
        ("a fox --quality --fast", "choose one of --quality or --fast"),
        ("a fox --seed 1 --seed 2", "--seed is given twice"),
        ("a fox --fast=yes", "--fast takes no value"),
        ("a fox --width 512", "unknown option --width"),
        # Past 4,300 digits Python's int() raises a ValueError: it was answered "something went wrong".
        (
            "a cat --seed " + "9" * 5000,
            "--seed needs a whole number of at most 20 digits, not '999999999999999999999999…'",
        ),
        ("a cat --n=" + "1" * 5000, "--n needs a whole number of at most 20 digits"),
        ("a cat --steps -" + "0" * 5000 + "5", "--steps needs a whole number of at most 20 digits"),
        ("a cat --seed " + "\u0661" * 21, "--seed needs a whole number of at most 20 digits"),
    ],
)
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(CommandError, match=message.replace("?", r"\?")):
        parse(text)


def test_body_is_what_the_api_would_receive() -> None:
    command = parse('a fox --quality --seed 3 --n 2 --negative "rain"')
    assert isinstance(command, Generate)
    assert command.body() == {"prompt": "a fox", "negative_prompt": "rain", "quality": "quality", "seed": 3, "n": 2}
    assert parse("a fox").body() == {"prompt": "a fox"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a fox --n 9", "--n: Input should be less than or equal to 8"),
        ("a fox --seed -1", "--seed: Input should be greater than or equal to 0"),
        ("a fox --steps 151", "--steps: Input should be less than or equal to 150"),
        ("a fox --seed " + "9" * 20, "--seed: Input should be less than or equal to 4294967295"),
        ("x" * 2001, "the prompt: String should have at most 2000 characters"),
    ],
)
def test_api_validation_errors_are_worded_with_the_option(text: str, message: str) -> None:
    command = parse(text)
    assert isinstance(command, Generate)
    with pytest.raises(InvalidRequest) as caught:
        validate(GenerateBody, command.body(), SLACK)
    assert caught.value.message == message


REQUEST = GenerateRequest(prompt="a <!channel> fox & co", seed=7, steps=25, guidance_scale=3.0, width=32, height=32)


def test_replies_escape_the_prompt_so_it_cannot_ping_anyone() -> None:
    text = comment(REQUEST, "U1")
    assert text.startswith("<@U1>: _a &lt;!channel&gt; fox &amp; co_")
    assert "<!channel>" not in queued(REQUEST, 0)


def test_comment_names_prompt_seed_and_requester() -> None:
    request = GenerateRequest("a fox", seed=9, steps=50, guidance_scale=3.0, width=32, height=32, n=3,
                              negative_prompt="rain")  # fmt: skip
    assert comment(request, "U2") == "<@U2>: _a fox_ (seeds 9 to 11, quality, 50 steps, without _rain_)"


@pytest.mark.parametrize(
    ("position", "where"), [(None, "starting now"), (0, "next in line"), (1, "behind 1 image"), (5, "behind 5 images")]
)
def test_queued_gives_the_position(position: int | None, where: str) -> None:
    assert where in queued(REQUEST, position)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (TimedOut("request timed out after 300 s in the queue"), ":hourglass: _a &lt;!channel&gt; fox &amp; co_ timed"),
        (WorkerDied("worker 1 died"), "crashed (worker 1 died)"),
        (GenerationFailed("generation failed: CUDA out of memory"), "failed: generation failed: CUDA out of memory"),
        (ShuttingDown("the server shut down"), "shut down before"),
        (Cancelled("cancelled by the client"), "was cancelled"),
    ],
)
def test_every_failure_has_words(error: Exception, words: str) -> None:
    assert words in failed(REQUEST, error)  # type: ignore[arg-type]


def test_refusals() -> None:
    assert "Try again in about 12 s" in refused(Overloaded("queue full", retry_after=12))
    assert "restarting" in refused(ShuttingDown("draining"))
    assert "can't generate images right now" in refused(Unavailable("every worker failed to boot"))


def test_usage_uses_the_command_name() -> None:
    assert usage("/imagine").startswith("*/imagine <prompt> [options]*")


@pytest.mark.parametrize(
    ("app", "bot", "problem"),
    [
        ("xapp-1", "xoxb-1", None),
        ("", "xoxb-1", "app-level token is not"),
        ("xapp-1", "", "bot token is not"),
        ("xoxb-1", "xapp-1", "must start with xapp-"),
        ("xapp-1", "xoxp-1", "must start with xoxb-"),
    ],
)
def test_token_problems_never_quote_the_token(app: str, bot: str, problem: str | None) -> None:
    found = token_problem(app, bot)
    assert found is None if problem is None else problem in (found or "")
    assert "xapp-1" not in (found or "") and "xoxb-1" not in (found or "")


def test_redact_hides_tokens_in_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = protect(logging.getLogger("muse.slack.test"), "s3cret-value-not-shaped-like-a-token")
    caplog.set_level(logging.DEBUG, logger="muse.slack.test")
    logger.debug("token=%s other=%s", "xoxb-123-456-abc", "s3cret-value-not-shaped-like-a-token")
    try:
        raise RuntimeError("bad token xapp-1-A0-xyz")
    except RuntimeError:
        logger.exception("failed with %r", {"Authorization": "Bearer xoxp-9-9"})
    assert "xoxb-123" not in caplog.text and "s3cret" not in caplog.text
    assert "xapp-1-A0" not in caplog.text and "xoxp-9" not in caplog.text
    assert f"token={REDACTED} other={REDACTED}" in caplog.text
    assert f"RuntimeError: bad token {REDACTED}" in caplog.text  # the traceback itself is kept


def test_redact_leaves_ordinary_text_alone() -> None:
    redact = Redact()
    redact.add("short", "")  # too short to be a secret: would blank out ordinary words
    assert redact.redact("a short note about xoxo and xapping") == "a short note about xoxo and xapping"
