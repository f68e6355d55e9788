"""The step worker's loop (muse.worker.steploop) on a real tiny pipeline, without a pipe: how much text
encoding a running batch lets in per step boundary, and where finished images are encoded."""

from __future__ import annotations

import torch

from muse.messages import Assignment, BatchKey, ImageSpec, Result
from muse.worker.pipeline import load_pipeline
from muse.worker.steploop import StepLoop


class Recorder:
    """The channel side the loop touches: what it sends."""

    busy = False
    stop_requested = False

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)


def batches(images: list[int]) -> list[Assignment]:
    key = BatchKey(64, 64, 4, 3.0)
    return [
        Assignment(f"b{i}", [ImageSpec("a red circle", "", seed) for seed in range(n)], key)
        for i, n in enumerate(images)
    ]


def test_a_running_batch_admits_one_unet_call_of_text_encoding_per_boundary(tiny_model: str) -> None:
    torch.set_num_threads(2)
    loop = StepLoop(Recorder(), load_pipeline(tiny_model, "cpu"), capacity=8)  # type: ignore[arg-type]
    try:
        first, *waiting = batches([1, 1, 1, 1, 2])
        loop.pending.append(first)
        loop.admit()
        loop.step()
        assert loop.admit_s > 0 and loop.step_s > 0, "both costs are measured"
        # Encoding an image costs 0.4 of a UNet call: two images join per boundary, oldest first.
        loop.pending.extend(waiting)
        loop.step_s, loop.admit_s = 0.010, 0.004
        loop.admit()
        assert [b.assignment_id for b in loop.pending] == ["b3", "b4"] and len(loop.engine.slots) == 3
        # Costlier still: one Assignment per boundary, even one of two images.
        loop.step_s, loop.admit_s = 0.010, 0.008
        loop.admit()
        loop.step_s, loop.admit_s = 0.010, 0.008
        loop.admit()
        assert not loop.pending and len(loop.engine.slots) == 6
    finally:
        loop.close()


def test_on_a_cpu_a_finished_assignment_is_encoded_and_sent_before_the_next_step(tiny_model: str) -> None:
    """No PNG thread on a CPU: it would take a core from the denoiser's OpenMP threads mid-step."""
    recorder = Recorder()
    loop = StepLoop(recorder, load_pipeline(tiny_model, "cpu"), capacity=4)  # type: ignore[arg-type]
    assert loop.encoder is None
    loop.pending.extend(batches([1]))
    loop.admit()
    for _ in range(loop.engine.slots[0].request.steps):
        loop.step()
    results = [m for m in recorder.sent if isinstance(m, Result)]
    assert [r.assignment_id for r in results] == ["b0"] and results[0].pngs[0].startswith(b"\x89PNG")


def test_an_idle_engine_takes_every_waiting_batch_that_fits(tiny_model: str) -> None:
    loop = StepLoop(Recorder(), load_pipeline(tiny_model, "cpu"), capacity=4)  # type: ignore[arg-type]
    try:
        loop.step_s, loop.admit_s = 0.010, 1.0  # no running image waits for the encoding
        loop.pending.extend(batches([1, 2, 1, 1]))
        loop.admit()
        assert len(loop.engine.slots) == 4 and [b.assignment_id for b in loop.pending] == ["b3"]
    finally:
        loop.close()
