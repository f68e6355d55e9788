"""Muse against the direct pipeline, Muse without batching, and LitServe: one command, one run.

    python benchmarks/compare.py [--quick] [--out PATH]

Every system serves the same model at the same size and steps with one worker and the same torch
threads. Closed-loop clients (load.py) sweep the concurrency levels. The direct pipeline loop (the
ceiling) runs before and after each served system, and each system is compared with the mean of its
two brackets, since this machine drifts by ±15 % within minutes.

Prints a table, writes JSON ({"systems": …, "ratios": …}) and a PNG plot under benchmarks/results/.
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

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, DirectPipeline, litserve_server, muse_server
from load import LevelResult, run_level

from muse.config import EMBEDDED_MODEL

SYSTEMS = ("muse", "muse_nobatch", "litserve")


def sweep(
    url: str, levels: list[int], duration: float, warmup: float, body: dict[str, Any], path: str
) -> list[LevelResult]:
    rows = []
    for level in levels:
        # Each level runs `warmup` seconds before its window opens, so a batch cycle in flight
        # when the window opens does not count against the system.
        row = asyncio.run(run_level(url, level, duration, body, path=path, warmup=warmup))
        print(
            f"  {level:>5} clients: {row.throughput:6.2f} img/s  p50 {row.p50_ms or 0:8.1f} ms  "
            f"p99 {row.p99_ms or 0:8.1f} ms  errors {row.errors or '-'}",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer levels, shorter windows (< 5 minutes)")
    parser.add_argument("--out", default=str(RESULTS / "compare"), help="path without extension")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--levels", default=None, help="comma list (default 1,4,16,64,256,1000)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per level")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    args = parser.parse_args()
    levels = [int(x) for x in (args.levels or ("1,16,256" if args.quick else "1,4,16,64,256,1000")).split(",")]
    duration = args.duration or (10.0 if args.quick else 30.0)
    warmup = 4.0 if args.quick else 8.0
    threads = os.cpu_count() or 1
    body = {"prompt": "a red circle on a blue background", "steps": args.steps, "seed": 1}
    started = time.strftime("%Y-%m-%d %H:%M")

    direct = DirectPipeline(args.model, threads)
    single_ms = statistics.median(direct.run(1, args.steps, seed=i) for i in range(5)) * 1000
    direct_window = 8.0 if args.quick else 12.0
    directs = [direct.throughput(args.batch, args.steps, direct_window)]
    print(f"direct: batch {args.batch} {directs[-1]:.2f} img/s; one image {single_ms:.1f} ms", flush=True)

    common_flags = ["--model", args.model, "--devices", "cpu", "--threads-per-worker", str(threads)]
    servers = {
        "muse": lambda: muse_server(
            *common_flags, "--max-batch-size", str(args.batch), "--max-wait-ms", str(args.max_wait_ms)
        ),
        "muse_nobatch": lambda: muse_server(*common_flags, "--max-batch-size", "1"),
        "litserve": lambda: litserve_server(args.model, args.batch, args.max_wait_ms / 1000, threads),
    }
    paths = {"muse": "/api/generate", "muse_nobatch": "/api/generate", "litserve": "/predict"}
    systems: dict[str, Any] = {}
    for name in args.systems.split(","):
        print(f"{name}:", flush=True)
        with servers[name]() as served:
            rows = sweep(served.url, levels, duration, warmup, body, paths[name])
        directs.append(direct.throughput(args.batch, args.steps, direct_window))
        bracket = (directs[-2] + directs[-1]) / 2
        print(f"direct: {directs[-1]:.2f} img/s", flush=True)
        systems[name] = {
            "levels": [asdict(r) for r in rows],
            "direct_bracket": bracket,
            "peak": max(r.throughput for r in rows),
        }

    report = {
        "machine": machine(),
        "date": started,
        "config": {
            "model": args.model,
            "batch": args.batch,
            "max_wait_ms": args.max_wait_ms,
            "steps": args.steps,
            "levels": levels,
            "duration_s": duration,
            "threads": threads,
            "workers": 1,
        },
        "direct": {"throughputs": directs, "one_image_ms": single_ms},
        "systems": systems,
    }
    report["ratios"] = ratios(systems, single_ms)
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def ratios(systems: dict[str, Any], single_ms: float) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if "muse" in systems:
        muse = systems["muse"]
        r["muse_over_direct"] = muse["peak"] / muse["direct_bracket"]
        idle = muse["levels"][0]
        if idle["concurrency"] == 1 and idle["p50_ms"] is not None:
            r["idle_latency_overhead_ms"] = idle["p50_ms"] - single_ms
        for other in ("muse_nobatch", "litserve"):
            if other in systems:
                # Each against its own bracket, so drift between the runs cancels out.
                r[f"muse_over_{other.removeprefix('muse_')}"] = (muse["peak"] / muse["direct_bracket"]) / (
                    systems[other]["peak"] / systems[other]["direct_bracket"]
                )
        if "litserve" in systems:
            per_level = []
            for m, lit in zip(muse["levels"], systems["litserve"]["levels"], strict=True):
                per_level.append(
                    {
                        "concurrency": m["concurrency"],
                        "throughput_ratio": m["throughput"] / lit["throughput"] if lit["throughput"] else None,
                        "muse_p99_ms": m["p99_ms"],
                        "litserve_p99_ms": lit["p99_ms"],
                    }
                )
            r["muse_vs_litserve_per_level"] = per_level
    return r


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{os.cpu_count()} cores, {cpu}"


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['machine']}, {report['date']}; {report['config']['steps']} steps, batch cap "
        f"{report['config']['batch']}, 1 worker"
    )
    print(f"{'system':<14}{'clients':>8}{'img/s':>8}{'p50 ms':>10}{'p99 ms':>10}  errors")
    for name, data in report["systems"].items():
        for row in data["levels"]:
            print(
                f"{name:<14}{row['concurrency']:>8}{row['throughput']:>8.2f}{row['p50_ms'] or 0:>10.1f}"
                f"{row['p99_ms'] or 0:>10.1f}  {row['errors'] or ''}"
            )
    print(
        f"direct pipeline: {', '.join(f'{d:.2f}' for d in report['direct']['throughputs'])} img/s "
        f"(before/between/after)"
    )
    for key, value in report["ratios"].items():
        if isinstance(value, float):
            print(f"{key:<28} {value:.3f}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, data in report["systems"].items():
        xs = [r["concurrency"] for r in data["levels"]]
        top.plot(xs, [r["throughput"] for r in data["levels"]], marker="o", label=name)
        bottom.plot(xs, [r["p99_ms"] or float("nan") for r in data["levels"]], marker="o", label=name)
    ceiling = statistics.fmean(report["direct"]["throughputs"])
    top.axhline(ceiling, color="grey", linestyle="--", label="direct pipeline")
    for ax, label in ((top, "images / s"), (bottom, "p99 latency (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    bottom.set_yscale("log")
    top.legend()
    fig.suptitle(f"{report['machine']} — {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
