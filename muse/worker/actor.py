"""The worker as a Ray actor: the same engine as a subprocess (muse.worker.main.serve), behind queues.

The engine runs on a thread of its own for the actor's whole life (load, warm-up and every step on
that one thread). The pool puts the parent's messages in with `send` and reads what the worker says
from `events`, a streaming method that yields what it says as it is produced, so progress reaches the
parent without polling. When the engine returns (Stop, or a model that cannot load) the stream ends
with `Exited`.

Each stream item carries every message waiting when it left (and the channel coalesces progress, see
muse.worker.channel): a stream item costs the actor's process about a millisecond of CPU.

Ray is imported by the pool (muse.pools.ray), which wraps this class with `ray.remote`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

from muse.messages import Exited, Placed
from muse.worker.channel import QueueChannel
from muse.worker.main import WorkerConfig, serve, setup_logging


def node_address() -> str:
    """The node's address and the start of its id (several nodes may share one address)."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


class WorkerActor:
    def __init__(self, config: WorkerConfig) -> None:
        setup_logging(config)
        self.channel = QueueChannel(progress_every=config.progress_interval)
        self.channel.send(Placed(node_address(), os.getpid()))
        self.thread = threading.Thread(target=self._run, args=(config,), name="muse-worker", daemon=True)
        self.thread.start()

    def _run(self, config: WorkerConfig) -> None:
        code = 1
        try:
            code = serve(self.channel, config)
        finally:
            self.channel.send(Exited(code))  # after any progress it holds

    def send(self, message: object) -> None:
        self.channel.inbox.put(message)

    def events(self) -> Iterator[list[object]]:
        # A generator function itself: Ray streams only those.
        yield from drained(self.channel.outbox)


def drained(outbox: queue.SimpleQueue[object]) -> Iterator[list[object]]:
    """What is put in `outbox`, in order: each list holds everything waiting when the first of it came
    (one stream item, not one per message). Ends after Exited."""
    while True:
        messages = [outbox.get()]
        while not isinstance(messages[-1], Exited) and not outbox.empty():
            messages.append(outbox.get())
        yield messages
        if isinstance(messages[-1], Exited):
            return
