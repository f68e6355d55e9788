"""Muse with the Ray pool vs the local pool, on this machine, in one run.

    python benchmarks/ray_pool.py [--rounds 3] [--duration 15] [--pairs 12]
    python benchmarks/ray_pool.py --quick        # about 2 minutes

One worker, the embedded model, 25 steps, batch cap 8, 2 torch threads. A one-node Ray cluster runs on
loopback (`ray start --head`); both servers start once and take turns (the idle one paused), round by
round, so the machine's drift falls on both alike. Measures:
- closed loop at saturation (16 clients): images/s, Ray ÷ local (target >= 0.9);
- idle latency (first in each round, before the closed loop), each served one-image request paired with a
  direct call in this process: the median served - direct for each pool, and Ray's extra (target <= 15 ms);
- the front process's resident memory after the runs (target: Ray <= local + 0.3 GB).
Writes benchmarks/results/ray_pool.json and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, DirectPipeline, free_port, muse_server, pause, resumed, write_report
from load import run_level

from muse.config import EMBEDDED_MODEL

BODY: dict[str, Any] = {"prompt": "a red circle on a blue background", "steps": 25}
# Ray advertises the machine's external address unless told otherwise; keep every connection on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def ray_head(cpus: int) -> Any:
    """A one-node Ray cluster on loopback; yields its address."""
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port = free_port()
    env = os.environ | LOOPBACK
    start = [ray, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0, help="closed-loop seconds per round")
    parser.add_argument("--pairs", type=int, default=12, help="idle pairs per pool")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "ray_pool"), help="path without extension")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.pairs = 2, 8.0, 6
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ.update(LOOPBACK)
    threads = 2
    direct = DirectPipeline(args.model, threads)
    flags = ["--model", args.model, "--devices", "cpu", "--threads-per-worker", str(threads), "--max-queue", "1024"]
    closed: dict[str, list[float]] = {"local": [], "ray": []}
    overhead: dict[str, list[float]] = {"local": [], "ray": []}
    with ray_head(threads + 1) as address, contextlib.ExitStack() as stack:
        servers = {
            "local": stack.enter_context(muse_server(*flags)),
            "ray": stack.enter_context(muse_server(*flags, "--pool", "ray", "--ray-address", address)),
        }
        for served in servers.values():
            pause(served)
        names = list(servers)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                with resumed(servers[name]) as served:
                    # Idle first: right after a saturating run, Ray's processes are still freeing its objects.
                    with httpx.Client(base_url=served.url, timeout=60) as client:
                        assert client.post("/api/generate", json=BODY).status_code == 200  # wake it up
                        for i in range(args.pairs // args.rounds or 1):
                            start = time.perf_counter()
                            assert client.post("/api/generate", json=BODY | {"seed": i}).status_code == 200
                            served_ms = (time.perf_counter() - start) * 1000
                            overhead[name].append(served_ms - direct.run(1, BODY["steps"], seed=i) * 1000)
                    asyncio.run(run_level(served.url, 16, 3.0, BODY))  # fill the pipeline
                    row = asyncio.run(run_level(served.url, 16, args.duration, BODY))
                    closed[name].append(row.throughput)
                print(f"round {round_ + 1} {name:<5}: {closed[name][-1]:.2f} img/s", flush=True)
        memory = {name: rss_gib(served.process.pid) for name, served in servers.items()}
    report: dict[str, Any] = {
        "model": Path(args.model).name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "closed_loop_img_s": closed,
        "throughput_ratio": statistics.fmean(closed["ray"]) / statistics.fmean(closed["local"]),
        "idle_overhead_ms": {name: statistics.median(v) for name, v in overhead.items()},
        "front_rss_gib": memory,
    }
    report["ray_extra_idle_ms"] = report["idle_overhead_ms"]["ray"] - report["idle_overhead_ms"]["local"]
    report["ray_extra_rss_gib"] = memory["ray"] - memory["local"]
    print(f"\n{'pool':<6}{'img/s (mean)':>14}{'idle over direct ms':>21}{'front RSS GiB':>15}")
    for name in names:
        print(
            f"{name:<6}{statistics.fmean(closed[name]):>14.2f}{report['idle_overhead_ms'][name]:>21.1f}"
            f"{memory[name]:>15.2f}"
        )
    print(
        f"Ray ÷ local throughput {report['throughput_ratio']:.3f} (target >= 0.9); Ray's extra idle latency "
        f"{report['ray_extra_idle_ms']:+.1f} ms (target <= 15); extra front memory {report['ray_extra_rss_gib']:+.2f} "
        "GiB (target <= 0.3)"
    )
    write_report(report, Path(args.out), plot)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["local", "ray"]
    figure, axes = plt.subplots(1, 3, figsize=(10, 3.5))
    panels = [
        ("images/s at saturation", [statistics.fmean(report["closed_loop_img_s"][n]) for n in names]),
        ("idle: served - direct (ms)", [report["idle_overhead_ms"][n] for n in names]),
        ("front process RSS (GiB)", [report["front_rss_gib"][n] for n in names]),
    ]
    for axis, (title, values) in zip(axes, panels, strict=True):
        axis.bar(names, values, color=["tab:blue", "tab:orange"])
        axis.set_title(title, fontsize=9)
    figure.suptitle("Muse: local pool vs Ray pool (one CPU worker, embedded model)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
