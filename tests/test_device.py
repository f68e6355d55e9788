"""What only a device shows end to end, run on `--device` (cpu unless named; benchmarks/gpu_check.py runs these
with the other tests marked `device` on a card): a step worker's finished images leaving as PNGs (on an
accelerator through its PNG thread, decoded off the step's critical path; in line on a CPU), and one request
served through a real worker subprocess on the device, each with `pipe()`'s pixels."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from muse.config import EMBEDDED_MODEL
from muse.messages import Assignment, BatchKey, ImageSpec, Result
from muse.worker.pipeline import load_pipeline, run_batch
from muse.worker.steploop import StepLoop
from tests.pixels import pixels
from tests.serving import live_server, settings

pytestmark = pytest.mark.device

TOLERANCE = 2  # of 255


class Recorder:
    """The channel side the step loop touches: what it sends."""

    stop_requested = False

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_finished_images_leave_the_step_loop_as_pngs_with_the_pipelines_pixels(device: str) -> None:
    torch.set_num_threads(2)
    loaded = load_pipeline(EMBEDDED_MODEL, device)
    key = BatchKey(loaded.width, loaded.height, 6, loaded.guidance_scale)
    work = [Assignment(f"a{i}", [ImageSpec("a red circle", "", seed) for seed in seeds], key)
            for i, seeds in enumerate([(1, 2), (3,)])]  # fmt: skip
    recorder = Recorder()
    loop = StepLoop(recorder, loaded, capacity=4)  # type: ignore[arg-type]
    assert (loop.encoder is None) == (torch.device(device).type == "cpu"), "a PNG thread on an accelerator only"
    try:
        loop.pending.extend(work)
        loop.admit()
        while loop.engine.slots or loop.held:
            loop.step()
    finally:
        loop.close()  # waits for the PNG thread
    results = {m.assignment_id: m for m in recorder.sent if isinstance(m, Result)}
    assert sorted(results) == ["a0", "a1"], recorder.sent
    for assignment in work:
        expected = run_batch(loaded, assignment, lambda step: True)
        assert expected is not None
        for got, want in zip(results[assignment.assignment_id].pngs, expected, strict=True):
            difference = np.abs(png_pixels(got) - png_pixels(want)).max()
            assert difference <= TOLERANCE, f"{assignment.assignment_id}: off by {difference}"


def test_a_request_served_by_a_worker_on_the_device_gets_the_pipelines_pixels(device: str) -> None:
    body = {"prompt": "a blue square on a yellow background", "steps": 8, "seed": 5}
    with live_server(settings(EMBEDDED_MODEL, devices=device)) as server:
        response = httpx.post(f"{server.url}/api/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
    loaded = load_pipeline(EMBEDDED_MODEL, device)
    key = BatchKey(loaded.width, loaded.height, 8, loaded.guidance_scale)
    expected = run_batch(loaded, Assignment("direct", [ImageSpec(body["prompt"], "", 5)], key), lambda step: True)
    assert expected is not None
    difference = np.abs(pixels(response.json()["images"][0]["png_base64"]) - png_pixels(expected[0])).max()
    assert difference <= TOLERANCE, f"off by {difference}"
