"""The batcher: batching policy over tickets, for workers with free capacity.

Policy (pure; tested against a fake pool in milliseconds):
- a ticket (muse.core.tickets) is made with its future *before* the request is queued;
- the queue is in fair order between owners (muse.core.fairqueue: start-time fair queuing in images);
- step workers (the pool says which kind it has): the request at the head of the queue goes, as its
  own Assignment, to a worker running its latent shape (width, height) with free slots for its n images, or
  to an idle one, the moment there is one; it joins the running images at the next step boundary. A
  worker runs one shape at a time: a head request of another shape waits until a worker drains, and
  the requests behind it wait too (oldest first). No holds: nothing is gained by waiting for company
  when company can join later;
- request workers (whole pipeline calls): batches group requests with the same BatchKey, up to
  `max_batch_size` images (a request for n images takes n slots and is never split);
- an idle request worker gets work at once when the service was quiet; while other workers are busy, a
  part-full batch may wait for company at most `max_wait_ms` after its oldest request arrived;
  right after a batch of several requests finished, while its clients are still coming back, it
  waits until they are all back, `max_wait_ms` after the latest arrival, or `RETURN_HOLDS` x
  `max_wait_ms` after the finish, whichever comes first (a lone client's next request never waits);
- cancelled or expired requests never reach a worker; a running batch whose requests are all gone
  is interrupted; a batch whose worker died is retried `max_retries` times, then fails with 503.

Driven by callbacks (submit, a worker going idle, a timer), so a waiting request costs a list entry
and a timer-heap entry, nothing that runs. Speeds for Retry-After and ETAs live in muse.core.estimates.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from muse.core.estimates import Speed
from muse.core.fairqueue import FairQueue
from muse.core.tickets import Ticket, TicketState, results_of
from muse.errors import (
    Cancelled,
    GenerationFailed,
    MuseError,
    Overloaded,
    ShuttingDown,
    TimedOut,
    WorkerDied,
)
from muse.messages import Assignment, Batching, Failure, GenerateRequest, GenerateResult, ImageSpec, Progress, Result

log = logging.getLogger("muse.core.batcher")
# After a batch finishes, its clients' next requests may be held at most this many max_waits.
RETURN_HOLDS = 4


class StepWorker(Protocol):
    """What the batcher reads of a step worker to place a request on it."""

    @property
    def images(self) -> int: ...  # running now
    @property
    def capacity(self) -> int: ...
    @property
    def shape(self) -> tuple[int, int] | None: ...  # (width, height) of what runs; None when idle
    @property
    def last_seen(self) -> float: ...


class WorkerPool(Protocol):
    """What the batcher needs of the pool (local subprocesses, or a fake in tests)."""

    @property
    def batching(self) -> str: ...
    def idle_worker(self) -> Any | None: ...
    def open_workers(self) -> Sequence[StepWorker]: ...
    def dispatch(self, worker: Any, batch: Assignment) -> int: ...
    def interrupt(self, assignment_id: str) -> None: ...
    def kill_assignment(self, assignment_id: str) -> None: ...
    def busy_count(self) -> int: ...


@dataclass(eq=False)
class InFlight:
    batch: Assignment
    tickets: list[Ticket]
    last_step_at: float
    kill_timer: asyncio.TimerHandle | None = None  # set once every request of it is gone

    def close(self) -> None:
        if self.kill_timer is not None:
            self.kill_timer.cancel()


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
        interrupt_grace: float = 5.0,
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
        self.interrupt_grace = interrupt_grace
        self.queue = FairQueue()
        self.inflight: dict[str, InFlight] = {}
        self.closed = False
        self.speed = Speed()
        self.on_finish: list[Callable[[Ticket], None]] = []
        self.on_batch: list[Callable[[int], None]] = []  # images a worker runs after taking a batch
        self.on_admit: list[Callable[[bool], None]] = []  # whether a batch joined running ones
        self.on_step: list[Callable[[float], None]] = []  # seconds between two steps of a running batch
        self.on_interrupt: list[Callable[[], None]] = []
        self.on_retry: list[Callable[[], None]] = []
        # Called whenever nothing is queued or running any more: after the last ticket ends, or
        # after a batch whose tickets had all ended (cancelled, client gone) comes back.
        self.on_idle: list[Callable[[], None]] = []
        self._hold: asyncio.TimerHandle | None = None
        self._last_finish = float("-inf")
        self._last_arrival = float("-inf")
        # Requests of the batch that finished last whose clients have not sent their next one yet.
        self._returning = 0

    # ---- entry points -----------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, *, owner: str | None = None) -> Ticket:
        if self.closed:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        # An empty queue takes any request, or one bigger than --max-queue could never run.
        if self.queued_images and self.queued_images + request.n > self.max_queue:
            raise Overloaded(
                f"queue full ({self.queued_images} images waiting, limit {self.max_queue}); retry later",
                retry_after=self.speed.wait(self.queued_images + request.n, self.capacity()),
            )
        loop = asyncio.get_running_loop()
        # Timestamps from time.monotonic(): uvloop's loop.time() only has millisecond resolution.
        now = time.monotonic()
        timeout = self.request_timeout
        if request.timeout_s is not None:
            timeout = min(timeout, request.timeout_s)
        ticket = Ticket(secrets.token_hex(8), request, loop.create_future(), now, now + timeout, owner)
        ticket.timer = loop.call_later(timeout, self._expire, ticket)
        self.queue.add(ticket)
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
            self.queue.drop(ticket)
            self._end(ticket, state, error=error)
            self._pump()
            self._emit_positions()
            self._settle()
        else:
            self._end(ticket, state, error=error)
            for flight in self.inflight.values():
                if ticket in flight.tickets and all(t.done for t in flight.tickets):
                    self._abandon(flight)
        return True

    def _abandon(self, flight: InFlight) -> None:
        """Every request of a running batch is gone: ask its worker to stop at the next step, and kill it
        if it has not within the grace (one step can last minutes, and the worker is wanted elsewhere)."""
        assignment_id = flight.batch.assignment_id
        log.info("interrupting batch %s: all its requests are gone", assignment_id)
        self.pool.interrupt(assignment_id)
        grace = self.interrupt_grace + 2 * self.speed.step_seconds
        flight.kill_timer = asyncio.get_running_loop().call_later(grace, self.pool.kill_assignment, assignment_id)

    def close(self) -> None:
        """Accept nothing new; what is queued or running carries on."""
        self.closed = True

    def fail_all(self, error: MuseError) -> None:
        for ticket in [*self.queue, *(t for f in self.inflight.values() for t in f.tickets)]:
            self.cancel(ticket, error)

    @property
    def queued_images(self) -> int:
        return self.queue.images

    @property
    def inflight_images(self) -> int:
        return sum(len(f.batch.images) for f in self.inflight.values())

    @property
    def idle(self) -> bool:
        return not self.queue and not self.inflight

    # ---- views ------------------------------------------------------------------------------------

    def active(self) -> list[Ticket]:
        """Unfinished tickets: running ones (oldest first), then the queue in order."""
        running = [t for f in self.inflight.values() for t in f.tickets if not t.done]
        return sorted(running, key=lambda t: t.submitted) + list(self.queue)

    def position(self, ticket: Ticket) -> int | None:
        """Images queued ahead of this ticket, or None once it left the queue."""
        return self.queue.position(ticket)

    def eta(self, ticket: Ticket) -> float | None:
        if ticket.state is TicketState.QUEUED and self.pool.batching == Batching.STEP:
            running = [f.batch.key.steps - self._step_of(f) for f in self.inflight.values() for _ in f.batch.images]
            ahead = [(t.request.n, t.request.steps) for t in self.queue.through(ticket)]
            slots = sum(w.capacity for w in self.pool.open_workers()) or self.max_batch_size
            return self.speed.slots_eta(running, slots, ahead)
        if ticket.state is TicketState.QUEUED:
            position = self.position(ticket) or 0
            # Nothing starts before a worker frees up: the soonest running batch must end first.
            steps_left = [f.batch.key.steps - self._step_of(f) for f in self.inflight.values()]
            soonest = min(steps_left) if steps_left and self.pool.idle_worker() is None else None
            return self.speed.queued_eta(position + ticket.request.n, self.capacity(), soonest)
        if ticket.state is TicketState.RUNNING:
            return self.speed.running_eta(ticket.request.steps - ticket.step)
        return None

    @staticmethod
    def _step_of(flight: InFlight) -> int:
        return max((t.step for t in flight.tickets), default=0)

    # ---- pool callbacks ---------------------------------------------------------------------------

    def room_freed(self) -> None:
        self._pump()

    def assignment_progress(self, message: Progress) -> None:
        flight = self.inflight.get(message.assignment_id)
        if flight is None:
            return
        now = time.monotonic()
        # Workers coalesce progress (muse.worker.channel): one report may cover several steps.
        moved = max(1, message.step - self._step_of(flight))
        per_step = (now - flight.last_step_at) / moved
        for _ in range(moved):
            self.speed.step_took(per_step)
            for callback in self.on_step:
                callback(per_step)
        flight.last_step_at = now
        for t in flight.tickets:
            if not t.done:
                t.step = message.step
                t.emit("progress")

    def assignment_finished(self, message: Result | Failure) -> None:
        flight = self.inflight.pop(message.assignment_id, None)
        if flight is None:
            return
        flight.close()
        try:
            self._batch_finished(flight, message)
        finally:
            self._settle()

    def _batch_finished(self, flight: InFlight, message: Result | Failure) -> None:
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
                    self._end(t, TicketState.FAILED, error=error)
            return
        self.speed.batch_took(message.compute_ms, message.occupancy or len(flight.batch.images))
        results = results_of(flight.tickets, message, model=self.model, now=time.monotonic())
        for t, result in zip(flight.tickets, results, strict=True):
            if not t.done:
                self._end(t, TicketState.SUCCEEDED, result=result)

    def assignment_lost(self, batch: Assignment, reason: str) -> None:
        flight = self.inflight.pop(batch.assignment_id, None)
        if flight is None:
            return
        flight.close()
        try:
            self._batch_lost(flight, reason)
        finally:
            self._settle()

    def _batch_lost(self, flight: InFlight, reason: str) -> None:
        alive = [t for t in flight.tickets if not t.done]
        retry = [t for t in alive if t.attempts <= self.max_retries]
        for t in alive:
            if t not in retry:
                self._end(t, TicketState.FAILED, error=WorkerDied(f"{reason}; retried, and the retry died too"))
        if retry:
            for callback in self.on_retry:
                callback()
            log.warning("%s: retrying %d request(s) of batch %s", reason, len(retry), flight.batch.assignment_id)
            for t in retry:
                t.state, t.step, t.started = TicketState.QUEUED, 0, None
            self.queue.put_back(retry)
            self._pump()

    # ---- internals --------------------------------------------------------------------------------

    def _expire(self, ticket: Ticket) -> None:
        where = "in the queue" if ticket.state is TicketState.QUEUED else "while running"
        timeout = ticket.deadline - ticket.submitted
        self.cancel(ticket, TimedOut(f"request timed out after {timeout:g} s {where}", param="timeout_s"))

    def _pump(self) -> None:
        """Hand batches to idle workers while there are both."""
        if self.pool.batching == Batching.STEP:
            self._pump_slots()
            return
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
            self.queue.take(batch)
            self._dispatch(worker, batch)
            moved = True
        if moved:
            self._emit_positions()

    def _pump_slots(self) -> None:
        """Step workers: the head of the queue goes as soon as a worker has room for it, oldest first."""
        moved = False
        while self.queue:
            head = self.queue.head
            worker = self._room_for(head.request)
            if worker is None:
                break
            self.queue.take([head])
            self._dispatch(worker, [head])
            moved = True
        if moved:
            self._emit_positions()

    def _room_for(self, request: GenerateRequest) -> StepWorker | None:
        """An idle worker, or one running this request's shape with free slots for its images: the one
        with the most free slots (every image more makes each step of a worker longer), then the one
        idle longest. An idle worker takes a request bigger than its capacity, or it could never run."""
        shape = (request.width, request.height)
        fits = [
            w
            for w in self.pool.open_workers()
            if w.images == 0 or (w.shape == shape and w.images + request.n <= w.capacity)
        ]
        return min(fits, key=lambda w: (w.images - w.capacity, w.last_seen), default=None)

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
        first = self.queue.head
        batch, images = [first], first.request.n
        for t in list(self.queue)[1:]:
            if images >= self.max_batch_size:
                break
            if t.request.key == first.request.key and images + t.request.n <= self.max_batch_size:
                batch.append(t)
                images += t.request.n
        return batch

    def _dispatch(self, worker: Any, tickets: list[Ticket]) -> None:
        images = [ImageSpec(t.request.prompt, t.request.negative_prompt, s) for t in tickets for s in t.request.seeds()]
        batch = Assignment(secrets.token_hex(6), images, tickets[0].request.key)
        now = time.monotonic()
        self.inflight[batch.assignment_id] = InFlight(batch, tickets, now)
        for t in tickets:
            t.state, t.started, t.batch_size, t.step = TicketState.RUNNING, now, len(images), 0
            t.attempts += 1
            t.emit("running")
        running = self.pool.dispatch(worker, batch)
        if batch.assignment_id in self.inflight:  # not lost on the way (a broken pipe is noticed at once)
            for t in tickets:
                t.batch_size = running
        for callback in self.on_batch:
            callback(running)
        for admitted in self.on_admit:
            admitted(running > len(images))

    def _end(
        self,
        ticket: Ticket,
        state: TicketState,
        *,
        result: GenerateResult | None = None,
        error: MuseError | None = None,
    ) -> None:
        ticket.end(state, result=result, error=error)
        for callback in self.on_finish:
            callback(ticket)

    def _settle(self) -> None:
        # Called once at the end of each entry point that can remove the last work (a cancelled
        # queued ticket, a batch back or lost), never from inside one, so idle is announced once.
        if self.idle:
            for callback in self.on_idle:
                callback()

    def _emit_positions(self) -> None:
        for t in self.queue:
            if t.listeners:
                t.emit("queued")
