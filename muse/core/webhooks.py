"""Webhooks (Standard Webhooks, https://www.standardwebhooks.com): a job's end, POSTed to its `webhook_url`.

Delivery is at least once. Events wait in the job store's outbox (written with the job's end, so they survive
a crash) until a receiver answers 2xx (delivered) or 410 (it wants no more), or --webhook-retry-for has passed.
Between attempts the gap doubles from --webhook-first-retry with jitter, at most 30 times that gap during the
first 1,800 gaps' time (2 s: a minute, for an hour, so a receiver back from a short outage hears within a
minute) and 1,800 times it later (2 s: an hour). Every attempt of one event carries the same `webhook-id`.

The payload is made at each attempt from the job's row: its image links are signed then, so a delivery that
comes hours late still carries links that work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from muse.core.destinations import Allowlist, Refused, Resolver, check, post, system_resolver
from muse.core.jobcodec import error_from_json
from muse.core.jobstore import Event, JobStore, StoredJob
from muse.errors import InvalidRequest
from muse.links import LinkSigner

log = logging.getLogger("muse.core.webhooks")

SECRET_FILE = "webhook-secret"
PREFIX = "whsec_"
TIMEOUT_S = 10.0
CONCURRENCY = 8


def parse_secret(secret: str) -> bytes:
    """The key inside `whsec_<base64>`; ValueError for anything else."""
    if not secret.startswith(PREFIX):
        raise ValueError("a webhook secret starts with whsec_ (muse webhook-secret prints one)")
    try:
        key = base64.b64decode(secret.removeprefix(PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret holds 24 to 64 bytes")
    return key


def load_secret(data_dir: Path) -> str:
    """The data dir's webhook secret, made once (readable by its owner only) on first use."""
    path = Path(data_dir) / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: theirs stands
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


def sign(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def gap(attempts: int, age: float, first: float, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt, after `attempts` failed ones of an event `age` seconds old."""
    cap = first * 30 if age < first * 1800 else first * 1800
    # Jitter within the top quarter: receivers coming back are not hit by every sender at once, and each gap
    # still grows (x1.5 at least) until the cap.
    jitter = (rng or random).uniform(0.75, 1.0)
    return min(cap, first * 2 ** min(attempts - 1, 40)) * jitter


class Webhooks:
    def __init__(
        self,
        store: JobStore,
        *,
        secret: str,
        allow: Allowlist,
        links: LinkSigner,
        public_url: str = "",
        retry_for: float = 86400.0,
        first_retry: float = 2.0,
        job_ttl: float = 600.0,
        timeout: float = TIMEOUT_S,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.store = store
        self.key = parse_secret(secret)
        self.allow = allow
        self.links = links
        self.public_url = public_url.rstrip("/")
        self.retry_for = retry_for
        self.first_retry = first_retry
        self.job_ttl = job_ttl
        self.timeout = timeout
        self.resolver = resolver
        self.delivered = 0
        self.failed_attempts = 0
        self._wake = asyncio.Event()
        self._sending: dict[str, asyncio.Task[None]] = {}

    async def check(self, url: str) -> None:
        """Refuse, as a 422 naming webhook_url, a destination no delivery would be sent to."""
        try:
            await check(url, self.allow, self.resolver)
        except Refused as exc:
            raise InvalidRequest(f"webhook_url: {exc}", param="webhook_url") from None

    def poke(self, event: Event | None = None) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver what is due, forever (the service cancels it when it stops)."""
        while True:
            self._wake.clear()
            self._start_due()
            await self._sleep()

    async def close(self, grace: float) -> None:
        """One last round for what is due now, bounded by `grace`; whatever is left waits in the outbox for the
        next start."""
        self._start_due()
        if self._sending:
            await asyncio.wait(list(self._sending.values()), timeout=grace)
        for task in list(self._sending.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start_due(self) -> None:
        for event in self.store.due(time.time(), limit=CONCURRENCY + len(self._sending)):
            if event.id not in self._sending and len(self._sending) < CONCURRENCY:
                self._sending[event.id] = asyncio.create_task(self._attempt(event), name=f"webhook-{event.id}")

    async def _sleep(self) -> None:
        upcoming = [e for e in self.store.due(float("inf"), limit=len(self._sending) + 1) if e.id not in self._sending]
        wait = 60.0 if not upcoming else max(0.0, min(60.0, upcoming[0].next_at - time.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait)

    async def _attempt(self, event: Event) -> None:
        try:
            job = self.store.job(event.job_id)
            if job is None:
                log.warning("webhook %s: its job %s is gone; dropped", event.id, event.job_id)
                self.store.settled(event, time.time() - self.job_ttl)
                return
            body = json.dumps(self.payload(event, job)).encode()
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": event.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.key, event.id, timestamp, body),
            }
            sent = await post(event.url, body, headers, allow=self.allow, timeout=self.timeout, resolver=self.resolver)
            self._after(event, sent.status, sent.error, sent.delivered)
        except Exception:
            log.exception("webhook %s: delivery failed unexpectedly", event.id)
            self._after(event, None, "internal error", False)
        finally:
            self._sending.pop(event.id, None)
            self._wake.set()

    def _after(self, event: Event, status: int | None, error: str, delivered: bool) -> None:
        now = time.time()
        if delivered or status == 410:
            if status == 410:
                log.info("webhook %s: the receiver answered 410 Gone; not sent again", event.id)
            self.delivered += delivered
            self.store.settled(event, now - self.job_ttl)
            return
        self.failed_attempts += 1
        why = error or f"HTTP {status}"
        age = now - event.created
        wait = gap(event.attempts + 1, age, self.first_retry)
        if age + wait > self.retry_for:
            log.warning(
                "webhook %s (%s of job %s) to %s: given up after %d attempts over %.0f s (last: %s)",
                event.id,
                event.type,
                event.job_id,
                event.url,
                event.attempts + 1,
                age,
                why,
            )
            self.store.settled(event, now - self.job_ttl)
            return
        log.info("webhook %s: attempt %d failed (%s); next in %.1f s", event.id, event.attempts + 1, why, wait)
        self.store.retry(event, now + wait, why)

    def payload(self, event: Event, job: StoredJob) -> dict[str, Any]:
        request = job.request
        data: dict[str, Any] = {
            "id": job.id,
            "status": job.state,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "n": request.n,
            "steps": request.steps,
            "width": request.width,
            "height": request.height,
            "loras": [{"name": use.name, "scale": use.scale} for use in request.loras],
            "created": job.created,
            "ended": job.ended,
        }
        if job.result_json is not None:
            result = json.loads(job.result_json)
            base = self.public_url or job.base_url.rstrip("/")
            data["images"] = [
                {"url": base + self.links.sign(f"/gallery/{image_id}.png"), "seed": seed}
                for image_id, seed in zip(result["images"], result["seeds"], strict=False)
            ]
            data["timings"] = dict(zip(("queued_ms", "compute_ms", "total_ms"), result["timings"], strict=True))
        error = error_from_json(job.error_json)
        if error is not None:
            data["error"] = error.to_dict()["error"]
        return {
            "type": event.type,
            "timestamp": datetime.fromtimestamp(event.created, UTC).isoformat().replace("+00:00", "Z"),
            "data": data,
        }
