"""Chaos: N requests from C clients while a worker is SIGKILLed every few seconds.

    python benchmarks/chaos.py [--requests 500] [--clients 32] [--kill-every 3] [--devices cpu,cpu]

Every request must end with an answer: an image, or an error with a reason. Prints sent, succeeded,
failed by reason, lost (no answer before the client's deadline: must be 0), crossed answers (an
answer carrying another request's seed: must be 0), server-side outcomes (each accepted request
counted exactly once), and p50/p99 latency. Writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, child_processes, muse_server
from load import check_loopback, percentile

from muse.config import EMBEDDED_MODEL


def worker_pids(server_pid: int) -> list[int]:
    """The server's multiprocessing spawn workers (not its resource tracker)."""
    return [pid for pid, cmdline in child_processes(server_pid) if b"spawn_main" in cmdline]


async def chaos(url: str, server_pid: int, args: argparse.Namespace) -> dict:
    check_loopback(url)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    crossed = lost = 0
    kills = 0
    next_request = 0
    done = asyncio.Event()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_request, crossed, lost
        while next_request < args.requests:
            seed = next_request
            next_request += 1
            body = {"prompt": f"a red circle {seed}", "seed": seed, "steps": args.steps}
            t0 = time.perf_counter()
            try:
                response = await http.post("/api/generate", json=body)
            except httpx.TimeoutException:
                lost += 1
                continue
            except httpx.HTTPError as exc:
                outcomes[f"transport:{type(exc).__name__}"] += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            if response.status_code == 200:
                if response.json()["images"][0]["seed"] != seed:
                    crossed += 1
                outcomes["succeeded"] += 1
            else:
                outcomes[f"{response.status_code}:{response.json()['error']['code']}"] += 1

    async def killer() -> None:
        nonlocal kills
        rng = random.Random(0)
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), args.kill_every)
            except TimeoutError:
                pids = worker_pids(server_pid)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1

    timeout = httpx.Timeout(args.client_timeout, connect=30)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        done.set()
        await kill_task
        metrics = (await http.get("/metrics")).text
    elapsed = time.perf_counter() - start
    server_outcomes = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("muse_requests_total{")
    }
    answered = sum(outcomes.values())
    return {
        "sent": args.requests,
        "answered": answered,
        "succeeded": outcomes["succeeded"],
        "failed": {k: v for k, v in outcomes.items() if k != "succeeded"},
        "lost": lost,
        "crossed_answers": crossed,
        "server_outcomes": server_outcomes,
        "server_outcomes_total": sum(server_outcomes.values()),
        "kills": kills,
        "retried_batches": _metric(metrics, "muse_batches_retried_total"),
        "elapsed_s": round(elapsed, 1),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies) if latencies else None,
    }


def _metric(text: str, name: str) -> float:
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs")
    parser.add_argument("--devices", default="cpu,cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--client-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(RESULTS / "chaos.json"))
    args = parser.parse_args()
    flags = ["--model", args.model, "--devices", args.devices, "--max-queue", str(max(256, args.clients * 2))]
    with muse_server(*flags) as served:
        report = asyncio.run(chaos(served.url, served.process.pid, args))
    for key in (
        "sent",
        "answered",
        "succeeded",
        "failed",
        "lost",
        "crossed_answers",
        "server_outcomes_total",
        "kills",
        "retried_batches",
        "p50_ms",
        "p99_ms",
    ):
        value = report[key]
        print(f"{key:<24} {round(value, 1) if isinstance(value, float) else value}")
    ok = report["lost"] == 0 and report["crossed_answers"] == 0 and report["answered"] == report["sent"]
    print("verdict:", "every request answered exactly once" if ok else "FAILED: lost or crossed answers")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
