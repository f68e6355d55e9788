"""The `/muse` Slack bot: slack-bolt's AsyncApp in socket mode, in the server's own event loop.

Socket mode needs no public URL (the bot dials out to Slack over a websocket), which suits a GPU box
behind a firewall.

- `start_slack` returns at once. A background task checks the bot token (auth.test), opens the socket
  with the app token (apps.connections.open) and leaves it to the SDK, which reconnects whenever it
  drops. A refused token is logged once, plainly, and the bot stays off: the web UI and the API never
  wait on Slack.
- A command is parsed, validated like an API request (`GenerateBody`), submitted to the same service,
  and acked (ephemeral, within Slack's 3 s) with its place in the queue. A task then awaits the images
  and uploads them with files_upload_v2, or tells the requester why not. Nothing ends silently.
- `stop()` closes the socket (no new commands) and gives accepted jobs `drain_timeout` to finish;
  the requesters of any left are told that the server shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from muse.config import Settings
from muse.core.service import Muse
from muse.core.tickets import Ticket
from muse.errors import InvalidRequest, MuseError, ShuttingDown
from muse.messages import GenerateRequest, GenerateResult
from muse.schema import GenerateBody, validate
from muse.slack import replies
from muse.slack.command import SLACK, CommandError, Help, parse
from muse.slack.redact import protect

# Where the Web API lives; only the tests set this (to their local fake Slack).
API_URL_ENV = "MUSE_SLACK_API_URL"
DEFAULT_API_URL = "https://slack.com/api/"
# How often the socket is pinged; a silent socket is replaced after a few missed pongs.
PING_INTERVAL_S = 10.0
# The membership check runs before the ack, which Slack wants within 3 s.
MEMBERSHIP_CHECK_S = 1.0
HTTP_TIMEOUT_S = 30.0
# Slack unreachable at start-up (network not up yet): keep trying, less and less often.
RETRY_DELAYS_S = (2.0, 5.0, 15.0, 30.0)
RETRY_EVERY_S = 60.0
# After drain_timeout, how long jobs get to post their last words before they are cancelled.
LAST_WORDS_S = 10.0

log = logging.getLogger("muse.slack")
sdk_log = logging.getLogger("muse.slack.sdk")

T = TypeVar("T")


@dataclass(eq=False)
class Delivery:
    """A queued /muse request and where its images (or the reason there are none) must go."""

    ticket: Ticket
    user: str
    channel: str
    response_url: str | None


async def start_slack(muse: Muse, settings: Settings, *, api_url: str | None = None) -> SlackBot | None:
    """Start the socket-mode bot when both tokens are set; None (and one log line) otherwise."""
    app_token, bot_token = settings.slack_app_token.strip(), settings.slack_bot_token.strip()
    protect(log, app_token, bot_token)
    if not app_token and not bot_token:
        log.info("Slack: no SLACK_APP_TOKEN/SLACK_BOT_TOKEN, running without the bot")
        return None
    problem = token_problem(app_token, bot_token)
    if problem:
        log.error("Slack: %s. The bot is off; the web UI and the API work as usual.", problem)
        return None
    bot = SlackBot(muse, settings, api_url=api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL)
    bot.start()
    return bot


def token_problem(app_token: str, bot_token: str) -> str | None:
    """What is wrong with the tokens' shape, in words that never include a token."""
    if not app_token:
        return "the bot token is set but the app-level token is not (--slack-app-token or SLACK_APP_TOKEN, xapp-…)"
    if not bot_token:
        return "the app-level token is set but the bot token is not (--slack-bot-token or SLACK_BOT_TOKEN, xoxb-…)"
    if not app_token.startswith("xapp-"):
        return "the app-level token (SLACK_APP_TOKEN) must start with xapp-: create one with connections:write"
    if not bot_token.startswith("xoxb-"):
        return "the bot token (SLACK_BOT_TOKEN) must start with xoxb-: see OAuth & Permissions"
    return None


