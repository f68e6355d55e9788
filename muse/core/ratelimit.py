"""A token bucket per client: `rate` images per minute, bursting up to one minute's worth."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from muse.errors import RateLimited

# Forget idle clients so the table cannot grow without bound.
MAX_CLIENTS = 10_000


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = per_minute
        self.per_second = per_minute / 60
        self.clock = clock
        self.buckets: dict[str, Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _bucket(self, client: str) -> Bucket:
        now = self.clock()
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= MAX_CLIENTS:
                self._forget_full(now)
            bucket = self.buckets[client] = Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        return bucket

    def _forget_full(self, now: float) -> None:
        for client, b in list(self.buckets.items()):
            if b.tokens + (now - b.updated) * self.per_second >= self.capacity:
                del self.buckets[client]

    def take(self, client: str, images: int) -> tuple[int, float]:
        """Spend `images` tokens or raise RateLimited. Returns (remaining, seconds until full)."""
        if not self.enabled:
            return 0, 0.0
        bucket = self._bucket(client)
        if bucket.tokens < images:
            wait = (images - bucket.tokens) / self.per_second
            raise RateLimited(
                f"rate limit of {self.capacity:g} images per minute reached; retry in {wait:.0f} s",
                limit=int(self.capacity),
                remaining=int(bucket.tokens),
                reset_s=wait,
            )
        bucket.tokens -= images
        return int(bucket.tokens), (self.capacity - bucket.tokens) / self.per_second
