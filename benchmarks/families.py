"""A transformer family (FLUX.1 by default) served on the step engine: against the direct pipeline, a short request
joining a long one, and whole-call batching under mixed steps, in one run.

    python benchmarks/families.py [--model FOLDER | --family flux|sd3] [--size 128] [--batch 8] [--duration 20]
                                  [--device cuda:0]
    python benchmarks/families.py --quick        # a few minutes

Without --model, a tiny random pipeline of --family is built (muse.demo_model.families). Phases:
1. direct: the pipeline in a loop at batch B, 28 steps, in this process (as many threads as one worker);
2. served closed loop: `muse serve --max-batch-size B` with 2B clients of 28-step requests; served ÷ direct;
3. admission: a 4-step request's latency alone (median of 5), and arriving while a 28-step request runs
   (median of 5 tries); the ratio is what joining costs it (target ≤ 1.5);
4. open loop, half 4 and half 28 steps (guidance 2-7), Poisson arrivals at --load x the mix's capacity (the
   direct rate scaled to the mean steps): step batching against `--batching request` on the same arrivals;
5. direct again: ratios use the mean of the two direct runs (the machine drifts).
Prints a table, writes benchmarks/results/families.json and .png. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, DirectPipeline, muse_server, write_report
from load import percentile, run_level
from openloop import open_loop

LONG, SHORT = 28, 4


def tiny(family: str) -> str:
    from muse.demo_model.families import build

    return str(build(family, Path(tempfile.mkdtemp(prefix=f"muse-bench-{family}-")) / "pipeline"))


def latency(url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    response = httpx.post(url + "/api/generate", json=body, timeout=600)
    response.raise_for_status()
    return (time.perf_counter() - start) * 1000


def joining(url: str, short: dict[str, Any], long: dict[str, Any]) -> float:
    """The short request's latency, sent once a long one is a few steps into its run."""
    job = httpx.post(url + "/api/jobs", json=long, timeout=30).json()["id"]
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{url}/api/jobs/{job}", timeout=30).json()).get("step") is None or status["step"] < 2:
        if time.monotonic() > deadline or status["status"] not in ("queued", "running"):
            raise RuntimeError(f"the long request never ran: {status}")
        time.sleep(0.005)  # polling another process's progress; nothing to wait on instead
    took = latency(url, short)
    still = httpx.get(f"{url}/api/jobs/{job}", timeout=30).json()["status"]
    while still in ("queued", "running"):  # let it finish before the next try
        time.sleep(0.05)
        still = httpx.get(f"{url}/api/jobs/{job}", timeout=30).json()["status"]
    if still != "succeeded":
        raise RuntimeError(f"the long request ended {still}")
    return took


