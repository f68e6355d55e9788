"""Request workers (whole pipeline calls): a batch groups queued requests with the same BatchKey, up to
`max_batch_size` images (a request for n images takes n slots and is never split).

An idle worker gets work at once when the service was quiet; while other workers are busy, a part-full
batch may wait for company at most `max_wait` after its oldest request arrived; right after a batch of
several requests finished, while its clients are still coming back, it waits until they are all back,
`max_wait` after the latest arrival, or `RETURN_HOLDS` x `max_wait` after the finish, whichever comes first
(a lone client's next request never waits)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from muse.core.policy import Context
from muse.core.tickets import Ticket

# After a batch finishes, its clients' next requests may be held at most this many max_waits.
RETURN_HOLDS = 4


class RequestPolicy:
    def __init__(self, context: Context, *, max_wait: float, wake: Callable[[], None]) -> None:
        """`wake`: ask the batcher to pick again (when a hold ends)."""
        self.c = context
        self.max_wait = max_wait
        self.wake = wake
        self._hold: asyncio.TimerHandle | None = None
        self._last_finish = float("-inf")
        self._last_arrival = float("-inf")
        # Requests of the batch that finished last whose clients have not sent their next one yet.
        self._returning = 0

    def pick(self) -> tuple[Any, list[Ticket]] | None:
        worker = self.c.pool.idle_worker()
        if worker is None:
            return None
        batch = self._next_batch()
        if sum(t.request.n for t in batch) < self.c.max_batch_size:
            wait_left = self._hold_until(batch[0]) - time.monotonic()
            if wait_left > 0:
                if self._hold is None:
                    self._hold = asyncio.get_running_loop().call_later(wait_left, self._release_hold)
                return None
        return worker, batch

    def queued_eta(self, ticket: Ticket) -> float | None:
        c = self.c
        position = c.queue.position(ticket) or 0
        # Nothing starts before a worker frees up: the soonest running batch must end first.
        steps_left = [f.steps_left for f in c.inflight.values()]
        soonest = min(steps_left) if steps_left and c.pool.idle_worker() is None else None
        return c.speed.queued_eta(position + ticket.request.n, c.capacity(), soonest)

    def finished(self, waiting_clients: int) -> None:
        self._last_finish = time.monotonic()
        self._returning = waiting_clients

    def arrived(self) -> None:
        self._returning = max(0, self._returning - 1)
        self._last_arrival = time.monotonic()

    def _hold_until(self, oldest: Ticket) -> float:
        """How long a part-full batch may wait for company (a monotonic time; the past means go)."""
        until = float("-inf")
        if self.c.pool.busy_count() > 0:
            until = oldest.submitted + self.max_wait
        if self._returning > 0:
            # The finished batch's clients come back one by one: keep waiting while they keep
            # arriving (max_wait after the latest), but never longer than RETURN_HOLDS * max_wait
            # after the finish. Measured from the finish, not from the oldest request, so a
            # request left over from an earlier split still waits to rejoin the others.
            latest = max(self._last_finish, self._last_arrival)
            until = max(until, min(latest + self.max_wait, self._last_finish + RETURN_HOLDS * self.max_wait))
        return until

    def _release_hold(self) -> None:
        self._hold = None
        self.wake()

    def _next_batch(self) -> list[Ticket]:
        queue = self.c.queue
        first = queue.head
        batch, images = [first], first.request.n
        for t in list(queue)[1:]:
            if images >= self.c.max_batch_size:
                break
            if t.request.key == first.request.key and images + t.request.n <= self.c.max_batch_size:
                batch.append(t)
                images += t.request.n
        return batch
