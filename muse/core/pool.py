"""What the core reads of a pool, named in one place: the batcher places work through `WorkerPool`, the
autoscaler sets a target through `Scalable`, and the service reads readiness and metrics through
`ServedPool`. Local subprocesses and Ray actors (muse.pools) both fit; tests fit fakes in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from muse.messages import Assignment, Ready, StepKey


class StepWorker(Protocol):
    """What the batcher reads of a step worker to place a request on it."""

    @property
    def images(self) -> int: ...  # running now
    @property
    def capacity(self) -> int: ...
    @property
    def step_key(self) -> StepKey | None: ...  # what its running images share (muse.messages); None when idle
    @property
    def last_seen(self) -> float: ...


class WorkerPool(Protocol):
    """What the batcher needs of the pool."""

    @property
    def batching(self) -> str: ...
    def idle_worker(self) -> Any | None: ...
    def open_workers(self) -> Sequence[StepWorker]: ...
    def dispatch(self, worker: Any, assignment: Assignment) -> int: ...
    def interrupt(self, assignment_id: str) -> None: ...
    def kill_assignment(self, assignment_id: str) -> None: ...
    def busy_count(self) -> int: ...


class Scalable(Protocol):
    """What the autoscaler needs: a target to set, and a way to converge on it now."""

    target: int

    def reconcile(self) -> None: ...


class ServedPool(WorkerPool, Scalable, Protocol):
    """Everything the service reads of its pool."""

    @property
    def info(self) -> Ready | None: ...  # what the first ready worker said about the model
    @property
    def workers(self) -> Sequence[object]: ...  # live ones
    @property
    def devices(self) -> Sequence[str]: ...  # one per seat ("auto" until a Ray pool has looked)
    @property
    def usable_devices(self) -> int: ...  # devices whose model did not fail to boot
    def image_use(self) -> tuple[int, int]: ...  # (images running, images the ready workers can run at once)
    def counts(self) -> dict[str, int]: ...  # live workers by state, and failed devices
    def nodes(self) -> dict[str, int]: ...  # live workers by node
    def readiness(self) -> tuple[bool, str]: ...
    @property
    def unet_calls(self) -> int: ...  # step workers' UNet calls, all together
    @property
    def step_gap_s(self) -> float: ...  # and the seconds between them while images waited
    def start(self, listener: Any) -> None: ...
    async def close(self, timeout: float = 10.0) -> None: ...
