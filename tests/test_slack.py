"""The Slack bot end to end: the real slack-bolt socket-mode handler in a real Muse server, against a fake Slack.

One server (one CPU worker, tiny random-weight model, 2 or 3 denoising steps) serves the whole module;
tests that hold the worker busy with a "blocker" job release it before they end. A few cheap servers
without workers check start-up with bad or missing tokens.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

import muse.slack.bot
from tests.fake_slack import FakeSlack
from tests.serving import (
    LiveServer,
    job_status,
    live_server,
    release,
    run_blocker,
    settings,
    submit_job,
    wait_for,
    wait_idle,
)

APP_TOKEN = "xapp-test"
BOT_TOKEN = "xoxb-test"
# Loggers turned up to DEBUG while the module runs, so the token check sees everything the SDK says.
LOUD = ("slack_sdk", "slack_bolt", "muse", "aiohttp")


class Captured(logging.Handler):
    """Every record from every thread, formatted (traceback included) the way a log file would show it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def logs() -> Iterator[Captured]:
    handler = Captured()
    loggers = [logging.getLogger(name) for name in LOUD]
    levels = [logger.level for logger in loggers]
    logging.getLogger().addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)
    logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSlack]:
    fake = FakeSlack(bot_token=BOT_TOKEN, app_token=APP_TOKEN)
    # The bot is not in #outside, and conversations.info says so.
    fake.add_channel("C_OUTSIDE", "outside", member=False)
    # Not in #private either, but without the scope to ask: only the upload finds out.
    fake.add_channel("C_PRIVATE", "private", member=False, info_error="missing_scope")
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tiny_model: str, fake: FakeSlack, logs: Captured) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(muse.slack.bot.API_URL_ENV, fake.api_url)
        # Short enough that the abrupt-drop test is quick, long enough that a busy machine still pongs in time.
        patch.setattr(muse.slack.bot, "PING_INTERVAL_S", 3.0)
        config = settings(
            tiny_model,
            slack_app_token=APP_TOKEN,
            slack_bot_token=BOT_TOKEN,
            slack_max_jobs_per_user=2,
            max_queue=4,
            max_wait_ms=1,
            max_retries=0,  # a killed worker fails its batch at once
        )
        with live_server(config) as s:
            fake.wait_connected()
            yield s


def command(fake: FakeSlack, text: str, **kwargs: str) -> str:
    """Send a command; assert it was acked within Slack's 3 seconds; return the ack's text."""
    ack = fake.wait_ack(fake.send_command(text, **kwargs))
    assert ack.latency_s < 3.0, f"ack took {ack.latency_s:.2f} s"
    assert ack.payload.get("response_type") == "ephemeral"
    return str(ack.payload["text"])


def api_pngs(server: LiveServer, body: dict) -> list[bytes]:
    response = httpx.post(server.url + "/api/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [base64.b64decode(image["png_base64"]) for image in response.json()["images"]]


def idle(server: LiveServer) -> None:
    wait_idle(server)


@pytest.mark.parametrize("text", ["help", "", "  --help ", "--seed 3"])
def test_help_or_an_empty_prompt_answers_with_usage(server: LiveServer, fake: FakeSlack, text: str) -> None:
    reply = command(fake, text)
    assert "/muse <prompt>" in reply and "--negative" in reply and "--seed N" in reply


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a cat --seed abc", "--seed needs a whole number, not 'abc'"),
        ("a cat --frobnicate", "unknown option --frobnicate"),
        ("a cat --quality --fast", "choose one of --quality or --fast"),
        ("a cat --negative", "--negative needs some text"),
    ],
)
def test_bad_options_are_named(server: LiveServer, fake: FakeSlack, text: str, problem: str) -> None:
    reply = command(fake, text)
    assert reply.startswith(":warning:") and problem in reply


@pytest.mark.parametrize(
    ("text", "body", "option"),
    [
        ("a cat --n 9", {"prompt": "a cat", "n": 9}, "--n"),
        ("a cat --seed 4294967296", {"prompt": "a cat", "seed": 2**32}, "--seed"),
        ("a cat --steps 0", {"prompt": "a cat", "steps": 0}, "--steps"),
        ("x" * 2001, {"prompt": "x" * 2001}, "the prompt"),
    ],
)
def test_what_the_api_refuses_slack_refuses_naming_the_option(
    server: LiveServer, fake: FakeSlack, text: str, body: dict, option: str
) -> None:
    api = httpx.post(server.url + "/api/generate", json=body)
    assert api.status_code == 422
    api_message = api.json()["error"]["message"].split(": ", 1)[1]
    reply = command(fake, text)
    assert f"{option}: {api_message}" in reply


