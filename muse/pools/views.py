"""What the core reads about a pool's workers: who is idle or has room, readiness in words, counts by state
and node, and images running against capacity (muse.core.pool names these in its Protocol)."""

from __future__ import annotations

from muse.messages import Batching, Ready
from muse.pools.handles import Seat, WorkerHandle, WorkerState


class PoolViews:
    """Read-only views over `seats`; mixed into the pool (muse.pools.base), which keeps them up to date."""

    seats: list[Seat]
    target: int
    info: Ready | None  # what the first ready worker said about the model

    @property
    def workers(self) -> list[WorkerHandle]:
        return [s.worker for s in self.seats if s.worker is not None and s.worker.live]

    def idle_worker(self) -> WorkerHandle | None:
        """The worker idle longest (an idle worker sends nothing, so `last_seen` is when it became
        idle). Taking the first idle one instead piled every batch onto worker 0 whenever a batch
        was held back until both were idle."""
        idle = [w for w in self.workers if w.state is WorkerState.IDLE and not w.draining]
        return min(idle, key=lambda w: w.last_seen, default=None)

    def open_workers(self) -> list[WorkerHandle]:
        """Workers that may take an Assignment now (the batcher picks one with room for it)."""
        return [w for w in self.workers if w.open]

    @property
    def batching(self) -> str:
        """How the model's workers batch (what the first ready worker said; "request" before)."""
        return self.info.batching if self.info is not None else Batching.REQUEST

    def image_use(self) -> tuple[int, int]:
        """(images running, images the ready workers can run at once)."""
        ready = [w for w in self.workers if w.state in (WorkerState.IDLE, WorkerState.BUSY)]
        return sum(w.images for w in ready), sum(w.capacity for w in ready)

    def busy_count(self) -> int:
        return sum(1 for w in self.workers if w.state is WorkerState.BUSY)

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in WorkerState if state is not WorkerState.DEAD}
        counts["draining"] = counts["pending"] = 0
        for w in self.workers:
            if w.draining and w.state is not WorkerState.STOPPING:
                counts["draining"] += 1
            elif w.pending:  # starting, but not placed yet: each worker is counted in one state only
                counts["pending"] += 1
            else:
                counts[w.state.value] += 1
        counts["failed"] = sum(1 for s in self.seats if s.boot_error)
        return counts

    def readiness(self) -> tuple[bool, str]:
        c = self.counts()
        if c["idle"] + c["busy"] > 0:
            return True, f"{c['idle'] + c['busy']} worker(s) ready"
        errors = [s.boot_error for s in self.seats if s.boot_error]
        if errors and len(errors) == len(self.seats):
            return False, f"every worker failed to boot: {errors[0]}"
        if c["pending"]:
            return False, f"{c['pending']} worker(s) waiting for resources (cluster autoscaler: add a node)"
        compiling = [w.compiling for w in self.workers if w.state is WorkerState.STARTING and w.compiling]
        if compiling:
            done, total = min(compiling)
            return False, f"{len(compiling)} worker(s) compiling ({done} of {total} shapes)"
        if c["starting"]:
            return False, f"{c['starting']} worker(s) loading the model"
        if self.target == 0:
            return True, "scaled to zero; the next request starts a worker"
        if errors:
            return False, f"worker failed to boot: {errors[0]}"
        return False, "no worker running"

    def nodes(self) -> dict[str, int]:
        """Live workers by the node they run on."""
        nodes: dict[str, int] = {}
        for w in self.workers:
            nodes[w.link.node] = nodes.get(w.link.node, 0) + 1
        return nodes

    @property
    def devices(self) -> list[str]:
        """The device of every seat, whether a worker runs there or not."""
        return [s.device for s in self.seats]

    @property
    def usable_devices(self) -> int:
        return sum(1 for s in self.seats if s.boot_error is None)
