"""Jobs that outlive the process: the service records each kept job in the job store before its 202, records
its end (with its webhook event), and on start-up puts back what the last process left: unfinished jobs
queued again in their order, with their ids, owners and seeds (so the same images), and ended ones readable
until --job-ttl, their images read back from the gallery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from muse.core.batcher import Batcher
from muse.core.jobcodec import error_from_json, image_ids, result_from_json
from muse.core.jobstore import Event, JobStore, StoredJob
from muse.core.tickets import Ticket, TicketState
from muse.errors import GenerationFailed, ShuttingDown
from muse.messages import GenerateRequest

log = logging.getLogger("muse.core.durable")


class Pictures(Protocol):
    """Where an ended job's images are read back from (muse.storage.Gallery)."""

    def png_path(self, image_id: str) -> Path | None: ...


def request_of(job: StoredJob) -> GenerateRequest | None:
    try:
        return job.request
    except (ValueError, KeyError, TypeError) as exc:
        log.debug("job %s: %s", job.id, exc)
        return None


class DurableJobs:
    def __init__(self, store: JobStore, pictures: Pictures, job_ttl: float) -> None:
        self.store = store
        self.pictures = pictures
        self.job_ttl = job_ttl
        # The live process's durable jobs not yet ended, with their webhook_url ("" for none).
        self._ids: dict[str, str] = {}
        self.on_event: list[Callable[[Event], None]] = []

    def record(self, ticket: Ticket, *, webhook_url: str = "", base_url: str = "") -> None:
        self.store.add(ticket, webhook_url=webhook_url, base_url=base_url)
        self._ids[ticket.id] = webhook_url

    def holds(self, ticket: Ticket) -> bool:
        """Whether the ticket is a durable job of this process, not yet ended."""
        return ticket.id in self._ids

    def ended(self, ticket: Ticket) -> None:
        webhook_url = self._ids.pop(ticket.id, None)
        if webhook_url is None:
            return
        if isinstance(ticket.error, ShuttingDown):
            # Failed only because this process stops: the next one on this data dir runs it.
            return
        event = self.store.end(ticket, webhook_url)
        if event is not None:
            for hear in self.on_event:
                hear(event)

    def forget(self, job_id: str) -> None:
        self.store.forget(job_id)

    def restore(self, batcher: Batcher) -> tuple[list[Ticket], list[Ticket]]:
        """What the last process left: (ended jobs still within --job-ttl, unfinished jobs queued again)."""
        now = time.time()
        self.store.prune(now - self.job_ttl)
        unfinished = [(job, request_of(job)) for job in self.store.unfinished()]
        for job, request in unfinished:
            if request is None:
                # Written by another version, or damaged: the job ends, said so, instead of stopping the start.
                log.error("job %s: its request could not be read back; it fails", job.id)
                self.store.fail(job.id, GenerationFailed("the job could not be read back after a restart"))
        ended = [self._ended_ticket(job) for job in self.store.ended_since(now - self.job_ttl)]
        queued = []
        for job, request in unfinished:
            if request is None:
                continue
            ticket = batcher.submit(request, owner=job.owner, ticket_id=job.id, created=job.created, restored=True)
            self._ids[ticket.id] = job.webhook_url
            queued.append(ticket)
        if ended or queued:
            log.info("jobs from the last run: %d queued again, %d ended ones readable", len(queued), len(ended))
        return ended, queued

    def _ended_ticket(self, job: StoredJob) -> Ticket:
        # A request that cannot be read back still leaves its job readable: its state and error, no prompt.
        request = request_of(job) or GenerateRequest("", 0, 0, 0.0, 0, 0)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        future.set_result(None)  # nobody awaits an ended job's future; it only has to be done
        ticket = Ticket(job.id, request, future, time.monotonic(), time.monotonic(), job.owner)  # type: ignore[arg-type]
        ticket.created = job.created
        ticket.state = TicketState(job.state)
        ticket.finished = job.ended
        ticket.error = error_from_json(job.error_json)
        ticket.step = request.denoising_steps
        saved = image_ids(job.result_json)
        if job.result_json is not None and request.steps:
            pngs = [self._png(image_id) for image_id in saved]
            if all(png is not None for png in pngs):
                ticket.result = result_from_json(job.result_json, request, [p for p in pngs if p is not None])
                ticket.saved = saved
            else:
                log.warning("job %s: some of its images are no longer in the gallery", job.id)
        return ticket

    def _png(self, image_id: str) -> bytes | None:
        path = self.pictures.png_path(image_id)
        try:
            return path.read_bytes() if path is not None else None
        except OSError:
            return None