def test_generates_and_uploads_the_same_pngs_as_the_api(server: LiveServer, fake: FakeSlack) -> None:
    reply = command(fake, 'a lighthouse at dusk --seed 7 --n 2 --steps 3 --negative "people, boats"')
    assert "2 images, seeds 7 to 8" in reply
    share = fake.wait_share("lighthouse")
    assert share.channel == "C_GENERAL"
    assert share.comment.startswith("<@U_ALICE>: _a lighthouse at dusk_")
    assert "seeds 7 to 8" in share.comment and "3 steps" in share.comment and "people, boats" in share.comment
    for png in share.files:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(png)).size == (32, 32)
    body = {"prompt": "a lighthouse at dusk", "seed": 7, "n": 2, "steps": 3, "negative_prompt": "people, boats"}
    assert share.files == api_pngs(server, body)
    assert share.titles == ["a lighthouse at dusk (seed 7)", "a lighthouse at dusk (seed 8)"]


def test_ack_gives_the_queue_position_and_each_user_gets_a_limited_number_of_jobs(
    server: LiveServer, fake: FakeSlack
) -> None:
    blocker = run_blocker(server)
    try:
        assert "queued, next in line" in command(fake, "first fox --steps 2")
        assert "queued behind 1 image" in command(fake, "second fox --steps 2")
        refused = command(fake, "third fox --steps 2")
        assert "You already have 2 image requests in progress (at most 2 per person)" in refused
        # The queue is fair between Slack users: Bob's first image goes ahead of Alice's second.
        assert "queued behind 1 image" in command(fake, "bob's fox --steps 2", user="U_BOB")
    finally:
        httpx.delete(f"{server.url}/api/jobs/{blocker}")
    for prompt in ("first fox", "second fox", "bob's fox"):
        fake.wait_share(prompt)
    assert not any("third fox" in share.comment for share in fake.state.shares)
    # Finished jobs no longer count against the limit.
    command(fake, "fourth fox --steps 2")
    fake.wait_share("fourth fox")
    idle(server)


def test_overload_is_refused_with_the_retry_time(server: LiveServer, fake: FakeSlack) -> None:
    blocker = run_blocker(server)
    waiting = submit_job(server, {"prompt": "fills the queue", "steps": 2, "n": 4})
    try:
        # As many images as the queue's biggest owner holds: the queue is full for this user too (a smaller
        # request would make room from that owner's share).
        reply = command(fake, "one too many --steps 2 --n 4")
        assert reply.startswith(":no_entry: Muse is busy: queue full") and "Try again in about" in reply
        assert job_status(server, waiting)["status"] == "queued"
    finally:
        release(server, waiting, blocker)


def test_bot_not_in_the_channel_says_invite_it_before_generating(server: LiveServer, fake: FakeSlack) -> None:
    uploads_before = len(fake.calls("files.getUploadURLExternal"))
    reply = command(fake, "a fox in the outside --steps 2", channel="C_OUTSIDE")
    assert "I'm not in this channel" in reply and "/invite <@U_MUSE>" in reply
    # Not queued: with the worker idle, a queued job would be running by now.
    assert server.read(lambda m: m.batcher.idle)
    assert len(fake.calls("files.getUploadURLExternal")) == uploads_before


def test_bot_not_in_the_channel_found_at_upload_tells_the_user_through_response_url(
    server: LiveServer, fake: FakeSlack
) -> None:
    reply = command(fake, "a private fox --steps 2", channel="C_PRIVATE")
    assert "starting now" in reply or "queued" in reply
    message = fake.wait_ephemeral("U_ALICE", "I'm not in this channel")
    assert message["via"] == "response_url" and message["response_type"] == "ephemeral"
    assert "/invite <@U_MUSE>" in message["text"]
    assert not any("private fox" in share.comment for share in fake.state.shares)


