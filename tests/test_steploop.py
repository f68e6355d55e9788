"""The step worker's loop (muse.worker.steploop) on a real tiny pipeline, without a pipe: how much text
encoding a running batch lets in per step boundary, waiting Assignments encoded with an admission, finished
images held under load to be decoded with the next ones, and where finished images are encoded."""

from __future__ import annotations

from typing import Any

import torch

from muse.messages import Assignment, BatchKey, Failure, ImageSpec, Result
from muse.worker.pipeline import load_pipeline
from muse.worker.steploop import REMEASURE_EVERY, StepLoop, slot_requests


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


def encoder_calls(loop: StepLoop) -> list[int]:
    """The rows of each call of the loop's text encoder, from now on."""
    calls: list[int] = []
    loop.engine.pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls


def test_a_waiting_assignment_is_encoded_with_the_one_admitted_before_it(tiny_model: str) -> None:
    loop = StepLoop(Recorder(), load_pipeline(tiny_model, "cpu"), capacity=2)  # type: ignore[arg-type]
    try:
        calls = encoder_calls(loop)
        first, second, third, fourth = batches([1, 1, 1, 1])
        loop.pending.append(first)
        loop.admit()
        loop.step()
        assert calls == [1, 1]  # alone: its prompt, then the negative prompt (kept from now on)
        loop.pending.extend([second, third, fourth])
        loop.step_s, loop.admit_s = 0.010, 0.001
        loop.admit()
        assert calls[2:] == [2]  # the second joins; the third, waiting for a slot, is encoded in the same call
        assert [b.assignment_id for b in loop.pending] == ["b2", "b3"] and list(loop.encoded) == ["b2"]
        while loop.engine.slots:
            loop.step()
        loop.admit()
        assert calls[3:] == [1] and not loop.encoded  # the third and fourth join: only the fourth is encoded
        (slot,) = [s for s in loop.engine.slots if s.request.owner == "b2"]
        (alone,) = loop.engine.encode(slot_requests(third))
        for key, rows in alone.rows.items():
            torch.testing.assert_close(slot.conditioning.rows[key], rows, rtol=0, atol=1e-5)
    finally:
        loop.close()


def test_an_assignment_interrupted_after_its_text_was_encoded_ahead_leaves_nothing_behind(tiny_model: str) -> None:
    recorder = Recorder()
    loop = StepLoop(recorder, load_pipeline(tiny_model, "cpu"), capacity=2)  # type: ignore[arg-type]
    try:
        first, second, third = batches([1, 1, 1])
        loop.pending.append(first)
        loop.admit()
        loop.step()
        loop.pending.extend([second, third])
        loop.step_s, loop.admit_s = 0.010, 0.001  # a budget of ten images' encoding at this boundary
        loop.admit()
        assert list(loop.encoded) == ["b2"]
        loop.interrupt("b2")
        assert not loop.encoded and not loop.pending
        assert isinstance(recorder.sent[-1], Failure) and recorder.sent[-1].assignment_id == "b2"
    finally:
        loop.close()


def staggered(tiny_model: str, waiting: bool, decode_cost: dict[int, float]) -> tuple[StepLoop, Recorder, list[int]]:
    """Two one-image Assignments of 4 steps, the second admitted a step after the first; when `waiting`, a
    third waits for a slot. Returns the loop about to run the step where the first finishes."""
    recorder = Recorder()
    loop = StepLoop(recorder, load_pipeline(tiny_model, "cpu"), capacity=2)  # type: ignore[arg-type]
    first, second, third = batches([1, 1, 1])
    loop.pending.append(first)
    loop.admit()
    loop.step()
    loop.pending.append(second)
    loop.admit()
    loop.step()
    loop.step()
    if waiting:
        loop.pending.append(third)
    loop.decode_cost = dict(decode_cost)
    sizes: list[int] = []
    decode_start = loop.engine.decode_start

    def spy(slots: list[Any]) -> Any:
        sizes.append(len(slots))
        return decode_start(slots)

    loop.engine.decode_start = spy  # type: ignore[method-assign]
    return loop, recorder, sizes


def results(recorder: Recorder) -> list[str]:
    return [m.assignment_id for m in recorder.sent if isinstance(m, Result)]


CHEAPER_TOGETHER = {1: 0.20, 2: 0.24}  # in UNet calls


def test_under_load_an_image_finishing_a_step_before_another_is_decoded_with_it(tiny_model: str) -> None:
    # Measured cheaper together, or not measured together yet (the hold measures it).
    for decode_cost in [CHEAPER_TOGETHER, {1: 0.20}]:
        loop, recorder, sizes = staggered(tiny_model, waiting=True, decode_cost=decode_cost)
        try:
            loop.step()  # the first finishes; the second finishes at the next step
            assert results(recorder) == [] and len(loop.held) == 1
            loop.step()
            assert sizes == [2] and results(recorder) == ["b0", "b1"] and not loop.held
            assert set(loop.decode_cost) == {1, 2}
        finally:
            loop.close()


def test_without_waiting_images_or_a_cheaper_decode_each_image_is_decoded_when_it_finishes(tiny_model: str) -> None:
    for waiting, decode_cost in [(False, CHEAPER_TOGETHER), (True, {1: 0.20, 2: 0.38}), (True, {})]:
        loop, recorder, sizes = staggered(tiny_model, waiting, decode_cost)
        try:
            loop.step()
            assert results(recorder) == ["b0"], (waiting, decode_cost)
            loop.step()
            assert sizes == [1, 1] and results(recorder) == ["b0", "b1"]
        finally:
            loop.close()


def test_a_held_image_interrupted_is_not_decoded_and_the_other_is(tiny_model: str) -> None:
    loop, recorder, sizes = staggered(tiny_model, waiting=True, decode_cost=CHEAPER_TOGETHER)
    try:
        loop.step()
        loop.interrupt("b0")
        loop.step()
        assert sizes == [1] and results(recorder) == ["b1"] and not loop.held
        assert any(isinstance(m, Failure) and m.assignment_id == "b0" and m.interrupted for m in recorder.sent)
    finally:
        loop.close()


def test_a_decode_of_several_that_did_not_pay_is_measured_again_now_and_then(tiny_model: str) -> None:
    loop = StepLoop(Recorder(), load_pipeline(tiny_model, "cpu"), capacity=2)  # type: ignore[arg-type]
    try:
        loop.decode_cost = {1: 0.20, 2: 0.38}
        chances = [loop.grouping_pays() for _ in range(2 * REMEASURE_EVERY)]
        assert chances.count(True) == 2 and chances[REMEASURE_EVERY - 1] and chances[-1]
    finally:
        loop.close()
