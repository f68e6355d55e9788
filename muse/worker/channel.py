"""The worker's end of its link to the parent: a pipe (a local subprocess) or two queues (a Ray actor).

The worker engine (muse.worker.main, muse.worker.steploop) only sends messages and receives them,
so the same engine runs behind either transport. The heartbeat thread and the main thread both send.
"""

from __future__ import annotations

import queue
import threading
from multiprocessing.connection import Connection

from muse.messages import Interrupt, Stop


class Channel:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = False
        self.stop_requested = False

    def send(self, message: object) -> None:
        with self.lock:
            self._send(message)

    def receive(self, block: bool) -> list[object]:
        """Every message waiting (at least one when `block`); raises EOFError once the parent is gone."""
        messages = [self._recv()] if block else []
        while self._poll():
            messages.append(self._recv())
        return messages

    def drain_control(self, batch_id: str) -> bool:
        """Read control messages that arrived mid-batch; True when this batch must stop."""
        interrupted = False
        for message in self.receive(block=False):
            if isinstance(message, Interrupt) and message.batch_id == batch_id:
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
    def __init__(self, conn: Connection) -> None:
        super().__init__()
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

    def __init__(self) -> None:
        super().__init__()
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()

    def _send(self, message: object) -> None:
        self.outbox.put(message)

    def _recv(self) -> object:
        return self.inbox.get()

    def _poll(self) -> bool:
        return not self.inbox.empty()
