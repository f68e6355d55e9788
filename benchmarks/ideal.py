"""What physics allows: ideal step batching against ideal whole-call batching, simulated on this machine's
measured cost curve, under the same Poisson arrivals.

    python benchmarks/ideal.py [--loads 0.5,0.7,0.8,0.9,0.95] [--requests 20000] [--reps 5] [--model DIR]
    python benchmarks/ideal.py --against benchmarks/results/openloop_heap3.json   # beside a measured run

Measured first, in this process, through Muse's own code (one image size, `--steps` steps, cap `--cap`):
a whole `run_batch` call of n images (what LitServe's peer and `--batching request` run), and the step
engine's pieces: admitting k images (their text encoded together), one denoising step of n running images,
decoding k finished ones. The kinds and sizes are interleaved, `--reps` times, and each cost is the median,
so a drift of the machine falls on all of them alike.

Then three schedulers with no overhead of their own, each fed the same arrivals at fractions of whole-call
batching's capacity (cap ÷ the cost of a call of cap images):
- `request`: when the model is free, the requests waiting (up to cap) run as one call, waiting `--wait` at
  most for company when fewer are there (LitServe's batch timeout; 0 is the ideal);
- `step`: between steps, waiting requests take the free slots (their admission costs the step that follows),
  every running image advances one step, and those done are decoded together.
- `held`: the same, with a finished image's decode held up to `--hold` steps for company while every slot is
  in use, as the worker does.
Per load: p50/p99 latency of each, and each step scheduler's ÷ request's. `--gap MS` adds that much to every
step (what the real engine spends between UNet calls), to show what a per-step overhead costs at each load.
With `--against`, an openloop.py report's measured p50/p99 ratios (`--system` ÷ `--unit`, both at the load
as a fraction of the unit's measured capacity) are printed beside the ideal ones. Prints a table, writes
benchmarks/results/ideal.json and .png.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, DirectPipeline, write_report
from load import percentile, poisson

Cost = Callable[[int], float]  # seconds for n images
Costs = dict[str, list[float]]  # seconds by kind ("call", "step", "admit", "decode"), for 1..cap images


# ---- the ideal schedulers -------------------------------------------------------------------------------


def whole_calls(arrivals: Sequence[float], call: Cost, cap: int, wait: float = 0.0) -> list[float]:
    """Each request's latency (seconds, in arrival order) under whole-call batching: one call at a time, of
    the requests waiting when the model frees (up to cap). With fewer than cap waiting, the call starts
    `wait` later at most, or as soon as the cap-th request arrives."""
    latencies: list[float] = []
    free, i, n = 0.0, 0, len(arrivals)
    while i < n:
        start = max(free, arrivals[i])
        if wait > 0 and bisect.bisect_right(arrivals, start) - i < cap:
            full = arrivals[i + cap - 1] if i + cap - 1 < n else float("inf")  # after start: fewer were there
            start = min(start + wait, full)
        size = min(cap, bisect.bisect_right(arrivals, start) - i)
        end = start + call(size)
        latencies.extend(end - arrivals[j] for j in range(i, i + size))
        free, i = end, i + size
    return latencies


def step_calls(
    arrivals: Sequence[float],
    step: Cost,
    admit: Cost,
    decode: Cost,
    cap: int,
    steps: int,
    gap: float = 0.0,
    hold: int = 0,
) -> list[float]:
    """Each request's latency (seconds, in arrival order) under step batching: before each step, the requests
    waiting take the free slots (admitted together); every running image advances a step (plus `gap`); the
    images done leave their slots and are decoded together, and answered then. With `hold`, finished images
    wait up to that many steps to be decoded with others, as muse.worker.steploop does: only while every slot
    is in use or about to be refilled, and only while a running image will finish within it."""
    latencies = [0.0] * len(arrivals)
    running: list[list[int]] = []  # [request index, steps left]
    held: list[int] = []
    held_since = calls = 0  # the step after which the oldest held image finished
    clock, i, n = 0.0, 0, len(arrivals)
    while i < n or running or held:
        if not running and not held:
            clock = max(clock, arrivals[i])
        waiting = bisect.bisect_right(arrivals, clock) - i
        joining = min(cap - len(running), waiting)
        if joining > 0:
            clock += admit(joining)
            running.extend([j, steps] for j in range(i, i + joining))
            i += joining
        if running:
            clock += step(len(running)) + gap
            calls += 1
            for slot in running:
                slot[1] -= 1
            done = [slot[0] for slot in running if slot[1] == 0]
            running = [slot for slot in running if slot[1] > 0]
            if done and not held:
                held_since = calls
            held.extend(done)
        if not held:
            continue
        waiting = bisect.bisect_right(arrivals, clock) - i
        left = hold - (calls - held_since)
        busy = len(running) + waiting >= cap and len(held) < cap
        if busy and any(slot[1] <= left for slot in running):
            continue
        clock += decode(len(held))
        for j in held:
            latencies[j] = clock - arrivals[j]
        held = []
    return latencies


def of(costs: Costs, kind: str) -> Cost:
    return lambda n: costs[kind][n - 1]


def stepping(arrivals: Sequence[float], costs: Costs, args: argparse.Namespace, hold: int) -> list[float]:
    step, admit, decode = (of(costs, kind) for kind in ("step", "admit", "decode"))
    return step_calls(arrivals, step, admit, decode, args.cap, args.steps, args.gap, hold)


def simulate(costs: Costs, args: argparse.Namespace, loads: list[float]) -> list[dict[str, Any]]:
    """p50/p99 (ms) of the three schedulers at each load, a fraction of whole-call batching's capacity, and
    each step scheduler's ÷ whole calls'."""
    capacity = args.cap / costs["call"][args.cap - 1]
    rows = []
    for load in loads:
        arrivals = poisson(load * capacity, args.requests, seed=int(load * 1000))
        warm = args.requests // 10  # the queue's start from empty is not the steady state
        request = whole_calls(arrivals, of(costs, "call"), args.cap, args.wait)[warm:]
        step = {name: stepping(arrivals, costs, args, hold)[warm:] for name, hold in (("step", 0), ("held", args.hold))}
        row: dict[str, Any] = {"load": load, "rate": load * capacity}
        for name, lat in (("request", request), *step.items()):
            row[name] = {"p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000}  # type: ignore[operator]
        for name in step:
            row[name]["p50_ratio"] = row[name]["p50_ms"] / row["request"]["p50_ms"]
            row[name]["p99_ratio"] = row[name]["p99_ms"] / row["request"]["p99_ms"]
        rows.append(row)
    return rows


def sensitivity(costs: Costs, args: argparse.Namespace, loads: list[float], scales: list[float]) -> list[Any]:
    """The held step scheduler with its costs (step, admit, decode) times each scale, whole calls' unchanged:
    its saturated capacity ÷ whole calls', and its p50/p99 ÷ whole calls' at each load. Near capacity the
    latency ratios follow the capacity ratio, which a few percent of drift moves."""
    whole = args.cap / costs["call"][args.cap - 1]
    found = []
    for scale in scales:
        scaled = {k: [c * scale for c in v] if k != "call" else v for k, v in costs.items()}
        # Saturated: arrivals at 1.5 x capacity; the rate of answers once the first tenth has left.
        arrivals = poisson(1.5 * whole, args.requests // 2, seed=7)
        latencies = stepping(arrivals, scaled, args, args.hold)
        ends = sorted(a + t for a, t in zip(arrivals, latencies, strict=True))
        first = len(ends) // 10
        capacity = (len(ends) - 1 - first) / (ends[-1] - ends[first])
        rows = simulate(scaled, args, loads)
        found.append(
            {
                "scale": scale,
                "capacity_ratio": capacity / whole,
                "rows": [{"load": r["load"], **{q: r["held"][q] for q in ("p50_ratio", "p99_ratio")}} for r in rows],
            }
        )
    return found


# ---- the cost curve -------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """Seconds, by kind and images 1..cap, each rep's in turn: `call` (a whole run_batch), then the same
    images through the step engine at once: `admit` (admitted together), `step` (the mean of their steps),
    `decode` (decoded together, to PNGs, as the worker answers: a whole call returns PNGs too). The engine's
    run follows the call it is compared with, so the two see the same minute of the machine."""
    from muse.messages import Assignment, BatchKey, ImageSpec
    from muse.worker.engine import StepEngine
    from muse.worker.pipeline import encode_png, run_batch
    from muse.worker.steploop import slot_requests

    loaded = DirectPipeline(args.model, args.threads).loaded  # threads and heap as a worker's
    key = BatchKey(loaded.width, loaded.height, args.steps, loaded.guidance_scale)
    engine = StepEngine(loaded)
    kinds = ("call", "step", "admit", "decode")
    samples: dict[str, list[list[float]]] = {k: [[] for _ in range(args.cap)] for k in kinds}

    def work(n: int, tag: str) -> Assignment:
        images = [ImageSpec(f"a red circle on a blue background, {tag} {i}", "", i) for i in range(n)]
        return Assignment(f"{tag}-{n}", images, key)

    def timed(fn: Callable[..., object], *args: object) -> float:
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    for rep in range(args.reps):
        sizes = list(range(1, args.cap + 1))
        random.Random(rep).shuffle(sizes)
        for n in sizes:
            got = samples["call"][n - 1], samples["admit"][n - 1], samples["step"][n - 1], samples["decode"][n - 1]
            got[0].append(timed(run_batch, loaded, work(n, f"call{rep}"), lambda step: True))
            got[1].append(timed(engine.admit, slot_requests(work(n, f"slot{rep}"))))
            finished, spent = [], 0.0
            for _ in range(args.steps):
                start = time.perf_counter()
                finished = engine.step()
                spent += time.perf_counter() - start
            got[2].append(spent / args.steps)
            got[3].append(timed(lambda done: [encode_png(p) for p in engine.decode(done)], finished))
        print(f"rep {rep + 1}/{args.reps}: call of {args.cap} {samples['call'][-1][-1] * 1000:.0f} ms", flush=True)
    return samples


def lockstep(samples: dict[str, list[list[float]]], steps: int) -> list[float]:
    """By images 1..cap: the step engine running them all at once (admitted, stepped, decoded together) ÷
    the whole call of them, paired rep by rep, the median: what step batching costs at its best."""
    admits, step_means, decodes = samples["admit"], samples["step"], samples["decode"]
    ratios = []
    for n, calls in enumerate(samples["call"]):
        runs = [admits[n][r] + steps * step_means[n][r] + decodes[n][r] for r in range(len(calls))]
        ratios.append(statistics.median(e / c for e, c in zip(runs, calls, strict=True)))
    return ratios


def curves(samples: dict[str, list[list[float]]]) -> tuple[Costs, list[Costs]]:
    """The cost curve of medians over every rep, and each rep's own."""
    median = {kind: [statistics.median(s) for s in by_size] for kind, by_size in samples.items()}
    reps = len(samples["call"][0])
    each = [{kind: [s[rep] for s in by_size] for kind, by_size in samples.items()} for rep in range(reps)]
    return median, each


