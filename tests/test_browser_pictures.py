"""Starting from a picture on the page: upload one in the advanced section, or "Use as init image" on a
finished image or a gallery image; errors in the picture show as the form's other errors do.

The browser tests drive headless Chromium (as tests/test_browser.py does) against one live server on the
tiny Stable Diffusion model; the form route's edges are checked over HTTP, on the same server or on an
app that is not started (nothing generates there, which the owner checks do not need).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw, ImageOps
from playwright.sync_api import Locator, Page, expect
from starlette.testclient import TestClient

from muse.app import create_app
from muse.http.auth import fingerprint
from muse.messages import GeneratedImage, GenerateRequest, GenerateResult, Timings
from tests.browser import Watched
from tests.serving import LiveServer, live_server, settings, wait_for
from tests.test_families_api import write_folder

HX = {"HX-Request": "true"}
LOOPBACK = "http://127.0.0.1"
MAX_UPLOAD = 200_000  # small, so that an oversize picture is cheap to send
STEPS = "4"
# Not the tiny model's native 64x64, within its 128-px sides: the result's size can only come from the picture.
PICTURE_SIZE = (96, 72)


def picture_png(size: tuple[int, int] = PICTURE_SIZE) -> bytes:
    image = Image.new("RGB", size, (30, 80, 190))
    width, height = size
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(230, 50, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(settings(tiny_model, max_wait_ms=1, job_ttl=120, max_upload=MAX_UPLOAD)) as s:
        yield s


def open_advanced(page: Page) -> None:
    advanced = page.locator("details.advanced")
    if advanced.get_attribute("open") is None:
        advanced.locator("summary").click()
    expect(page.get_by_label("Strength")).to_be_visible()


def finished_image(card: Locator) -> Locator:
    """The card's first image once its job succeeded, loaded."""
    expect(card).to_have_attribute("data-state", "succeeded", timeout=60_000)
    image = card.locator("figure.image img").first
    expect(image).to_be_visible()
    card.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image


def natural_size(image: Locator) -> tuple[int, int]:
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    return int(width), int(height)


def stored_parameters(server: LiveServer, image: Locator) -> str:
    """The `parameters` text of the gallery's PNG that a card's image shows."""
    src = image.get_attribute("src") or ""
    assert src.startswith("/gallery/"), f"the image is in the gallery: {src}"
    response = httpx.get(server.url + src)
    assert response.status_code == 200
    return str(Image.open(io.BytesIO(response.content)).info["parameters"])


# ---- in the browser -------------------------------------------------------------------------------


def picked_from_a_new_image(page: Page, server: LiveServer, prompt: str, query: str = "") -> Locator:
    """Generate `prompt` from text, then "Use as init image" on its card; returns the card."""
    page.goto(f"{server.url}/?steps={STEPS}{query}")
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate", exact=True).click()
    first = page.locator("#jobs .job").first
    finished_image(first)
    first.get_by_role("link", name="Use as init image").click()
    return first


def test_upload_a_picture_and_get_an_image_of_its_size(watched: Watched, server: LiveServer, tmp_path: Path) -> None:
    page = watched.page
    picture = tmp_path / "start.png"
    picture.write_bytes(picture_png())
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a kite over the dunes")
    open_advanced(page)
    size = page.get_by_label("Size", exact=True)
    expect(size.locator("option:checked")).to_contain_text("(native)")
    page.get_by_label("Start from a picture").set_input_files(picture)
    expect(page.get_by_role("img", name="The chosen picture")).to_be_visible()
    expect(size.locator("option:checked")).to_have_text("The picture's")
    page.get_by_label("Strength").fill("0.6")
    page.get_by_role("button", name="Generate", exact=True).click()

    card = page.locator("#jobs .job").first
    image = finished_image(card)
    assert natural_size(image) == PICTURE_SIZE
    expect(card.locator(".params")).to_contain_text("Strength0.6")
    assert "Denoising strength: 0.6" in stored_parameters(server, image)

    # "Generate again" asks for the same picture again (the card's hidden form carries the job, not the file).
    card.get_by_role("button", name="Generate again").click()
    expect(page.locator("#jobs .job")).to_have_count(2)
    again = page.locator("#jobs .job").first
    assert natural_size(finished_image(again)) == PICTURE_SIZE
    expect(again.locator(".params")).to_contain_text("Strength0.6")


