"""End to end in headless Chromium: type, submit, watch progress, get the image; cancel; errors; the
gallery after a restart; htmx from the local copy when the CDN is unreachable.

Every test blocks the internet. Screenshots go to the test's temp dir; their paths are printed and
recorded as the `screenshot` property (in the JUnit XML; `pytest -rP` shows the prints).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from muse.core.batcher import TicketState
from muse.web.assets import STATIC_DIR
from muse.web.render import HTMX_CDN, HTMX_VERSION, SSE_CDN
from tests.browser import Restartable, Watched, open_page
from tests.serving import run_blocker, settings, wait_idle

PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def shared_server(browser: Browser, tiny_model: str) -> Iterator[Restartable]:
    # Asks for the browser first: without Chromium, fail before paying for a server start.
    server = Restartable(settings(tiny_model, max_wait_ms=1, job_ttl=60))
    yield server
    server.stop()


@pytest.fixture
def served(shared_server: Restartable) -> Restartable:
    """The module's server, on its own settings whichever test ran before (one restarts it on others)."""
    shared_server.reset()
    return shared_server


def test_chromium_is_installed(request: pytest.FixtureRequest) -> None:
    """One plain FAILED line (not only setup errors) when the browser is missing. It asks for the
    module's browser inside the test, rather than starting a second Playwright: the sync API refuses
    to start inside the first one, so that failed whenever another test had already run."""
    browser: Browser = request.getfixturevalue("browser")
    assert browser.is_connected() and browser.version


def screenshot(page: Page, path: Path, record_property: Callable[[str, object], None]) -> None:
    page.screenshot(path=str(path), full_page=True)
    record_property("screenshot", str(path))
    print(f"screenshot: {path}")


def progress_after(page: Page, previous: int, steps: int) -> int:
    """Wait for the running card's bar to show a step past `previous` and before the last one."""
    handle = page.wait_for_function(
        """([previous, steps]) => {
            const bar = document.querySelector('#jobs .job [role=progressbar]');
            const step = bar ? Number(bar.getAttribute('aria-valuenow')) : 0;
            return step > previous && step < steps ? step : false;
        }""",
        arg=[previous, steps],
        timeout=60_000,
    )
    return int(handle.json_value())


def release(served: Restartable, job: str) -> None:
    httpx.delete(f"{served.url}/api/jobs/{job}")
    wait_idle(served.server)


