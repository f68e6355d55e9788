"""LoRA adapters on the page: the advanced section lists the server's --lora-dir as it is at each render, the
chosen adapter goes into the request at its scale, "Reuse seed" and "Generate again" keep every adapter (the
first in the control, the others as prompt tags), and the card and the gallery page say which were used.

The browser tests drive headless Chromium (as tests/test_browser.py does) against one live server on the tiny
Stable Diffusion model with a LoRA folder; the form route's refusals are checked over HTTP without JavaScript.
Servers that show no control (no folder, a family without LoRAs) are never asked to generate: they run no worker.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Locator, Page, expect

from muse.demo_model.loras import make_lora
from muse.messages import LoraUse
from tests.browser import Watched
from tests.serving import LiveServer, live_server, settings
from tests.test_loading import copy_of, edit_index

STEPS = "4"  # the tiny model's 64x64 native size, few steps: each image takes a fraction of a second


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Path:
    folder = tmp_path_factory.mktemp("page-loras")
    make_lora(tiny_model, folder / "ink.safetensors", seed=1)
    make_lora(tiny_model, folder / "glow.safetensors", seed=2)
    return folder


@pytest.fixture(scope="module")
def server(tiny_model: str, folder: Path) -> Iterator[LiveServer]:
    with live_server(settings(tiny_model, lora_dir=str(folder), max_wait_ms=1, job_ttl=120)) as s:
        yield s


def open_advanced(page: Page) -> None:
    advanced = page.locator("details.advanced")
    if advanced.get_attribute("open") is None:
        advanced.locator("summary").click()
    expect(page.get_by_label("Seed", exact=True)).to_be_visible()


def lora_options(page: Page) -> list[str]:
    return page.get_by_label("LoRA", exact=True).locator("option").all_inner_texts()


def finished(card: Locator) -> Locator:
    """The card's first image once its job succeeded, loaded."""
    expect(card).to_have_attribute("data-state", "succeeded", timeout=60_000)
    image = card.locator("figure.image img").first
    expect(image).to_be_visible()
    card.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image


def job_of(card: Locator) -> str:
    return (card.get_attribute("id") or "").removeprefix("job-")


def asked(server: LiveServer, job: str) -> tuple[tuple[LoraUse, ...], str, int]:
    """The adapters, prompt and seed of the request the service got for `job`."""
    return server.read(lambda m: (m.job(job).request.loras, m.job(job).request.prompt, m.job(job).request.seed))


def stored_parameters(server: LiveServer, image: Locator) -> str:
    """The `parameters` text of the gallery's PNG that a card's image shows."""
    src = image.get_attribute("src") or ""
    assert src.startswith("/gallery/"), f"the image is in the gallery: {src}"
    return str(Image.open(io.BytesIO(httpx.get(server.url + src).content)).info["parameters"])


def generate(page: Page) -> Locator:
    """Click Generate; the new card."""
    return newest_card(page, lambda: page.get_by_role("button", name="Generate", exact=True).click())


def newest_card(page: Page, action: Callable[[], None]) -> Locator:
    """The card that `action` adds, by its id (`.first` would move on to the next new card)."""
    before = page.locator("#jobs .job").count()
    action()
    expect(page.locator("#jobs .job")).to_have_count(before + 1)
    return page.locator(f"#{page.locator('#jobs .job').first.get_attribute('id')}")


# ---- in the browser -------------------------------------------------------------------------------


