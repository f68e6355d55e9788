"""What two cores allow any served system: the direct loop beside a neighbour that wakes as a server's front
process and its client do.

    python benchmarks/interference.py [--neighbours 60x1,6x10] [--rounds 6] [--images 96] [--model DIR]

A served worker shares the machine with the processes that feed it: the front process (HTTP, batching, pipes)
and the load generator, which together took ~6 % of one core in the saturated runs here, in short bursts, at
every arrival, answer and progress message. Each burst lands on a core where one of the denoiser's two OpenMP
threads runs, and the other thread waits for it at the next barrier. This measures that price without any server:
the direct `pipe()` loop at batch 8 alone, and beside a neighbour process that wakes on a Poisson clock
(`RATExMS`: wakeups per second, milliseconds of CPU each), in rotating order, so a round's figures are taken
minutes apart at most. Per neighbour: images/s ÷ the round's loop alone (median over rounds), the neighbour's
own CPU share (from the kernel's accounting of it), and the throughput lost per point of CPU it took. A served
system's ceiling on this machine is the loop beside its own front process and client, not the loop alone.
Prints a table, writes benchmarks/results/interference.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, write_report
from steploop import direct

from muse.config import EMBEDDED_MODEL
from muse.worker.heap import keep_freed_memory
from muse.worker.pipeline import LoadedPipeline, load_pipeline, warm_up

# The neighbour: sleeps an exponential time, then burns CPU for a fixed time; says when it starts, and on SIGTERM
# the CPU time it took since (its interpreter's start-up is not the neighbour's load).
NEIGHBOUR = """
import random, signal, sys, time
rate, burn, seed = float(sys.argv[1]), float(sys.argv[2]) / 1000, int(sys.argv[3])
rng = random.Random(seed)
start = time.process_time()

def stop(*_):
    print(time.process_time() - start, flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(rng.expovariate(rate))
    end = time.thread_time() + burn
    while time.thread_time() < end:
        pass
"""


@dataclass(frozen=True)
class Neighbour:
    rate: float  # wakeups per second
    burn_ms: float  # CPU per wakeup

    @classmethod
    def parse(cls, text: str) -> Neighbour:
        rate, _, burn = text.lower().partition("x")
        try:
            neighbour = cls(float(rate), float(burn))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected RATExMS, e.g. 30x1") from None
        if neighbour.rate <= 0 or neighbour.burn_ms <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: rate and milliseconds must be positive")
        return neighbour

    @property
    def name(self) -> str:
        return f"{self.rate:g}/s x {self.burn_ms:g} ms"


def beside(neighbour: Neighbour, loaded: LoadedPipeline, images: int, steps: int, seed: int) -> dict[str, float]:
    """The direct loop with the neighbour running; its images/s and the neighbour's CPU share."""
    argv = [sys.executable, "-c", NEIGHBOUR, str(neighbour.rate), str(neighbour.burn_ms), str(seed)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the neighbour did not start")
        started = time.perf_counter()
        img_s = direct(loaded, images, steps)
        wall = time.perf_counter() - started
    finally:
        process.terminate()
        cpu, _ = process.communicate(timeout=30)
    return {"img_s": img_s, "cpu_share": float(cpu) / wall}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = report["rounds"]
    x = range(1, len(rounds) + 1)
    for name in report["neighbours"]:
        ax.plot(x, [r[name]["over_alone"] for r in rounds], marker="o", label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("images/s ÷ the loop alone")
    ax.set_title("direct loop, batch 8, beside a neighbour")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument(
        "--neighbours",
        default="60x1,6x10",
        type=lambda text: [Neighbour.parse(part) for part in text.split(",")],
        help="RATExMS profiles, comma-separated: wakeups per second x milliseconds of CPU each (default 60x1,6x10)",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=96, help="images per run (batches of 8)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "interference"), help="path without extension")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a Muse worker does
    loaded = load_pipeline(args.model, "cpu")
    warm_up(loaded)
    names = [n.name for n in args.neighbours]
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order: list[Neighbour | None] = [None, *args.neighbours]
        order = order[i % len(order) :] + order[: i % len(order)]
        row: dict[str, Any] = {}
        for neighbour in order:
            if neighbour is None:
                row["alone"] = direct(loaded, args.images, args.steps)
            else:
                row[neighbour.name] = beside(neighbour, loaded, args.images, args.steps, seed=i)
        for name in names:
            row[name]["over_alone"] = row[name]["img_s"] / row["alone"]
        rounds.append(row)
        print(
            f"round {i + 1}: alone {row['alone']:.2f} img/s | "
            + " | ".join(
                f"{name}: {row[name]['img_s']:.2f} ({row[name]['over_alone']:.3f} x, "
                f"neighbour {row[name]['cpu_share'] * 100:.1f} % of a core)"
                for name in names
            ),
            flush=True,
        )
    summary = {}
    for name in names:
        ratio = statistics.median(r[name]["over_alone"] for r in rounds)
        share = statistics.median(r[name]["cpu_share"] for r in rounds)
        # Points of throughput (of the two cores') lost per point of one core's time the neighbour took.
        summary[name] = {"over_alone": ratio, "cpu_share": share, "lost_per_cpu": (1 - ratio) * 2 / share}
    print(f"\n{'neighbour':<16} {'÷ alone':>8} {'its CPU':>9} {'lost ÷ taken':>13}")
    for name, s in summary.items():
        print(f"{name:<16} {s['over_alone']:>8.3f} {s['cpu_share'] * 100:>8.1f}% {s['lost_per_cpu']:>13.2f}")
    report = {
        "model": Path(args.model).name,
        "steps": args.steps,
        "images": args.images,
        "threads": args.threads,
        "neighbours": names,
        "rounds": rounds,
        "median": summary,
    }
    write_report(report, Path(args.out), plot)


if __name__ == "__main__":
    main()