def test_type_submit_watch_progress_and_get_the_image(
    watched: Watched, served: Restartable, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    page = watched.page
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    # Long enough (about 3 s on a quiet 2-core machine) to see the bar between its first and last steps.
    steps = 150
    page.goto(f"{served.url}/?steps={steps}&seed=42&size=64x64&n=8")  # the query refills the form
    prompt = page.get_by_label("Prompt", exact=True)
    expect(prompt).to_be_focused()
    prompt.type("a lighthouse")
    prompt.press("Shift+Enter")
    prompt.type("at dusk")
    expect(prompt).to_have_value("a lighthouse\nat dusk")
    expect(page.locator("#jobs .card")).to_have_count(0)  # Shift+Enter did not submit

    prompt.press("Enter")
    card = page.locator("#jobs .job").first
    expect(card).to_be_visible()
    first = progress_after(page, 0, steps)
    second = progress_after(page, first, steps)
    assert 0 < first < second < steps
    expect(card.locator("[data-role=progress]")).to_contain_text(f"/{steps}")

    image = card.get_by_role("img", name="a lighthouse\nat dusk").first  # seed 42's, the first of 8
    expect(image).to_be_visible(timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    expect(card).to_contain_text("Seed 42")
    job = (card.get_attribute("id") or "").removeprefix("job-")
    assert any(url.endswith(f"/jobs/{job}/stream") for url in requests), "the card follows its event stream"
    assert not any(url.endswith(f"/jobs/{job}") for url in requests), "and never polls"
    with page.expect_download() as download:
        card.get_by_role("link", name="Download").first.click()
    assert download.value.suggested_filename == "a-lighthouse-at-dusk-42.png"
    screenshot(page, tmp_path / "studio.png", record_property)

    # "Reuse seed" refills the form in place; "Generate again" makes a new card with a new seed.
    seed = page.get_by_label("Seed", exact=True)
    seed.fill("")
    card.get_by_role("link", name="Reuse seed").first.click()
    expect(seed).to_have_value("42")
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
    card.get_by_role("button", name="Generate again").click()
    expect(page.locator("#jobs .job")).to_have_count(2)
    again = page.locator("#jobs .job").first
    expect(again).not_to_contain_text("Seed 42")
    again.get_by_role("button", name="Cancel").click()  # a long job: don't hold up the next test
    expect(again).to_have_attribute("data-state", "cancelled")


def test_cancel_a_queued_job(watched: Watched, served: Restartable) -> None:
    blocker = run_blocker(served.server)
    try:
        page = watched.page
        page.goto(f"{served.url}/?steps=5")
        page.get_by_label("Prompt", exact=True).fill("waits its turn")
        page.get_by_role("button", name="Generate").click()
        card = page.locator("#jobs .job").first
        expect(card).to_have_attribute("data-state", "queued")
        expect(card.locator("[data-role=position]")).to_have_text("Next in line")
        job = (card.get_attribute("id") or "").removeprefix("job-")
        card.get_by_role("button", name="Cancel").click()
        expect(card).to_have_attribute("data-state", "cancelled")
        expect(card).to_contain_text("Cancelled by the client")
        state, attempts = served.server.read(lambda m: (m.job(job).state, m.job(job).attempts))
        assert state is TicketState.CANCELLED and attempts == 0, "it never reached a worker"
    finally:
        release(served, blocker)


def test_a_validation_error_shows_in_a_card(watched: Watched, served: Restartable) -> None:
    page = watched.page
    page.goto(served.url + "/")
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("   ")  # passes the browser's `required`, not the server's check
    prompt.press("Enter")
    alert = page.locator("#jobs").get_by_role("alert")
    expect(alert).to_contain_text("Check the prompt")
    expect(alert).to_contain_text("Prompt must not be empty")
    expect(prompt).to_have_value("   ")
    alert.get_by_role("button", name="Dismiss").press("Enter")
    expect(alert).to_have_count(0)


def test_a_json_error_becomes_a_readable_card(watched: Watched, served: Restartable) -> None:
    """Answers from outside the pages (the sign-in layer, a proxy) are JSON: the page never shows it raw."""
    page = watched.page
    page.goto(served.url + "/")
    page.wait_for_function("() => window.htmx !== undefined")
    page.evaluate("htmx.ajax('GET', '/api/jobs/nope', {target: '#jobs', swap: 'afterbegin'})")
    alert = page.locator("#jobs").get_by_role("alert")
    expect(alert).to_contain_text("Something went wrong")
    expect(alert).to_contain_text("No job 'nope'")
    expect(page.locator("#jobs")).not_to_contain_text('{"error"')


def test_htmx_loads_from_the_local_copy_when_the_cdn_is_unreachable(watched: Watched, served: Restartable) -> None:
    page = watched.page
    page.goto(served.url + "/")
    page.wait_for_function("() => window.htmx !== undefined && htmx.createEventSource !== undefined")
    assert page.evaluate("htmx.version") == HTMX_VERSION
    assert watched.external == [HTMX_CDN, SSE_CDN], "the pinned CDN scripts are the only external resources"
    assert f"{served.url}/static/htmx.min.js" in watched.requested
    assert f"{served.url}/static/htmx-ext-sse.min.js" in watched.requested


@pytest.mark.parametrize("tampered", [False, True], ids=["genuine", "tampered"])
def test_the_cdn_copy_is_checked_against_its_sri_hash(browser: Browser, served: Restartable, tampered: bool) -> None:
    change = b"\n// changed" if tampered else b""
    htmx, sse = ((STATIC_DIR / name).read_bytes() + change for name in ("htmx.min.js", "htmx-ext-sse.min.js"))
    watched = open_page(browser)
    cors = {"access-control-allow-origin": "*", "content-type": "text/javascript"}
    watched.context.route(HTMX_CDN, lambda route: route.fulfill(status=200, headers=cors, body=htmx))
    watched.context.route(SSE_CDN, lambda route: route.fulfill(status=200, headers=cors, body=sse))
    page = watched.page
    page.goto(served.url + "/")
    page.wait_for_function("() => window.htmx !== undefined && htmx.createEventSource !== undefined")
    for local in ("htmx.min.js", "htmx-ext-sse.min.js"):
        fallback = f"{served.url}/static/{local}" in watched.requested
        assert fallback is tampered, f"{local}: a tampered CDN file is refused (local copy used), a genuine one used"
    watched.context.close()


def test_phone_width_fits_without_sideways_scrolling(
    browser: Browser, served: Restartable, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    watched = open_page(browser, viewport=PHONE, is_mobile=True, has_touch=True)
    page = watched.page
    page.goto(f"{served.url}/?steps=2&n=2")
    page.get_by_label("Prompt", exact=True).fill("a small red boat on a long calm lake")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#jobs .job img")).to_have_count(2, timeout=60_000)
    fits = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(fits), "the studio overflows"
    screenshot(page, tmp_path / "studio-phone.png", record_property)
    page.goto(served.url + "/gallery")
    assert page.evaluate(fits), "the gallery overflows"
    watched.context.close()
    watched.assert_clean()


def test_the_image_is_in_the_gallery_after_a_restart(watched: Watched, served: Restartable) -> None:
    """It restarts the shared server on other settings; the `served` fixture puts them back for any test after."""
    page = watched.page
    prompt = f"a glass tower {uuid.uuid4().hex[:6]}"
    page.goto(f"{served.url}/?steps=2")
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Prompt", exact=True).press("Enter")
    expect(page.locator("#jobs .job").get_by_role("img", name=prompt)).to_be_visible(timeout=60_000)

    # A new app on the same data dir. It starts scaled to zero: showing the gallery needs no worker,
    # and loading the model again would double the test's cost on a small CI machine.
    served.restart(min_workers=0)
    page.goto(served.url + "/gallery")
    search = page.get_by_role("searchbox", name="Search prompts")
    search.type("glass tower")
    expect(page.locator("#gallery-results .count")).to_contain_text("matching “glass tower”")
    assert parse_qs(urlparse(page.url).query)["q"] == ["glass tower"], "the search is in the address bar"
    tile = page.locator("#gallery-results").get_by_role("img", name=prompt)
    expect(tile).to_be_visible()
    tile.click()
    expect(page.get_by_role("heading", level=1)).to_have_text(prompt)
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url(f"{served.url}/gallery")
    expect(page.locator("#gallery-results").get_by_role("img", name=prompt)).to_have_count(0)
