"""`--compile` (muse.worker.fastpath): the row buckets, compiled output within float rounding of eager
on CPU (inductor), and a compiling worker that says so on /readyz before it serves."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from muse.worker.engine import SlotRequest, StepEngine
from muse.worker.fastpath import bucket_for, compile_decoder, image_buckets, optimize, row_buckets
from muse.worker.pipeline import load_pipeline
from muse.worker.warmup import warm_buckets

# Compiled fp32 on CPU against eager: rounding only (measured at most 1 of 255 on the embedded model, UNet and
# decoder compiled).
TOLERANCE = 2  # of 255


def test_buckets_are_powers_of_two_up_to_the_capacity() -> None:
    assert image_buckets(8) == [1, 2, 4, 8]
    assert image_buckets(6) == [1, 2, 4, 6]
    assert image_buckets(1) == [1]
    assert image_buckets(0) == [1]
    assert row_buckets(8) == [1, 2, 4, 8, 16]  # one unguided row, or two per guided image
    assert [bucket_for(rows, row_buckets(8)) for rows in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_for(20, row_buckets(8)) == 20  # an oversized first Assignment runs unpadded


@pytest.mark.device
def test_compiled_step_engine_matches_eager_and_other_shapes_run_eager(tiny_model: str, device: str) -> None:
    torch.set_num_threads(2)

    def requests(size: int) -> list[SlotRequest]:
        return [
            SlotRequest(
                f"r{size}-{i}/0", "a red circle", "", seed=i, steps=4, guidance_scale=3.0, width=size, height=size
            )
            for i in range(2)
        ]

    def run(engine: StepEngine, batch: list[SlotRequest]) -> list[np.ndarray]:
        engine.admit(batch)
        finished: list[np.ndarray] = []
        while engine.slots:
            finished += [np.asarray(p, dtype=np.int16) for p in engine.decode(engine.step())]
        return finished

    # One bucket (two guided images: four rows) and the decoder's one shape; each compiled shape costs
    # ~15-20 s here.
    eager_engine = StepEngine(load_pipeline(tiny_model, device), [4])
    eager = run(eager_engine, requests(64))
    loaded = load_pipeline(tiny_model, device)
    unet, decoder = optimize(loaded.pipe), compile_decoder(loaded.pipe)
    assert decoder is not None
    engine = StepEngine(loaded, [4], unet, decoder)
    reports: list[tuple[int, int]] = []
    graphs = counters["stats"]["unique_graphs"]
    warm_buckets(engine, 64, 64, lambda done, total: reports.append((done, total)))
    assert reports == [(1, 1)] and not engine.slots, "warming reports each bucket and leaves no slot behind"
    assert counters["stats"]["unique_graphs"] - graphs >= 2, "dynamo captured the UNet and the decoder"
    side = 64 // loaded.pipe.vae_scale_factor
    latents = loaded.pipe.unet.config.in_channels
    warmed = {(4, latents, side, side)}  # rows, latent channels, latent size
    assert unet.shapes == warmed and decoder.shapes == {(1, latents, side, side)}
    compiled = run(engine, requests(64))
    assert len(compiled) == len(eager) == 2
    for a, b in zip(eager, compiled, strict=True):
        assert np.abs(a - b).max() <= TOLERANCE
    # Another sampler (Euler's float timesteps, DDIM's are integers) runs on the same graphs.
    graphs = counters["stats"]["unique_graphs"]
    euler = [dataclasses.replace(r, scheduler="Euler") for r in requests(64)]
    assert len(run(engine, euler)) == 2 and counters["stats"]["unique_graphs"] == graphs
    # Another size is not compiled on the spot (that would stall every running image): it runs eager.
    graphs = counters["stats"]["unique_graphs"]
    assert len(run(engine, requests(32))) == 2 and unet.shapes == warmed and len(decoder.shapes) == 1
    assert counters["stats"]["unique_graphs"] == graphs


def test_readyz_says_how_far_a_compiling_worker_is() -> None:
    from muse.messages import Compiling
    from muse.pools.handles import Seat, WorkerHandle
    from muse.pools.local import Pool

    pool = Pool(model="unused", devices=["cpu"])
    worker = WorkerHandle(1, 0, "cpu")
    pool.seats[0] = Seat("cpu", worker=worker)
    assert pool.readiness() == (False, "1 worker(s) loading the model")
    pool._handle(worker, Compiling(2, 5))
    assert pool.readiness() == (False, "1 worker(s) compiling (2 of 5 shapes)")


class FakeEngine:
    """Only what warming touches: the rows of the last step."""

    def __init__(self, buckets: list[int]) -> None:
        self.buckets = buckets
        self.compiled = self.decoder = None
        self.slots: list[SlotRequest] = []
        self.rows = 0

    def admit(self, requests: list[SlotRequest]) -> list[SlotRequest]:
        self.slots += requests
        return requests

    def step(self) -> list[SlotRequest]:
        self.rows = sum(2 if r.guidance_scale > 1 else 1 for r in self.slots)
        return []

    def decode(self, slots: list[SlotRequest]) -> list[object]:
        return [None for _ in slots]

    def remove(self, ids: Iterable[str]) -> None:
        gone = set(ids)
        self.slots = [r for r in self.slots if r.slot_id not in gone]


class FakeMemory:
    """A card of `gib` GiB where a UNet call takes 1 GiB per row."""

    def __init__(self, engine: FakeEngine, gib: int) -> None:
        self.engine = engine
        self.total = gib * 2**30

    def reset(self) -> None:
        self.engine.rows = 0

    def peak(self) -> int:
        return self.engine.rows * 2**30


def test_a_bucket_over_the_memory_fraction_is_dropped_with_every_larger_one() -> None:
    engine = FakeEngine(row_buckets(8))  # 1, 2, 4, 8, 16 rows
    reports: list[tuple[int, int]] = []
    warmed = warm_buckets(engine, 64, 64, lambda *r: reports.append(r), FakeMemory(engine, 10), 0.9)
    # 16 rows peak at 16 GiB > 9 GiB: the worker keeps 1-8 rows and takes at most 4 images at once.
    assert warmed.buckets == engine.buckets == [1, 2, 4, 8]
    assert warmed.capacity == 4
    assert warmed.peak_bytes == {rows: rows * 2**30 for rows in (1, 2, 4, 8, 16)}
    assert reports[-1] == (5, 5) and not engine.slots
    roomy = FakeEngine(row_buckets(8))
    assert warm_buckets(roomy, 64, 64, lambda *r: None, FakeMemory(roomy, 20), 0.9).capacity == 8
