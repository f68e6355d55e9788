"""Closed-loop load generator: C clients, each sending its next request as soon as the last one ends.

    python benchmarks/load.py URL [--concurrency 1,4,16] [--duration 20] [--steps 25]

Per level: completed, errors by status, throughput (images/s), p50/p90/p99 latency. Loopback only;
every level is bounded in time (and optionally in count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float
    completed: int
    images: int
    errors: dict[str, int] = field(default_factory=dict)
    throughput: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    batch_sizes: dict[int, int] = field(default_factory=dict)
    # Medians of what Muse reports in each answer's "timings" (None for servers that do not):
    # client latency minus server total is HTTP + JSON; total minus queued + compute is the pipe.
    server_queued_p50_ms: float | None = None
    server_compute_p50_ms: float | None = None
    server_total_p50_ms: float | None = None


def poisson(rate: float, count: int, seed: int) -> list[float]:
    """`count` arrival times (seconds from 0) of a Poisson process at `rate` per second."""
    rng = random.Random(seed)
    clock, times = 0.0, []
    for _ in range(count):
        clock += rng.expovariate(rate)
        times.append(clock)
    return times


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"refusing to load {host}: this generator only targets loopback")


async def run_level(
    url: str,
    concurrency: int,
    duration: float,
    body: dict[str, Any] | Callable[[int], dict[str, Any]],
    *,
    max_requests: int | None = None,
    path: str = "/api/generate",
    warmup: float = 0.0,
) -> LevelResult:
    """Clients send back to back; after `warmup` seconds (the pipeline filling up, not counted) the
    window of `duration` seconds opens, and only completions inside it count. `body` may be a function of the
    request's number (a mix of bodies)."""
    check_loopback(url)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    batches: Counter[int] = Counter()
    timings: dict[str, list[float]] = {"queued_ms": [], "compute_ms": [], "total_ms": []}
    images = 0
    sent = 0
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    timeout = httpx.Timeout(duration + 600, connect=60)
    start = time.perf_counter() + warmup
    end = start + duration

    async def client_loop(http: httpx.AsyncClient) -> None:
        nonlocal images, sent
        while time.perf_counter() < end and (max_requests is None or sent < max_requests):
            sent += 1
            t0 = time.perf_counter()
            try:
                response = await http.post(path, json=body(sent) if callable(body) else body)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            t1 = time.perf_counter()
            if t1 > end:
                break
            counted = t1 >= start  # completions during the warm-up are not measured
            if response.status_code == 200:
                if counted:
                    data = response.json()
                    latencies.append((t1 - t0) * 1000)
                    images += len(data.get("images", []))
                    batches[int(data.get("batch_size", 0))] += 1
                    for name, values in timings.items():
                        if name in data.get("timings", {}):
                            values.append(float(data["timings"][name]))
                continue
            if counted:
                errors[str(response.status_code)] += 1
            retry_after = response.headers.get("retry-after", "")
            if response.status_code in (429, 503) and retry_after.isdigit():
                # A well-behaved client waits as told instead of hammering a full queue, warm-up or not.
                await asyncio.sleep(min(float(retry_after), max(0.0, end - time.perf_counter())))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        tasks = [asyncio.create_task(client_loop(http)) for _ in range(concurrency)]
        await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()) + 0.05)
        # Requests still in flight when the window closes are abandoned (their connections close),
        # rather than waited out: a deep queue would otherwise take minutes to drain.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = max(1e-9, min(time.perf_counter(), end) - start)
    return LevelResult(
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        completed=len(latencies),
        images=images,
        errors=dict(errors),
        throughput=round(images / elapsed, 3) if elapsed > 0 else 0.0,
        p50_ms=_r(percentile(latencies, 50)),
        p90_ms=_r(percentile(latencies, 90)),
        p99_ms=_r(percentile(latencies, 99)),
        batch_sizes=dict(sorted(batches.items())),
        server_queued_p50_ms=_r(percentile(timings["queued_ms"], 50)),
        server_compute_p50_ms=_r(percentile(timings["compute_ms"], 50)),
        server_total_p50_ms=_r(percentile(timings["total_ms"], 50)),
    )


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def print_table(rows: list[LevelResult], title: str = "") -> None:
    if title:
        print(title)
    print(f"{'clients':>8} {'done':>6} {'img/s':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}  errors")
    for r in rows:
        print(
            f"{r.concurrency:>8} {r.completed:>6} {r.throughput:>8.2f} {r.p50_ms or 0:>9.1f} "
            f"{r.p90_ms or 0:>9.1f} {r.p99_ms or 0:>9.1f}  {r.errors or ''}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--concurrency", default="1,4,16,64,256,1000")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds per level before counting")
    parser.add_argument("--max-requests", type=int, default=None, help="cap per level")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()
    body = {"prompt": args.prompt, "steps": args.steps}
    rows = [
        asyncio.run(
            run_level(args.url, int(c), args.duration, body, max_requests=args.max_requests, warmup=args.warmup)
        )
        for c in args.concurrency.split(",")
    ]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=2)


if __name__ == "__main__":
    main()