def window(
    url: str, rate: float, duration: float, size: int, mix_steps: tuple[int, int], seed: int = 0
) -> dict[str, Any]:
    raw = asyncio.run(
        open_loop(url, "/api/generate", rate, duration, 3.0, LONG, True, size, seed=seed, mix_steps=mix_steps)
    )
    lat = raw["latencies_ms"]
    return {
        "rate": round(rate, 3),
        "completed": len(lat),
        "sent": raw["sent"],
        "errors": raw["errors"],
        "throughput": round(raw["images"] / raw["seconds"], 3),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a pipeline folder (default: a tiny random one of --family)")
    parser.add_argument("--family", default="flux", choices=["flux", "sd3"])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--device", default="cpu", help="where the direct pipeline and the served worker run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    parser.add_argument("--load", type=float, default=0.7, help="open-loop rate, x the mix's capacity")
    parser.add_argument("--tries", type=int, default=5, help="latencies measured for each admission median")
    parser.add_argument("--quick", action="store_true", help="8 s phases, 3 tries")
    parser.add_argument("--out", default=str(RESULTS / "families"))
    args = parser.parse_args()
    duration, tries = (8.0, 3) if args.quick else (args.duration, args.tries)
    model = args.model or tiny(args.family)
    threads = os.cpu_count() or 1
    size = {"width": args.size, "height": args.size}
    long = {"prompt": "a lighthouse on a cliff", "steps": LONG, "seed": 1, **size}
    short = {"prompt": "a red circle", "steps": SHORT, "seed": 2, **size}

    direct = DirectPipeline(model, threads, args.device)
    before = direct.throughput(args.batch, LONG, duration, args.size)
    print(f"direct batch {args.batch}: {before:.3f} images/s")
    flags = ["--model", model, "--devices", args.device, "--max-batch-size", str(args.batch)]
    report: dict[str, Any] = {
        "config": {
            "model": args.model or f"tiny random {args.family}",
            "size": args.size,
            "batch": args.batch,
            "duration_s": duration,
            "threads": threads,
            "cpu": os.cpu_count(),
            "device": args.device,
        },
        "direct_before": round(before, 3),
    }
    with muse_server(*flags) as served:
        clients = 2 * args.batch
        level = asyncio.run(run_level(served.url, clients, duration, long, warmup=3.0))
        report["served"] = {"clients": clients, "throughput": round(level.throughput, 3), "p50_ms": level.p50_ms}
        alone = [latency(served.url, short | {"seed": i}) for i in range(tries)]
        joined = [joining(served.url, short | {"seed": i}, long | {"seed": 100 + i}) for i in range(tries)]
        long_alone = statistics.median(latency(served.url, long | {"seed": i}) for i in range(tries))
        report["admission"] = {
            "short_alone_ms": round(statistics.median(alone), 1),
            "short_joining_ms": round(statistics.median(joined), 1),
            "long_alone_ms": round(long_alone, 1),
        }
    # The mix's capacity: the direct rate at 28 steps, scaled to the mix's mean steps.
    capacity = before * LONG / ((LONG + SHORT) / 2)
    rate = args.load * capacity
    report["open_loop"] = {"load": args.load, "capacity": round(capacity, 3)}
    for system, extra in (("step", []), ("request", ["--batching", "request"])):
        with muse_server(*flags, *extra) as served:
            report["open_loop"][system] = window(served.url, rate, duration, args.size, (SHORT, LONG))
    after = direct.throughput(args.batch, LONG, duration, args.size)
    report["direct_after"] = round(after, 3)
    mean_direct = (before + after) / 2
    admission = report["admission"]
    report["ratio_served_over_direct"] = round(report["served"]["throughput"] / mean_direct, 3)
    report["ratio_joining_over_alone"] = round(admission["short_joining_ms"] / admission["short_alone_ms"], 3)
    step, request = report["open_loop"]["step"], report["open_loop"]["request"]
    if step["p99_ms"] and request["p99_ms"]:
        report["open_loop"]["p50_step_over_request"] = round(step["p50_ms"] / request["p50_ms"], 3)
        report["open_loop"]["p99_step_over_request"] = round(step["p99_ms"] / request["p99_ms"], 3)
    print_table(report)
    write_report(report, Path(args.out), plot)


def print_table(report: dict[str, Any]) -> None:
    a, o = report["admission"], report["open_loop"]
    print(f"\n{report['config']['model']}, {report['config']['size']} px, batch {report['config']['batch']}")
    print(f"direct {report['direct_before']:.3f} / {report['direct_after']:.3f} img/s; served {report['served']}")
    print(f"served / direct                 {report['ratio_served_over_direct']:.3f}  (target >= 0.95)")
    ratio = report["ratio_joining_over_alone"]
    print(f"{SHORT}-step alone / joining {LONG}-step  {a['short_alone_ms']:.0f} / {a['short_joining_ms']:.0f} ms")
    print(f"  = {ratio:.2f}  (target <= 1.5; {LONG} steps alone {a['long_alone_ms']:.0f} ms)")
    print(f"open loop {SHORT}/{LONG} steps at {o['load']} x {o['capacity']:.2f} img/s:")
    for system in ("step", "request"):
        row = o[system]
        latencies = f"p50 {row['p50_ms'] or 0:9.0f}  p99 {row['p99_ms'] or 0:9.0f}"
        done = f"{row['completed']}/{row['sent']} {row['errors']}"
        print(f"  {system:8} {latencies}  {row['throughput']:.2f} img/s  {done}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["served ÷ direct", "joining ÷ alone"], [report["ratio_served_over_direct"],
             report["ratio_joining_over_alone"]], color=["#3a7", "#37a"])  # fmt: skip
    left.axhline(1.0, color="#999", lw=0.8)
    left.set_title(report["config"]["model"])
    o = report["open_loop"]
    systems = ["step", "request"]
    x = range(len(systems))
    right.bar([i - 0.2 for i in x], [o[s]["p50_ms"] or 0 for s in systems], width=0.4, label="p50")
    right.bar([i + 0.2 for i in x], [o[s]["p99_ms"] or 0 for s in systems], width=0.4, label="p99")
    right.set_xticks(list(x), [f"--batching {s}" for s in systems])
    right.set_ylabel("ms")
    right.set_title(f"open loop {SHORT}/{LONG} steps at {o['load']} x capacity")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