class SlackBot:
    def __init__(self, muse: Muse, settings: Settings, *, api_url: str) -> None:
        self.muse = muse
        self.settings = settings
        self.limit = settings.slack_max_jobs_per_user
        self.app_token = settings.slack_app_token.strip()
        sdk = protect(sdk_log, self.app_token, settings.slack_bot_token.strip())
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        self.client = AsyncWebClient(
            token=settings.slack_bot_token.strip(),
            base_url=api_url if api_url.endswith("/") else api_url + "/",
            session=self.session,
            timeout=int(HTTP_TIMEOUT_S),
            logger=sdk,
        )
        self.app = AsyncApp(client=self.client, logger=sdk)
        # Any command routed to this app: the manifest may name it /muse, /imagine or /muse-dev.
        self.app.command(re.compile(r"^/"))(self.on_command)
        self.handler = AsyncSocketModeHandler(self.app, self.app_token, logger=sdk, ping_interval=PING_INTERVAL_S)
        self.bot_user: str | None = None
        self.active: Counter[str] = Counter()  # unfinished jobs per Slack user
        self.deliveries: dict[asyncio.Task[None], Delivery] = {}
        self._runner: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self.connect(), name="muse-slack-connect")

    async def connect(self) -> None:
        try:
            identity = await self._patiently("auth.test", self.client.auth_test)
        except SlackApiError as exc:
            log.error(
                "Slack: the bot token was refused (auth.test: %s). Check SLACK_BOT_TOKEN (xoxb-…, under "
                "OAuth & Permissions). The bot is off; the web UI and the API work as usual.",
                _code(exc),
            )
            return
        self.bot_user = identity.get("user_id")
        try:
            opened = await self._patiently(
                "apps.connections.open", lambda: self.client.apps_connections_open(app_token=self.app_token)
            )
        except SlackApiError as exc:
            log.error(
                "Slack: the app-level token was refused (apps.connections.open: %s). Check SLACK_APP_TOKEN "
                "(xapp-…, scope connections:write) and that Socket Mode is on. The bot is off; the web UI "
                "and the API work as usual.",
                _code(exc),
            )
            return
        # Handing the URL over saves the SDK a second apps.connections.open.
        self.handler.client.wss_uri = opened["url"]
        await self.handler.connect_async()
        log.info("Slack: connected in socket mode as @%s on %s", identity.get("user"), identity.get("team"))

    async def _patiently(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while Slack cannot be reached; Slack's own answers (SlackApiError) are final."""
        for delay in itertools.chain(RETRY_DELAYS_S, itertools.repeat(RETRY_EVERY_S)):
            try:
                return await call()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("Slack: %s failed (%s: %s); retrying in %g s", what, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self.handler.close_async()
        if self.deliveries:
            log.info("Slack: waiting for %d request(s) to finish and upload", len(self.deliveries))
            _, pending = await asyncio.wait(self.deliveries, timeout=self.settings.drain_timeout)
            for task in pending:
                # Ends the ticket; its task then tells the requester and returns.
                self.muse.cancel(self.deliveries[task].ticket, ShuttingDown("the server shut down"))
            if pending:
                _, pending = await asyncio.wait(pending, timeout=LAST_WORDS_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.session.close()

    # ---- commands ---------------------------------------------------------------------------------

    async def on_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        try:
            reply, delivery = await self.accept(command)
        except Exception:
            log.exception("Slack: could not handle a command")
            reply, delivery = ":x: Something went wrong on Muse's side; try again, or tell whoever runs it.", None
        await ack(text=reply, response_type="ephemeral")
        if delivery is not None:
            task = asyncio.create_task(self.deliver(delivery), name=f"muse-slack-{delivery.ticket.id}")
            self.deliveries[task] = delivery
            task.add_done_callback(lambda t: self.deliveries.pop(t, None))

    async def accept(self, command: dict[str, Any]) -> tuple[str, Delivery | None]:
        """The ack's text, and the delivery when a request was queued."""
        name = command.get("command") or "/muse"
        try:
            parsed = parse(command.get("text") or "")
        except CommandError as exc:
            return replies.invalid(str(exc), name), None
        if isinstance(parsed, Help):
            return replies.usage(name, self.muse.model), None
        try:
            body: GenerateBody = validate(GenerateBody, parsed.body(), SLACK)
        except InvalidRequest as exc:
            return replies.invalid(exc.message, name), None
        user, channel = command["user_id"], command["channel_id"]
        if self.active[user] >= self.limit:
            return replies.busy_user(self.active[user], self.limit), None
        self.active[user] += 1  # held across the await below, so two quick commands can't both slip in
        queued = False
        try:
            if not await self.bot_is_member(channel):
                return replies.invite(self.bot_user), None
            try:
                # The model's cost limits (size, steps) are checked here, against the served model.
                request = body.to_request(self.muse.model, SLACK)
            except InvalidRequest as exc:
                return replies.invalid(exc.message, name), None
            try:
                ticket = self.muse.submit(request, owner=f"slack:{user}")
            except MuseError as exc:
                return replies.refused(exc), None
            queued = True
            position = self.muse.position(ticket)
            return replies.queued(request, position), Delivery(ticket, user, channel, command.get("response_url"))
        finally:
            if not queued:
                self._release(user)

    async def bot_is_member(self, channel: str) -> bool:
        """False only when Slack says so; without the scopes to ask (or an answer in time), the upload finds out."""
        try:
            info = await asyncio.wait_for(self.client.conversations_info(channel=channel), MEMBERSHIP_CHECK_S)
        except SlackApiError as exc:
            return _code(exc) not in replies.NOT_IN_CHANNEL
        except (aiohttp.ClientError, TimeoutError, OSError):
            return True
        return (info.get("channel") or {}).get("is_member", True) is not False

    def _release(self, user: str) -> None:
        self.active[user] -= 1
        if self.active[user] <= 0:
            del self.active[user]

    # ---- deliveries------------------------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        request = delivery.ticket.request
        try:
            # Shielded: cancelling this task must go through the batcher, not cancel the future under it.
            result = await asyncio.shield(delivery.ticket.future)
        except MuseError as exc:
            await self.tell(delivery, replies.failed(request, exc))
            return
        finally:
            self._release(delivery.user)
        await self.upload(delivery, request, result)

    async def upload(self, delivery: Delivery, request: GenerateRequest, result: GenerateResult) -> None:
        files = [
            {
                "content": image.png,
                "filename": f"muse-{image.seed}.png",
                "title": f"{request.prompt[:80]} (seed {image.seed})",
                "alt_txt": request.prompt[:1000],
            }
            for image in result.images
        ]
        try:
            await self.client.files_upload_v2(
                file_uploads=files, channel=delivery.channel, initial_comment=replies.comment(request, delivery.user)
            )
        except SlackApiError as exc:
            code = _code(exc)
            log.warning("Slack: could not upload to %s for %s: %s", delivery.channel, delivery.user, code)
            text = replies.invite(self.bot_user) if code in replies.NOT_IN_CHANNEL else None
            await self.tell(delivery, text or replies.upload_failed(request, f"Slack said {code}"))
        except Exception as exc:
            where, who = delivery.channel, delivery.user
            log.warning("Slack: could not upload to %s for %s: %s: %s", where, who, type(exc).__name__, exc)
            await self.tell(delivery, replies.upload_failed(request, "the upload did not go through"))

    async def tell(self, delivery: Delivery, text: str) -> None:
        """An ephemeral message to the requester; through the command's response_url if the bot can't post."""
        try:
            await self.client.chat_postEphemeral(channel=delivery.channel, user=delivery.user, text=text)
            return
        except Exception as exc:
            first = _describe(exc)
        if delivery.response_url:
            try:
                webhook = AsyncWebhookClient(delivery.response_url, session=self.session, logger=sdk_log)
                response = await webhook.send(text=text, response_type="ephemeral", replace_original=False)
                if response.status_code == 200:
                    return
                first += f"; response_url: HTTP {response.status_code}"
            except Exception as exc:
                first += f"; response_url: {_describe(exc)}"
        log.warning("Slack: could not tell %s in %s (%s): %s", delivery.user, delivery.channel, first, text)


def _code(exc: SlackApiError) -> str:
    return str(exc.response.get("error") or "unknown_error")


def _describe(exc: Exception) -> str:
    return _code(exc) if isinstance(exc, SlackApiError) else f"{type(exc).__name__}: {exc}"
