"""Chaos: N requests from C normal clients while hostile clients attack and a worker is SIGKILLed every few seconds.

    python benchmarks/chaos.py [--requests 500] [--clients 32] [--kill-every 3] [--devices cpu,cpu]
                               [--hostile 4] [--slow 200] [--server-kills 3] [--kill-jobs 60]

Every normal request must end with an answer: an image, or a documented retryable error (503 with
Retry-After). Hostile clients send, as fast as they are answered, requests over the cost limits,
malformed bodies (bad JSON, nesting past the recursion limit, wrong types, hostile field names, odd
sizes), and `--slow` connections that send half a request and stall. Prints normal requests sent,
succeeded, failed by reason, lost (no answer before the client's deadline: must be 0), duplicated
(an answer carrying another request's seed, or more server outcomes than requests: must be 0),
hostile answers by status (must hold no 5xx), slow connections cut off by the server, and p50/p99
latency. Then the server-kill round (benchmarks/server_kill.py): jobs with webhooks, the whole server
SIGKILLed `--server-kills` times while they run and started again on its data dir: jobs lost and webhook
events missing must be 0. Writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, child_processes, metric, muse_server
from load import check_loopback, percentile
from server_kill import server_kill_round

from muse.config import EMBEDDED_MODEL

HOSTILE_BODIES: list[tuple[str, bytes]] = [
    ("/api/generate", json.dumps({"prompt": "a", "width": 2048, "height": 2048, "n": 8, "steps": 150}).encode()),
    ("/api/generate", json.dumps({"prompt": "a", "steps": 10_000}).encode()),
    ("/api/generate", b"[" * 100_000 + b"]" * 100_000),
    ("/api/generate", b"{not json"),
    ("/api/generate", json.dumps({"prompt": ["a"], "seed": "7", "n": 1.5}).encode()),
    ("/api/jobs", json.dumps({"prompt": "a", "scheduler": "PNDM", "steps": 2}).encode()),
    ("/v1/images/generations", json.dumps({"prompt": "a", "size": "\u00b2x\u00b2"}).encode()),
    ("/v1/images/generations", json.dumps({"prompt": "a", "size": "1" * 5000 + "x64"}).encode()),
    ("/sdapi/v1/txt2img", json.dumps({"prompt": "a", "width": 4096, "height": 4096, "batch_size": 8}).encode()),
    ("/sdapi/v1/txt2img", json.dumps({"prompt": "a", "steps": 1, "a\nb": 1, "\u2603": 2}).encode()),
    ("/sdapi/v1/png-info", json.dumps({"image": "R0lGODlhAQABAAAAACw="}).encode()),
]


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

    hostile: Counter[str] = Counter()

    async def attacker(http: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(index)
        while not done.is_set():
            path, body = rng.choice(HOSTILE_BODIES)
            try:
                response = await http.post(path, content=body, headers={"content-type": "application/json"})
                hostile[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                hostile[f"transport:{type(exc).__name__}"] += 1

    slow_closed = 0

    async def slowloris() -> None:
        nonlocal slow_closed
        host, port = url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()
        sockets = []
        for i in range(args.slow):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, int(port)))
            half = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n" + b"\r\n{" * (i % 2)
            await loop.sock_sendall(sock, half)
            sockets.append(sock)

        async def cut_off(sock: socket.socket) -> bool:
            try:
                return await loop.sock_recv(sock, 1024) == b""
            except OSError:
                return True

        results = await asyncio.gather(*(asyncio.wait_for(cut_off(s), 60) for s in sockets), return_exceptions=True)
        slow_closed = sum(r is True for r in results)
        for sock in sockets:
            sock.close()

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
        attackers = [asyncio.create_task(attacker(http, i)) for i in range(args.hostile)]
        slow_task = asyncio.create_task(slowloris())
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        done.set()
        await asyncio.gather(kill_task, *attackers, slow_task)
        metrics = (await http.get("/metrics")).text
    elapsed = time.perf_counter() - start
    server_outcomes = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("muse_requests_total{")
    }
    answered = sum(outcomes.values())
    # Server outcomes count every accepted request once: the normal ones, and hostile ones that were valid.
    hostile_accepted = sum(v for k, v in hostile.items() if k in ("200", "202"))
    duplicated = crossed + max(0, round(sum(server_outcomes.values())) - args.requests - hostile_accepted)
    retryable = {k: v for k, v in outcomes.items() if k.startswith("503:")}
    return {
        "sent": args.requests,
        "answered": answered,
        "succeeded": outcomes["succeeded"],
        "failed": {k: v for k, v in outcomes.items() if k != "succeeded"},
        "failed_retryable": sum(retryable.values()),
        "lost": lost,
        "duplicated": duplicated,
        "crossed_answers": crossed,
        "hostile_by_status": dict(sorted(hostile.items())),
        "hostile_5xx": sum(v for k, v in hostile.items() if k.startswith("5")),
        "slow_connections": args.slow,
        "slow_cut_off": slow_closed,
        "server_outcomes": server_outcomes,
        "server_outcomes_total": sum(server_outcomes.values()),
        "kills": kills,
        "retried_batches": metric(metrics, "muse_batches_retried_total"),
        "elapsed_s": round(elapsed, 1),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": statistics.fmean(latencies) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs")
    parser.add_argument("--devices", default="cpu,cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hostile", type=int, default=4, help="hostile clients sending bad requests")
    parser.add_argument("--slow", type=int, default=200, help="connections that send half a request")
    parser.add_argument("--client-timeout", type=float, default=300.0)
    parser.add_argument("--server-kills", type=int, default=3, help="SIGKILLs of the whole server (0: no round)")
    parser.add_argument("--kill-jobs", type=int, default=60, help="jobs sent across the server-kill round")
    parser.add_argument("--out", default=str(RESULTS / "chaos.json"))
    args = parser.parse_args()
    flags = ["--model", args.model, "--devices", args.devices, "--max-queue", str(max(256, args.clients * 2))]
    flags += ["--header-timeout", "5", "--body-timeout", "5"]
    with muse_server(*flags) as served:
        report = asyncio.run(chaos(served.url, served.process.pid, args))
    if args.server_kills:
        report["server_kill"] = server_kill_round(
            args.model, args.devices, args.kill_jobs, args.server_kills, args.steps
        )
        for key, value in report["server_kill"].items():
            print(f"server kill: {key:<20} {value}")
    for key in (
        "sent",
        "answered",
        "succeeded",
        "failed",
        "failed_retryable",
        "lost",
        "duplicated",
        "crossed_answers",
        "hostile_by_status",
        "hostile_5xx",
        "slow_connections",
        "slow_cut_off",
        "server_outcomes_total",
        "kills",
        "retried_batches",
        "p50_ms",
        "p99_ms",
    ):
        value = report[key]
        print(f"{key:<24} {round(value, 1) if isinstance(value, float) else value}")
    normal_ok = report["succeeded"] + report["failed_retryable"] == report["sent"]
    ok = report["lost"] == 0 and report["duplicated"] == 0 and report["hostile_5xx"] == 0 and normal_ok
    kill = report.get("server_kill")
    if kill is not None:
        ok = ok and kill["lost"] == kill["webhooks_missing"] == kill["events_under_two_ids"] == 0
    print(
        "verdict:",
        "every normal request answered once (an image or a retryable 503); no 5xx from hostile input; no job or "
        "webhook lost to a server kill"
        if ok
        else "FAILED: lost, duplicated, non-retryable failures, a 5xx from hostile input, or a job or webhook lost "
        "to a server kill",
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
