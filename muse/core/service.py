"""The service: the one door for the front ends (JSON APIs, pages, Slack, CLI). Owns pool, batcher, autoscaler.

Front ends call `submit`, `job`, `cancel`, `position`, `eta`, `watch` and `readiness`, and never reach
the batcher or the pool themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from muse.config import EMBEDDED_MODEL, Settings
from muse.core.autoscaler import Autoscaler
from muse.core.batcher import Batcher
from muse.core.durable import DurableJobs
from muse.core.loras import LoraFile, LoraFolder
from muse.core.metrics import Metrics
from muse.core.pool import ServedPool
from muse.core.ratelimit import RateLimiter
from muse.core.tickets import EVERYONE, Listener, Ticket, TicketState, Viewer
from muse.core.webhooks import Webhooks
from muse.errors import InvalidRequest, MuseError, NotFound, ShuttingDown, Unavailable
from muse.messages import GenerateRequest, GenerateResult
from muse.model_info import Limits, ModelInfo, inspect
from muse.schema import NATIVE, Dialect

log = logging.getLogger("muse.core.service")
# Unfinished jobs are bounded by --max-queue and the workers; ended ones wait out --job-ttl up to this many.
MAX_KEPT_JOBS = 10_000


def evictable(jobs: dict[str, Ticket], room: int) -> list[str]:
    """The `room` kept jobs to drop: the oldest ended ones of the owner keeping the most ended jobs, so one
    tenant's flood of create+cancel calls evicts its own, never another's finished job before --job-ttl."""
    if room <= 0:
        return []
    ended: dict[str | None, list[str]] = {}
    for job_id, t in jobs.items():  # dicts keep insertion order: oldest first
        if t.done:
            ended.setdefault(t.owner, []).append(job_id)
    return max(ended.values(), key=len, default=[])[:room]


class Gallery(Protocol):
    """Where finished images are kept (muse.storage); the service only hands results over."""

    def save(self, result: GenerateResult, model_scheduler: str = "", owner: str = "") -> list[str]: ...


class Muse:
    def __init__(
        self,
        settings: Settings,
        pool: ServedPool,
        *,
        workers: tuple[int, int],
        gallery: Gallery | None = None,
        durable: DurableJobs | None = None,
        webhooks: Webhooks | None = None,
    ) -> None:
        """`pool`: built by the composition root (muse.pools.factory); `workers`: the autoscaler's (min, max);
        `durable`: where kept jobs are recorded (None: they live in memory only); `webhooks`: their delivery."""
        self.settings = settings
        self.gallery = gallery
        self.durable = durable
        self.webhooks = webhooks
        if durable is not None and webhooks is not None:
            durable.on_event.append(webhooks.poke)
        self.pool = pool
        self._model = inspect(settings.model, EMBEDDED_MODEL)
        self.lora_folder = LoraFolder(settings.lora_dir) if settings.lora_dir else None
        self.jobs: dict[str, Ticket] = {}
        self.metrics = Metrics()
        self.limiter = RateLimiter(settings.rate_limit)
        self.draining = False
        min_workers, max_workers = workers
        self.batcher = Batcher(
            self.pool,
            model=self._model.name,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            max_retries=settings.max_retries,
            request_timeout=settings.request_timeout,
            capacity=lambda: max(1, len(self.pool.workers)),
            on_demand=lambda: self.autoscaler.poke(),
            interrupt_grace=settings.interrupt_grace,
            # One image queued in each running step worker: under load a freed slot refills at the next step,
            # and the fair queue's order holds beyond that one image. (Two would let the worker encode the
            # second's text with the first's, 0.3 % of an image's time on the embedded model: not worth an
            # image more jumping the fair queue.)
            step_prefetch=1,
        )
        self.autoscaler = Autoscaler(
            self.pool,
            lambda: self.batcher.queued_images + self.batcher.inflight_images,
            max_batch_size=settings.max_batch_size,
            min_workers=min_workers,
            max_workers=max_workers,
            interval=settings.scale_interval,
            upscale_delay=settings.upscale_delay,
            downscale_delay=settings.downscale_delay,
        )
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.batcher.on_finish.append(self._finished)
        self.batcher.on_idle.append(self._idle.set)
        self.batcher.on_batch.append(self.metrics.batch_size.observe)
        self.batcher.on_admit.append(
            lambda joined: self.metrics.admissions.labels("running" if joined else "idle").inc()
        )
        self.batcher.on_step.append(self.metrics.step_seconds.observe)
        self.batcher.on_interrupt.append(self.metrics.interrupted.inc)
        self.batcher.on_retry.append(self.metrics.retries.inc)
        self._register_gauges()

    @property
    def model(self) -> ModelInfo:
        """The served model; once a worker has loaded it, its own report of size and guidance wins.
        Its cost limits are derived from that native size, where --max-side/--max-pixels/--max-steps
        leave them open (and the model's muse.json, for steps)."""
        ready = self.pool.info
        if ready is not None and ready.pipeline and not self._model.pipeline:
            # A hub id the parent could not read before a worker fetched it: its family is known now.
            self._model = inspect(self.settings.model, EMBEDDED_MODEL)
        model = self._model
        if ready is not None:
            # replace(), not a new ModelInfo: fields the worker does not report (name, scheduler) are kept.
            model = dataclasses.replace(
                model, width=ready.width, height=ready.height, guidance_scale=ready.guidance_scale
            )
        s = self.settings
        limits = Limits.around(
            model.width,
            model.height,
            max_side=s.max_side,
            max_pixels=s.max_pixels,
            max_steps=s.max_steps,
            model_steps=model.max_steps,  # the model's muse.json, where --max-steps is left at its default
            max_upload=s.max_upload,
            max_loras=s.max_loras_per_request,
        )
        loras = self.lora_folder.names() if self.lora_folder is not None and model.takes_loras else None
        return dataclasses.replace(model, limits=limits, loras=loras)

    def lora_files(self) -> tuple[LoraFile, ...]:
        """The LoRA adapters requests may name (none without --lora-dir, or for a model that takes none)."""
        if self.lora_folder is None or not self._model.takes_loras:
            return ()
        return self.lora_folder.files()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        log.info(
            "model %s (%s), native %dx%d; devices %s; workers %d..%d",
            self.model.name,
            self.settings.model,
            self.model.width,
            self.model.height,
            ",".join(self.pool.devices),
            self.autoscaler.min_workers,
            self.autoscaler.max_workers,
        )
        self.pool.start(self.batcher)
        self._tasks.append(asyncio.create_task(self.autoscaler.run(), name="muse-autoscaler"))
        if self.durable is None:
            log.warning(
                "jobs are not durable (--no-gallery, or a read-only data dir): they live in memory only, a restart "
                "loses unfinished ones, and webhook_url is refused"
            )
        else:
            self._restore(self.durable)
        if self.webhooks is not None:
            self._tasks.append(asyncio.create_task(self.webhooks.run(), name="muse-webhooks"))

    def _restore(self, durable: DurableJobs) -> None:
        ended, queued = durable.restore(self.batcher)
        for ticket in ended:
            self.jobs[ticket.id] = ticket
            self._drop_later(ticket)
        for ticket in queued:
            self.jobs[ticket.id] = ticket

    async def drain(self) -> None:
        """Refuse new work; let accepted work finish (up to drain_timeout), then fail what is left."""
        self.draining = True
        self.batcher.close()
        if self.batcher.idle:
            return
        log.info(
            "draining: %d queued, %d running image(s)",
            self.batcher.queued_images,
            self.batcher.inflight_images,
        )
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout)
        except TimeoutError:
            lost = ShuttingDown("the server shut down before this request finished")
            kept = ShuttingDown(
                "the server stopped before this job finished; it runs again, with the same id, when the server "
                "starts again on its data dir"
            )
            durable = self.durable
            self.batcher.fail_all(lambda t: kept if durable is not None and durable.holds(t) else lost)

    async def stop(self) -> None:
        await self.drain()
        if self.webhooks is not None:
            # Jobs that ended while draining tell their receivers now, not at the next start (if there is one).
            await self.webhooks.close(grace=10.0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close()
        log.info("stopped")

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        return self.pool.readiness()

    # ---- requests ---------------------------------------------------------------------------------

    def submit(
        self,
        request: GenerateRequest,
        *,
        keep: bool = False,
        client: str | None = None,
        owner: str | None = None,
        dialect: Dialect = NATIVE,
        webhook_url: str = "",
        base_url: str = "",
    ) -> Ticket:
        """Queue a request; `keep` makes it a job readable by id until `job_ttl` after it ends, and durable
        (on disk before this returns) where there is a data dir. A kept job may have a `webhook_url` (checked by
        the caller with `check_webhook`); `base_url` is where it was asked for, for its images' links.

        `client` (an API key's fingerprint or an address) is charged the request's cost against --rate-limit.
        `owner` (default: the client) owns the job and its images, and is the tenant the queue is fair to.
        `dialect`: the front end's field names and status, for the refusals made here.
        """
        if self.pool.usable_devices == 0:
            raise Unavailable(f"no worker can serve: {self.pool.readiness()[1]}")
        if client is not None:
            cost = self.model.cost(request.width, request.height, request.steps, request.n)
            if not self.limiter.fits(cost):
                raise InvalidRequest(
                    f"this request costs {cost:.1f} images' worth ({request.n} x {request.width}x{request.height} at "
                    f"{request.steps} steps, against {self.model.width}x{self.model.height} at 25), more than "
                    f"--rate-limit allows in a minute ({self.limiter.capacity:g}); ask for fewer, smaller or "
                    "shorter images",
                    param=dialect.name("n"),
                    code="over_rate_limit",
                    status=dialect.status,
                )
            self.limiter.take(client, cost)
        try:
            ticket = self.batcher.submit(request, owner=owner or client)
        except MuseError:
            if client is not None:
                self.limiter.refund(client, cost)  # refused (queue full, shutting down): nothing was spent
            raise
        if keep:
            self._keep(ticket)
            if self.durable is not None:
                try:
                    self.durable.record(ticket, webhook_url=webhook_url, base_url=base_url)
                except Exception:
                    log.exception("could not record job %s", ticket.id)
                    self.batcher.cancel(ticket, Unavailable("the job could not be recorded on disk"))
                    self.jobs.pop(ticket.id, None)
                    raise Unavailable("the job could not be recorded on disk; retry later") from None
        return ticket

    async def check_webhook(self, url: str) -> None:
        """Refuse (422 naming webhook_url) a webhook no delivery could reach, or any where jobs are not kept."""
        if self.webhooks is None:
            raise InvalidRequest(
                "webhook_url: this server keeps no jobs on disk (--no-gallery), so it sends no webhooks",
                param="webhook_url",
            )
        await self.webhooks.check(url)

    def _keep(self, ticket: Ticket) -> None:
        """Jobs stay readable for --job-ttl after they end, but at most MAX_KEPT_JOBS of them: a flood of
        requests that end at once (cancelled, expired) must not grow the table without bound."""
        for job_id in evictable(self.jobs, len(self.jobs) - MAX_KEPT_JOBS + 1):
            self._drop_job(job_id)
        self.jobs[ticket.id] = ticket

    def _drop_later(self, ticket: Ticket) -> None:
        """An ended job goes --job-ttl after it ended."""
        expires = (ticket.finished or time.time()) + self.settings.job_ttl - time.time()
        asyncio.get_running_loop().call_later(max(0.0, expires), self._drop_job, ticket.id)

    def _drop_job(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        if self.durable is not None:
            try:
                self.durable.forget(job_id)
            except Exception:
                log.exception("could not forget job %s", job_id)

    def job(self, job_id: str, viewer: Viewer = EVERYONE) -> Ticket:
        """A kept job by id; 404 if unknown, expired, or not the viewer's to see."""
        ticket = self.jobs.get(job_id)
        if ticket is None or not viewer.sees(ticket.owner):
            raise NotFound(f"no job {job_id!r} (unknown, or finished more than the job TTL ago)", param="id")
        return ticket

    def cancel(self, job: Ticket | str, error: MuseError | None = None, viewer: Viewer = EVERYONE) -> Ticket:
        """End a job now (by ticket, or by id: 404 if unknown or not the viewer's); a queued one never reaches
        a worker, a running batch whose requests are all gone stops at the next step. Ended jobs stay as they
        were."""
        ticket = self.job(job, viewer) if isinstance(job, str) else job
        self.batcher.cancel(ticket, error)
        return ticket

    def position(self, ticket: Ticket) -> int | None:
        """Images queued ahead of this job; None once it left the queue."""
        return self.batcher.position(ticket)

    def eta(self, ticket: Ticket) -> float | None:
        """Seconds until this job is done, from measured speeds; None while nothing is measured."""
        return self.batcher.eta(ticket)

    def active(self, owner: str | None = None) -> list[Ticket]:
        """Unfinished jobs, running ones first (oldest first), then queued; only `owner`'s when given."""
        return [t for t in self.batcher.active() if owner is None or t.owner == owner]

    def watch(self, ticket: Ticket, listener: Listener) -> Callable[[], None]:
        """Hear the job's events (queued, running, progress, its end); returns the unwatch function."""
        return ticket.watch(listener)

    # ---- internals --------------------------------------------------------------------------------

    def _finished(self, ticket: Ticket) -> None:
        if ticket.state is TicketState.SUCCEEDED and ticket.result is not None and self.gallery is not None:
            # Stored before the answer goes out, so a link to it works at once. Small local writes
            # (file + rename, a WAL commit without fsync) cost far less than a denoising step.
            try:
                ticket.saved = self.gallery.save(
                    ticket.result, model_scheduler=self._model.scheduler, owner=ticket.owner or ""
                )
            except Exception:
                log.exception("could not store the images of request %s", ticket.id)
        if self.durable is not None:
            try:
                self.durable.ended(ticket)
            except Exception:
                log.exception("could not record the end of job %s", ticket.id)
        m = self.metrics
        m.requests.labels(ticket.error.code if ticket.error else ticket.state.value).inc()
        if ticket.state is TicketState.SUCCEEDED and ticket.result is not None:
            t = ticket.result.timings
            m.images.inc(len(ticket.result.images))
            m.queue_seconds.observe(t.queued_ms / 1000)
            m.compute_seconds.observe(t.compute_ms / 1000)
            m.total_seconds.observe(t.total_ms / 1000)
        if ticket.id in self.jobs:
            self._drop_later(ticket)

    def _occupancy(self) -> float:
        running, capacity = self.pool.image_use()
        return running / capacity if capacity else 0.0

    def _register_gauges(self) -> None:
        m, b = self.metrics, self.batcher
        m.gauge("muse_queue_images", "Images waiting in the queue", lambda: b.queued_images)
        m.gauge("muse_inflight_images", "Images running on workers", lambda: b.inflight_images)
        m.gauge("muse_autoscaler_target", "Workers the autoscaler wants", lambda: self.pool.target)
        m.labelled_gauge("muse_workers", "Workers by state", "state", self.pool.counts)
        m.labelled_gauge("muse_workers_by_node", "Live workers by the node they run on", "node", self.pool.nodes)
        m.gauge("muse_slot_occupancy", "Images running / images the ready workers can run at once", self._occupancy)
        m.counter_function("muse_unet_calls", "UNet calls made by step workers", lambda: self.pool.unet_calls)
        hooks = self.webhooks
        if hooks is not None:
            m.gauge("muse_webhook_outbox", "Webhook events not yet delivered", hooks.store.pending)
            m.counter_function("muse_webhook_deliveries", "Webhook events delivered (2xx)", lambda: hooks.delivered)
            m.counter_function(
                "muse_webhook_failed_attempts",
                "Webhook attempts that failed (retried later)",
                lambda: hooks.failed_attempts,
            )
        m.counter_function(
            "muse_step_gap_seconds",
            "Seconds step workers spent between UNet calls while images waited (text encoding, decoding, "
            "pipe writes): divided by muse_unet_calls_total, the device's idle time per step under load",
            lambda: self.pool.step_gap_s,
        )
