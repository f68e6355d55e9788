"""The `/muse` Slack bot: socket-mode app, command parsing, replies and token redaction."""
