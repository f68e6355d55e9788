"""A token bucket per client: `rate` images' worth of cost per minute, bursting up to one minute's worth.

Cost is counted in native-size, 25-step images (ModelInfo.cost), so a 150-step request at twice the
side costs 24 of them: what a client may ask for is bounded by the work it causes, not by its count.
"""

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

    def fits(self, cost: float) -> bool:
        """Whether a request of this cost can ever pass (a full bucket holds one minute's worth)."""
        return not self.enabled or cost <= self.capacity

    def refund(self, client: str, cost: float) -> None:
        if self.enabled and client in self.buckets:
            bucket = self.buckets[client]
            bucket.tokens = min(self.capacity, bucket.tokens + cost)

    def take(self, client: str, cost: float) -> tuple[int, float]:
        """Spend `cost` tokens or raise RateLimited. Returns (remaining, seconds until full)."""
        if not self.enabled:
            return 0, 0.0
        bucket = self._bucket(client)
        if bucket.tokens < cost:
            wait = (cost - bucket.tokens) / self.per_second
            raise RateLimited(
                f"rate limit of {self.capacity:g} images per minute reached; retry in {wait:.0f} s",
                limit=int(self.capacity),
                remaining=int(bucket.tokens),
                reset_s=wait,
            )
        bucket.tokens -= cost
        return int(bucket.tokens), (self.capacity - bucket.tokens) / self.per_second
