"""Tickets: one per accepted request, from the queue to its answer.

A ticket and its future exist *before* the request is queued. Its states run queued → running →
succeeded | failed | cancelled, and it ends exactly once (`end`): the future is resolved, the
listeners hear the final state, and nothing it does afterwards changes that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from muse.errors import MuseError
from muse.messages import GeneratedImage, GenerateRequest, GenerateResult, Result, Timings


class TicketState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = (TicketState.SUCCEEDED, TicketState.FAILED, TicketState.CANCELLED)


@dataclass(frozen=True)
class Viewer:
    """Who asks to see a job or an image. Without API keys everyone sees everything (one tenant); with
    keys, a key sees what it made and an admin key sees everything."""

    identity: str | None = None  # None: no keys configured
    admin: bool = False

    @property
    def sees_all(self) -> bool:
        return self.identity is None or self.admin

    def sees(self, owner: str | None) -> bool:
        return self.sees_all or owner == self.identity

    @property
    def owner_filter(self) -> str | None:
        """For listings: the one owner whose things this viewer sees, or None for everyone's."""
        return None if self.sees_all else self.identity


EVERYONE = Viewer()

# Called with the ticket and the event: "queued" (position may have changed), "running", "progress",
# or the final state's name.
Listener = Callable[["Ticket", str], None]


@dataclass(eq=False)
class Ticket:
    """One accepted request. `submitted` and `deadline` are time.monotonic(); `created` is wall-clock."""

    id: str
    request: GenerateRequest
    future: asyncio.Future[GenerateResult]
    submitted: float
    deadline: float
    owner: str | None = None  # who sent it: an API key's fingerprint, a client address or a Slack user
    tag: float = 0.0  # its place in the fair queue (muse.core.fairqueue: start-time fair queuing by owner)
    created: float = field(default_factory=time.time)
    state: TicketState = TicketState.QUEUED
    step: int = 0
    started: float | None = None
    finished: float | None = None
    batch_size: int = 0
    attempts: int = 0
    result: GenerateResult | None = None
    error: MuseError | None = None
    listeners: list[Listener] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # gallery ids of its images, once stored
    timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return self.state in ENDED

    def watch(self, listener: Listener) -> Callable[[], None]:
        """Hear this ticket's events until it ends; returns the function that stops listening."""
        self.listeners.append(listener)

        def unwatch() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)

        return unwatch

    def emit(self, event: str) -> None:
        for listener in list(self.listeners):
            listener(self, event)

    def end(self, state: TicketState, *, result: GenerateResult | None = None, error: MuseError | None = None) -> None:
        assert state in ENDED and not self.done
        self.state = state
        self.finished = time.time()
        self.result, self.error = result, error
        if self.timer is not None:
            self.timer.cancel()
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
                # Nobody may be awaiting (a job polled over HTTP): don't warn about it.
                self.future.exception()
            else:
                self.future.set_result(result)  # type: ignore[arg-type]
        self.emit(state.value)
        self.listeners.clear()


def results_of(tickets: list[Ticket], message: Result, *, model: str, now: float) -> list[GenerateResult]:
    """Split a batch's PNGs among its tickets, in dispatch order (ticket i's n images are consecutive).
    Their batch size is the images they shared steps with: on a step worker, the mean it reported."""
    images = max(len(message.pngs), round(message.occupancy))
    pngs = iter(message.pngs)
    results = []
    for t in tickets:
        own = [GeneratedImage(next(pngs), seed) for seed in t.request.seeds()]
        started = t.started or now
        results.append(
            GenerateResult(
                images=own,
                model=model,
                steps=t.request.steps,
                width=t.request.width,
                height=t.request.height,
                batch_size=images,
                timings=Timings(
                    queued_ms=(started - t.submitted) * 1000,
                    compute_ms=message.compute_ms,
                    total_ms=(now - t.submitted) * 1000,
                ),
                request=t.request,
            )
        )
    return results
