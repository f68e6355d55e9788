"""What every pool does, whatever hosts its workers: converge on `target`, supervise, handle messages.

The autoscaler only sets `target`; `reconcile()` makes it so, like gunicorn's `manage_workers`: undrain
or spawn the missing, drain the surplus (a busy worker is never killed for scaling: it finishes its
batches, then stops). A step worker (see muse.messages) runs several Assignments at once, of one latent
shape, up to the capacity it reported; a request worker runs one at a time. The pool supervises itself
on its own timer (`supervise`: kill the hung, then reconcile), whatever the autoscaler does.
Subclasses say how a worker is started and reached (`_launch`): local subprocesses over pipes
(muse.pools.local) or Ray actors (muse.pools.ray).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from muse.messages import (
    BOOT_FAILURE_EXIT,
    Assignment,
    Interrupt,
    Ready,
    Stop,
)
from muse.periodic import every
from muse.pools.handles import Link, PoolListener, Seat, WorkerHandle, WorkerState
from muse.pools.inbox import WorkerMessages
from muse.pools.views import PoolViews
from muse.worker.main import WorkerConfig

log = logging.getLogger("muse.pools")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


def default_threads(devices: Sequence[str]) -> int:
    cpu_workers = sum(1 for d in devices if d == "cpu") or 1
    return max(1, (os.cpu_count() or 1) // cpu_workers)


class BasePool(PoolViews, WorkerMessages):
    """Convergence, supervision and message handling, whatever hosts the workers (see `_launch`)."""

    def __init__(
        self,
        *,
        model: str,
        devices: Sequence[str],
        threads_per_worker: int = 0,
        worker_timeout: float = 60.0,
        log_level: str = "info",
        batching: str = "auto",
        max_batch_size: int = 8,
        worker_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`worker_options`: more WorkerConfig fields every worker gets as they are (--progress-interval
        and the --compile options)."""
        self.worker_options = dict(worker_options or {})
        # Every step worker's UNet calls, and the seconds between them while images waited (idle device).
        self.unet_calls = 0
        self.step_gap_s = 0.0
        self.model = model
        self.wanted_batching = batching
        self.max_batch_size = max_batch_size
        self.seats = [Seat(d) for d in devices]
        self._listener: PoolListener | None = None
        self.worker_timeout = worker_timeout
        # Often enough to catch a hung worker soon after --worker-timeout, rarely enough to cost nothing.
        self.supervise_interval = max(0.05, min(1.0, worker_timeout / 4))
        self._supervisor: asyncio.Task[None] | None = None
        self.log_level = log_level
        self.threads = threads_per_worker or default_threads(devices)
        self.target = len(self.seats)
        self.info: Ready | None = None  # what the first ready worker said about the model
        self._ids = itertools.count(1)
        self._retry_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self.spawned = 0

    def start(self, listener: PoolListener) -> None:
        """Begin converging on `target`, telling `listener` (the batcher) what workers do."""
        self._listener = listener
        self.reconcile()
        self._supervisor = asyncio.create_task(
            every(self.supervise_interval, self.supervise, log=log, name="pool supervisor"), name="muse-pool"
        )

    @property
    def listener(self) -> PoolListener:
        assert self._listener is not None, "Pool.start() first"
        return self._listener

    # ---- convergence ------------------------------------------------------------------------------

    def supervise(self) -> None:
        """One tick of the pool's own timer: kill hung workers, then converge on the target."""
        if self._closed:
            return
        self._kill_hung()
        self.reconcile()

    def reconcile(self) -> None:
        """One repeatable step towards `target`; safe to call at any time."""
        if self._closed:
            return
        active = [w for w in self.workers if not w.draining and w.state is not WorkerState.STOPPING]
        missing = self.target - len(active)
        if missing > 0:
            # Undrain before spawning: a draining worker is already loaded.
            missing -= self._undrain(missing)
            self._spawn_missing(missing)
        elif missing < 0:
            self._drain_surplus(active, -missing)

    def _kill_hung(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.state is WorkerState.BUSY and now - w.last_step > self.worker_timeout:
                log.warning("worker %d made no step for %.0f s while busy: killing it", w.id, now - w.last_step)
                self._kill(w)
                self._on_death(w, f"worker {w.id} hung (no step for {self.worker_timeout:g} s)")

    def _undrain(self, wanted: int) -> int:
        undrained = 0
        for w in self.workers:
            if undrained < wanted and w.draining and w.state is not WorkerState.STOPPING:
                w.draining = False
                undrained += 1
        return undrained

    def _spawn_missing(self, missing: int) -> None:
        """Spawn into free slots, skipping slots whose model failed to boot and slots still backing off."""
        now = time.monotonic()
        next_retry = None
        for seat in self.seats:
            if missing == 0:
                return
            if seat.boot_error or (seat.worker is not None and seat.worker.live):
                continue
            if seat.retry_at > now:
                next_retry = min(next_retry or seat.retry_at, seat.retry_at)
                continue
            self._spawn(seat)
            missing -= 1
        if next_retry is not None:
            self._schedule_retry(next_retry - now)

    def _drain_surplus(self, active: list[WorkerHandle], surplus: int) -> None:
        # Idle workers first (newest first), then busy ones, which finish their batch before stopping.
        ordered = sorted(active, key=lambda w: (w.state is WorkerState.BUSY, -w.started_at))
        for w in ordered[:surplus]:
            log.info("draining worker %d on %s (target %d)", w.id, w.device, self.target)
            w.draining = True
            if w.state in (WorkerState.IDLE, WorkerState.STARTING):
                self._stop(w)

    def _schedule_retry(self, delay: float) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        loop = asyncio.get_running_loop()
        self._retry_handle = loop.call_later(max(delay, 0.01), self.reconcile)

    def _spawn(self, seat: Seat) -> WorkerHandle:
        worker_id = next(self._ids)
        self.spawned += 1
        config = WorkerConfig(
            worker_id=worker_id,
            model=self.model,
            device=seat.device,
            threads=self.threads if seat.device == "cpu" else 0,
            heartbeat_interval=max(0.05, min(5.0, self.worker_timeout / 4)),
            log_level=self.log_level,
            parent_pid=os.getpid(),
            batching=self.wanted_batching,
            capacity=self.max_batch_size,
            **self.worker_options,
        )
        handle = WorkerHandle(worker_id, self.seats.index(seat), seat.device)
        handle.exited = asyncio.get_running_loop().create_future()
        handle.link = self._launch(handle, config)
        seat.worker = handle
        log.info("starting worker %d on %s (%s)", worker_id, seat.device, self.where(handle))
        return handle

    def _launch(self, worker: WorkerHandle, config: WorkerConfig) -> Link:
        """Start the worker; deliver what it sends to `_handle` and its end to `_exited` (or `_on_death`)."""
        raise NotImplementedError

    def where(self, worker: WorkerHandle) -> str:
        return f"pid {worker.pid}"

    # ---- work -------------------------------------------------------------------------------------

    def dispatch(self, worker: WorkerHandle, batch: Assignment) -> int:
        """Send an Assignment; returns the images the worker now runs (more than the Assignment's: it joined others)."""
        assert worker.open
        if not worker.assignments:
            # A worker that joins Assignments into running ones is judged hung from its last step, not from here.
            worker.last_step = time.monotonic()
        worker.state = WorkerState.BUSY
        worker.assignments[batch.assignment_id] = batch
        worker.last_seen = time.monotonic()
        running = worker.images
        try:
            self._send(worker, batch)
        except OSError:
            self._on_death(worker, f"worker {worker.id} pipe broke")
        return running

    def interrupt(self, assignment_id: str) -> None:
        for w in self.workers:
            if assignment_id in w.assignments:
                # A broken pipe means it is dying; the reader handles its death.
                with contextlib.suppress(OSError):
                    self._send(w, Interrupt(assignment_id))

    def kill_assignment(self, assignment_id: str) -> None:
        """Kill the worker running this batch: every request of it is gone and it did not stop in time
        (one step can last minutes). A replacement starts at once."""
        for w in self.workers:
            if assignment_id in w.assignments:
                log.warning("worker %d did not stop abandoned batch %s: killing it", w.id, assignment_id)
                self._kill(w)
                self._on_death(w, f"worker {w.id} killed: its batch was abandoned")

    def _send(self, worker: WorkerHandle, message: object) -> None:
        worker.link.send(message)

    def _stop(self, worker: WorkerHandle) -> None:
        worker.state = WorkerState.STOPPING
        with contextlib.suppress(OSError):
            self._send(worker, Stop())

    def _kill(self, worker: WorkerHandle) -> None:
        worker.killed = True
        if worker.link.alive():
            worker.link.kill()

    def _on_death(self, worker: WorkerHandle, reason: str) -> None:
        if not worker.live:
            return
        expected = worker.state is WorkerState.STOPPING
        worker.state = WorkerState.DEAD
        worker.link.close()
        lost, worker.assignments = list(worker.assignments.values()), {}
        if not expected:
            log.warning("%s", reason)
        for assignment in lost:
            self.listener.assignment_lost(assignment, reason)
        if not expected and not worker.killed and not self._closed:
            seat = self.seats[worker.seat]
            seat.crashes += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (seat.crashes - 1))
            seat.retry_at = time.monotonic() + delay

    def _exited(self, worker: WorkerHandle, code: int | None) -> None:
        """The worker is gone for good, with this exit code (None: unknown, e.g. a lost node)."""
        if code == BOOT_FAILURE_EXIT:
            seat = self.seats[worker.seat]
            seat.boot_error = seat.boot_error or f"worker exited with code {code} while loading the model"
        self._on_death(worker, f"worker {worker.id} on {worker.device} ({self.where(worker)}) exited with code {code}")
        if worker.exited is not None and not worker.exited.done():
            worker.exited.set_result(code)
        if not self._closed:
            self.reconcile()

    # ---- shutdown ---------------------------------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """Stop every worker: ask, wait up to `timeout`, then kill."""
        self._closed = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        workers = self.workers
        for w in workers:
            if w.state is not WorkerState.STOPPING:
                self._stop(w)
        waits = [w.exited for w in workers if w.exited is not None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                for w in workers:
                    self._kill(w)
                await asyncio.wait(pending, timeout=5)
