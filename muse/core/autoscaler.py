"""The autoscaler: turns load into `pool.target`, nothing else.

Load = images queued + images in flight. Each worker can usefully hold one full batch, so the wanted
worker count is ceil(load / max_batch_size), clamped to [min_workers, max_workers]. A rise must last
`upscale_delay` and a fall `downscale_delay` before the target moves; a request arriving while scaled
to zero wakes it at once (cold start).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from muse.core.pool import Scalable
from muse.periodic import every

log = logging.getLogger("muse.core.autoscaler")


class Autoscaler:
    def __init__(
        self,
        pool: Scalable,
        load: Callable[[], int],
        *,
        max_batch_size: int,
        min_workers: int,
        max_workers: int,
        interval: float = 1.0,
        upscale_delay: float = 0.0,
        downscale_delay: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.load = load
        self.max_batch_size = max_batch_size
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.interval = interval
        self.upscale_delay = upscale_delay
        self.downscale_delay = downscale_delay
        self.clock = clock
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._wake = asyncio.Event()
        self.decisions: list[str] = []
        self.ticks = 0

    def wanted(self) -> int:
        wanted = math.ceil(self.load() / self.max_batch_size)
        return max(self.min_workers, min(self.max_workers, wanted))

    def poke(self) -> None:
        """Load changed: decide now rather than at the next tick (cold start from zero)."""
        if self.pool.target == 0 or self.pool.target < self.max_workers:
            self._wake.set()

    def step(self) -> None:
        self.ticks += 1
        now = self.clock()
        wanted, target = self.wanted(), self.pool.target
        if wanted > target:
            self._down_since = None
            self._up_since = self._up_since if self._up_since is not None else now
            # From zero there is nobody to serve the request: don't wait out the delay.
            if target == 0 or now - self._up_since >= self.upscale_delay:
                self._set(wanted, f"load {self.load()} images needs {wanted} worker(s)")
        elif wanted < target:
            self._up_since = None
            self._down_since = self._down_since if self._down_since is not None else now
            if now - self._down_since >= self.downscale_delay:
                self._set(wanted, f"load {self.load()} images for {self.downscale_delay:g} s needs {wanted}")
        else:
            self._up_since = self._down_since = None

    def _set(self, target: int, reason: str) -> None:
        log.info("scaling %d -> %d worker(s): %s", self.pool.target, target, reason)
        self.decisions.append(f"{self.pool.target}->{target}: {reason}")
        self.pool.target = target
        self._up_since = self._down_since = None
        # Converge now rather than at the pool's next tick: a cold start should not wait.
        self.pool.reconcile()

    async def run(self) -> None:
        await every(self.interval, self.step, log=log, name="autoscaler", wake=self._wake)
