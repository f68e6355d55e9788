"""Batching policy against a fake pool: no processes, milliseconds per test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from muse.core.batcher import Batcher
from muse.core.tickets import TicketState
from muse.errors import Cancelled, Overloaded, ShuttingDown, TimedOut, WorkerDied
from muse.messages import Assignment, Failure, GenerateRequest, Progress, Result

pytestmark = pytest.mark.anyio


class FakePool:
    """Request workers: one batch each at a time."""

    batching = "request"

    def __init__(self, workers: int = 1) -> None:
        self.idle: list[int] = list(range(workers))
        self.running: dict[int, Assignment] = {}
        self.dispatched: list[Assignment] = []
        self.interrupted: list[str] = []
        self.killed: list[str] = []

    def idle_worker(self) -> Any | None:
        return self.idle[0] if self.idle else None

    def open_workers(self) -> list[Any]:
        raise AssertionError("only step workers are placed by room")

    def dispatch(self, worker: Any, batch: Assignment) -> int:
        self.idle.remove(worker)
        self.running[worker] = batch
        self.dispatched.append(batch)
        return len(batch.images)

    def interrupt(self, assignment_id: str) -> None:
        self.interrupted.append(assignment_id)

    def kill_assignment(self, assignment_id: str) -> None:
        self.killed.append(assignment_id)

    def busy_count(self) -> int:
        return len(self.running)

    def finish(self, batcher: Batcher, worker: int = 0) -> Assignment:
        batch = self.running.pop(worker)
        self.idle.append(worker)
        pngs = [f"png-{spec.prompt}-{spec.seed}".encode() for spec in batch.images]
        batcher.assignment_finished(Result(batch.assignment_id, pngs, compute_ms=100.0))
        batcher.room_freed()
        return batch

    def die(self, batcher: Batcher, worker: int = 0) -> Assignment:
        batch = self.running.pop(worker)
        self.idle.append(worker)
        batcher.assignment_lost(batch, "worker died")
        return batch


def req(prompt: str = "p", *, n: int = 1, steps: int = 2, width: int = 64, seed: int = 1, **kw: Any) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, seed=seed, steps=steps, guidance_scale=4.0, width=width, height=64, n=n, **kw)


def make(pool: FakePool, **kw: Any) -> Batcher:
    return Batcher(pool, model="m", **({"max_batch_size": 4, "max_wait_ms": 0} | kw))


async def test_idle_worker_gets_a_lone_request_at_once() -> None:
    pool = FakePool()
    batcher = make(pool)
    ticket = batcher.submit(req())
    assert [len(j.images) for j in pool.dispatched] == [1]
    assert ticket.state is TicketState.RUNNING
    pool.finish(batcher)
    result = await ticket.future
    assert result.images[0].png == b"png-p-1"
    assert result.batch_size == 1


async def test_requests_queued_behind_a_busy_worker_form_one_batch_oldest_first() -> None:
    pool = FakePool()
    batcher = make(pool)
    first = batcher.submit(req("a"))
    others = [batcher.submit(req(f"b{i}")) for i in range(5)]
    assert len(pool.dispatched) == 1
    pool.finish(batcher)
    batch = pool.dispatched[1]
    assert [s.prompt for s in batch.images] == ["b0", "b1", "b2", "b3"]  # capped at max_batch_size
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[2].images] == ["b4"]
    pool.finish(batcher)
    assert (await first.future).batch_size == 1
    assert [(await t.future).batch_size for t in others] == [4, 4, 4, 4, 1]


async def test_only_compatible_requests_share_a_batch() -> None:
    pool = FakePool()
    batcher = make(pool)
    batcher.submit(req("busy"))
    batcher.submit(req("x", width=64))
    batcher.submit(req("y", width=128))
    batcher.submit(req("z", width=64))
    batcher.submit(req("s", steps=3))
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[1].images] == ["x", "z"]
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[2].images] == ["y"]
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[3].images] == ["s"]


async def test_a_request_for_n_images_takes_n_slots_with_consecutive_seeds() -> None:
    pool = FakePool()
    batcher = make(pool)
    batcher.submit(req("busy"))
    three = batcher.submit(req("three", n=3, seed=10))
    two = batcher.submit(req("two", n=2))  # does not fit beside the three: 3 + 2 > 4
    one = batcher.submit(req("one"))
    pool.finish(batcher)
    assert [(s.prompt, s.seed) for s in pool.dispatched[1].images] == [
        ("three", 10),
        ("three", 11),
        ("three", 12),
        ("one", 1),
    ]
    pool.finish(batcher)
    pool.finish(batcher)
    result = await three.future
    assert [i.seed for i in result.images] == [10, 11, 12]
    assert [i.png for i in result.images] == [b"png-three-10", b"png-three-11", b"png-three-12"]
    assert len((await two.future).images) == 2
    assert (await one.future).images[0].png == b"png-one-1"


async def test_part_full_batch_waits_at_most_max_wait_for_company_while_others_are_busy() -> None:
    pool = FakePool(workers=2)
    batcher = make(pool, max_wait_ms=30)
    batcher.submit(req("a"))  # worker 0 busy, worker 1 idle
    assert len(pool.dispatched) == 1
    b = batcher.submit(req("b"))
    assert len(pool.dispatched) == 1, "a part-full batch should wait for company while a worker is busy"
    c = batcher.submit(req("c"))
    assert b.state is TicketState.QUEUED
    await asyncio.wait_for(_until(lambda: len(pool.dispatched) == 2), 1.0)
    assert [s.prompt for s in pool.dispatched[1].images] == ["b", "c"]
    assert c.state is TicketState.RUNNING


async def test_full_batch_goes_at_once_even_while_others_are_busy() -> None:
    pool = FakePool(workers=2)
    batcher = make(pool, max_wait_ms=60_000)
    batcher.submit(req("a"))
    for i in range(4):
        batcher.submit(req(f"f{i}"))
    assert len(pool.dispatched) == 2 and len(pool.dispatched[1].images) == 4


async def test_cancelled_queued_request_never_reaches_a_worker() -> None:
    pool = FakePool()
    batcher = make(pool)
    batcher.submit(req("busy"))
    gone = batcher.submit(req("gone"))
    kept = batcher.submit(req("kept"))
    assert batcher.cancel(gone)
    with pytest.raises(Cancelled):
        await gone.future
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[1].images] == ["kept"]
    assert batcher.queued_images == 0
    assert not batcher.cancel(gone), "a ticket ends once"
    pool.finish(batcher)
    await kept.future


async def test_running_batch_is_interrupted_only_when_all_its_requests_are_gone() -> None:
    pool = FakePool()
    batcher = make(pool)
    batcher.submit(req("busy"))
    a, b = batcher.submit(req("a")), batcher.submit(req("b"))
    pool.finish(batcher)
    batch = pool.dispatched[1]
    batcher.cancel(a)
    assert pool.interrupted == []
    batcher.cancel(b)
    assert pool.interrupted == [batch.assignment_id]
    batcher.assignment_finished(Failure(batch.assignment_id, "interrupted", interrupted=True))
    assert a.state is TicketState.CANCELLED and b.state is TicketState.CANCELLED


@pytest.mark.parametrize("ending", ["interrupted", "finished anyway"])
async def test_idle_is_signalled_when_a_batch_of_gone_requests_comes_back(ending: str) -> None:
    # A drain waits for this signal: the batch still holds the worker after its clients left.
    pool = FakePool()
    batcher = make(pool)
    idle: list[bool] = []
    batcher.on_idle.append(lambda: idle.append(batcher.idle))
    ticket = batcher.submit(req("gone"))
    batcher.cancel(ticket)
    assert idle == [], "the batch is still running"
    batch = pool.running.pop(0)
    pool.idle.append(0)
    if ending == "interrupted":
        batcher.assignment_finished(Failure(batch.assignment_id, "interrupted", interrupted=True))
    else:
        batcher.assignment_finished(Result(batch.assignment_id, [b"png"], compute_ms=1.0))
    assert idle == [True]


async def test_a_lost_batch_never_looks_idle_while_part_of_it_is_retried() -> None:
    pool = FakePool()
    batcher = make(pool, max_retries=1)
    old = batcher.submit(req("old"))
    first = pool.running.pop(0)  # the worker dies and is not back yet
    batcher.assignment_lost(first, "worker died")
    new = batcher.submit(req("new"))
    pool.idle.append(0)
    batcher.room_freed()
    assert [s.prompt for s in pool.running[0].images] == ["old", "new"]
    idle: list[bool] = []
    batcher.on_idle.append(lambda: idle.append(True))
    pool.die(batcher)  # old has used its retry, new has not
    assert old.state is TicketState.FAILED and new.state is TicketState.RUNNING
    assert idle == [], "new is still to run"
    pool.finish(batcher)
    assert idle == [True]


async def test_deadline_while_queued_fails_with_timeout_and_is_never_computed() -> None:
    pool = FakePool()
    batcher = make(pool)
    batcher.submit(req("busy"))
    late = batcher.submit(req("late", timeout_s=0.02))
    with pytest.raises(TimedOut):
        await asyncio.wait_for(late.future, 1.0)
    pool.finish(batcher)
    assert len(pool.dispatched) == 1


async def test_lost_batch_is_retried_once_then_fails_with_worker_died() -> None:
    pool = FakePool()
    batcher = make(pool, max_retries=1)
    ticket = batcher.submit(req("x", seed=5))
    first = pool.die(batcher)
    assert ticket.state is TicketState.RUNNING, "retried on the idle worker"
    second = pool.running[0]
    assert [s.seed for s in second.images] == [s.seed for s in first.images]
    pool.die(batcher)
    with pytest.raises(WorkerDied):
        await ticket.future
    assert len(pool.dispatched) == 2


async def test_retry_disabled_fails_at_once() -> None:
    pool = FakePool()
    batcher = make(pool, max_retries=0)
    ticket = batcher.submit(req())
    pool.die(batcher)
    with pytest.raises(WorkerDied):
        await ticket.future


async def test_overload_is_refused_before_queueing_with_retry_after() -> None:
    pool = FakePool()
    batcher = make(pool, max_queue=3)
    batcher.submit(req("running"))
    for i in range(3):
        batcher.submit(req(f"q{i}"))
    with pytest.raises(Overloaded) as info:
        batcher.submit(req("over"))
    assert int(info.value.headers()["Retry-After"]) >= 1
    assert batcher.queued_images == 3


async def test_closed_batcher_refuses_new_work() -> None:
    batcher = make(FakePool())
    batcher.close()
    with pytest.raises(ShuttingDown):
        batcher.submit(req())


async def test_positions_and_progress_events() -> None:
    pool = FakePool()
    batcher = make(pool, max_batch_size=1)
    batcher.submit(req("busy"))
    a = batcher.submit(req("a", n=1))
    b = batcher.submit(req("b", n=1))
    assert batcher.position(a) == 0 and batcher.position(b) == 1
    events: list[tuple[str, int | None]] = []
    b.watch(lambda t, e: events.append((e, batcher.position(t))))
    pool.finish(batcher)  # a starts, b moves up
    batch = pool.finish(batcher, 0)  # a done, b starts
    assert batch.images[0].prompt == "a"
    b_batch = pool.running[0]
    for step in (1, 2):
        batcher.assignment_progress(Progress(b_batch.assignment_id, step, 2))
    pool.finish(batcher)
    assert events == [
        ("queued", 0),
        ("running", None),
        ("progress", None),
        ("progress", None),
        ("succeeded", None),
    ]
    assert b.step == 2


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def test_empty_queue_takes_a_request_bigger_than_max_queue() -> None:
    pool = FakePool()
    batcher = make(pool, max_queue=2)
    batcher.submit(req("busy"))
    big = batcher.submit(req("big", n=4))
    assert big.state is TicketState.QUEUED
    with pytest.raises(Overloaded):
        batcher.submit(req("more"))


async def test_requests_right_after_a_batch_finished_wait_for_its_other_clients() -> None:
    # Closed-loop clients resend together when their batch returns; the first must not run alone.
    pool = FakePool()
    batcher = make(pool, max_batch_size=2, max_wait_ms=60_000)
    batcher.submit(req("a1"))
    batcher.submit(req("a2"))
    batcher.submit(req("a3"))
    pool.finish(batcher)  # a1 ran alone; a2 + a3 fill the next batch, so it goes at once
    assert [s.prompt for s in pool.dispatched[1].images] == ["a2", "a3"]
    pool.finish(batcher)
    b = batcher.submit(req("b"))
    assert b.state is TicketState.QUEUED, "a batch of two just finished: wait for the other client"
    c = batcher.submit(req("c"))
    assert [s.prompt for s in pool.dispatched[2].images] == ["b", "c"], "both back: no need to wait longer"
    assert c.state is TicketState.RUNNING


async def test_a_request_left_over_from_a_split_batch_waits_to_rejoin_the_others() -> None:
    # Four closed-loop clients once split 3 + 1 must not stay split: the straggler, queued long
    # ago, still waits (briefly) for the three whose batch just finished.
    pool = FakePool()
    batcher = make(pool, max_wait_ms=50)
    three = [batcher.submit(req(f"c{i}")) for i in range(3)]
    assert len(pool.dispatched) == 1 and len(pool.dispatched[0].images) == 1, "c0 alone on the idle worker"
    pool.finish(batcher)  # c1 + c2 go next (a full hold's worth later at most)
    await asyncio.wait_for(_until(lambda: len(pool.dispatched) == 2), 1.0)
    straggler = batcher.submit(req("s"))
    straggler.submitted -= 5.0  # it has waited a whole batch already
    pool.finish(batcher)
    assert straggler.state is TicketState.QUEUED, "the two clients of the batch just finished are due back"
    batcher.submit(req("c1 again"))
    assert straggler.state is TicketState.QUEUED
    batcher.submit(req("c2 again"))
    assert [s.prompt for s in pool.dispatched[2].images] == ["s", "c1 again", "c2 again"]
    assert all(t.state is TicketState.SUCCEEDED for t in three)


async def test_returning_clients_are_waited_for_while_they_keep_coming_but_not_forever() -> None:
    pool = FakePool()
    batcher = make(pool, max_wait_ms=40)
    batcher.submit(req("busy"))
    gone = [batcher.submit(req(f"g{i}")) for i in range(3)]
    pool.finish(batcher)
    await asyncio.wait_for(_until(lambda: len(pool.dispatched) == 2), 1.0)
    pool.finish(batcher)  # three clients due back; none of them ever comes
    start = asyncio.get_running_loop().time()
    late = batcher.submit(req("someone else"))
    assert late.state is TicketState.QUEUED
    await asyncio.wait_for(_until(lambda: len(pool.dispatched) == 3), 1.0)
    waited = asyncio.get_running_loop().time() - start
    assert waited < 4 * 0.04 + 0.1, f"held {waited:.3f} s: the hold must end"
    assert all(t.state is TicketState.SUCCEEDED for t in gone)


async def test_a_cancelled_requests_client_is_not_waited_for() -> None:
    pool = FakePool()
    batcher = make(pool, max_batch_size=2, max_wait_ms=60_000)
    batcher.submit(req("busy"))
    gone, kept = batcher.submit(req("gone")), batcher.submit(req("kept"))
    pool.finish(batcher)  # gone + kept fill a batch and run
    batcher.cancel(gone)
    pool.finish(batcher)
    assert kept.state is TicketState.SUCCEEDED
    again = batcher.submit(req("kept again"))
    assert again.state is TicketState.RUNNING, "the only client that got an answer is back"


async def test_a_lone_clients_next_request_never_waits() -> None:
    pool = FakePool()
    batcher = make(pool, max_wait_ms=60_000)
    for prompt in ["first", "second", "third"]:
        ticket = batcher.submit(req(prompt))
        assert ticket.state is TicketState.RUNNING, f"{prompt}: one client, nobody else to wait for"
        pool.finish(batcher)


async def test_an_abandoned_batch_that_does_not_stop_within_the_grace_is_killed_and_not_retried() -> None:
    pool = FakePool()
    batcher = make(pool, interrupt_grace=0.02)
    ticket = batcher.submit(req("huge"))
    batch = pool.dispatched[0]
    batcher.cancel(ticket)  # its deadline passed, say: the only request of the batch is gone
    assert pool.interrupted == [batch.assignment_id] and pool.killed == []
    await asyncio.wait_for(_until(lambda: pool.killed == [batch.assignment_id]), 1.0)
    pool.die(batcher)  # the kill reads as a lost batch
    assert len(pool.dispatched) == 1, "nobody waits for it: it must not be retried"
    assert batcher.idle


async def test_an_abandoned_batch_that_stops_in_time_is_not_killed() -> None:
    pool = FakePool()
    batcher = make(pool, interrupt_grace=0.05)
    ticket = batcher.submit(req("stops"))
    batch = pool.running.pop(0)
    batcher.cancel(ticket)
    kill = batcher.inflight[batch.assignment_id].kill_timer
    assert kill is not None and not kill.cancelled(), "the kill is armed once every request is gone"
    pool.idle.append(0)
    batcher.assignment_finished(Failure(batch.assignment_id, "interrupted", interrupted=True))
    follower = batcher.submit(req("next"))
    assert kill.cancelled(), "the batch came back in time: its kill is called off"
    assert pool.killed == [] and follower.state is TicketState.RUNNING


async def test_the_queue_is_fair_between_owners() -> None:
    pool = FakePool()
    batcher = make(pool, max_batch_size=8)
    first = batcher.submit(req("a0", n=8), owner="key:a")  # running
    hog = [batcher.submit(req(f"a{i}", n=8), owner="key:a") for i in range(1, 25)]  # 192 images waiting
    single = batcher.submit(req("b"), owner="key:b")
    assert batcher.position(single) == 0, "one image behind 192 of another key's"
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[1].images] == ["b"], "served by the very next batch"
    late = batcher.submit(req("c", n=2), owner="key:c")  # while b runs
    pool.finish(batcher)
    assert [s.prompt for s in pool.dispatched[2].images] == ["c", "c"], "key:a has had its 8 images already"
    for _ in range(3):
        pool.finish(batcher)
    # One owner's requests stay in their own order.
    assert [pool.dispatched[i].images[0].prompt for i in (3, 4, 5)] == ["a1", "a2", "a3"]
    assert first.state is TicketState.SUCCEEDED and late.state is TicketState.SUCCEEDED and hog[0].done


async def test_one_owner_alone_is_served_oldest_first() -> None:
    pool = FakePool()
    batcher = make(pool)
    batcher.submit(req("busy"), owner="k")
    tickets = [batcher.submit(req(f"p{i}", n=1 + i % 3), owner="k") for i in range(6)]
    assert [batcher.position(t) for t in tickets] == [0, 1, 3, 6, 7, 9]


async def test_what_an_owner_cancelled_does_not_count_against_their_next_request() -> None:
    pool = FakePool()
    batcher = make(pool, max_batch_size=8)
    batcher.submit(req("busy"), owner="b")
    theirs = [batcher.submit(req(f"b{i}", n=8), owner="b") for i in range(3)]
    mine = [batcher.submit(req(f"a{i}", n=8), owner="a") for i in range(10)]
    for ticket in mine:
        batcher.cancel(ticket)
    again = batcher.submit(req("a again"), owner="a")
    assert batcher.position(again) <= 8, "only what is still queued may count, not the 80 cancelled images"
    assert all(t.state is TicketState.QUEUED for t in theirs)


async def test_a_retried_batch_goes_back_in_fair_order() -> None:
    pool = FakePool(workers=1)
    batcher = make(pool, max_batch_size=8)
    batcher.submit(req("a0"), owner="a")  # running
    for name, owner in (("a1", "a"), ("c1", "c"), ("a2", "a"), ("b1", "b")):
        batcher.submit(req(name), owner=owner)
    pool.die(batcher)
    tags = [(t.tag, t.submitted) for t in batcher.queue]
    assert tags == sorted(tags), "the queue stays sorted, so later arrivals land where they belong"


async def test_one_owner_filling_the_queue_makes_room_for_another_from_its_own_newest() -> None:
    pool = FakePool()
    batcher = make(pool, max_queue=8)
    batcher.submit(req("running"), owner="flood")  # takes the worker
    flood = [batcher.submit(req(f"f{i}", n=2), owner="flood") for i in range(4)]  # 8 images: the queue is full
    with pytest.raises(Overloaded):
        batcher.submit(req("more"), owner="flood")  # the flood's own request is refused as before
    other = batcher.submit(req("mine", n=2), owner="other")
    assert other.state is TicketState.QUEUED
    # The flood's newest request made room; its older ones keep their places.
    assert [t.state for t in flood] == [TicketState.QUEUED] * 3 + [TicketState.FAILED]
    assert isinstance(flood[-1].error, Overloaded) and flood[-1].error.code == "queue_full"
    assert batcher.queued_images == 8


async def test_the_queue_is_not_emptied_for_an_owner_as_big_as_the_biggest() -> None:
    pool = FakePool()
    batcher = make(pool, max_queue=4)
    batcher.submit(req("running"), owner="a")
    a = [batcher.submit(req(f"a{i}"), owner="a") for i in range(2)]
    b = [batcher.submit(req(f"b{i}"), owner="b") for i in range(2)]
    # Shares are even: b's third image would make it the bigger owner, so it is refused, not a's.
    with pytest.raises(Overloaded):
        batcher.submit(req("b2"), owner="b")
    assert all(t.state is TicketState.QUEUED for t in a + b)