def test_upload_failure_reaches_the_user(server: LiveServer, fake: FakeSlack) -> None:
    fake.fail_uploads = True
    try:
        command(fake, "an unlucky fox --steps 2", user="U_CAROL")
        message = fake.wait_ephemeral("U_CAROL", "couldn't upload it")
    finally:
        fake.fail_uploads = False
    assert message["via"] == "chat.postEphemeral" and message["channel"] == "C_GENERAL"
    assert "_an unlucky fox_ is ready" in message["text"]


@pytest.mark.parametrize("how", ["close", "refresh", "abort"])
def test_reconnects_when_the_socket_drops(server: LiveServer, fake: FakeSlack, how: str) -> None:
    connections, opened = fake.state.connections, len(fake.calls("apps.connections.open"))
    fake.drop(how)
    fake.wait_connected(connections + 1, timeout=30)
    assert len(fake.calls("apps.connections.open")) > opened  # a fresh URL for every new socket
    assert "/muse <prompt>" in command(fake, "help")


def test_worker_failure_reaches_the_user(server: LiveServer, fake: FakeSlack) -> None:
    command(fake, "a doomed fox --steps 150 --n 8", user="U_DAVE")
    wait_for(lambda: server.read(lambda m: m.batcher.inflight_images) == 8, 60, what="the job to run")
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    message = fake.wait_ephemeral("U_DAVE", "crashed")
    assert "_a doomed fox_" in message["text"] and message["via"] == "chat.postEphemeral"
    # The pool respawns the worker in the background; nothing after this needs it.


def test_tokens_never_reach_the_logs(server: LiveServer, logs: Captured) -> None:
    # Runs last: by now the log holds start-up, reconnects, uploads and failures, at DEBUG.
    assert any("Sending a request" in line and "apps.connections.open" in line for line in logs.lines)
    assert any("(redacted)" in line for line in logs.lines), "the SDK's own header redaction should show"
    leaks = [line for line in logs.lines if APP_TOKEN in line or BOT_TOKEN in line]
    assert not leaks, leaks[:3]


# ---- start-up, each on its own server without workers (cheap: no model is loaded) -----------------


@pytest.mark.parametrize(
    ("app_token", "bot_token", "expected"),
    [
        ("", "", "Slack: no SLACK_APP_TOKEN/SLACK_BOT_TOKEN, running without the bot"),
        (APP_TOKEN, "xoxb-wrong-secret-1234", "the bot token was refused (auth.test: invalid_auth)"),
        ("xapp-wrong-secret-1234", BOT_TOKEN, "the app-level token was refused (apps.connections.open: invalid_auth)"),
        ("xoxb-swapped-secret-1234", "xapp-swapped-secret-1234", "must start with xapp-"),
        ("", BOT_TOKEN, "the app-level token is not"),
    ],
)
def test_start_up_without_a_working_bot_says_so_once_and_the_api_keeps_working(
    tiny_model: str, fake: FakeSlack, caplog: pytest.LogCaptureFixture, app_token: str, bot_token: str, expected: str
) -> None:
    for name in LOUD:
        caplog.set_level(logging.DEBUG, logger=name)
    config = settings(tiny_model, slack_app_token=app_token, slack_bot_token=bot_token, min_workers=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(muse.slack.bot.API_URL_ENV, fake.api_url)
        with live_server(config) as s:
            wait_for(lambda: expected in caplog.text, 30, what=expected)
            assert httpx.get(s.url + "/healthz").status_code == 200
            assert httpx.get(s.url + "/readyz").status_code == 200
    slack_lines = [r for r in caplog.records if r.name == "muse.slack" and r.levelno >= logging.INFO]
    assert len(slack_lines) == 1, [r.getMessage() for r in slack_lines]
    for token in (app_token, bot_token):
        if token:
            assert token not in caplog.text


def test_slack_out_of_reach_at_start_up_is_retried_in_the_background(
    tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    closed = FakeSlack().start()
    dead_url = closed.api_url
    closed.stop()  # nothing listens on its port now
    config = settings(tiny_model, slack_app_token=APP_TOKEN, slack_bot_token=BOT_TOKEN, min_workers=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(muse.slack.bot.API_URL_ENV, dead_url)
        with live_server(config) as s:
            wait_for(lambda: "Slack: auth.test failed" in caplog.text, 30, what="the retry warning")
            assert "retrying in" in caplog.text
            assert httpx.get(s.url + "/healthz").status_code == 200
    # Shutdown cancelled the retry loop: the server stopped (live_server asserts it) with nothing left over.