# ---- a measured run beside it ---------------------------------------------------------------------------


def measured_ratios(path: Path, system: str, unit: str) -> list[dict[str, Any]]:
    """An openloop.py report's latency rows of `system`, as ratios to `unit`'s at the same load (run with
    `--unit` that system, the load is a fraction of its measured capacity)."""
    report = json.loads(path.read_text())
    theirs = {row["fraction"]: row for row in report["systems"][unit]["rows"]}
    found = []
    for mine in report["systems"][system]["rows"]:
        other = theirs.get(mine["fraction"])
        if not other or not mine.get("p50_ms") or not other.get("p50_ms"):
            continue
        found.append(
            {
                "load": mine["fraction"],
                "p50_ratio": mine["p50_ms"] / other["p50_ms"],
                "p99_ratio": mine["p99_ms"] / other["p99_ms"],
                "p50_median_round_ratio": mine.get("p50_median_round_ratio"),
                "p99_median_round_ratio": mine.get("p99_median_round_ratio"),
            }
        )
    return found


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(15, 3.8))
    loads = [r["load"] for r in report["rows"]]
    for name, style in (("request", ":"), ("step", "--"), ("held", "-")):
        for q, marker in (("p50_ms", "o"), ("p99_ms", "s")):
            left.plot(loads, [r[name][q] for r in report["rows"]], style, marker=marker, label=f"{name} {q[:3]}")
    left.set_xlabel("load (÷ whole-call capacity)")
    left.set_ylabel("latency, ms")
    left.set_title("ideal schedulers, measured costs")
    left.legend(fontsize=8)
    for name, style in (("step", "--"), ("held", "-")):
        for q, marker in (("p50_ratio", "o"), ("p99_ratio", "s")):
            line = right.plot(
                loads, [r[name][q] for r in report["rows"]], style, marker=marker, label=f"{name} {q[:3]}"
            )
            if name == "held":  # what the drift between reps moves it by
                lows, highs = zip(*(r[name][q + "_reps"] for r in report["rows"]), strict=True)
                right.fill_between(loads, lows, highs, color=line[0].get_color(), alpha=0.15)
    for m in report.get("measured", []):
        right.scatter([m["load"]] * 2, [m["p50_ratio"], m["p99_ratio"]], marker="x", color="black")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xlabel("load")
    right.set_ylabel("÷ ideal whole-call batching")
    right.set_title("x: the measured run (--against)")
    right.legend(fontsize=8)
    capacities = [e["capacity_ratio"] for e in report["sensitivity"]]
    for i, load in enumerate(r["load"] for r in report["rows"]):
        for q, style in (("p50_ratio", "-"), ("p99_ratio", "--")):
            values = [e["rows"][i][q] for e in report["sensitivity"]]
            third.plot(capacities, values, style, marker="o", label=f"{q[:3]} at {load:g}")
    third.axhline(1.0, color="grey", linewidth=0.8)
    third.set_xlabel("held step capacity ÷ whole-call capacity")
    third.set_ylabel("÷ ideal whole-call batching")
    third.set_title("its costs scaled (--scales)")
    third.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from muse.config import EMBEDDED_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cap", type=int, default=8, help="images per call, and slots of the step engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="measurements of each cost (median)")
    parser.add_argument("--loads", default="0.5,0.7,0.8,0.9,0.95", help="fractions of whole-call capacity")
    parser.add_argument("--requests", type=int, default=20000, help="simulated requests per load")
    parser.add_argument("--wait", type=float, default=0.0, help="whole-call batching's batch timeout, seconds")
    parser.add_argument("--hold", type=int, default=2, help="steps a finished image's decode may wait (Muse's 2)")
    parser.add_argument("--gap", type=float, default=0.0, help="ms added to every step of the step scheduler")
    parser.add_argument("--against", type=Path, help="an openloop.py report to print beside the ideal")
    parser.add_argument("--system", default="muse", help="the --against report's step-batching system")
    parser.add_argument("--unit", default="litserve", help="the --against report's whole-call system")
    parser.add_argument(
        "--scales", default="0.94,0.97,1,1.03,1.06,1.09", help="factors on the step engine's costs, for the sensitivity"
    )
    parser.add_argument("--costs", type=Path, help="a report of this script: reuse its costs, measure nothing")
    parser.add_argument("--out", default=str(RESULTS / "ideal"), help="path without extension")
    args = parser.parse_args()
    try:
        loads = [float(x) for x in args.loads.split(",")]
    except ValueError:
        parser.error(f"--loads: numbers separated by commas, not {args.loads!r}")
    try:
        scales = [float(x) for x in args.scales.split(",")]
    except ValueError:
        parser.error(f"--scales: numbers separated by commas, not {args.scales!r}")
    if not all(x > 0 for x in scales):
        parser.error("--scales: each above 0")
    if not all(0 < x < 1 for x in loads):
        parser.error("--loads: each a fraction of capacity, above 0 and below 1")
    if args.cap < 1 or args.steps < 1 or args.requests < 10:
        parser.error("--cap and --steps must be at least 1, --requests at least 10")
    args.gap /= 1000

    if args.costs:
        measured = json.loads(args.costs.read_text())
        samples, args.reps = measured["samples_s"], measured["reps"]
    else:
        samples = measure(args)
    if len(samples["call"]) < args.cap:
        parser.error(f"--costs: measured up to {len(samples['call'])} images, below --cap {args.cap}")
    costs, each = curves(samples)
    rows = simulate(costs, args, loads)
    # The machine drifts between reps: each rep's own curve, simulated alike, shows how much that moves.
    spread = [simulate(curve, args, loads) for curve in each]
    for i, row in enumerate(rows):
        for name in ("step", "held"):
            for q in ("p50_ratio", "p99_ratio"):
                values = [rep_rows[i][name][q] for rep_rows in spread]
                row[name][q + "_reps"] = [min(values), max(values)]
    print(f"\n{'n':>3} {'call ms':>9} {'step ms':>9} {'admit ms':>9} {'decode ms':>10}")
    for n in range(1, args.cap + 1):
        c = {k: v[n - 1] * 1000 for k, v in costs.items()}
        print(f"{n:>3} {c['call']:>9.1f} {c['step']:>9.2f} {c['admit']:>9.2f} {c['decode']:>10.2f}")
    capacity = args.cap / costs["call"][args.cap - 1]
    paired = lockstep(samples, args.steps)
    print(f"\nwhole-call capacity {capacity:.2f} img/s; per-step gap {args.gap * 1000:.1f} ms")
    print(f"the engine running {args.cap} together ÷ a whole call of {args.cap}, paired by rep: {paired[-1]:.3f}")
    header = "p50/p99 ms (÷ request)"
    print(f"{'load':>5} {'request p50/p99 ms':>19} {'step ' + header:>31} {'held ' + header:>31}")
    for r in rows:
        print(
            f"{r['load']:>5.2f} {r['request']['p50_ms']:>10.0f} /{r['request']['p99_ms']:>6.0f}  "
            + "  ".join(
                f"{r[k]['p50_ms']:>6.0f} /{r[k]['p99_ms']:>6.0f} ({r[k]['p50_ratio']:.2f} / {r[k]['p99_ratio']:.2f})"
                for k in ("step", "held")
            )
        )
    print(f"\n÷ request on each of the {args.reps} reps' own curves, lowest-highest:")
    for r in rows:
        print(
            f"{r['load']:>5.2f}  "
            + "  ".join(
                f"{k} p50 {r[k]['p50_ratio_reps'][0]:.2f}-{r[k]['p50_ratio_reps'][1]:.2f}, "
                f"p99 {r[k]['p99_ratio_reps'][0]:.2f}-{r[k]['p99_ratio_reps'][1]:.2f}"
                for k in ("step", "held")
            )
        )
    report: dict[str, Any] = {
        "model": Path(args.model).name,
        "steps": args.steps,
        "cap": args.cap,
        "wait_s": args.wait,
        "gap_s": args.gap,
        "hold_steps": args.hold,
        "requests": args.requests,
        "capacity_img_s": capacity,
        "reps": args.reps,
        "costs_s": costs,
        "lockstep_ratio": paired,
        "samples_s": samples,
        "rows": rows,
        "sensitivity": sensitivity(costs, args, loads, scales),
    }
    print("\nheld, its costs scaled: capacity ÷ whole calls', then p50 / p99 ÷ whole calls' at each load")
    print(f"{'scale':>6} {'capacity':>9}  " + "  ".join(f"{load:>11.2f}" for load in loads))
    for entry in report["sensitivity"]:
        cells = "  ".join(f"{r['p50_ratio']:>5.2f} /{r['p99_ratio']:>5.2f}" for r in entry["rows"])
        print(f"{entry['scale']:>6.2f} {entry['capacity_ratio']:>9.3f}  {cells}")
    if args.against:
        report["measured"] = measured_ratios(args.against, args.system, args.unit)
        print(f"\nmeasured ({args.against.name}, {args.system} ÷ {args.unit}), pooled (median of rounds):")
        for m in report["measured"]:
            print(
                f"{m['load']:>5.2f}  p50 {m['p50_ratio']:.2f} ({m['p50_median_round_ratio'] or float('nan'):.2f})"
                f"  p99 {m['p99_ratio']:.2f} ({m['p99_median_round_ratio'] or float('nan'):.2f})"
            )
    write_report(report, Path(args.out), plot)


if __name__ == "__main__":
    main()