def test_use_a_finished_image_as_the_init_image(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_role("button", name="Generate", exact=True).click()
    first = page.locator("#jobs .job").first
    finished_image(first)
    expect(first.locator(".params")).not_to_contain_text("Strength")

    # The card's link swaps in the form, starting from that image, with its prompt.
    first.get_by_role("link", name="Use as init image").click()
    thumbnail = page.locator("#generate-form").get_by_role("img", name="The picture to start from")
    expect(thumbnail).to_be_visible()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a lighthouse at dusk")
    expect(page.get_by_label("Size", exact=True).locator("option:checked")).to_have_text("The picture's")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#jobs .job")).to_have_count(2)
    second = page.locator("#jobs .job").first
    image = finished_image(second)
    assert natural_size(image) == (64, 64), "the gallery image's size"
    expect(second.locator(".params")).to_contain_text("Strength0.75")
    assert "Denoising strength: 0.75" in stored_parameters(server, image)


def test_use_a_gallery_image_as_the_init_image(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a glass tower")
    page.get_by_role("button", name="Generate", exact=True).click()
    made = finished_image(page.locator("#jobs .job").first)
    made.click()  # to the image's page in the gallery
    expect(page.get_by_role("heading", level=1)).to_have_text("a glass tower")

    page.get_by_role("link", name="Use as init image").click()
    page.wait_for_url(re.compile(r"/\?.*init_id="))
    expect(page.get_by_role("img", name="The picture to start from")).to_be_visible()
    page.get_by_label("Strength").fill("0.5")
    page.get_by_role("button", name="Generate", exact=True).click()
    card = page.locator("#jobs .job").first
    image = finished_image(card)
    parameters = stored_parameters(server, image)
    assert "Denoising strength: 0.5" in parameters and parameters.startswith("a glass tower")

    # The new image's page says so too.
    image.click()
    expect(page.locator(".params")).to_contain_text("Strength0.5")
    page.get_by_text("PNG parameters").click()
    expect(page.locator(".png-info pre")).to_contain_text("Denoising strength: 0.5")


def test_remove_the_picked_picture_and_generate_from_text(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    picked_from_a_new_image(page, server, "a quiet harbour")
    form = page.locator("#generate-form")
    expect(form.get_by_role("img", name="The picture to start from")).to_be_visible()
    form.get_by_role("link", name="Remove").click()
    expect(form.get_by_role("img", name="The picture to start from")).to_have_count(0)
    expect(page.get_by_label("Size", exact=True).locator("option:checked")).to_contain_text("(native)")
    assert page.url.rstrip("/").endswith(f"?steps={STEPS}"), "removed in place, not by loading another page"
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#jobs .job")).to_have_count(2)
    second = page.locator("#jobs .job").first
    finished_image(second)
    expect(second.locator(".params")).not_to_contain_text("Strength")


def test_a_file_that_is_not_a_picture_shows_an_error_naming_the_field(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a kite")
    open_advanced(page)
    # `accept` only guides the file chooser: anything can still be sent.
    page.get_by_label("Start from a picture").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture at all"}]
    )
    with page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    assert answer.value.status == 422
    alert = page.locator("#jobs").get_by_role("alert")
    expect(alert).to_contain_text("Check the picture")
    expect(alert).to_contain_text("Not a picture this server reads")
    expect(alert.locator(".hint strong")).to_have_text("Picture")
    expect(page.locator("#jobs .job")).to_have_count(0)
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a kite")


def test_a_picture_over_the_upload_limit_is_refused_before_it_is_sent(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a kite")
    posts: list[str] = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    upload = page.get_by_label("Start from a picture")
    upload.set_input_files(files=[{"name": "huge.png", "mimeType": "image/png", "buffer": bytes(MAX_UPLOAD + 1)}])
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(upload).to_have_js_property(
        "validationMessage", "This picture is over this server's limit of 200,000 bytes."
    )
    upload.set_input_files(files=[])  # cleared, the form is valid again
    expect(upload).to_have_js_property("validationMessage", "")
    assert posts == [], "nothing was sent"


# ---- masks: painted over the picture, or chosen as a file --------------------------------------------------


def mask_canvas(page: Page, size: tuple[int, int]) -> Locator:
    """The mask editor's canvas once it lies over a picture of `size`."""
    canvas = page.get_by_role("img", name="Mask: paint where to repaint")
    expect(canvas).to_be_visible()
    expect(page.locator("[data-mask-editor]")).to_have_attribute("data-ready", "")
    assert tuple(canvas.evaluate("c => [c.width, c.height]")) == size, "the canvas has the picture's pixels"
    return canvas


def drag_across(page: Page, canvas: Locator, y: float, x0: float, x1: float) -> None:
    """One stroke at height `y`, from `x0` to `x1` (fractions of the canvas)."""
    canvas.scroll_into_view_if_needed()  # the mouse reaches only what is on the screen
    box = canvas.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y * box["height"], steps=8)
    page.mouse.up()


def job_id(card: Locator) -> str:
    return (card.get_attribute("id") or "").removeprefix("job-")


def sent_mask(server: LiveServer, job: str) -> Image.Image | None:
    source = server.read(lambda m: m.job(job).request.source)
    assert source is not None, "the job starts from the picture"
    return None if source.mask is None else Image.open(io.BytesIO(source.mask)).convert("L")


# The canvas's PNG encoding made slow: a Generate pressed right after a stroke must still send the stroke.
SLOW_TO_BLOB = """
const toBlob = HTMLCanvasElement.prototype.toBlob;
HTMLCanvasElement.prototype.toBlob = function (callback, ...rest) {
  toBlob.call(this, (blob) => setTimeout(() => callback(blob), 400), ...rest);
};
"""
ALPHA_AT = "document.querySelector('[data-mask-canvas]').getContext('2d').getImageData(x, y, 1, 1).data[3]"
ALPHA = f"([x, y]) => {ALPHA_AT}"


def painted(page: Page, x: int, y: int) -> None:
    """Wait until the canvas shows paint at (x, y). A function with its argument, not an expression in a string:
    the page's Content-Security-Policy forbids the eval Playwright polls a string with."""
    page.wait_for_function(f"([x, y]) => {ALPHA_AT} > 200", arg=[x, y])


def generated_mask(page: Page, server: LiveServer, jobs: int) -> Image.Image | None:
    """Generate; once the new card (the `jobs`th) finished, the mask its job got."""
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#jobs .job")).to_have_count(jobs)
    card = page.locator("#jobs .job").first
    finished_image(card)
    return sent_mask(server, job_id(card))


def test_paint_a_mask_over_the_picture_and_the_job_gets_it_then_keeps_or_clears_it(
    watched: Watched, server: LiveServer, tmp_path: Path
) -> None:
    page = watched.page
    page.add_init_script(SLOW_TO_BLOB)
    picture = tmp_path / "start.png"
    picture.write_bytes(picture_png())
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a boat in the harbour")
    open_advanced(page)
    expect(page.locator("[data-mask-editor]")).to_be_hidden()  # nothing to paint on yet
    page.get_by_label("Start from a picture").set_input_files(picture)
    canvas = mask_canvas(page, PICTURE_SIZE)
    drag_across(page, canvas, y=0.5, x0=0.1, x1=0.4)
    # At once, twice: one job, and it waited for the stroke to be in the form.
    page.get_by_role("button", name="Generate", exact=True).dblclick()
    card = page.locator("#jobs .job").first
    finished_image(card)
    expect(card.locator(".params")).to_contain_text("(inpainted)")
    # A second post would have left with the first and been answered before the first job's image came.
    expect(page.locator("#jobs .job")).to_have_count(1)
    mask = sent_mask(server, job_id(card))
    assert mask is not None and mask.size == PICTURE_SIZE
    width, height = PICTURE_SIZE
    assert mask.getpixel((width // 4, height // 2)) == 255, "painted: repaint"
    for kept in ((3 * width // 4, height // 2), (width // 4, height // 10), (width - 1, height - 1)):
        assert mask.getpixel(kept) == 0, f"not painted at {kept}: keep"

    # "Reuse seed" names the job's picture: its mask comes back as paint, and goes again unless cleared.
    card.get_by_role("link", name="Reuse seed").click()
    mask_canvas(page, PICTURE_SIZE)
    painted(page, width // 4, height // 2)
    assert page.evaluate(ALPHA, [3 * width // 4, height // 2]) == 0
    kept = generated_mask(page, server, 2)
    assert kept is not None and kept.tobytes() == mask.tobytes()

    # Cleared, the next job repaints the whole picture at its strength.
    page.get_by_role("button", name="Clear mask").click()
    assert page.evaluate(ALPHA, [width // 4, height // 2]) == 0
    assert generated_mask(page, server, 3) is None
    expect(page.locator("#jobs .job").first.locator(".params")).not_to_contain_text("(inpainted)")


def test_a_chosen_mask_file_shows_as_paint_over_a_picked_image_and_one_of_another_size_is_refused(
    watched: Watched, server: LiveServer
) -> None:
    page = watched.page
    picked_from_a_new_image(page, server, "a red barn", "&size=64x64")
    mask_canvas(page, (64, 64))  # over the picked image, the tiny model's size
    mask_input = page.get_by_label("Mask optional")

    def png(image: Image.Image) -> dict[str, Any]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"name": "mask.png", "mimeType": "image/png", "buffer": buffer.getvalue()}

    # Of another size: refused before it is sent, as the server would refuse it.
    mask_input.set_input_files(files=[png(Image.new("L", (48, 48), 255))])
    expect(mask_input).to_have_js_property(
        "validationMessage", "This mask is 48x48, the picture 64x64: choose a mask of the picture's size."
    )

    # Of the picture's size: it shows on the picture as paint (its white), and is what goes.
    left = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(left).rectangle((0, 0, 31, 63), fill=255)
    mask_input.set_input_files(files=[png(left)])
    painted(page, 8, 32)
    assert page.evaluate(ALPHA, [56, 32]) == 0, "its black is no paint"
    expect(mask_input).to_have_js_property("validationMessage", "")
    mask = generated_mask(page, server, 2)
    assert mask is not None and mask.tobytes() == left.tobytes()


# ---- over HTTP ------------------------------------------------------------------------------------


def post(server: LiveServer, data: dict[str, str], files: Any = None) -> httpx.Response:
    return httpx.post(f"{server.url}/jobs", data=data, files=files, headers=HX, timeout=60)


def job_of(fragment: str) -> str:
    found = re.search(r'id="job-([0-9a-f]+)"', fragment)
    assert found, fragment
    return found.group(1)


def request_size(server: LiveServer, answer: httpx.Response) -> tuple[int, int]:
    assert answer.status_code == 201, answer.text
    job = job_of(answer.text)
    return server.read(lambda m: (m.job(job).request.width, m.job(job).request.height))


def test_the_page_shows_the_picture_field_for_a_model_that_takes_pictures(server: LiveServer) -> None:
    page = httpx.get(server.url + "/").text
    assert 'hx-encoding="multipart/form-data"' in page and 'enctype="multipart/form-data"' in page
    assert 'type="file" accept="image/png,image/jpeg,image/webp"' in page
    assert 'id="strength" name="strength" type="number" min="0.05" max="1"' in page and 'value="0.75"' in page
    assert "up to 200,000 bytes" in page, "the hint says this server's --max-upload"


def test_a_multipart_form_with_a_picture_makes_an_image_of_its_size(server: LiveServer) -> None:
    answer = post(
        server, {"prompt": "a kite", "steps": STEPS}, {"init_image": ("kite.png", picture_png(), "image/png")}
    )
    assert answer.status_code == 201, answer.text
    job = job_of(answer.text)
    wait_for(lambda: server.read(lambda m: m.job(job).done), 60, what="the job to end")
    result, source = server.read(lambda m: (m.job(job).result, m.job(job).request.source))
    assert result is not None and (result.width, result.height) == PICTURE_SIZE
    assert source is not None and source.strength == 0.75
    thumbnail = httpx.get(f"{server.url}/jobs/{job}/picture.png")
    assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).size == PICTURE_SIZE


def test_a_chosen_size_crops_the_picture_and_a_large_one_is_scaled_to_the_limits(server: LiveServer) -> None:
    chosen = post(server, {"prompt": "x", "size": "64x64"}, {"init_image": ("p.png", picture_png(), "image/png")})
    large = post(server, {"prompt": "x"}, {"init_image": ("p.png", picture_png((200, 150)), "image/png")})
    assert [request_size(server, answer) for answer in (chosen, large)] == [(64, 64), (128, 96)], (
        "the tiny model's sides stop at 128 px"
    )
    job = job_of(chosen.text)
    source = server.read(lambda m: m.job(job).request.source)
    assert source is not None
    cropped = ImageOps.fit(Image.open(io.BytesIO(picture_png())), (64, 64), method=Image.Resampling.LANCZOS)
    assert Image.open(io.BytesIO(source.image)).tobytes() == cropped.tobytes(), "cropped to fit, not stretched"


def test_without_javascript_a_mask_file_inpaints_and_a_new_one_replaces_a_named_pictures(server: LiveServer) -> None:
    def mask_png(box: tuple[int, int, int, int]) -> bytes:
        mask = Image.new("L", PICTURE_SIZE, 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        return buffer.getvalue()

    def mask_of(answer: httpx.Response) -> bytes | None:
        assert answer.status_code == 201, answer.text
        source = server.read(lambda m: m.job(job_of(answer.text)).request.source)
        assert source is not None
        return None if source.mask is None else Image.open(io.BytesIO(source.mask)).convert("L").tobytes()

    left, right = mask_png((0, 0, 47, 71)), mask_png((48, 0, 95, 71))
    first = post(
        server,
        {"prompt": "a kite", "steps": STEPS},
        {"init_image": ("kite.png", picture_png(), "image/png"), "mask_image": ("left.png", left, "image/png")},
    )
    assert mask_of(first) == Image.open(io.BytesIO(left)).tobytes()
    # "Generate again" names the job's picture: its mask comes with it, unless another is sent.
    named = {"prompt": "a kite", "steps": STEPS, "init_job": job_of(first.text)}
    assert mask_of(post(server, named)) == Image.open(io.BytesIO(left)).tobytes()
    replaced = post(server, named, {"mask_image": ("right.png", right, "image/png")})
    assert mask_of(replaced) == Image.open(io.BytesIO(right)).tobytes()
    # The page's Clear mask drops it.
    assert mask_of(post(server, named | {"stored_mask": "cleared"})) is None
    shown = httpx.get(f"{server.url}/jobs/{job_of(first.text)}/mask.png")
    assert (
        shown.status_code == 200
        and Image.open(io.BytesIO(shown.content)).tobytes() == Image.open(io.BytesIO(left)).tobytes()
    )


def test_an_empty_file_input_generates_from_text(server: LiveServer) -> None:
    answer = post(server, {"prompt": "x", "strength": "0.75"}, {"init_image": ("", b"", "application/octet-stream")})
    assert answer.status_code == 201, answer.text
    assert server.read(lambda m: m.job(job_of(answer.text)).request.source) is None


@pytest.mark.parametrize(
    ("data", "files", "title", "message"),
    [
        ({}, {"init_image": ("a.txt", b"hello", "text/plain")}, "Check the picture", "Not a picture this server reads"),
        ({}, {"init_image": ("a.png", b"", "image/png")}, "Check the picture", "The picture is empty"),
        (
            {},
            {"init_image": ("a.png", b"\x89PNG" + bytes(MAX_UPLOAD), "image/png")},
            "Check the picture",
            "over this server",
        ),
        ({}, {"init_image": ("a.png", picture_png()[:80], "image/png")}, "Check the picture", "truncated or corrupt"),
        ({"init_image": "a.png"}, None, "Check the picture", "Only the file"),
        ({"strength": "1.5"}, {"init_image": ("a.png", picture_png(), "image/png")}, "Check the strength", "1"),
        ({"strength": "lots"}, {"init_image": ("a.png", picture_png(), "image/png")}, "Check the strength", "number"),
        ({"init_id": "0123456789abcdef"}, None, "Check the picture", "No such image in the gallery"),
        ({"init_job": "nope"}, None, "Check the picture", "choose the picture again"),
        ({}, {"mask_image": ("m.png", picture_png(), "image/png")}, "Check the mask", "A mask needs a picture"),
        (
            {},
            {
                "init_image": ("a.png", picture_png(), "image/png"),
                "mask_image": ("m.png", picture_png((64, 64)), "image/png"),
            },
            "Check the mask",
            "send a mask of the picture",
        ),
        ({"mask_image": "m.png"}, None, "Check the mask", "Only the file"),
        (
            {},
            {"init_image": ("a.png", picture_png(), "image/png"), "mask_image": ("m.png", b"", "image/png")},
            "Check the mask",
            "The mask is empty",
        ),
        (
            {},
            [
                ("init_image", ("a.png", picture_png(), "image/png")),
                ("init_image", ("b.png", picture_png(), "image/png")),
            ],
            "Check the picture",
            "Send one picture",
        ),
    ],
    ids=[
        "not-a-picture",
        "empty",
        "oversize",
        "truncated",
        "file-name-only",
        "strength-high",
        "strength-text",
        "no-image",
        "no-job",
        "mask-without-picture",
        "mask-of-another-size",
        "mask-file-name-only",
        "mask-empty",
        "two-pictures",
    ],
)
def test_a_bad_picture_is_a_422_card_naming_the_field(
    server: LiveServer, data: dict[str, str], files: Any, title: str, message: str
) -> None:
    answer = post(server, {"prompt": "x", **data}, files)
    assert answer.status_code == 422, answer.text
    text = answer.text.replace("&#39;", "'")
    assert f'<h3 class="card-title">{title}</h3>' in text and message in text
    assert 'role="alert"' in text and "data-state" not in text


def test_without_javascript_an_error_refills_the_form(server: LiveServer) -> None:
    answer = httpx.post(
        f"{server.url}/jobs",
        data={"prompt": "a plain post", "strength": "0.4"},
        files={"init_image": ("a.txt", b"hello", "text/plain")},
    )
    assert answer.status_code == 422 and "<html" in answer.text
    assert ">a plain post</textarea>" in answer.text and 'value="0.4"' in answer.text
    assert "Check the picture" in answer.text
    assert "Try again" not in answer.text, "a form of hidden fields cannot send the file again"


# ---- only what the requester may see -------------------------------------------------------------


ALICE, BOB = "alice-key", "bob-key"


@pytest.fixture
def keyed_app(tiny_model: str, tmp_path: Path) -> TestClient:
    """Two keys' app, not started: the pages and the gallery work, jobs queue and never run."""
    app = create_app(settings(tiny_model, data_dir=str(tmp_path), api_keys=f"{ALICE},{BOB}"))
    return TestClient(app, base_url=LOOPBACK)


def as_key(key: str) -> dict[str, str]:
    return HX | {"Authorization": f"Bearer {key}"}


def alices_image(client: TestClient) -> str:
    gallery = client.app.state.gallery  # type: ignore[attr-defined]
    request = GenerateRequest(prompt="alice's", seed=1, steps=2, guidance_scale=3.0, width=64, height=64)
    result = GenerateResult([GeneratedImage(picture_png((64, 64)), 1)], "tiny", 2, 64, 64, 1, Timings(0, 1, 1), request)
    [image_id] = gallery.save(result, owner=f"key:{fingerprint(ALICE)}")
    return str(image_id)


def test_a_gallery_image_starts_a_job_only_for_who_may_see_it(keyed_app: TestClient) -> None:
    image_id = alices_image(keyed_app)
    mine = keyed_app.get(f"/?init_id={image_id}", headers={"Authorization": f"Bearer {ALICE}"})
    assert f'src="/gallery/{image_id}.png" alt="The picture to start from"' in mine.text
    assert f'name="init_id" value="{image_id}"' in mine.text

    theirs = keyed_app.get(f"/?init_id={image_id}", headers={"Authorization": f"Bearer {BOB}"})
    assert theirs.status_code == 200 and image_id not in theirs.text
    assert "No such image in the gallery" in theirs.text, "the card says why the picture is not there"

    refused = keyed_app.post("/jobs", data={"prompt": "x", "init_id": image_id}, headers=as_key(BOB))
    assert refused.status_code == 422 and "No such image in the gallery" in refused.text
    accepted = keyed_app.post("/jobs", data={"prompt": "x", "init_id": image_id}, headers=as_key(ALICE))
    assert accepted.status_code == 201 and 'data-state="queued"' in accepted.text


def test_a_jobs_picture_and_mask_are_only_for_who_may_see_the_job(keyed_app: TestClient) -> None:
    files = {
        "init_image": ("a.png", picture_png(), "image/png"),
        "mask_image": ("m.png", picture_png(), "image/png"),  # its red is repainted, its blue kept
    }
    made = keyed_app.post("/jobs", data={"prompt": "x"}, files=files, headers=as_key(ALICE))
    assert made.status_code == 201, made.text
    job = job_of(made.text)
    for part in ("picture", "mask"):
        assert keyed_app.get(f"/jobs/{job}/{part}.png", headers=as_key(ALICE)).status_code == 200
        assert keyed_app.get(f"/jobs/{job}/{part}.png", headers=as_key(BOB)).status_code == 404
    refused = keyed_app.post("/jobs", data={"prompt": "x", "init_job": job}, headers=as_key(BOB))
    assert refused.status_code == 422 and "choose the picture again" in refused.text
    again = keyed_app.post("/jobs", data={"prompt": "x", "init_job": job}, headers=as_key(ALICE))
    assert again.status_code == 201


def test_a_model_that_starts_from_text_only_shows_no_picture_field(tmp_path: Path) -> None:
    # A pipeline Muse runs whole calls of, its img2img twin unknown (the page needs only its folder's JSON).
    model = write_folder(tmp_path / "pixart", "PixArtAlphaPipeline", ("transformer", {"sample_size": 128}))
    client = TestClient(create_app(settings(model, data_dir=str(tmp_path / "data"))), base_url=LOOPBACK)
    page = client.get("/").text
    assert "Start from a picture" not in page and "multipart" not in page
    files = {"init_image": ("a.png", picture_png(), "image/png")}
    refused = client.post("/jobs", data={"prompt": "x"}, files=files, headers=HX)
    assert (
        refused.status_code == 422 and "Check the picture" in refused.text and "starts from text only" in refused.text
    )


def test_signed_in_the_form_uploads_with_its_csrf_header(keyed_app: TestClient) -> None:
    """Signed in, htmx sends the multipart form with the CSRF token in its header, and a plain post without
    JavaScript sends it as the form's field, which the CSRF check reads from the multipart body."""
    login_token = keyed_app.get("/login").cookies["muse_csrf"]
    keyed_app.post("/login", data={"key": ALICE, "csrf_token": login_token}, follow_redirects=False)
    page = keyed_app.get("/").text
    assert 'hx-encoding="multipart/form-data"' in page and 'enctype="multipart/form-data"' in page
    token = keyed_app.cookies["muse_csrf"]
    files = {"init_image": ("a.png", picture_png(), "image/png")}
    refused = keyed_app.post("/jobs", data={"prompt": "x"}, files=files, headers=HX)
    assert refused.status_code == 403, "a cookie-authenticated post needs the token"
    accepted = keyed_app.post("/jobs", data={"prompt": "x"}, files=files, headers=HX | {"X-CSRF-Token": token})
    assert accepted.status_code == 201 and 'data-state="queued"' in accepted.text
    # Without JavaScript: the token as the multipart form's field.
    fields = {"prompt": "a plain post", "csrf_token": token}
    plain = keyed_app.post("/jobs", data=fields, files=files, follow_redirects=False)
    assert plain.status_code == 303 and plain.headers["location"].startswith("/jobs/"), plain.text
    forged = keyed_app.post("/jobs", data=fields | {"csrf_token": "forged"}, files=files, follow_redirects=False)
    assert forged.status_code == 403
    # A urlencoded form (a page from before) sends the file input's name alone: refused by the field's name.
    stale = keyed_app.post("/jobs", data={"prompt": "a stale page", "init_image": "a.png", "csrf_token": token})
    assert stale.status_code == 422 and "multipart/form-data" in stale.text and ">a stale page</textarea>" in stale.text
