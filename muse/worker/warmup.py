"""`--compile`'s warm-up driver: one step at every row bucket before the worker says Ready, so each shape is
compiled before the first request, keeping on CUDA only the buckets that fit --gpu-memory-fraction.

It sits above the step engine (muse.worker.engine) and the fast path (muse.worker.fastpath), driving the
first through the small `Warmable` interface below so tests can warm a fake engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from muse.worker.engine import SlotRequest

log = logging.getLogger("muse.worker")


class Compiled(Protocol):
    warming: bool


class Warmable(Protocol):
    """What warming needs of a step engine."""

    buckets: list[int]
    compiled: Any  # a Compiled, or None when eager
    decoder: Any

    def admit(self, requests: list[SlotRequest]) -> Sequence[Any]: ...
    def step(self) -> Sequence[Any]: ...
    def decode(self, slots: Any) -> list[Any]: ...
    def remove(self, slot_ids: Iterable[str]) -> Any: ...


class MemoryProbe(Protocol):
    total: int

    def reset(self) -> None: ...
    def peak(self) -> int: ...


@dataclass
class Warmed:
    """What warming the buckets found: those kept, the seconds and peak memory (bytes; CUDA only) each took."""

    buckets: list[int]
    seconds: dict[int, float] = field(default_factory=dict)
    peak_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        """Images the worker can take at once within the kept buckets."""
        return max(1, max(self.buckets, default=2) // 2)


class Memory:
    """A CUDA device's peak allocated memory since the last reset, and its total."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device
        self.total = torch.cuda.get_device_properties(device).total_memory

    def reset(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated(self.device))


def warm_buckets(
    engine: Warmable,
    width: int,
    height: int,
    report: Callable[[int, int], None],
    memory: MemoryProbe | None = None,
    fraction: float = 0.9,
) -> Warmed:
    """Run one step at every row bucket, smallest first (at the native size), so each is compiled before the
    first request; `report(done, total)` after each. With `memory` (CUDA), a bucket whose peak passes
    `fraction` of the device's memory is dropped with every larger one, and the engine keeps the rest:
    the worker never admits a batch it has not run."""
    warmed = Warmed(buckets=[])
    total = len(engine.buckets)
    for done, rows in enumerate(engine.buckets, start=1):
        guided = rows > 1
        images = rows // 2 if guided else 1
        requests = [
            SlotRequest(f"warm-{rows}/{i}", "warm up", "", i, 2, 7.5 if guided else 1.0, width, height)
            for i in range(images)
        ]
        if memory is not None:
            memory.reset()
        start = time.perf_counter()
        compiled = [c for c in (engine.compiled, engine.decoder) if c is not None]
        for c in compiled:
            c.warming = True
        slots = engine.admit(requests)
        try:
            engine.step()
            engine.decode(slots[:1])  # the decoder's one shape, with the first (smallest) bucket
        finally:
            engine.remove(r.slot_id for r in requests)
            for c in compiled:
                c.warming = False
        warmed.seconds[rows] = time.perf_counter() - start
        if memory is not None:
            warmed.peak_bytes[rows] = memory.peak()
            if warmed.peak_bytes[rows] > fraction * memory.total:
                log.warning(
                    "a UNet batch of %d rows peaked at %.1f GiB, over --gpu-memory-fraction %.2f of %.1f GiB: "
                    "this worker takes at most %d images at once",
                    rows, warmed.peak_bytes[rows] / 2**30, fraction, memory.total / 2**30, warmed.capacity,
                )  # fmt: skip
                report(total, total)
                break
        warmed.buckets.append(rows)
        log.info("compiled the UNet for %d rows in %.1f s (%d of %d)", rows, warmed.seconds[rows], done, total)
        report(done, total)
    engine.buckets = warmed.buckets
    return warmed
