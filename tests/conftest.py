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
