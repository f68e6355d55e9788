"""A logging filter that keeps Slack tokens out of log records, whoever writes them.

The bot hands one logger (`muse.slack.sdk`) to every slack-sdk and slack-bolt object it builds; bolt
copies that logger's filters onto the loggers it derives from it. The SDK already redacts its
Authorization headers, so this is the belt to those braces: it also catches a token that reaches a
message or a traceback some other way (an exception text, a misconfigured value echoed back).
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
# Any Slack token by its shape: bot/user/config tokens (xoxb-, xoxp-, xoxe-…) and app-level ones (xapp-).
TOKEN_SHAPE = re.compile(r"\b(?:xox[a-z]|xapp)-[A-Za-z0-9-]+")
# A shorter "secret" would blank out ordinary words.
MIN_SECRET = 6


class Redact(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def add(self, *secrets: str) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        found = {s for s in (*self.secrets, *secrets) if len(s) >= MIN_SECRET}
        self.secrets = sorted(found, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return TOKEN_SHAPE.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as it would
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback they print is this redacted one.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


# One for the process: bolt copies it onto its own (process-wide) loggers the first time.
REDACT = Redact()


def protect(logger: logging.Logger, *secrets: str) -> logging.Logger:
    REDACT.add(*secrets)
    logger.addFilter(REDACT)  # a no-op when it is already there
    return logger
