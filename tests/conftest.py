from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from tests.browser import Watched


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="where the tests marked `device` run their pipelines and workers (e.g. cuda:0; benchmarks/gpu_check.py)",
    )


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> str:
    """The torch device of the tests marked `device`: cpu unless `--device` names another."""
    return str(pytestconfig.getoption("--device"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real diffusers pipeline folder with random weights, small enough for a test to run it many times."""
    from muse.demo_model.architecture import TINY_SPEC, build_pipeline, save_pipeline

    folder: Path = tmp_path_factory.mktemp("tiny-model")
    save_pipeline(build_pipeline(TINY_SPEC, seed=0), folder, {"guidance_scale": 3.0})
    return str(folder)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _family(tmp_path_factory: pytest.TempPathFactory, family: str) -> str:
    from muse.demo_model.families import build

    return str(build(family, tmp_path_factory.mktemp(f"tiny-{family}")))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny StableDiffusionXLPipeline with random weights (two text encoders, size conditioning)."""
    return _family(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny FluxPipeline shaped like FLUX.1-dev (CLIP and T5 encoders, packed latents, guidance embedding)."""
    return _family(tmp_path_factory, "flux")


@pytest.fixture(scope="session")
def tiny_schnell_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny FluxPipeline shaped like FLUX.1-schnell (no guidance embedding)."""
    return _family(tmp_path_factory, "flux-schnell")


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny StableDiffusion3Pipeline (two CLIP encoders and a T5, pooled projections, flow matching)."""
    return _family(tmp_path_factory, "sd3")


@pytest.fixture(scope="session")
def tiny_inpainting_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An inpainting checkpoint's shape (StableDiffusionInpaintPipeline, a 9-channel UNet)."""
    return _family(tmp_path_factory, "sd-inpaint")


# ---- headless Chromium, for the page tests ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    from tests.browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    """A desktop-sized page; its JavaScript or console errors fail the test."""
    from tests.browser import DESKTOP, open_page

    page = open_page(browser, viewport=DESKTOP)
    yield page
    page.context.close()
    page.assert_clean()
