"""Browser fixtures: Debian's Chromium driven by Playwright, with every non-local request blocked.

Blocking the internet (the htmx CDN included) is what the test machines have anyway; doing it in the
browser makes it quick (no DNS timeouts) and lets a test prove what the page tried to reach.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright, Route

from muse.config import Settings
from tests.serving import LiveServer

CHROMIUM = Path(os.environ.get("MUSE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXTERNAL = re.compile(r"^https?://(?!127\.0\.0\.1[:/]|localhost[:/])")


DESKTOP = {"width": 1280, "height": 900}


def ensure_chromium() -> None:
    """Install Debian's chromium when it is missing and we may (root with apt): the tests bring
    what they need beyond pip, so a fresh machine passes with the README's test command alone."""
    if CHROMIUM.exists() or "MUSE_TEST_CHROMIUM" in os.environ:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, capture_output=True)


def launch(playwright: Playwright) -> Browser:
    ensure_chromium()
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the browser tests need Debian's chromium package "
            "(apt-get install -y chromium), or MUSE_TEST_CHROMIUM pointing at a Chromium binary",
            pytrace=False,
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@dataclass
class Watched:
    """A page plus what it did: requests it tried outside the machine, JS errors, console errors."""

    page: Page
    context: BrowserContext
    external: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.errors, f"browser errors: {self.errors}"


def open_page(browser: Browser, **context_options: object) -> Watched:
    context = browser.new_context(**context_options)  # type: ignore[arg-type]
    watched = Watched(context.new_page(), context)

    def block(route: Route) -> None:
        watched.external.append(route.request.url)
        route.abort("internetdisconnected")

    def console(message: ConsoleMessage) -> None:
        # Failed loads are expected (the blocked CDN, 4xx cards); anything else (CSP, JS) is a bug.
        if message.type == "error" and "Failed to load resource" not in message.text:
            watched.errors.append(message.text)

    context.route(EXTERNAL, block)
    watched.page.on("console", console)
    watched.page.on("pageerror", lambda error: watched.errors.append(str(error)))
    watched.page.on("request", lambda request: watched.requested.append(request.url))
    return watched


class Restartable:
    """A live server that a test can restart on the same settings (and so the same data dir)."""

    def __init__(self, settings: Settings) -> None:
        self.original = self.settings = settings
        self.server = self._start()

    def _start(self) -> LiveServer:
        server = LiveServer(self.settings).start()
        server.wait_ready()
        return server

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self, **changes: Any) -> None:
        self.server.stop()
        self.settings = dataclasses.replace(self.settings, **changes)
        self.server = self._start()

    def reset(self) -> None:
        """Back on the settings it was made with, if a test restarted it on others."""
        if self.settings != self.original:
            self.restart(**{f.name: getattr(self.original, f.name) for f in dataclasses.fields(self.original)})

    def stop(self) -> None:
        self.server.stop()
