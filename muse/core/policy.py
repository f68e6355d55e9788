"""What a batching policy sees and answers. The batcher (muse.core.batcher) owns tickets, their lifecycle and
the callbacks; a policy only decides which queued tickets go to which worker now, and how long a queued
ticket will wait. One policy per batching mode: muse.core.step_policy (step workers: requests join running
batches between steps) and muse.core.request_policy (whole pipeline calls, grouped by key, with holds)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from muse.core.estimates import Speed
from muse.core.fairqueue import FairQueue
from muse.core.pool import WorkerPool
from muse.core.tickets import Ticket
from muse.messages import Assignment


@dataclass(eq=False)
class InFlight:
    """An Assignment on a worker, with the tickets it answers."""

    assignment: Assignment
    tickets: list[Ticket]
    last_step_at: float
    started: bool = False  # False while it waits in a step worker for a free slot (taken ahead)
    running: int = 0  # images its worker ran once it had it
    kill_timer: asyncio.TimerHandle | None = None  # set once every request of it is gone

    @property
    def step(self) -> int:
        return max((t.step for t in self.tickets), default=0)

    @property
    def steps_left(self) -> int:
        return self.assignment.key.steps - self.step

    def close(self) -> None:
        if self.kill_timer is not None:
            self.kill_timer.cancel()


@dataclass
class Context:
    """The batcher's state a policy reads (never changes: the batcher takes and dispatches what it picks)."""

    queue: FairQueue
    pool: WorkerPool
    inflight: dict[str, InFlight]
    speed: Speed
    max_batch_size: int
    capacity: Callable[[], int]  # workers there are to share the queue


class Policy(Protocol):
    def pick(self) -> tuple[Any, list[Ticket]] | None:
        """The next (worker, tickets) to dispatch now, or None: nothing can go yet (a policy that holds work
        back arranges to be asked again)."""
        ...

    def queued_eta(self, ticket: Ticket) -> float | None:
        """Seconds until a queued ticket is done; None while nothing is measured."""
        ...

    def finished(self, waiting_clients: int) -> None:
        """An Assignment came back; `waiting_clients` of its requests' clients got their answer now."""
        ...

    def arrived(self) -> None:
        """A request was queued."""
        ...
