"""The batcher: batching policy over tickets, for workers with free capacity.

Policy (pure; tested against a fake pool in milliseconds):
- a ticket (muse.core.tickets) is made with its future *before* the request is queued;
- the queue is in fair order between owners (muse.core.fairqueue: start-time fair queuing in images);
- the pool says which kind of workers it has; one policy per kind picks what goes where
  (muse.core.step_policy, muse.core.request_policy: muse.core.policy says what they see);
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
from collections.abc import Callable
from typing import Any

from muse.core.estimates import Speed
from muse.core.fairqueue import FairQueue
from muse.core.policy import Context, InFlight, Policy
from muse.core.pool import WorkerPool
from muse.core.request_policy import RequestPolicy
from muse.core.step_policy import StepPolicy
from muse.core.tickets import Ticket, TicketState, results_of
from muse.errors import (
    Cancelled,
    GenerationFailed,
    InvalidRequest,
    MuseError,
    Overloaded,
    ShuttingDown,
    TimedOut,
    WorkerDied,
)
from muse.messages import Assignment, Batching, Failure, GenerateRequest, GenerateResult, ImageSpec, Progress, Result

log = logging.getLogger("muse.core.batcher")


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
        step_prefetch: int = 0,
    ) -> None:
        """`step_prefetch`: images a running step worker may hold queued beyond its capacity (see
        muse.core.step_policy)."""
        self.pool = pool
        self.model = model
        self.max_batch_size = max_batch_size
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
        context = Context(self.queue, pool, self.inflight, self.speed, max_batch_size, capacity)
        self.policies: dict[str, Policy] = {
            Batching.STEP: StepPolicy(context, prefetch=step_prefetch),
            Batching.REQUEST: RequestPolicy(context, max_wait=max_wait_ms / 1000, wake=self._pump),
        }

    # ---- entry points -----------------------------------------------------------------------------

    def submit(
        self,
        request: GenerateRequest,
        *,
        owner: str | None = None,
        ticket_id: str | None = None,
        created: float | None = None,
        restored: bool = False,
    ) -> Ticket:
        """Queue a request. `ticket_id`, `created` and `restored` re-queue a durable job after a restart: it
        keeps its id and age, and takes its place whatever --max-queue says (it was accepted once already)."""
        if self.closed:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        # An empty queue takes any request, or one bigger than --max-queue could never run.
        if not restored and self.queued_images and self.queued_images + request.n > self.max_queue:
            victims = self._room_for(owner, request.n)
            if victims is None:
                raise Overloaded(
                    f"queue full ({self.queued_images} images waiting, limit {self.max_queue}); retry later",
                    retry_after=self.speed.wait(self.queued_images + request.n, self.capacity()),
                )
            for victim in victims:
                self.cancel(
                    victim,
                    Overloaded(
                        "queue full: another client needed room, and this owner held the largest share of the "
                        "queue; retry later",
                        retry_after=self.speed.wait(self.queued_images, self.capacity()),
                    ),
                )
        loop = asyncio.get_running_loop()
        # Timestamps from time.monotonic(): uvloop's loop.time() only has millisecond resolution.
        now = time.monotonic()
        timeout = self.request_timeout
        if request.timeout_s is not None:
            timeout = min(timeout, request.timeout_s)
        ticket = Ticket(ticket_id or secrets.token_hex(8), request, loop.create_future(), now, now + timeout, owner)
        if created is not None:
            ticket.created = created
        ticket.timer = loop.call_later(timeout, self._expire, ticket)
        self.queue.add(ticket)
        self.policy.arrived()
        self._pump()
        self.on_demand()
        return ticket

    def _room_for(self, owner: str | None, n: int) -> list[Ticket] | None:
        """The queue is full: which queued tickets to refuse so `owner`'s n images fit, or None to refuse the
        newcomer instead. Each owner has a share: the biggest owner's newest tickets make room, but only while
        that owner would still hold more than the newcomer does with its request (so one tenant's flood
        never locks the others out, and a lone tenant is refused exactly as before)."""
        owners = self.queue.by_owner()
        held = {o: sum(t.request.n for t in tickets) for o, tickets in owners.items()}
        mine = held.get(owner, 0) + n
        over = self.queued_images + n - self.max_queue
        victims: list[Ticket] = []
        while over > 0:
            biggest = max((o for o in held if o != owner), key=lambda o: held[o], default=None)
            if biggest is None or held[biggest] <= mine:
                return None
            victim = owners[biggest].pop()  # its newest
            victims.append(victim)
            held[biggest] -= victim.request.n
            over -= victim.request.n
        return victims

    def cancel(self, ticket: Ticket, error: MuseError | None = None) -> bool:
        """End a ticket now (client gone, DELETE, deadline). False if it had already ended."""
        if ticket.done:
            return False
        error = error or Cancelled("cancelled by the client")
        state = TicketState.CANCELLED if isinstance(error, Cancelled) else TicketState.FAILED
        if ticket.state is TicketState.QUEUED and not self._ahead(ticket):
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
        assignment_id = flight.assignment.assignment_id
        log.info("interrupting batch %s: all its requests are gone", assignment_id)
        self.pool.interrupt(assignment_id)
        grace = self.interrupt_grace + 2 * self.speed.step_seconds
        flight.kill_timer = asyncio.get_running_loop().call_later(grace, self.pool.kill_assignment, assignment_id)

    def close(self) -> None:
        """Accept nothing new; what is queued or running carries on."""
        self.closed = True

    def fail_all(self, error: Callable[[Ticket], MuseError]) -> None:
        """End every queued and running ticket, each with the error `error` gives it."""
        for ticket in [*self.queue, *(t for f in self.inflight.values() for t in f.tickets)]:
            self.cancel(ticket, error(ticket))

    @property
    def queued_images(self) -> int:
        """Images waiting: in the fair queue, or taken ahead by a step worker that has not started them."""
        return self.queue.images + sum(len(f.assignment.images) for f in self.inflight.values() if not f.started)

    @property
    def inflight_images(self) -> int:
        """Images running on workers."""
        return sum(len(f.assignment.images) for f in self.inflight.values() if f.started)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.inflight

    # ---- views ------------------------------------------------------------------------------------

    def active(self) -> list[Ticket]:
        """Unfinished tickets: running ones (oldest first), then the queue in order."""
        running = [t for f in self.inflight.values() for t in f.tickets if not t.done]
        return sorted(running, key=lambda t: t.submitted) + list(self.queue)

    def position(self, ticket: Ticket) -> int | None:
        """Images waiting ahead of this ticket (those taken ahead by workers first, then the fair queue's),
        or None once it runs."""
        if ticket.state is not TicketState.QUEUED:
            return None
        waiting = 0
        for flight in self.inflight.values():
            if not flight.started:
                if ticket in flight.tickets:
                    return waiting
                waiting += len(flight.assignment.images)
        place = self.queue.position(ticket)
        return None if place is None else waiting + place

    def _ahead(self, ticket: Ticket) -> bool:
        """Whether a queued ticket waits in a step worker (taken ahead, see muse.core.step_policy)."""
        return any(ticket in f.tickets for f in self.inflight.values())

    @property
    def policy(self) -> Policy:
        """The policy for the workers the pool has now (it knows once the first is ready)."""
        return self.policies[self.pool.batching]

    def eta(self, ticket: Ticket) -> float | None:
        if ticket.state is TicketState.QUEUED:
            return self.policy.queued_eta(ticket)
        if ticket.state is TicketState.RUNNING:
            return self.speed.running_eta(ticket.request.steps - ticket.step)
        return None

    # ---- pool callbacks ---------------------------------------------------------------------------

    def room_freed(self) -> None:
        self._pump()

    def assignment_progress(self, message: Progress) -> None:
        flight = self.inflight.get(message.assignment_id)
        if flight is None:
            return
        now = time.monotonic()
        if flight.started:
            # Workers coalesce progress (muse.worker.channel): one report may cover several steps.
            moved = max(1, message.step - flight.step)
            per_step = (now - flight.last_step_at) / moved
            for _ in range(moved):
                self.speed.step_took(per_step)
                for callback in self.on_step:
                    callback(per_step)
        flight.last_step_at = now
        if not flight.started:  # it waited in the worker and has started now
            self._started(flight)
            for t in flight.tickets:
                if not t.done:
                    self._start(t, now)
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
        # Only clients still waiting get an answer now and may send again; cancelled ones will not.
        self.policy.finished(sum(not t.done for t in flight.tickets))
        if isinstance(message, Failure):
            error: MuseError
            if message.interrupted:
                error = Cancelled("interrupted: every request of the batch was gone")
            elif message.param:
                error = InvalidRequest(message.message, param=message.param, code="unusable")
            else:
                error = GenerationFailed(f"generation failed: {message.message}")
            if message.interrupted:
                for callback in self.on_interrupt:
                    callback()
            for t in flight.tickets:
                if not t.done:
                    self._end(t, TicketState.FAILED, error=error)
            return
        self.speed.batch_took(message.compute_ms, message.occupancy or len(flight.assignment.images))
        now = time.monotonic()
        if not flight.started:  # taken ahead, and done before any progress reached us
            self._started(flight)
            for t in flight.tickets:
                if not t.done:
                    self._start(t, now)
        results = results_of(flight.tickets, message, model=self.model, now=now)
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
            log.warning("%s: retrying %d request(s) of batch %s", reason, len(retry), flight.assignment.assignment_id)
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
        """Hand work to workers while the policy finds some that can go now."""
        moved = False
        while self.queue:
            picked = self.policy.pick()
            if picked is None:
                break
            worker, tickets = picked
            self.queue.take(tickets)
            self._dispatch(worker, tickets)
            moved = True
        if moved:
            self._emit_positions()

    def _dispatch(self, worker: Any, tickets: list[Ticket]) -> None:
        images = [
            ImageSpec(t.request.prompt, t.request.negative_prompt, s, t.request.source, t.request.loras)
            for t in tickets
            for s in t.request.seeds()
        ]
        batch = Assignment(secrets.token_hex(6), images, tickets[0].request.key)
        now = time.monotonic()
        # A step worker that has no free slot for it takes it ahead: it stays queued until it starts there.
        ahead = (
            self.pool.batching == Batching.STEP and worker.images > 0 and worker.images + len(images) > worker.capacity
        )
        self.inflight[batch.assignment_id] = InFlight(batch, tickets, now)
        for t in tickets:
            t.batch_size, t.step = len(images), 0
            if not ahead:
                self._start(t, now)
        running = self.pool.dispatch(worker, batch)
        flight = self.inflight.get(batch.assignment_id)
        if flight is not None:  # not lost on the way (a broken pipe is noticed at once)
            flight.running = running
            for t in tickets:
                t.batch_size = running
            if not ahead:
                self._started(flight)

    def _started(self, flight: InFlight) -> None:
        """An Assignment's images run now (at dispatch, or once a worker that took it ahead starts it)."""
        flight.started = True
        for callback in self.on_batch:
            callback(flight.running)
        for admitted in self.on_admit:
            admitted(flight.running > len(flight.assignment.images))

    @staticmethod
    def _start(ticket: Ticket, now: float) -> None:
        # An attempt is a start: a request taken ahead and lost (or cancelled) before it ran has cost nothing.
        ticket.attempts += 1
        ticket.state, ticket.started = TicketState.RUNNING, now
        ticket.emit("running")

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
