"""Batching policy for step workers (requests join a running batch between steps), against a fake pool."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from muse.core.batcher import Batcher
from muse.core.tickets import Ticket, TicketState
from muse.errors import Cancelled
from muse.messages import Assignment, Failure, GenerateRequest, Progress, Result, StepKey

pytestmark = pytest.mark.anyio


@dataclass(eq=False)
class FakeStepWorker:
    id: int
    capacity: int
    assignments: dict[str, Assignment] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def images(self) -> int:
        return sum(len(b.images) for b in self.assignments.values())

    @property
    def step_key(self) -> StepKey | None:
        for b in self.assignments.values():
            return b.key.step_key
        return None


class FakeStepPool:
    batching = "step"

    def __init__(self, workers: int = 1, capacity: int = 4) -> None:
        self.workers = [FakeStepWorker(i, capacity) for i in range(workers)]
        self.interrupted: list[str] = []
        self.killed: list[str] = []

    def open_workers(self) -> list[FakeStepWorker]:
        return self.workers

    def idle_worker(self) -> Any | None:
        raise AssertionError("step workers are placed by room, not by idleness")

    def dispatch(self, worker: FakeStepWorker, batch: Assignment) -> int:
        worker.assignments[batch.assignment_id] = batch
        return worker.images

    def interrupt(self, assignment_id: str) -> None:
        self.interrupted.append(assignment_id)

    def kill_assignment(self, assignment_id: str) -> None:
        self.killed.append(assignment_id)

    def busy_count(self) -> int:
        return sum(1 for w in self.workers if w.assignments)

    def running(self, worker: int = 0) -> list[str]:
        """Prompts running on a worker, in admission order."""
        return [spec.prompt for b in self.workers[worker].assignments.values() for spec in b.images]

    def owner(self, ticket: Ticket) -> FakeStepWorker:
        return next(
            w for w in self.workers for b in w.assignments.values() if b.images[0].prompt == ticket.request.prompt
        )

    def assignment_of(self, ticket: Ticket) -> str:
        worker = self.owner(ticket)
        return next(i for i, a in worker.assignments.items() if a.images[0].prompt == ticket.request.prompt)

    def finish(self, batcher: Batcher, ticket: Ticket) -> None:
        worker = self.owner(ticket)
        assignment_id = next(i for i, b in worker.assignments.items() if b.images[0].prompt == ticket.request.prompt)
        batch = worker.assignments.pop(assignment_id)
        batcher.assignment_finished(
            Result(assignment_id, [b"png"] * len(batch.images), compute_ms=100.0, occupancy=2.0)
        )
        batcher.room_freed()

    def die(self, batcher: Batcher, worker: int = 0) -> None:
        lost = list(self.workers[worker].assignments.values())
        self.workers[worker].assignments.clear()
        for batch in lost:
            batcher.assignment_lost(batch, "worker died")


def req(prompt: str, *, n: int = 1, steps: int = 4, width: int = 64, **kw: Any) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, seed=1, steps=steps, guidance_scale=4.0, width=width, height=64, n=n, **kw)


def make(pool: FakeStepPool, **kw: Any) -> Batcher:
    # A long max_wait: step workers must never hold a request back for company.
    return Batcher(pool, model="m", **({"max_batch_size": 4, "max_wait_ms": 10_000} | kw))


async def test_requests_join_a_running_worker_at_once_whatever_their_steps_guidance_or_sampler() -> None:
    pool = FakeStepPool(capacity=4)
    batcher = make(pool)
    joined: list[bool] = []
    batcher.on_admit.append(joined.append)
    first = batcher.submit(req("a", steps=25))
    batcher.submit(req("b", steps=50))
    batcher.submit(GenerateRequest(prompt="c", seed=2, steps=10, guidance_scale=7.0, width=64, height=64))
    batcher.submit(req("d", scheduler="euler_a"))
    assert pool.running() == ["a", "b", "c", "d"]
    assert joined == [False, True, True, True]
    assert first.state is TicketState.RUNNING and first.batch_size == 1
    assert batcher.queued_images == 0


async def test_beyond_capacity_a_request_waits_for_a_free_slot_then_joins() -> None:
    pool = FakeStepPool(capacity=2)
    batcher = make(pool)
    a, _ = batcher.submit(req("a")), batcher.submit(req("b"))
    c = batcher.submit(req("c"))
    assert pool.running() == ["a", "b"] and c.state is TicketState.QUEUED
    assert batcher.position(c) == 0
    pool.finish(batcher, a)
    assert pool.running() == ["b", "c"] and c.state is TicketState.RUNNING
    assert a.future.result().images[0].png == b"png"


async def test_a_request_for_n_images_needs_n_free_slots_and_keeps_its_place() -> None:
    pool = FakeStepPool(capacity=4)
    batcher = make(pool)
    a = batcher.submit(req("a", n=2))
    big = batcher.submit(req("big", n=3))
    small = batcher.submit(req("small"))
    # `small` would fit, but `big` is older: it waits behind it rather than overtaking.
    assert pool.running() == ["a", "a"]
    assert big.state is TicketState.QUEUED and small.state is TicketState.QUEUED
    pool.finish(batcher, a)
    assert pool.running() == ["big", "big", "big", "small"]


async def test_an_idle_worker_takes_a_request_bigger_than_its_capacity() -> None:
    pool = FakeStepPool(capacity=2)
    batcher = make(pool)
    t = batcher.submit(req("huge", n=3))
    assert t.state is TicketState.RUNNING and pool.running() == ["huge"] * 3


async def test_a_worker_runs_one_shape_and_switches_when_it_drains_oldest_first() -> None:
    pool = FakeStepPool(capacity=4)
    batcher = make(pool)
    a = batcher.submit(req("a", width=64))
    wide = batcher.submit(req("wide", width=128))
    later = batcher.submit(req("later", width=64))
    # The 128-wide request cannot join 64-wide slots; the one behind it does not overtake it.
    assert pool.running() == ["a"]
    assert wide.state is TicketState.QUEUED and later.state is TicketState.QUEUED
    pool.finish(batcher, a)
    assert pool.running() == ["wide"]
    pool.finish(batcher, wide)
    assert pool.running() == ["later"]


async def test_two_workers_take_different_shapes_and_new_work_goes_where_most_slots_are_free() -> None:
    pool = FakeStepPool(workers=2, capacity=4)
    batcher = make(pool)
    batcher.submit(req("a"))
    batcher.submit(req("b"))
    assert pool.running(0) == ["a"] and pool.running(1) == ["b"]
    batcher.submit(req("wide", width=128))  # neither worker is idle: it waits for one to drain
    assert "wide" not in pool.running(0) + pool.running(1)
    pool2 = FakeStepPool(workers=2, capacity=4)
    batcher2 = make(pool2)
    batcher2.submit(req("x", width=128))
    batcher2.submit(req("y"))
    assert pool2.running(0) == ["x"] and pool2.running(1) == ["y"]


async def test_cancelling_one_running_request_interrupts_only_its_own_images() -> None:
    pool = FakeStepPool(capacity=4)
    batcher = make(pool)
    a, b = batcher.submit(req("a")), batcher.submit(req("b"))
    batcher.cancel(a)
    batch_a = next(i for i, x in pool.workers[0].assignments.items() if x.images[0].prompt == "a")
    assert pool.interrupted == [batch_a]
    assert b.state is TicketState.RUNNING
    with pytest.raises(Cancelled):
        a.future.result()


async def test_a_dead_step_worker_loses_every_request_on_it_and_each_is_retried() -> None:
    pool = FakeStepPool(workers=1, capacity=4)
    batcher = make(pool)
    a, b = batcher.submit(req("a")), batcher.submit(req("b"))
    pool.die(batcher)
    # Back in their old order, then placed again on the (respawned) worker.
    batcher.room_freed()
    assert pool.running() == ["a", "b"]
    assert a.attempts == 2 and b.attempts == 2


def dispatched_ago(steps: int, seconds: float) -> tuple[Batcher, Ticket, str, list[float]]:
    """One request of `steps` steps, dispatched `seconds` ago to a step worker; the step times reported."""
    pool = FakeStepPool(capacity=4)
    batcher = make(pool)
    times: list[float] = []
    batcher.on_step.append(times.append)
    ticket = batcher.submit(req("a", steps=steps))
    assignment_id = next(iter(pool.workers[0].assignments))
    batcher.inflight[assignment_id].last_step_at -= seconds
    return batcher, ticket, assignment_id, times


async def test_progress_reaches_each_request_and_the_step_time_is_measured() -> None:
    batcher, a, assignment_id, steps = dispatched_ago(4, 0.01)
    batcher.assignment_progress(Progress(assignment_id, 1, 4))
    assert a.step == 1 and len(steps) == 1 and steps[0] >= 0.01
    assert batcher.eta(a) == pytest.approx(3 * batcher.speed.step_seconds)


async def test_coalesced_progress_spreads_its_time_over_the_steps_it_covers() -> None:
    batcher, a, assignment_id, steps = dispatched_ago(10, 0.4)  # one report for steps 1-4, 400 ms after dispatch
    batcher.assignment_progress(Progress(assignment_id, 4, 10))
    assert a.step == 4 and steps == pytest.approx([0.1] * 4, abs=0.01)
    assert batcher.speed.step_seconds == pytest.approx(0.1, abs=0.01)


async def test_a_queued_requests_eta_counts_the_slots_ahead_of_it() -> None:
    pool = FakeStepPool(capacity=2)
    batcher = make(pool)
    a, _ = batcher.submit(req("a", steps=10)), batcher.submit(req("b", steps=4))
    c, d = batcher.submit(req("c", steps=4)), batcher.submit(req("d", steps=4))
    batcher.speed.step_seconds = 0.5
    # c takes b's slot when b ends (4 steps), then runs 4: 8 steps. d takes the next free slot: c's (at 8,
    # before a's at 10), then 4 more: 12 steps.
    assert batcher.eta(c) == pytest.approx(8 * 0.5)
    assert batcher.eta(d) == pytest.approx(12 * 0.5)
    pool.finish(batcher, a)
    assert c.state is TicketState.RUNNING and d.state is TicketState.QUEUED


async def test_the_cost_per_image_counts_the_images_it_shared_steps_with() -> None:
    pool = FakeStepPool(capacity=4)
    batcher = make(pool)
    a = batcher.submit(req("a"))
    pool.finish(batcher, a)  # 100 ms while sharing steps with 2 images on average
    assert batcher.speed.image_seconds == pytest.approx(0.05)


async def test_a_full_worker_takes_a_few_images_ahead_to_fill_slots_the_moment_they_free() -> None:
    pool = FakeStepPool(capacity=4)
    batcher = make(pool, step_prefetch=1)
    running = [batcher.submit(req(f"r{i}")) for i in range(4)]
    ahead = batcher.submit(req("ahead"))
    behind = batcher.submit(req("behind"))
    # Four running and one queued in the worker; the sixth waits in the parent's fair queue.
    assert pool.running() == ["r0", "r1", "r2", "r3", "ahead"]
    assert ahead.state is behind.state is TicketState.QUEUED
    assert batcher.queue.images == 1 and batcher.queued_images == 2, "both wait, one of them in the worker"
    assert batcher.position(ahead) == 0 and batcher.position(behind) == 1
    pool.finish(batcher, running[0])
    assert pool.running() == ["r1", "r2", "r3", "ahead", "behind"]


async def test_a_request_taken_ahead_stays_queued_until_its_worker_starts_it() -> None:
    pool = FakeStepPool(capacity=2)
    batcher = make(pool, step_prefetch=1)
    running = [batcher.submit(req(f"r{i}")) for i in range(2)]
    ahead = batcher.submit(req("ahead"))
    assert ahead.state is TicketState.QUEUED and batcher.position(ahead) == 0 and ahead.attempts == 0
    assert batcher.queue.images == 0 and batcher.queued_images == 1, "it left the parent's queue for the worker's"
    events: list[str] = []
    ahead.watch(lambda _, event: events.append(event))
    pool.finish(batcher, running[0])
    batcher.assignment_progress(Progress(pool.assignment_of(ahead), 1, 4))
    assert ahead.state is TicketState.RUNNING and events[:2] == ["running", "progress"]
    assert ahead.attempts == 1, "an attempt counts from its start"


async def test_cancelling_a_request_taken_ahead_frees_its_place_in_the_worker() -> None:
    pool = FakeStepPool(capacity=1)
    batcher = make(pool, step_prefetch=1)
    batcher.submit(req("running"))
    ahead = batcher.submit(req("ahead"))
    assignment = pool.assignment_of(ahead)
    batcher.cancel(ahead)
    assert ahead.state is TicketState.CANCELLED and pool.interrupted == [assignment]
    assert ahead.attempts == 0, "it never ran"
    batcher.assignment_finished(Failure(assignment, "interrupted", interrupted=True))  # the worker's answer
    assert batcher.queued_images == 0 and batcher.inflight_images == 1
