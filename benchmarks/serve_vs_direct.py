"""Served throughput against the direct pipeline, in one run.

    python benchmarks/serve_vs_direct.py [--batch 8] [--clients 32] [--duration 30] [--quick]

1. direct: the pipeline in a loop at batch B (this process, same thread count as one worker);
2. served: `muse serve --devices cpu --max-batch-size B` with C closed-loop clients;
3. idle latency: one client, one image at a time, against one direct batch-1 call;
4. idle latency again, paired: a direct call and a served request alternate, so drift and other
   tenants' load hit both alike; the median of the per-pair differences is the overhead;
5. Muse's own overhead on one-step requests (so compute noise is small), split into the HTTP floor
   (GET /healthz with the same client), the server's part outside the worker and the rest;
6. direct again. The machine drifts, so ratios use the mean of the bracketing direct runs.

Prints a table, writes benchmarks/results/serve_vs_direct.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, DirectPipeline, muse_server
from load import run_level

from muse.config import EMBEDDED_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measured phase")
    parser.add_argument("--quick", action="store_true", help="10 s phases")
    parser.add_argument("--pairs", type=int, default=15, help="direct/served pairs for the idle latency")
    parser.add_argument("--out", default=str(RESULTS / "serve_vs_direct"))
    args = parser.parse_args()
    duration = 10.0 if args.quick else args.duration
    threads = os.cpu_count() or 1
    body = {"prompt": "a red circle on a blue background", "steps": args.steps}

    direct = DirectPipeline(args.model, threads)
    before = direct.throughput(args.batch, args.steps, duration)
    single = statistics.median(direct.run(1, args.steps, seed=i) for i in range(7)) * 1000
    print(f"direct batch {args.batch}: {before:.2f} images/s; batch 1: {single:.1f} ms")

    flags = ["--model", args.model, "--devices", "cpu", "--max-batch-size", str(args.batch)]
    flags += ["--threads-per-worker", str(threads), "--max-queue", str(max(256, args.clients * 4))]
    with muse_server(*flags) as served:
        url = served.url
        served = asyncio.run(run_level(url, args.clients, duration, body, warmup=8.0))
        idle = asyncio.run(run_level(url, 1, min(duration, 10.0), body, warmup=2.0))
        paired = paired_idle(direct, url, body, args.steps, pairs=args.pairs)
        overhead = overhead_breakdown(url, body)
    after = direct.throughput(args.batch, args.steps, duration)
    ceiling = (before + after) / 2

    ratio = served.throughput / ceiling
    idle_overhead = (idle.p50_ms or 0) - single
    print()
    print(f"{'system':<28} {'img/s':>8} {'p50 ms':>9} {'p99 ms':>9}")
    print(f"{'direct (before)':<28} {before:>8.2f}")
    print(
        f"{f'muse, {args.clients} clients':<28} {served.throughput:>8.2f} {served.p50_ms:>9.1f} {served.p99_ms:>9.1f}"
    )
    print(f"{'direct (after)':<28} {after:>8.2f}")
    print(f"{'muse, 1 client (idle)':<28} {idle.throughput:>8.2f} {idle.p50_ms:>9.1f} {idle.p99_ms:>9.1f}")
    print(f"\nserved / direct = {ratio:.3f}   (target >= 0.9)")
    print(f"idle latency: served p50 {idle.p50_ms:.1f} ms vs direct {single:.1f} ms (+{idle_overhead:.1f} ms)")
    print(
        f"  of which, as the server saw it: queued {idle.server_queued_p50_ms} ms, worker compute "
        f"{idle.server_compute_p50_ms} ms, total {idle.server_total_p50_ms} ms (p50s)"
    )
    print(
        f"paired idle latency ({len(paired['pairs'])} pairs): direct p50 {paired['direct_p50_ms']:.1f} ms, "
        f"served p50 {paired['served_p50_ms']:.1f} ms, median difference {paired['overhead_p50_ms']:+.1f} ms "
        f"(worker compute minus direct: {paired['compute_minus_direct_p50_ms']:+.1f} ms)"
    )
    print(
        f"overhead of a 1-step request (p50s): client latency minus worker compute {overhead['total_ms']:.2f} ms; "
        f"HTTP floor (GET /healthz) {overhead['http_floor_ms']:.2f} ms; inside the server, outside the worker "
        f"{overhead['server_ms']:.2f} ms"
    )
    print(f"batch sizes seen under load: {served.batch_sizes}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            "batch": args.batch,
            "clients": args.clients,
            "steps": args.steps,
            "duration_s": duration,
            "threads": threads,
            "model": args.model,
        },
        "direct_before": before,
        "direct_after": after,
        "direct_batch1_ms": single,
        "served": asdict(served),
        "idle": asdict(idle),
        "ratio_served_over_direct": ratio,
        "idle_overhead_ms": idle_overhead,
        "paired_idle": paired,
        "overhead_1_step": overhead,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def paired_idle(direct: DirectPipeline, url: str, body: dict[str, Any], steps: int, pairs: int) -> dict[str, Any]:
    """Alternate one direct batch-1 call and one served request (one image, nothing else running)."""
    rows = []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/api/generate", json=body).raise_for_status()  # the connection and batch-1 shapes
        for i in range(pairs):
            direct_ms = direct.run(1, steps, seed=i) * 1000
            start = time.perf_counter()
            response = client.post("/api/generate", json=body)
            served_ms = (time.perf_counter() - start) * 1000
            response.raise_for_status()
            compute_ms = float(response.json()["timings"]["compute_ms"])
            rows.append({"direct_ms": direct_ms, "served_ms": served_ms, "server_compute_ms": compute_ms})
    median = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "pairs": rows,
        "direct_p50_ms": median("direct_ms"),
        "served_p50_ms": median("served_ms"),
        "overhead_p50_ms": statistics.median(r["served_ms"] - r["direct_ms"] for r in rows),
        "compute_minus_direct_p50_ms": statistics.median(r["server_compute_ms"] - r["direct_ms"] for r in rows),
        "served_minus_compute_p50_ms": statistics.median(r["served_ms"] - r["server_compute_ms"] for r in rows),
    }


def overhead_breakdown(url: str, body: dict[str, Any], reps: int = 60) -> dict[str, float]:
    """Muse's own cost per request, measured where the pipeline call is short (1 step)."""
    one_step = {**body, "steps": 1}
    total, server, floor = [], [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(reps + 10):
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            middle = time.perf_counter()
            response = client.post("/api/generate", json=one_step)
            end = time.perf_counter()
            response.raise_for_status()
            timings = response.json()["timings"]
            if i >= 10:  # the first few pay for connection set-up and the new step count
                floor.append((middle - start) * 1000)
                total.append((end - middle) * 1000 - timings["compute_ms"])
                server.append(timings["total_ms"] - timings["compute_ms"])
    return {
        "total_ms": statistics.median(total),
        "http_floor_ms": statistics.median(floor),
        "server_ms": statistics.median(server),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["direct\n(before)", f"muse\n{report['config']['clients']} clients", "direct\n(after)"]
    values = [report["direct_before"], report["served"]["throughput"], report["direct_after"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, values, color=["#999", "#3a7", "#999"])
    ax.set_ylabel("images / s")
    ax.set_title(f"served / direct = {report['ratio_served_over_direct']:.2f} (batch {report['config']['batch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
