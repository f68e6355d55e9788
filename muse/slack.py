"""The Slack bot (placeholder: the Slack issue implements it)."""

from __future__ import annotations

import logging

from muse.config import Settings
from muse.service import Muse

log = logging.getLogger("muse.slack")


class SlackBot:
    async def stop(self) -> None:
        return None


async def start_slack(muse: Muse, settings: Settings) -> SlackBot | None:
    """Start the socket-mode bot when both tokens are set; None (and one log line) otherwise."""
    log.info("Slack: no SLACK_APP_TOKEN/SLACK_BOT_TOKEN, running without the bot")
    return None