def test_pick_an_adapter_and_generate(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    open_advanced(page)
    assert lora_options(page) == ["None", "glow", "ink"]
    expect(page.get_by_label("LoRA scale")).to_have_value("1")
    expect(page.locator("#lora-hint")).to_contain_text("<lora:name:0.8>")
    page.get_by_label("LoRA", exact=True).select_option("ink")
    page.get_by_label("LoRA scale").fill("0.8")
    card = generate(page)
    image = finished(card)
    assert asked(server, job_of(card))[:2] == ((LoraUse("ink", 0.8),), "a red circle")
    expect(card.locator(".params")).to_contain_text("LoRAink 0.8")
    assert stored_parameters(server, image).startswith("a red circle <lora:ink:0.8>")

    # "Use as init image" keeps the adapter, on the card and on the image's gallery page.
    use_as_init = re.compile(r"/\?.*init_id=.*lora=ink&lora_scale=0.8|/\?.*lora=ink&lora_scale=0.8.*init_id=")
    assert use_as_init.search(card.get_by_role("link", name="Use as init image").get_attribute("href") or "")
    # The image's gallery page says so too, and its "Reuse seed" refills the control.
    image.click()
    expect(page.locator(".params")).to_contain_text("LoRAink 0.8")
    assert use_as_init.search(page.get_by_role("link", name="Use as init image").get_attribute("href") or "")
    page.get_by_role("link", name="Reuse seed").click()
    page.wait_for_url(re.compile(r"/\?.*lora=ink"))
    expect(page.get_by_label("LoRA", exact=True)).to_have_value("ink")
    expect(page.get_by_label("LoRA scale")).to_have_value("0.8")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red circle")


def test_a_file_copied_in_after_start_is_listed_on_reload(watched: Watched, server: LiveServer, folder: Path) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    assert "late" not in lora_options(page)
    shutil.copy(folder / "glow.safetensors", folder / "late.safetensors")
    try:
        page.reload()
        assert lora_options(page) == ["None", "glow", "ink", "late"]
        page.get_by_label("Prompt", exact=True).fill("a blue square")
        open_advanced(page)
        page.get_by_label("LoRA", exact=True).select_option("late")
        card = generate(page)
        finished(card)
        assert asked(server, job_of(card))[0] == (LoraUse("late", 1.0),)
    finally:
        (folder / "late.safetensors").unlink()
    page.reload()
    assert "late" not in lora_options(page), "a deleted file leaves the list"


def test_reuse_seed_and_generate_again_keep_every_adapter(watched: Watched, server: LiveServer) -> None:
    page = watched.page
    page.goto(f"{server.url}/?steps={STEPS}")
    # One adapter from the control, one as a prompt tag: the request has both, the control's first.
    page.get_by_label("Prompt", exact=True).fill("a green hill <lora:glow:0.5>")
    open_advanced(page)
    page.get_by_label("LoRA", exact=True).select_option("ink")
    page.get_by_label("LoRA scale").fill("-1.25")
    first = generate(page)
    finished(first)
    loras, prompt, seed = asked(server, job_of(first))
    assert (loras, prompt) == ((LoraUse("ink", -1.25), LoraUse("glow", 0.5)), "a green hill")
    expect(first.locator(".params")).to_contain_text("LoRAink -1.25, glow 0.5")

    # "Generate again" (the card's hidden form) asks for the same adapters, with a new seed.
    again = newest_card(page, first.get_by_role("button", name="Generate again").click)
    finished(again)
    assert asked(server, job_of(again))[:2] == (loras, prompt)

    # "Reuse seed" refills the form: the first adapter in the control, the other back in the prompt.
    # Cleared first, so that only the refill can bring them back.
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_label("LoRA", exact=True).select_option("")
    page.get_by_label("LoRA scale").fill("1")
    first.get_by_role("link", name="Reuse seed").first.click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value(str(seed))
    expect(page.get_by_label("LoRA", exact=True)).to_have_value("ink")
    expect(page.get_by_label("LoRA scale")).to_have_value("-1.25")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a green hill <lora:glow:0.5>")
    reused = generate(page)
    finished(reused)
    assert asked(server, job_of(reused)) == (loras, prompt, seed), "the same request again"


def test_a_server_without_a_folder_shows_no_control_and_a_pipeline_without_a_family_shows_one(
    watched: Watched, tiny_model: str, folder: Path, tmp_path: Path
) -> None:
    page = watched.page
    # A pipeline class Muse has no family for runs whole calls, with adapters where diffusers loads them.
    unknown = copy_of(tiny_model, tmp_path)
    edit_index(unknown, _class_name="StableDiffusionPAGPipeline")
    # No worker starts (min_workers=0) and none is needed: the page renders from the model's folder alone.
    for model, lora_dir, shown in ((tiny_model, "", 0), (str(unknown), str(folder), 1)):
        with live_server(settings(model, lora_dir=lora_dir, min_workers=0), ready=False) as idle:
            page.goto(idle.url + "/")
            open_advanced(page)
            expect(page.get_by_label("Seed", exact=True)).to_be_visible()
            expect(page.get_by_label("LoRA", exact=True)).to_have_count(shown)
            expect(page.get_by_label("LoRA scale")).to_have_count(shown)


# ---- over HTTP, without JavaScript ----------------------------------------------------------------


def post_form(server: LiveServer, data: dict[str, str]) -> httpx.Response:
    """The form as a browser without JavaScript posts it: urlencoded, no HX-Request header."""
    return httpx.post(f"{server.url}/jobs", data={"steps": STEPS} | data, follow_redirects=False, timeout=60)


def test_without_javascript_the_chosen_adapter_goes_into_the_request(server: LiveServer) -> None:
    answer = post_form(server, {"prompt": "a kite", "lora": "glow", "lora_scale": "0.3"})
    assert answer.status_code == 303, answer.text
    job = answer.headers["location"].removeprefix("/jobs/")
    assert asked(server, job)[0] == (LoraUse("glow", 0.3),)
    # The job's page refills the form with it, the advanced section open.
    page = httpx.get(server.url + answer.headers["location"]).text
    assert '<option value="glow" selected>' in page and 'name="lora_scale"' in page and 'value="0.3"' in page
    assert '<details class="advanced" open>' in page


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"lora": "nope"}, "No LoRA named &#39;nope&#39;"),
        ({"lora": "ink", "lora_scale": "lots"}, "Must be a number"),
        ({"lora": "ink", "lora_scale": "9"}, "less than or equal to 4"),
        ({"prompt": "a kite <lora:nope:0.5>"}, "No LoRA named &#39;nope&#39;"),
    ],
    ids=["unknown-name", "scale-text", "scale-over", "unknown-tag"],
)
def test_a_bad_adapter_shows_an_error_naming_the_lora_field(
    server: LiveServer, data: dict[str, Any], message: str
) -> None:
    answer = post_form(server, {"prompt": "a kite"} | data)
    assert answer.status_code == 422, answer.text
    page = answer.text
    assert "Check the LoRA" in page and "Fix the <strong>LoRA</strong> field" in page
    assert message in page
    if data.get("lora") == "nope":
        # The refilled form keeps the name it was given, so the person sees what to change.
        assert '<option value="nope" selected>nope (not on this server)</option>' in page
