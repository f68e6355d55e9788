"""What a pool does with what its workers say: progress, results and failures go to the listener (the
batcher); Ready, Compiling and BootFailure update the worker's state; Steps add to the step counters."""

from __future__ import annotations

import logging
import time

from muse.messages import (
    BootFailure,
    Compiling,
    Failure,
    Heartbeat,
    Progress,
    Ready,
    Result,
    Steps,
)
from muse.pools.handles import PoolListener, Seat, WorkerHandle, WorkerState, describe_batching

log = logging.getLogger("muse.pools")


class WorkerMessages:
    """Mixed into the pool (muse.pools.base), which calls `_handle` for every message a worker sends."""

    seats: list[Seat]
    info: Ready | None
    # Every step worker's UNet calls, and the seconds between them while images waited (idle device).
    unet_calls: int
    step_gap_s: float

    @property
    def listener(self) -> PoolListener:
        raise NotImplementedError

    def _stop(self, worker: WorkerHandle) -> None:
        raise NotImplementedError

    def _count_steps(self, worker: WorkerHandle, message: Steps) -> None:
        """Add a step worker's UNet calls and the gaps between them since its last report to the pool's totals."""
        # Running totals of one worker process (a respawn gets a fresh handle): the deltas are never negative.
        self.unet_calls += message.unet_calls - worker.unet_calls
        self.step_gap_s += message.gap_s - worker.gap_s
        worker.unet_calls, worker.gap_s = message.unet_calls, message.gap_s

    def _handle(self, worker: WorkerHandle, message: object) -> None:
        worker.last_seen = time.monotonic()
        if isinstance(message, Progress | Steps | Result | Failure):
            worker.last_step = worker.last_seen
        elif isinstance(message, Heartbeat) and worker.info is not None and not worker.info.reports_steps:
            worker.last_step = worker.last_seen  # its calls say nothing until they end: alive is all we learn
        if isinstance(message, Progress):
            self.listener.assignment_progress(message)
        elif isinstance(message, Steps):
            self._count_steps(worker, message)
            for progress in message.progress:
                self.listener.assignment_progress(progress)
        elif isinstance(message, Result | Failure):
            if worker.assignments.pop(message.assignment_id, None) is None:
                return
            worker.assignments_done += 1
            if not worker.assignments:
                worker.state = WorkerState.IDLE
            self.listener.assignment_finished(message)
            if worker.state is WorkerState.IDLE:
                self._after_idle(worker)
            elif not worker.draining:
                self.listener.room_freed()  # slots freed: waiting requests of its shape may join
        elif isinstance(message, Ready):
            log.info("worker %d ready on %s in %.1f s", worker.id, worker.device, message.load_s)
            worker.info = message
            if self.info is None:
                self.info = message
                log.info("%s", describe_batching(message))
            worker.state = WorkerState.IDLE
            self.seats[worker.seat].crashes = 0
            self._after_idle(worker)
        elif isinstance(message, Compiling):
            worker.compiling = (message.done, message.total)
        elif isinstance(message, BootFailure):
            log.error("worker %d failed to boot: %s", worker.id, message.message)
            self.seats[worker.seat].boot_error = message.message
        elif isinstance(message, Heartbeat):
            pass

    def _after_idle(self, worker: WorkerHandle) -> None:
        if worker.draining:
            self._stop(worker)
        else:
            self.listener.room_freed()
