"""The Ray pool (`--pool ray`): each worker is a Ray actor, placed by Ray on any node of a cluster.

The actor hosts the same engine as a local subprocess (muse.worker.actor). Messages to it are actor
calls; what it says comes back on one streaming call per actor, read in the event loop (`async for` over
its object refs), so progress arrives as it is made and an idle pool costs nothing. An actor that dies
(killed, out of memory, its node lost) ends its stream with an error: its Assignments are retried
elsewhere like a dead subprocess's, and the pool converges back on `target`. An actor Ray has not
placed within PENDING_AFTER_S counts as pending (the cluster lacks the resources it asked for: the
cue for Ray's own autoscaler, e.g. KubeRay, to add a node).

Actors are spread over the nodes (Ray's SPREAD strategy); a CUDA worker asks for one GPU, a CPU
worker for `cpus_per_worker` CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from muse.messages import Exited, Placed
from muse.pools.base import BasePool
from muse.pools.handles import Link, WorkerHandle, WorkerState
from muse.worker.main import WorkerConfig

log = logging.getLogger("muse.pools.ray")
PENDING_AFTER_S = 5.0


class ActorLink:
    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.pid: int | None = None
        self.node = "unplaced"
        self.task: asyncio.Task[None] | None = None

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def send(self, message: object) -> None:
        # Fire and forget: a dead actor is noticed on its event stream.
        self.actor.send.remote(message)

    def kill(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    def close(self) -> None:
        # Its resources go back to the cluster; its event stream then ends with an error, and `_follow`
        # reports the exit as the local pool's process sentinel does.
        self.kill()


@contextlib.contextmanager
def own_signals() -> Iterator[None]:
    """Keep the server's SIGTERM and SIGINT handlers through `ray.init`: Ray's core worker installs a fatal-signal
    handler for them (it prints "*** SIGTERM received ***" and aborts), which would kill a draining server with
    its accepted requests. Ray's own shutdown does not need it: the pool stops its actors and disconnects."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a server runs its loop there
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


class RayPool(BasePool):
    def __init__(self, *, address: str, devices: Sequence[str], cpus_per_worker: float = 1.0, **kwargs: Any) -> None:
        super().__init__(devices=devices, threads_per_worker=max(1, int(cpus_per_worker)), **kwargs)
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self._connected_here = False
        self._remote: Any = None

    def start(self, listener: Any) -> None:
        import ray

        from muse.worker.actor import WorkerActor

        if not ray.is_initialized():
            with own_signals():
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            self._connected_here = True
        resources = ray.cluster_resources()
        for seat in self.seats:
            if seat.device == "auto":
                seat.device = "cuda" if resources.get("GPU", 0) else "cpu"
        log.info("Ray cluster at %s: %s", self.address, _resources(resources))
        self._remote = ray.remote(WorkerActor)
        super().start(listener)

    def _launch(self, worker: WorkerHandle, config: WorkerConfig) -> Link:
        if config.device.startswith("cuda"):
            # Ray gives the actor its GPU as the only visible one.
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            config = dataclasses.replace(config, device="cuda", parent_pid=0)
        else:
            options = {"num_cpus": self.cpus_per_worker}
            config = dataclasses.replace(config, parent_pid=0)
        # Threads: `events` blocks in its own while `send` calls come in.
        actor = self._remote.options(max_concurrency=4, scheduling_strategy="SPREAD", **options).remote(config)
        link = ActorLink(actor)
        link.task = asyncio.create_task(self._follow(worker, link), name=f"muse-actor-{worker.id}")
        return link

    async def _follow(self, worker: WorkerHandle, link: ActorLink) -> None:
        """Read the actor's event stream until it exits or dies."""
        code: int | None = None
        try:
            async for ref in link.actor.events.options(num_returns="streaming").remote():
                for message in await ref:
                    if isinstance(message, Placed):
                        link.node, link.pid, worker.pending = message.node, message.pid, False
                    elif isinstance(message, Exited):
                        code = message.code
                    elif worker.live:
                        self._handle(worker, message)
                if code is not None:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the actor died: killed, out of memory, its node lost
            if worker.live and worker.state is not WorkerState.STOPPING:
                log.warning("worker %d (actor on %s) died: %s", worker.id, link.node, _first_line(exc))
        self._exited(worker, code)

    def where(self, worker: WorkerHandle) -> str:
        link = worker.link
        return f"actor on {link.node}" if isinstance(link, ActorLink) else super().where(worker)

    def supervise(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.state is WorkerState.STARTING and isinstance(w.link, ActorLink) and w.link.pid is None:
                w.pending = now - w.started_at > PENDING_AFTER_S
        super().supervise()

    async def close(self, timeout: float = 10.0) -> None:
        await super().close(timeout)
        if self._connected_here:
            import ray

            ray.shutdown()


def _resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if not k.startswith(("node:", "memory")))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
