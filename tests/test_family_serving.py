"""FLUX.1 and SD3 served on the step engine end to end: real worker subprocesses, real HTTP. A short request
joins a long one's running batch between steps and leaves long before it, one with a LoRA beside them; every
image is still the plain pipeline call's for its seed (within 2/255), the LoRA's with that adapter loaded."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from muse.demo_model.loras import make_lora
from muse.messages import Batching
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from tests.pixels import assert_plain
from tests.serving import live_server, metric, settings, submit_job, wait_job

SIZE = {"width": 64, "height": 64}  # the API's smallest side


@pytest.fixture(scope="module", params=["flux", "sd3"])
def family(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param, request.getfixturevalue(f"tiny_{request.param}_model")


def test_a_short_request_joins_a_long_one_and_both_get_the_pipelines_pixels(
    family: tuple[str, str], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    name, model = family
    make_lora(model, tmp_path / "ink.safetensors", seed=1)
    inked = {"prompt": "an inked one", "steps": 5, "seed": 9, "loras": [{"name": "ink", "scale": 0.7}], **SIZE}
    caplog.set_level(logging.INFO, logger="muse.pools")
    long = {"prompt": "a long one", "steps": 150, "seed": 5, "guidance_scale": 3.5, **SIZE}
    short = {"prompt": "a short one", "steps": 4, "seed": 6, "guidance_scale": 5.0, **SIZE}
    unguided = {"prompt": "a plain one", "steps": 7, "seed": 8, "guidance_scale": 1.0, "n": 2, **SIZE}
    if name == "sd3":
        short["negative_prompt"] = "blurry"
    with live_server(settings(model, threads_per_worker=2, lora_dir=str(tmp_path))) as server:
        assert server.read(lambda m: m.pool.batching) == Batching.STEP
        first = submit_job(server, long)
        wait_job(server, first, {"running"})
        joined = [submit_job(server, body) for body in (short, unguided, inked)]
        results = [wait_job(server, job, {"succeeded", "failed"}) for job in joined]
        assert wait_job(server, first, {"running", "succeeded"})["status"] == "running", "the short ones left first"
        first_result = wait_job(server, first, {"succeeded", "failed"})
        assert metric(server, 'muse_admissions_total{into="running"}') >= 1
    pipeline = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[name]
    assert any(f"batching: step ({pipeline}" in r.getMessage() for r in caplog.records)
    direct: LoadedPipeline = load_pipeline(model, "cpu")
    for body, result in zip((short, unguided), results[:2], strict=True):
        assert_plain(direct, body, result)
    assert_plain(direct, long, first_result)
    # The LoRA's image: diffusers' own loader, the adapter at the request's scale.
    direct.pipe.load_lora_weights(str(tmp_path / "ink.safetensors"), adapter_name="ink")
    direct.pipe.set_adapters(["ink"], [0.7])
    assert_plain(direct, inked, results[2])
