"""Step workers: the request at the head of the queue goes, as its own Assignment, to a worker running its
latent shape (width, height) with free slots for its n images, or to an idle one, the moment there is one;
it joins the running images at the next step boundary. A worker runs one shape at a time: a head request of
another shape waits until a worker drains, and the requests behind it wait too (oldest first). No holds:
nothing is gained by waiting for company when company can join later.

A running worker also takes up to `prefetch` images beyond its capacity (the service asks for one), queued
in the worker: a slot that
frees is then filled at the very next step boundary, instead of after its Result has reached the parent
and the next request has travelled back (about one step, during which the slot sat empty: measured at
7.2 of 8 slots busy under saturation, a tenth of the capacity)."""

from __future__ import annotations

from muse.core.policy import Context
from muse.core.pool import StepWorker
from muse.core.tickets import Ticket


class StepPolicy:
    def __init__(self, context: Context, prefetch: int = 0) -> None:
        self.c = context
        self.prefetch = prefetch

    def pick(self) -> tuple[StepWorker, list[Ticket]] | None:
        head = self.c.queue.head
        worker = self._room_for(head)
        return None if worker is None else (worker, [head])

    def _room_for(self, ticket: Ticket) -> StepWorker | None:
        """An idle worker, or one running this request's StepKey with free slots for its images: the one
        with the most free slots (every image more makes each step of a worker longer), then the one
        idle longest. An idle worker takes a request bigger than its capacity, or it could never run."""
        request = ticket.request
        key = request.step_key
        fits = [
            w
            for w in self.c.pool.open_workers()
            if w.images == 0 or (w.step_key == key and w.images + request.n <= w.capacity + self.prefetch)
        ]
        return min(fits, key=lambda w: (w.images - w.capacity, w.last_seen), default=None)

    def queued_eta(self, ticket: Ticket) -> float | None:
        c = self.c
        running = [f.steps_left for f in c.inflight.values() for _ in f.assignment.images]
        ahead = [(t.request.n, t.request.denoising_steps) for t in c.queue.through(ticket)]
        slots = sum(w.capacity for w in c.pool.open_workers()) or c.max_batch_size
        return c.speed.slots_eta(running, slots, ahead)

    def finished(self, waiting_clients: int) -> None:
        pass

    def arrived(self) -> None:
        pass
