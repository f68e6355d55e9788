"""The local pool: one worker subprocess per device seat, over a pipe.

Pipes are read in the event loop with `add_reader` (and a process's exit through its sentinel), so an
idle pool costs nothing.

A CPU worker is forked from a server process (multiprocessing's forkserver) that imported the worker's
modules once: torch, diffusers and transformers take ~5 s to import on a small machine, which every
spawned worker paid again at each start, respawn and scale-up. That process has run nothing (no OpenMP
pool, no tensors), so a fork of it starts as clean as a spawn. Accelerator workers are still spawned:
CUDA cannot be used in a child forked after its driver was initialised, and an import may initialise it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import sys
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from muse.pools.base import BasePool
from muse.pools.framing import FrameReader
from muse.pools.handles import Link, WorkerHandle, WorkerState
from muse.worker import main as worker_main

__all__ = ["Pool", "WorkerHandle", "WorkerState"]
log = logging.getLogger("muse.pools.local")

# Imported once in the forkserver, shared by every worker forked from it: what a CPU worker imports before
# its first step (see muse.worker.main, steploop), after the forkserver's own SIGTERM policy.
FORKSERVER_PRELOAD = ["muse.pools.forkserver_init", "muse.worker.main", "muse.worker.pipeline", "muse.worker.steploop"]


def context_for(device: str) -> mp.context.ForkServerContext | mp.context.SpawnContext:
    """forkserver for a CPU worker on Linux (where a worker dies with the server: see
    muse.worker.main.die_with_parent), spawn for a device's or elsewhere."""
    if device != "cpu" or not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    forked = mp.get_context("forkserver")
    forked.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the forkserver starts, at the first fork
    return forked


class PipeLink:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.reader = FrameReader(conn.fileno())

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def node(self) -> str:
        return "local"

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: object) -> None:
        # The loop keeps the fd non-blocking; messages to a worker are small and it reads them
        # promptly (idle: blocked in recv; busy: polled every step), so a blocking write is brief.
        fd = self.conn.fileno()
        os.set_blocking(fd, True)
        try:
            self.conn.send(message)
        finally:
            os.set_blocking(fd, False)

    def kill(self) -> None:
        self.process.kill()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.conn.close()


class Pool(BasePool):
    """Worker subprocesses, one per device seat: forked from a warm server on a CPU, spawned on a device."""

    def _launch(self, worker: WorkerHandle, config: worker_main.WorkerConfig) -> Link:
        ctx = context_for(config.device)
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=worker_main.main, args=(child_conn, config), name=f"muse-worker-{worker.id}", daemon=True
        )
        process.start()
        child_conn.close()  # so that the worker's death reads as EOF on our end
        link = PipeLink(process, parent_conn)
        loop = asyncio.get_running_loop()
        os.set_blocking(parent_conn.fileno(), False)
        loop.add_reader(parent_conn.fileno(), self._on_readable, worker, link)
        loop.add_reader(process.sentinel, self._on_exit, worker, link)
        return link

    def _on_readable(self, worker: WorkerHandle, link: PipeLink) -> None:
        try:
            for message in link.reader.read():
                if worker.live:
                    self._handle(worker, message)
        except (EOFError, OSError):
            self._on_death(worker, f"worker {worker.id} on {worker.device} died")

    def _on_exit(self, worker: WorkerHandle, link: PipeLink) -> None:
        asyncio.get_running_loop().remove_reader(link.process.sentinel)
        link.process.join()
        self._exited(worker, link.process.exitcode)
