"""The worker's end of the link (muse.worker.channel) and the Ray actor's event stream: progress
travels in few messages, nothing is reordered or lost, and a result never waits for progress."""

from __future__ import annotations

import queue

from muse.messages import Exited, Failure, Heartbeat, Progress, Result, Steps
from muse.worker.actor import drained
from muse.worker.channel import QueueChannel


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sent(channel: QueueChannel) -> list[object]:
    out = []
    while not channel.outbox.empty():
        out.append(channel.outbox.get())
    return out


def test_progress_within_the_interval_is_held_and_leaves_with_the_next_message() -> None:
    clock = Clock()
    channel = QueueChannel(progress_every=0.1, clock=clock)
    channel.send(Progress("a", 1, 25))  # the first after a quiet spell leaves at once: the job started
    assert sent(channel) == [Steps([Progress("a", 1, 25)])]
    clock.now += 0.02
    channel.send(Steps([Progress("a", 2, 25), Progress("b", 1, 10)]))
    clock.now += 0.02
    channel.send(Steps([Progress("a", 3, 25)]))
    assert sent(channel) == []
    result = Result("a", [b"png"], compute_ms=1.0)
    channel.send(result)
    # Each Assignment's latest step, before the result.
    assert sent(channel) == [Steps([Progress("a", 3, 25), Progress("b", 1, 10)]), result]


def test_progress_leaves_once_the_interval_has_passed() -> None:
    clock = Clock()
    channel = QueueChannel(progress_every=0.1, clock=clock)
    channel.send(Heartbeat())
    for step in range(1, 5):
        clock.now += 0.03
        channel.send(Steps([Progress("a", step, 25)]))
    # Steps 1-3 came within 0.1 s of the heartbeat; step 4 (0.12 s after it) carries them all.
    assert sent(channel) == [Heartbeat(), Steps([Progress("a", 4, 25)])]


def test_the_step_counters_travel_with_coalesced_progress() -> None:
    clock = Clock()
    channel = QueueChannel(progress_every=0.1, clock=clock)
    channel.send(Steps([Progress("a", 1, 25)], unet_calls=1, gap_s=0.0))
    clock.now += 0.01
    channel.send(Steps([Progress("a", 2, 25)], unet_calls=2, gap_s=0.003))  # held
    channel.send(Failure("b", "boom"))
    # Running totals: the held report's (the latest) go out.
    assert sent(channel)[1:] == [Steps([Progress("a", 2, 25)], unet_calls=2, gap_s=0.003), Failure("b", "boom")]


def test_zero_interval_sends_every_step() -> None:
    channel = QueueChannel(progress_every=0.0, clock=Clock())
    channel.send(Progress("a", 1, 2))
    channel.send(Progress("a", 2, 2))
    assert sent(channel) == [Steps([Progress("a", 1, 2)]), Steps([Progress("a", 2, 2)])]


def test_the_actor_stream_carries_everything_waiting_in_one_item() -> None:
    outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
    result = Result("a", [], compute_ms=1.0)
    for message in [Steps([Progress("a", 3, 3)]), result, Exited(0), Heartbeat()]:
        outbox.put(message)
    # The stream ends at Exited: nothing after it is read.
    assert list(drained(outbox)) == [[Steps([Progress("a", 3, 3)]), result, Exited(0)]]
