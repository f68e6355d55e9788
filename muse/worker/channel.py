"""The worker's end of its link to the parent: a pipe (a local subprocess) or two queues (a Ray actor).

The worker engine (muse.worker.main, muse.worker.steploop) only sends messages and receives them,
so the same engine runs behind either transport. The heartbeat thread and the main thread both send.

Progress is coalesced: a step's progress waits (at most `progress_every`, --progress-interval, after
the last message) to travel with what follows, keeping each Assignment's latest step; anything else (a
Result, a Failure, a heartbeat) leaves at once, with the progress held before it. Every message costs
the parent (and a Ray actor's own process) CPU taken from the steps on a busy machine: one per step
added ~30 ms to a 500 ms CPU request through Ray. A held step is never stale for long: the step after
it, or its Assignment's Result, comes within one step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from muse.messages import Interrupt, Progress, Steps, Stop

PROGRESS_EVERY_S = 0.1


class Channel:
    def __init__(self, progress_every: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self.stop_requested = False
        self.progress_every = progress_every
        self.clock = clock
        self._held: dict[str, Progress] = {}
        self._counters = (0, 0.0)  # the latest Steps' unet_calls and gap_s: running totals, so the last wins
        self._last_sent = -progress_every

    def send(self, message: object) -> None:
        with self.lock:
            if isinstance(message, Progress | Steps):
                if isinstance(message, Steps):
                    self._counters = (message.unet_calls, message.gap_s)
                for progress in message.progress if isinstance(message, Steps) else [message]:
                    self._held[progress.assignment_id] = progress
                if self.clock() - self._last_sent < self.progress_every:
                    return
                message = None
            if self._held:
                self._send(Steps(list(self._held.values()), *self._counters))
                self._held = {}
            if message is not None:
                self._send(message)
            self._last_sent = self.clock()

    def receive(self, block: bool) -> list[object]:
        """Every message waiting (at least one when `block`); raises EOFError once the parent is gone."""
        messages = [self._recv()] if block else []
        while self._poll():
            messages.append(self._recv())
        return messages

    def drain_control(self, assignment_id: str) -> bool:
        """Read control messages that arrived mid-batch; True when this batch must stop."""
        interrupted = False
        for message in self.receive(block=False):
            if isinstance(message, Interrupt) and message.assignment_id == assignment_id:
                interrupted = True
            elif isinstance(message, Stop):
                self.stop_requested = True
        return interrupted

    def _send(self, message: object) -> None:
        raise NotImplementedError

    def _recv(self) -> object:
        raise NotImplementedError

    def _poll(self) -> bool:
        raise NotImplementedError


class PipeChannel(Channel):
    def __init__(self, conn: Connection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn = conn

    def _send(self, message: object) -> None:
        self.conn.send(message)

    def _recv(self) -> object:
        return self.conn.recv()

    def _poll(self) -> bool:
        return self.conn.poll()


class QueueChannel(Channel):
    """For a worker hosted on a thread of a process it does not own (a Ray actor): the host puts the
    parent's messages in `inbox` and streams `outbox` back. The host's owner ends it (Ray kills an
    actor whose owner died), so no end-of-input marker is needed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()

    def _send(self, message: object) -> None:
        self.outbox.put(message)

    def _recv(self) -> object:
        return self.inbox.get()

    def _poll(self) -> bool:
        return not self.inbox.empty()
