"""How long things take: running averages of observed speed, turned into Retry-After and ETAs.

Nothing is known before the first batch; until then the estimates say None (ETAs) or assume one
second per image (Retry-After), which only errs towards telling clients to wait.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from muse.averages import ewma

UNKNOWN_IMAGE_SECONDS = 1.0


@dataclass
class Speed:
    image_seconds: float = 0.0  # compute time per image of a finished batch
    step_seconds: float = 0.0  # time between two progress reports of one batch

    def step_took(self, seconds: float) -> None:
        self.step_seconds = ewma(self.step_seconds, seconds)

    def batch_took(self, compute_ms: float, images: float) -> None:
        self.image_seconds = ewma(self.image_seconds, compute_ms / 1000 / max(images, 1))

    def wait(self, images: int, workers: int) -> float:
        """Seconds until `images` queued images are done, spread over `workers`."""
        return images * (self.image_seconds or UNKNOWN_IMAGE_SECONDS) / max(1, workers)

    def queued_eta(self, images_through: int, workers: int, soonest_free_steps: int | None) -> float | None:
        """A queued request's ETA: the soonest running batch must end (None if a worker is free), then
        the images ahead of it and its own."""
        if not self.image_seconds:
            return None
        free_in = 0.0 if soonest_free_steps is None else soonest_free_steps * self.step_seconds
        return free_in + self.wait(images_through, workers)

    def running_eta(self, steps_left: int) -> float | None:
        return max(0.0, steps_left * self.step_seconds) if self.step_seconds else None

    def slots_eta(self, running_steps_left: list[int], slots: int, queue: list[tuple[int, int]]) -> float | None:
        """A queued request's ETA on step workers: when the last of `queue` (images, steps) is done, each
        request starting once it has as many free slots as images (oldest first), a running image
        freeing its slot after its steps left. `slots`: images all the workers run at once."""
        if not self.step_seconds or not queue:
            return None
        free_at = [left * self.step_seconds for left in running_steps_left]
        free_at += [0.0] * max(0, slots - len(free_at))
        heapq.heapify(free_at)
        end = 0.0
        for images, steps in queue:
            taken = [heapq.heappop(free_at) for _ in range(min(images, len(free_at)))]
            end = max(taken, default=0.0) + steps * self.step_seconds
            for _ in taken:
                heapq.heappush(free_at, end)
        return end
