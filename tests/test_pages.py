"""The HTMX pages through HTTP: every fragment alone (HX-Request) and inside its full page.

Generation runs on a real server with one CPU worker and the tiny model; states that are hard to
produce on demand (a worker that died twice) are rendered from a ticket placed in an app that is not
started, which needs no worker at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from muse.app import create_app
from muse.core.batcher import Ticket, TicketState
from muse.errors import GenerationFailed, WorkerDied
from muse.messages import GeneratedImage, GenerateRequest, GenerateResult, Timings
from muse.web.assets import STATIC_DIR
from muse.web.render import HTMX_CDN, HTMX_INTEGRITY, HTMX_VERSION, SSE_CDN, SSE_INTEGRITY
from tests.serving import (
    LiveServer,
    live_server,
    release,
    run_blocker,
    settings,
    submit_job,
    wait_for,
    wait_idle,
    wait_job,
)

HX = {"HX-Request": "true"}

# The Host the app answers to when bound to loopback (TestClient says "testserver" by default).
LOOPBACK = "http://127.0.0.1"


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    # Progress at every step: the stream tests follow a job step by step.
    with live_server(settings(tiny_model, max_queue=4, job_ttl=60, max_wait_ms=1, progress_interval=0)) as s:
        yield s


@pytest.fixture
def idle_app(tiny_model: str, tmp_path: Path) -> TestClient:
    """The app, not started: pages and the gallery work, nothing can be generated."""
    return TestClient(create_app(settings(tiny_model, data_dir=str(tmp_path))), base_url=LOOPBACK)


def post_form(server: LiveServer, data: dict[str, str], htmx: bool = True) -> httpx.Response:
    return httpx.post(f"{server.url}/jobs", data=data, headers=HX if htmx else {}, follow_redirects=False)


def card(server: LiveServer, job: str) -> str:
    response = httpx.get(f"{server.url}/jobs/{job}", headers=HX)
    assert response.status_code == 200, response.text
    return response.text


def job_id(fragment: str) -> str:
    found = re.search(r'id="job-([0-9a-f]+)"', fragment)
    assert found, fragment
    return found.group(1)


def follows(fragment: str) -> bool:
    """Whether the card comes with a listener on its server-sent events (until the job ends)."""
    return 'sse-connect="/jobs/' in fragment


# ---- studio and assets ----------------------------------------------------------------------------


def test_studio_page_has_the_form_pinned_htmx_and_csrf_header(server: LiveServer) -> None:
    response = httpx.get(server.url + "/")
    page = response.text
    assert page.startswith("<!doctype html>") and 'id="generate-form"' in page and 'id="jobs"' in page
    assert f'<script src="{HTMX_CDN}" integrity="{HTMX_INTEGRITY}" crossorigin="anonymous">' in page
    assert "window.htmx || document.write('<script src=\"/static/htmx.min.js\"><\\/script>')" in page
    assert f'<script src="{SSE_CDN}" integrity="{SSE_INTEGRITY}" crossorigin="anonymous">' in page
    # The double-submit CSRF token from muse.http.auth rides on every HTMX request.
    token = response.cookies["muse_csrf"]
    assert f"""<body hx-headers='{{"X-CSRF-Token": "{token}"}}'>""" in page
    # Labelled controls: every input the form shows has a <label for=…>.
    for control in ("prompt", "negative_prompt", "seed", "size", "guidance_scale", "scheduler", "steps", "n"):
        assert f'<label for="{control}">' in page and f'id="{control}"' in page
    external = re.findall(r'(?:src|href)="(https?://[^"]+)"', page)
    assert external == [HTMX_CDN, SSE_CDN], "no other external resource"


def test_shipped_htmx_is_the_pinned_version_and_matches_the_sri_hash() -> None:
    data = (STATIC_DIR / "htmx.min.js").read_bytes()
    assert f'version:"{HTMX_VERSION}"'.encode() in data
    assert "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode() == HTMX_INTEGRITY
    assert f"htmx.org@{HTMX_VERSION}/" in HTMX_CDN


def test_shipped_sse_extension_is_the_pinned_file_and_matches_the_sri_hash() -> None:
    data = (STATIC_DIR / "htmx-ext-sse.min.js").read_bytes()
    assert b'htmx.defineExtension("sse"' in data
    assert "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode() == SSE_INTEGRITY


def test_static_assets_are_served(server: LiveServer) -> None:
    for name, kind in (("htmx.min.js", "javascript"), ("muse.js", "javascript"), ("style.css", "css")):
        response = httpx.get(f"{server.url}/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_form_fragment_comes_back_refilled_for_reuse_seed(server: LiveServer) -> None:
    query = {"prompt": "a fox", "seed": "77", "steps": "9", "size": "64x64", "scheduler": "Euler a"}
    fragment = httpx.get(server.url + "/", params=query, headers=HX).text
    assert fragment.lstrip().startswith("<form") and "<html" not in fragment
    assert ">a fox</textarea>" in fragment and 'value="77"' in fragment and 'value="9"' in fragment
    assert '<option value="64x64" selected>' in fragment and '<option value="Euler a" selected>' in fragment
    assert '<details class="advanced" open>' in fragment
    full = httpx.get(server.url + "/", params=query).text
    assert "<html" in full and ">a fox</textarea>" in full


# ---- job cards ------------------------------------------------------------------------------------


def test_job_card_follows_its_stream_until_done_then_shows_images_and_actions(server: LiveServer) -> None:
    created = post_form(server, {"prompt": "a lighthouse, at dusk!", "steps": "3", "seed": "7", "n": "2"})
    assert created.status_code == 201 and "<html" not in created.text
    assert follows(created.text) and 'hx-swap="outerHTML"' in created.text
    job = job_id(created.text)
    done = wait_for(lambda: (c := card(server, job)) and not follows(c) and c, 60, what="a finished card")
    assert 'data-state="succeeded"' in done
    ids = re.findall(r'<img src="/gallery/([0-9a-f]{16})\.png" alt="a lighthouse, at dusk!"', done)
    assert len(ids) == 2, done
    assert 'download="a-lighthouse-at-dusk-7.png"' in done and 'download="a-lighthouse-at-dusk-8.png"' in done
    assert "Seed 7" in done and "Seed 8" in done and ">Reuse seed</a>" in done
    assert re.search(r'href="/\?prompt=a\+lighthouse%2C\+at\+dusk%21&amp;[^"]*seed=8', done)
    again = done[done.index('<footer class="actions">') :]
    assert ">Generate again</button>" in again and 'name="seed"' not in again, "again means a new seed"
    assert 'name="steps" value="3"' in again and 'name="n" value="2"' in again

    image = httpx.get(f"{server.url}/gallery/{ids[0]}.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert (
        Image.open(io.BytesIO(image.content))
        .info["parameters"]
        .startswith("a lighthouse, at dusk!\nSteps: 3, Sampler: DDIM,")
    ), "the model's own scheduler, named"
    download = httpx.get(f"{server.url}/gallery/{ids[0]}.png?download=1")
    assert download.headers["content-disposition"].startswith('attachment; filename="a-lighthouse-at-dusk-7.png"')


def test_without_javascript_the_form_redirects_to_a_job_page(server: LiveServer) -> None:
    created = post_form(server, {"prompt": "plain html", "steps": "2"}, htmx=False)
    assert created.status_code == 303
    location = created.headers["location"]
    assert re.fullmatch(r"/jobs/[0-9a-f]+", location)
    page = httpx.get(server.url + location).text
    assert "<html" in page and 'id="generate-form"' in page and location.replace("/jobs/", 'id="job-') in page
    job = location.rsplit("/", 1)[1]
    wait_job(server, job, {"succeeded"})
    finished = httpx.get(server.url + location).text
    assert 'http-equiv="refresh"' not in finished and 'data-state="succeeded"' in finished


def test_queued_card_shows_honest_position_and_cancel_ends_it(server: LiveServer) -> None:
    blocker = run_blocker(server)
    try:
        ahead = submit_job(server, {"prompt": "ahead", "steps": 2, "n": 3})
        queued = post_form(server, {"prompt": "waiting", "steps": "2"}).text
        assert 'data-state="queued"' in queued and "3 images ahead of yours" in queued
        job = job_id(queued)
        httpx.delete(f"{server.url}/api/jobs/{ahead}")
        assert "Next in line" in card(server, job)
        cancelled = httpx.post(f"{server.url}/jobs/{job}/cancel", headers=HX)
        assert cancelled.status_code == 200 and 'data-state="cancelled"' in cancelled.text
        assert not follows(cancelled.text) and "Cancelled by the client" in cancelled.text
        assert ">Try again</button>" in cancelled.text
        assert server.read(lambda m: m.job(job).state) is TicketState.CANCELLED
    finally:
        release(server, blocker)


def test_running_card_shows_step_of_n_and_eta(server: LiveServer) -> None:
    job = job_id(post_form(server, {"prompt": "slow one", "steps": "150", "n": "8"}).text)
    try:
        wait_for(lambda: server.read(lambda m: m.job(job).step) >= 2, 60, what="two steps")
        running = card(server, job)
        step = int(re.search(r'aria-valuenow="(\d+)"', running).group(1))  # type: ignore[union-attr]
        assert 'role="progressbar"' in running and 'aria-valuemax="150"' in running and step >= 2
        assert re.search(r"Step \d+/150 · (about \d+ s|about \d+ min|less than a second) left", running)
        assert f'id="cancel-{job}"' in running and follows(running)
    finally:
        httpx.post(f"{server.url}/jobs/{job}/cancel", headers=HX)
        wait_idle(server)


def test_validation_errors_render_as_cards_naming_the_field(server: LiveServer) -> None:
    cases = [
        ({"prompt": "   "}, "Check the prompt", "Prompt must not be empty"),
        ({"prompt": "x", "seed": "abc"}, "Check the seed", "Must be a whole number"),
        ({"prompt": "x", "seed": str(2**32)}, "Check the seed", "less than or equal to 4294967295"),
        ({"prompt": "x", "size": "16x16"}, "Check the size", "greater than or equal to 64"),
        ({"prompt": "x", "guidance_scale": "nan"}, "Check the guidance", "Must be a number"),
        ({"prompt": "x", "n": "9"}, "Check the images", "less than or equal to 8"),
        ({"prompt": "x", "quality": "best"}, "Check the quality", "'fast' or 'quality'"),
        ({"prompt": "x", "scheduler": "Warp"}, "Check the sampler", "Unknown scheduler"),
    ]
    for data, title, message in cases:
        response = post_form(server, data)
        assert response.status_code == 422, (data, response.text)
        assert response.headers["content-type"].startswith("text/html") and "<article" in response.text
        assert f">{title}</h3>" in response.text and message in html.unescape(response.text), (data, response.text)
        assert 'role="alert"' in response.text and "<html" not in response.text
    page = post_form(server, {"prompt": "keep me", "seed": "-1"}, htmx=False)
    assert page.status_code == 422 and "<html" in page.text and "Check the seed" in page.text
    assert ">keep me</textarea>" in page.text and 'value="-1"' in page.text, "the form comes back as typed"


def test_non_form_bodies_get_a_card_too(server: LiveServer) -> None:
    response = httpx.post(f"{server.url}/jobs", json={"prompt": "x"}, headers=HX)
    assert response.status_code == 415 and "application/x-www-form-urlencoded" in response.text


def test_full_queue_card_says_when_to_retry(server: LiveServer) -> None:
    blocker = run_blocker(server)
    try:
        filler = submit_job(server, {"prompt": "filler", "steps": 2, "n": 4})
        refused = post_form(server, {"prompt": "one too many", "steps": "2"})
        assert refused.status_code == 503 and "Muse is busy" in refused.text
        assert re.search(r"Try again in \d+ s\.", refused.text) and "Queue full" in refused.text
        assert 'name="prompt" value="one too many"' in refused.text and ">Try again</button>" in refused.text
        httpx.delete(f"{server.url}/api/jobs/{filler}")
    finally:
        release(server, blocker)


def test_timed_out_job_card_explains_it(server: LiveServer) -> None:
    blocker = run_blocker(server)
    try:
        job = submit_job(server, {"prompt": "impatient", "steps": 2, "timeout_s": 0.2})
        wait_job(server, job, {"failed"})
        timed_out = card(server, job)
        assert 'data-state="failed"' in timed_out and "Took too long" in timed_out
        assert 'data-state="failed"' in timed_out and "Request timed out after 0.2 s in the queue" in timed_out
        assert not follows(timed_out)
    finally:
        release(server, blocker)


def test_unknown_job_is_a_not_found_card(server: LiveServer) -> None:
    fragment = httpx.get(f"{server.url}/jobs/nope", headers=HX)
    assert fragment.status_code == 404 and "Not found" in fragment.text and "<html" not in fragment.text
    page = httpx.get(f"{server.url}/jobs/nope")
    assert page.status_code == 404 and "<html" in page.text and "Not found" in page.text


# ---- states rendered from a placed ticket ---------------------------------------------------------


def place_ticket(client: TestClient, state: TicketState, **fields: object) -> Ticket:
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    loop.close()
    request = GenerateRequest(prompt="a placed job", seed=5, steps=2, guidance_scale=3.0, width=32, height=32)
    ticket = Ticket("feedc0de", request, future, 0.0, 0.0, state=state, **fields)  # type: ignore[arg-type]
    client.app.state.muse.jobs[ticket.id] = ticket  # type: ignore[attr-defined]
    return ticket


def test_worker_failure_cards_are_readable(idle_app: TestClient) -> None:
    for error, title in (
        (WorkerDied("worker 1 exited with code -9; retried, and the retry died too"), "A worker crashed"),
        (GenerationFailed("generation failed: CUDA out of memory"), "Generation failed"),
    ):
        place_ticket(idle_app, TicketState.FAILED, error=error)
        fragment = idle_app.get("/jobs/feedc0de", headers=HX).text
        assert ">a placed job</h3>" in fragment and f'<p class="problem-title">{title}</p>' in fragment
        assert error.message[1:] in fragment and ">Try again</button>" in fragment
        assert not follows(fragment)


def test_without_a_gallery_images_come_from_the_job(tiny_model: str) -> None:
    client = TestClient(create_app(settings(tiny_model, no_gallery=True)), base_url=LOOPBACK)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buffer, format="PNG")
    ticket = place_ticket(client, TicketState.SUCCEEDED)
    ticket.result = GenerateResult(
        [GeneratedImage(buffer.getvalue(), 5)], "tiny", 2, 32, 32, 1, Timings(0, 1, 1), ticket.request
    )
    fragment = client.get("/jobs/feedc0de", headers=HX).text
    assert '<img src="/jobs/feedc0de/images/0.png"' in fragment
    image = client.get("/jobs/feedc0de/images/0.png?download=1")
    assert image.content == buffer.getvalue() and "a-placed-job-5.png" in image.headers["content-disposition"]
    assert client.get("/jobs/feedc0de/images/1.png").status_code == 404
    studio = client.get("/").text
    assert 'href="/gallery"' not in studio, "no gallery link when the gallery is off"
    off = client.get("/gallery")
    assert off.status_code == 200 and "--no-gallery" in off.text
    assert client.get("/gallery/0123456789abcdef").status_code == 404


# ---- gallery --------------------------------------------------------------------------------------


def fill_gallery(client: TestClient, prompts: list[str]) -> list[str]:
    gallery = client.app.state.gallery  # type: ignore[attr-defined]
    ids = []
    for i, prompt in enumerate(prompts):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (i, 0, 0)).save(buffer, format="PNG")
        request = GenerateRequest(prompt=prompt, seed=i, steps=2, guidance_scale=3.0, width=32, height=32)
        image = GeneratedImage(buffer.getvalue(), i)
        ids += gallery.save(GenerateResult([image], "tiny", 2, 32, 32, 1, Timings(0, 1, 1), request))
    return ids


def test_gallery_pages_newest_first_with_search(idle_app: TestClient) -> None:
    ids = fill_gallery(idle_app, [f"cat number {i}" if i % 2 else f"dog number {i}" for i in range(30)])
    page = idle_app.get("/gallery")
    assert page.status_code == 200 and "<html" in page.text and "30 images" in page.text
    shown = re.findall(r'<a href="/gallery/([0-9a-f]{16})">', page.text)
    assert shown == ids[::-1][:24]
    older = re.search(r'rel="next" href="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    second = idle_app.get(older.replace("&amp;", "&"), headers=HX)
    assert second.text.lstrip().startswith('<div id="gallery-results"') and "<html" not in second.text
    assert re.findall(r'<a href="/gallery/([0-9a-f]{16})">', second.text) == ids[::-1][24:]
    assert 'rel="prev"' in second.text and 'rel="next"' not in second.text

    found = idle_app.get("/gallery", params={"q": "CAT"}, headers=HX).text
    assert "15 images matching" in found and "dog" not in found
    assert 'alt="cat number 29"' in found
    nothing = idle_app.get("/gallery", params={"q": "zebra"}).text
    assert "No prompt contains" in nothing


def test_image_detail_download_and_delete(idle_app: TestClient) -> None:
    [image_id] = fill_gallery(idle_app, ["a lone tree"])
    detail = idle_app.get(f"/gallery/{image_id}")
    assert detail.status_code == 200 and "<h1" in detail.text and "a lone tree" in detail.text
    assert 'alt="a lone tree"' in detail.text and 'download="a-lone-tree-0.png"' in detail.text
    assert "Steps: 2, Sampler: Default, CFG scale: 3, Seed: 0, Size: 32x32, Model: tiny" in detail.text
    assert 'href="/?prompt=a+lone+tree&amp;' in detail.text and "seed=0" in detail.text

    deleted = idle_app.post(f"/gallery/{image_id}/delete", headers=HX)
    assert deleted.status_code == 204 and deleted.headers["HX-Redirect"] == "/gallery"
    assert idle_app.get(f"/gallery/{image_id}").status_code == 404
    assert idle_app.get(f"/gallery/{image_id}.png").status_code == 404
    [other] = fill_gallery(idle_app, ["another"])
    plain = idle_app.post(f"/gallery/{other}/delete", follow_redirects=False)
    assert plain.status_code == 303 and plain.headers["location"] == "/gallery"


def test_with_api_keys_a_signed_in_page_posts_with_its_csrf_token(tiny_model: str) -> None:
    client = TestClient(create_app(settings(tiny_model, api_keys="sekrit")), base_url=LOOPBACK)
    assert client.get("/", headers={"accept": "text/html"}, follow_redirects=False).status_code == 303
    login_token = client.get("/login").cookies["muse_csrf"]
    signed_in = client.post("/login", data={"key": "sekrit", "csrf_token": login_token}, follow_redirects=False)
    assert signed_in.status_code == 303 and "muse_session" in client.cookies
    page = client.get("/")
    token = client.cookies["muse_csrf"]
    assert f"""hx-headers='{{"X-CSRF-Token": "{token}"}}'""" in page.text
    refused = client.post("/jobs", data={"prompt": "x"}, headers=HX)
    assert refused.status_code == 403, "a cookie-authenticated post needs the token"
    # With the token it reaches the page and queues (nothing runs it here: the app is not started).
    accepted = client.post("/jobs", data={"prompt": "x"}, headers=HX | {"X-CSRF-Token": token})
    assert accepted.status_code == 201 and 'data-state="queued"' in accepted.text


def stream_events(server: LiveServer, job: str) -> list[tuple[str, str]]:
    """Every (event, data) of a card's stream, until it ends."""
    events: list[tuple[str, str]] = []
    name, data = "", []
    with httpx.stream("GET", f"{server.url}/jobs/{job}/stream", timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and name:
                events.append((name, "\n".join(data)))
                name, data = "", []
                if events[-1][0] == "end":
                    break
    return events


def test_the_card_stream_sends_the_card_on_changes_and_the_bar_at_every_step_then_ends(server: LiveServer) -> None:
    job = job_id(post_form(server, {"prompt": "streamed", "steps": "12", "seed": "3"}).text)
    events = stream_events(server, job)
    names = [name for name, _ in events]
    assert names[0] == "card" and names[-2:] == ["card", "end"] and set(names) == {"card", "progress", "end"}
    progress = [html for name, html in events if name == "progress"]
    assert all(html.startswith(f'<div class="progress" id="progress-{job}">') for html in progress)
    assert all("Cancel" not in html for html in progress), "a step replaces the bar, not the card's buttons"
    steps = [int(m.group(1)) for html in progress if (m := re.search(r'aria-valuenow="(\d+)"', html))]
    assert len(steps) >= 6 and steps == sorted(steps), f"per-step bars, in order: {steps}"
    final = events[-2][1]
    assert 'data-state="succeeded"' in final and not follows(final) and 'id="job-' in final
    assert all(not follows(html) for _, html in events), "the stream sends the card alone"
    # A finished job's stream is its final card and the end, at once.
    assert [name for name, _ in stream_events(server, job)] == ["card", "end"]
