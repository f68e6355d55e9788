"""The batcher: one future per request, grouped into batches for idle workers.

Policy (pure; tested against a fake pool in milliseconds):
- a ticket and its future exist *before* the request is queued; every ticket ends exactly once;
- batches group requests with the same BatchKey, oldest first, up to `max_batch_size` images
  (a request for n images takes n slots and is never split);
- an idle worker gets work at once when the service was quiet; while other workers are busy, a
  part-full batch may wait for company at most `max_wait_ms` after its oldest request arrived;
  right after a batch of several requests finished, while its clients are still coming back, it
  waits until they are all back, `max_wait_ms` after the latest arrival, or `RETURN_HOLDS` x
  `max_wait_ms` after the finish, whichever comes first (a lone client's next request never waits);
- cancelled or expired requests never reach a worker; a running batch whose requests are all gone
  is interrupted; a batch whose worker died is retried `max_retries` times, then fails with 503.

Driven by callbacks (submit, a worker going idle, a timer), so a waiting request costs a list entry
and a timer-heap entry, nothing that runs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from muse.errors import (
    Cancelled,
    GenerationFailed,
    MuseError,
    Overloaded,
    ShuttingDown,
    TimedOut,
    WorkerDied,
)
from muse.messages import (
    Failure,
    GeneratedImage,
    GenerateRequest,
    GenerateResult,
    ImageSpec,
    Job,
    Progress,
    Result,
    Timings,
)

log = logging.getLogger("muse.core.batcher")
# After a batch finishes, its clients' next requests may be held at most this many max_waits.
RETURN_HOLDS = 4


class WorkerPool(Protocol):
    """What the batcher needs of the pool."""

    def idle_worker(self) -> Any | None: ...
    def dispatch(self, worker: Any, job: Job) -> None: ...
    def interrupt(self, job_id: str) -> None: ...
    def busy_count(self) -> int: ...


class TicketState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


Listener = Callable[["Ticket", str], None]


@dataclass(eq=False)
class Ticket:
    """One accepted request, from queue to answer."""

    id: str
    request: GenerateRequest
    future: asyncio.Future[GenerateResult]
    submitted: float
    deadline: float
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
        return self.state in (TicketState.SUCCEEDED, TicketState.FAILED, TicketState.CANCELLED)


@dataclass(eq=False)
class InFlight:
    job: Job
    tickets: list[Ticket]
    dispatched: float
    last_step_at: float


class Batcher:
    def __init__(
        self,
        pool: WorkerPool,
        *,
        model: str,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        max_retries: int = 1,
        request_timeout: float = 300.0,
        capacity: Callable[[], int] = lambda: 1,
        on_demand: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.capacity = capacity
        self.on_demand = on_demand
        self.queue: list[Ticket] = []
        self.queued_images = 0
        self.inflight: dict[str, InFlight] = {}
        self.closed = False
        self.on_finish: list[Callable[[Ticket], None]] = []
        self.on_batch: list[Callable[[int], None]] = []
        self.on_interrupt: list[Callable[[], None]] = []
        self.on_retry: list[Callable[[], None]] = []
        # Called whenever nothing is queued or running any more: after the last ticket ends, or
        # after a batch whose tickets had all ended (cancelled, client gone) comes back.
        self.on_idle: list[Callable[[], None]] = []
        # Exponential averages of observed speed, for Retry-After and ETAs.
        self.image_seconds = 0.0
        self.step_seconds = 0.0
        self._hold: asyncio.TimerHandle | None = None
        self._last_finish = float("-inf")
        self._last_arrival = float("-inf")
        # Requests of the batch that finished last whose clients have not sent their next one yet.
        self._returning = 0
        self._watched = 0

    # ---- entry points -----------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, *, ticket_id: str | None = None) -> Ticket:
        if self.closed:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        # An empty queue takes any request, or one bigger than --max-queue could never run.
        if self.queued_images and self.queued_images + request.n > self.max_queue:
            raise Overloaded(
                f"queue full ({self.queued_images} images waiting, limit {self.max_queue}); retry later",
                retry_after=self.estimate_wait(self.queued_images + request.n),
            )
        loop = asyncio.get_running_loop()
        # Timestamps from time.monotonic(): uvloop's loop.time() only has millisecond resolution.
        now = time.monotonic()
        timeout = self.request_timeout
        if request.timeout_s is not None:
            timeout = min(timeout, request.timeout_s)
        ticket = Ticket(ticket_id or secrets.token_hex(8), request, loop.create_future(), now, now + timeout)
        ticket.timer = loop.call_later(timeout, self._expire, ticket)
        self.queue.append(ticket)
        self.queued_images += request.n
        self._returning = max(0, self._returning - 1)
        self._last_arrival = now
        self._pump()
        self.on_demand()
        return ticket

    def cancel(self, ticket: Ticket, error: MuseError | None = None) -> bool:
        """End a ticket now (client gone, DELETE, deadline). False if it had already ended."""
        if ticket.done:
            return False
        error = error or Cancelled("cancelled by the client")
        state = TicketState.CANCELLED if isinstance(error, Cancelled) else TicketState.FAILED
        if ticket.state is TicketState.QUEUED:
            self._dequeue([ticket])
            self._finish(ticket, state, error=error)
            self._pump()
            self._emit_positions()
            self._settle()
        else:
            self._finish(ticket, state, error=error)
            for job_id, flight in self.inflight.items():
                if ticket in flight.tickets and all(t.done for t in flight.tickets):
                    log.info("interrupting batch %s: all its requests are gone", job_id)
                    self.pool.interrupt(job_id)
        return True

    def watch(self, ticket: Ticket, listener: Listener) -> Callable[[], None]:
        ticket.listeners.append(listener)
        self._watched += 1

        def unwatch() -> None:
            if listener in ticket.listeners:
                ticket.listeners.remove(listener)
                self._watched -= 1

        return unwatch

    def close(self) -> None:
        """Accept nothing new; what is queued or running carries on."""
        self.closed = True

    def fail_all(self, error: MuseError) -> None:
        for ticket in [*self.queue, *(t for f in self.inflight.values() for t in f.tickets)]:
            self.cancel(ticket, error)

    @property
    def inflight_images(self) -> int:
        return sum(len(f.job.images) for f in self.inflight.values())

    @property
    def idle(self) -> bool:
        return not self.queue and not self.inflight

    # ---- views ------------------------------------------------------------------------------------

    def position(self, ticket: Ticket) -> int | None:
        """Images queued ahead of this ticket, or None once it left the queue."""
        ahead = 0
        for t in self.queue:
            if t is ticket:
                return ahead
            ahead += t.request.n
        return None

    def estimate_wait(self, images: int) -> float:
        per_image = self.image_seconds or 1.0
        return images * per_image / max(1, self.capacity())

    def eta(self, ticket: Ticket) -> float | None:
        if ticket.state is TicketState.QUEUED:
            if not self.image_seconds:
                return None
            position = self.position(ticket) or 0
            # Nothing starts before a worker frees up: the soonest running batch must end first.
            running = [(f.job.steps - self._step_of(f)) * self.step_seconds for f in self.inflight.values()]
            free_in = min(running) if running and self.pool.idle_worker() is None else 0.0
            return free_in + self.estimate_wait(position + ticket.request.n)
        if ticket.state is TicketState.RUNNING and self.step_seconds:
            return max(0.0, (ticket.request.steps - ticket.step) * self.step_seconds)
        return None

    @staticmethod
    def _step_of(flight: InFlight) -> int:
        return max((t.step for t in flight.tickets), default=0)

    # ---- pool callbacks ---------------------------------------------------------------------------

    def worker_idle(self) -> None:
        self._pump()

    def job_progress(self, message: Progress) -> None:
        flight = self.inflight.get(message.job_id)
        if flight is None:
            return
        now = time.monotonic()
        self.step_seconds = _ewma(self.step_seconds, now - flight.last_step_at)
        flight.last_step_at = now
        for t in flight.tickets:
            if not t.done:
                t.step = message.step
                self._emit(t, "progress")

    def job_finished(self, message: Result | Failure) -> None:
        flight = self.inflight.pop(message.job_id, None)
        if flight is None:
            return
        try:
            self._job_finished(flight, message)
        finally:
            self._settle()

    def _job_finished(self, flight: InFlight, message: Result | Failure) -> None:
        self._last_finish = time.monotonic()
        # Only clients still waiting get an answer now and may send again; cancelled ones will not.
        self._returning = sum(not t.done for t in flight.tickets)
        if isinstance(message, Failure):
            error = (
                Cancelled("interrupted: every request of the batch was gone")
                if message.interrupted
                else GenerationFailed(f"generation failed: {message.message}")
            )
            if message.interrupted:
                for callback in self.on_interrupt:
                    callback()
            for t in flight.tickets:
                if not t.done:
                    self._finish(t, TicketState.FAILED, error=error)
            return
        images = len(flight.job.images)
        self.image_seconds = _ewma(self.image_seconds, message.compute_ms / 1000 / max(images, 1))
        now = time.monotonic()
        pngs = iter(message.pngs)
        for t in flight.tickets:
            own = [GeneratedImage(next(pngs), seed) for seed in t.request.seeds()]
            if t.done:
                continue
            started = t.started or now
            result = GenerateResult(
                images=own,
                model=self.model,
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
            self._finish(t, TicketState.SUCCEEDED, result=result)

    def job_lost(self, job: Job, reason: str) -> None:
        flight = self.inflight.pop(job.job_id, None)
        if flight is None:
            return
        try:
            self._job_lost(flight, reason)
        finally:
            self._settle()

    def _job_lost(self, flight: InFlight, reason: str) -> None:
        alive = [t for t in flight.tickets if not t.done]
        retry = [t for t in alive if t.attempts <= self.max_retries]
        for t in alive:
            if t not in retry:
                self._finish(t, TicketState.FAILED, error=WorkerDied(f"{reason}; retried, and the retry died too"))
        if retry:
            for callback in self.on_retry:
                callback()
            log.warning("%s: retrying %d request(s) of batch %s", reason, len(retry), flight.job.job_id)
            for t in retry:
                t.state, t.step, t.started = TicketState.QUEUED, 0, None
            # Back to the front, oldest first: they were accepted before anything still queued.
            self.queue = sorted(retry, key=lambda t: t.submitted) + self.queue
            self.queued_images += sum(t.request.n for t in retry)
            self._pump()

    # ---- internals --------------------------------------------------------------------------------

    def _expire(self, ticket: Ticket) -> None:
        where = "in the queue" if ticket.state is TicketState.QUEUED else "while running"
        timeout = ticket.deadline - ticket.submitted
        self.cancel(ticket, TimedOut(f"request timed out after {timeout:g} s {where}", param="timeout_s"))

    def _pump(self) -> None:
        """Hand batches to idle workers while there are both."""
        loop = asyncio.get_running_loop()
        moved = False
        while self.queue:
            worker = self.pool.idle_worker()
            if worker is None:
                break
            batch = self._next_batch()
            images = sum(t.request.n for t in batch)
            if images < self.max_batch_size:
                wait_left = self._hold_until(batch[0]) - time.monotonic()
                if wait_left > 0:
                    if self._hold is None:
                        self._hold = loop.call_later(wait_left, self._release_hold)
                    break
            self._dequeue(batch)
            self._dispatch(worker, batch)
            moved = True
        if moved:
            self._emit_positions()

    def _hold_until(self, oldest: Ticket) -> float:
        """How long a part-full batch may wait for company (a monotonic time; the past means go)."""
        until = float("-inf")
        if self.pool.busy_count() > 0:
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
        self._pump()

    def _next_batch(self) -> list[Ticket]:
        first = self.queue[0]
        batch, images = [first], first.request.n
        for t in self.queue[1:]:
            if images >= self.max_batch_size:
                break
            if t.request.key == first.request.key and images + t.request.n <= self.max_batch_size:
                batch.append(t)
                images += t.request.n
        return batch

    def _dequeue(self, tickets: list[Ticket]) -> None:
        gone = set(map(id, tickets))
        self.queue = [t for t in self.queue if id(t) not in gone]
        self.queued_images -= sum(t.request.n for t in tickets)

    def _dispatch(self, worker: Any, batch: list[Ticket]) -> None:
        first = batch[0].request
        job = Job(
            job_id=secrets.token_hex(6),
            images=[
                ImageSpec(t.request.prompt, t.request.negative_prompt, s) for t in batch for s in t.request.seeds()
            ],
            width=first.width,
            height=first.height,
            steps=first.steps,
            guidance_scale=first.guidance_scale,
            scheduler=first.scheduler,
        )
        now = time.monotonic()
        self.inflight[job.job_id] = InFlight(job, batch, now, time.monotonic())
        for t in batch:
            t.state, t.started, t.batch_size, t.step = TicketState.RUNNING, now, len(job.images), 0
            t.attempts += 1
            self._emit(t, "running")
        for callback in self.on_batch:
            callback(len(job.images))
        self.pool.dispatch(worker, job)

    def _finish(
        self,
        ticket: Ticket,
        state: TicketState,
        *,
        result: GenerateResult | None = None,
        error: MuseError | None = None,
    ) -> None:
        ticket.state = state
        ticket.finished = time.time()
        ticket.result, ticket.error = result, error
        if ticket.timer is not None:
            ticket.timer.cancel()
        if not ticket.future.done():
            if error is not None:
                ticket.future.set_exception(error)
                # Nobody may be awaiting (a job polled over HTTP): don't warn about it.
                ticket.future.exception()
            else:
                ticket.future.set_result(result)  # type: ignore[arg-type]
        self._emit(ticket, state.value)
        for callback in self.on_finish:
            callback(ticket)
        self._watched -= len(ticket.listeners)
        ticket.listeners.clear()

    def _settle(self) -> None:
        # Called once at the end of each entry point that can remove the last work (a cancelled
        # queued ticket, a batch back or lost), never from inside one, so idle is announced once.
        if self.idle:
            for callback in self.on_idle:
                callback()

    def _emit(self, ticket: Ticket, event: str) -> None:
        for listener in list(ticket.listeners):
            listener(ticket, event)

    def _emit_positions(self) -> None:
        if self._watched <= 0:
            return
        for t in self.queue:
            if t.listeners:
                self._emit(t, "queued")


def _ewma(previous: float, sample: float, weight: float = 0.2) -> float:
    return sample if previous == 0 else previous + weight * (sample - previous)
