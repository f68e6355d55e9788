"""A worker as the pool sees it: its link (a subprocess's pipe, a Ray actor), its state, its Assignments."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from muse.messages import Assignment, Batching, Failure, Progress, Ready, Result, StepKey


def describe_batching(ready: Ready) -> str:
    if ready.batching == Batching.STEP:
        return (
            f"batching: step ({ready.pipeline} on the step engine: requests join and leave a running batch "
            f"between denoising steps, up to {ready.capacity} images per worker)"
        )
    return f"batching: request ({ready.pipeline}: whole pipeline calls, one batch per worker at a time)"


class WorkerState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    DEAD = "dead"


class Link(Protocol):
    """How the pool reaches one worker, whatever hosts it."""

    @property
    def pid(self) -> int | None: ...
    @property
    def node(self) -> str: ...  # where it runs ("local", or a Ray node's address)
    def alive(self) -> bool: ...
    def send(self, message: object) -> None: ...  # OSError when the worker is gone
    def kill(self) -> None: ...
    def close(self) -> None: ...  # after its death: stop reading it


class PoolListener(Protocol):
    def room_freed(self) -> None: ...
    def assignment_progress(self, message: Progress) -> None: ...
    def assignment_finished(self, message: Result | Failure) -> None: ...
    def assignment_lost(self, batch: Assignment, reason: str) -> None: ...


@dataclass(eq=False)
class WorkerHandle:
    id: int
    seat: int  # its index in the pool's seats
    device: str
    link: Link = field(init=False)  # set by the pool right after it makes the handle
    state: WorkerState = WorkerState.STARTING
    assignments: dict[str, Assignment] = field(default_factory=dict)  # running on it, by id
    draining: bool = False
    started_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    # When its batch last moved (dispatch, a step, the end): heartbeats prove a process is alive, not
    # that its batch is getting anywhere.
    last_step: float = field(default_factory=time.monotonic)
    killed: bool = False  # on purpose (hung, or its batch abandoned): not a crash to back off from
    info: Ready | None = None
    assignments_done: int = 0
    exited: asyncio.Future[int | None] | None = None
    pending: bool = False  # waiting for resources its host does not have yet (a Ray cluster)
    compiling: tuple[int, int] | None = None  # --compile: (shapes done, shapes) while it starts
    unet_calls: int = 0  # the running totals its last Steps reported
    gap_s: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.link.pid

    @property
    def live(self) -> bool:
        return self.state is not WorkerState.DEAD

    @property
    def images(self) -> int:
        return sum(len(b.images) for b in self.assignments.values())

    @property
    def step_key(self) -> StepKey | None:
        """What the Assignments running on it share; a step worker runs one StepKey at a time."""
        for batch in self.assignments.values():
            return batch.key.step_key
        return None

    @property
    def capacity(self) -> int:
        return self.info.capacity if self.info is not None and self.info.batching == Batching.STEP else 1

    @property
    def open(self) -> bool:
        """Ready for work and not draining (idle, or a busy step worker that may have free slots)."""
        return not self.draining and (
            self.state is WorkerState.IDLE or (self.state is WorkerState.BUSY and self.capacity > 1)
        )


@dataclass
class Seat:
    """One device's place in the pool (not an image slot of a step worker): the worker on it, how often it
    crashed (for backoff), and why its model failed to boot, if it did (then it is never respawned)."""

    device: str
    worker: WorkerHandle | None = None
    crashes: int = 0
    retry_at: float = 0.0
    boot_error: str | None = None
