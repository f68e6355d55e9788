from __future__ import annotations

from pathlib import Path

import pytest


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
