"""Open-loop latency: requests arrive on their own (Poisson) clock, as real traffic does; every one is awaited.

    python benchmarks/openloop.py [--rates 0.3,0.6,0.8,0.9] [--duration 30] [--systems muse,muse-request,litserve]
                                  [--mix]
    python benchmarks/openloop.py --quick        # under 5 minutes

MLPerf Inference's "server" scenario, scaled to this machine. Rates are fractions of the direct
pipeline's batch-8 capacity, measured in the same run; rate by rate, the systems take turns on fresh
servers, and each rate's turns are bracketed by direct runs (the machine drifts). Systems: `muse` (step
batching: requests join a running batch between denoising steps), `muse-request` (`--batching request`:
whole pipeline calls), LitServe running the same `run_batch`, and, when asked, `muse-compile` (step
batching with `--compile`). Per rate: p50/p90/p99 latency, throughput, errors, and the mean images per
batch the server reported (for step batching, the mean images each request shared its steps with: the
occupancy). Also the highest rate whose p99 stays under 4 x the single-image latency (MLPerf's bound;
with --mix, of a 50-step image). With `--unit SYSTEM` each window's figures (saturated rate, p50, p99) are
also divided by that system's in the same round, and the median of those ratios reported: the machine's drift
falls on both sides of each ratio, where pooled figures mix fast and slow minutes.
`--mix`: half "fast" (25 steps) and half "quality" (50), guidance uniform in 2-7, and rates are fractions
of the mix's capacity (at its mean 37.5 steps). LitServe's peer, like `muse-request`, runs one pipeline
call per distinct steps and guidance in a batch (a diffusers call takes one of each). Writes JSON and a
latency-vs-rate plot. Loopback only; every window is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, DirectPipeline, litserve_server, muse_server, pause, resumed, write_report
from load import check_loopback, percentile

from muse.config import EMBEDDED_MODEL

P99_BOUND = 4.0  # x the single-image latency
# Answers this close are one batch's (one decode's, one call's): shorter than any step of a served model.
ANSWERS_TOGETHER_S = 0.025
MIX_MEAN_STEPS = 37.5  # half 25, half 50
PATHS = {
    "muse": "/api/generate",
    "muse-request": "/api/generate",
    "muse-compile": "/api/generate",
    "litserve": "/predict",
}


def body_for(
    index: int,
    rng: random.Random,
    steps: int,
    mix: bool,
    size: int | None = None,
    mix_steps: tuple[int, int] = (25, 50),
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a red circle on a blue background", "seed": index, "steps": steps}
    if size is not None:
        body["width"] = body["height"] = size
    if mix:
        body["steps"] = mix_steps[0] if rng.random() < 0.5 else mix_steps[1]
        body["guidance_scale"] = round(rng.uniform(2, 7), 2)
    return body


async def open_loop(
    url: str,
    path: str,
    rate: float,
    duration: float,
    warmup: float,
    steps: int,
    mix: bool,
    size: int | None = None,
    seed: int = 0,
    mix_steps: tuple[int, int] = (25, 50),
) -> dict[str, Any]:
    """Send at `rate` per second (exponential gaps) for warmup + duration; count those sent after the warm-up.
    Returns the window's raw figures (see `summarize`); the same seed gives the same arrivals and bodies."""
    check_loopback(url)
    rng = random.Random(int(rate * 1000) + 7919 * seed)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    measured_images = 0
    completions: list[tuple[float, int]] = []  # every answer, warm-up ones too: when (since begin), images

    async def one(client: httpx.AsyncClient, body: dict[str, Any], measured: bool) -> None:
        nonlocal measured_images
        start = time.perf_counter()
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            if measured:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        answered = time.perf_counter()
        if response.status_code != 200:
            if measured:
                errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
            return
        data = response.json()
        completions.append((answered - begin, len(data["images"])))
        if not measured:
            return
        latencies.append((answered - start) * 1000)
        measured_images += len(data["images"])
        if "batch_size" in data:
            batch_sizes.append(int(data["batch_size"]))

    timeout = httpx.Timeout(600, connect=30)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        tasks = []
        begin = time.perf_counter()
        index = measured = 0
        next_at = 0.0
        while next_at < warmup + duration:
            delay = begin + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival clock itself, not a synchronisation
            # Bodies drawn here, in arrival order: every system gets the same requests at the same times.
            body = body_for(index, rng, steps, mix, size, mix_steps)
            in_window = next_at >= warmup
            tasks.append(asyncio.create_task(one(client, body, measured=in_window)))
            measured += in_window
            index += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    steady_images, steady_seconds = steady(completions, warmup, warmup + duration)
    return {
        "sent": len(tasks),
        "measured": measured,  # sent after the warm-up: a short window at a low rate can draw none
        "latencies_ms": latencies,
        "batch_sizes": batch_sizes,
        "errors": errors,
        "images": measured_images,
        # The measured window plus the drain of its requests: throughput is a rate, not a peak.
        "seconds": max(duration, elapsed - warmup),
        "steady_images": steady_images,
        "steady_seconds": steady_seconds,
    }


def steady(completions: list[tuple[float, int]], start: float, end: float) -> tuple[int, float]:
    """The images answered inside [start, end] after its first answer, and the time from that answer to its
    last: a saturated server's rate while its queue never empties. The window-plus-drain rate also counts
    the backlog left from the warm-up and the drain's thinning batches (a step engine's last images finish
    one by one with fewer and fewer others), which no steady load has. Answers leaving together (one
    decode, one whole call: within ANSWERS_TOGETHER_S of each other) count as one: starting and ending at
    such a group keeps a whole-call server's eight-at-once answers from counting a batch the window saw
    only the end of."""
    groups: list[tuple[float, int]] = []  # each group's last answer, and its images
    for t, n in sorted((t, n) for t, n in completions if start <= t <= end):
        if groups and t - groups[-1][0] <= ANSWERS_TOGETHER_S:
            groups[-1] = (t, groups[-1][1] + n)
        else:
            groups.append((t, n))
    if len(groups) < 2:
        return 0, 0.0
    return sum(n for _, n in groups[1:]), groups[-1][0] - groups[0][0]


def summarize(rate: float, windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a system's windows at one rate: their latencies pooled."""
    latencies = [x for w in windows for x in w["latencies_ms"]]
    batch_sizes = [x for w in windows for x in w["batch_sizes"]]
    errors: dict[str, int] = {}
    for w in windows:
        for kind, count in w["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "rate": rate,
        "windows": len(windows),
        "sent": sum(w["sent"] for w in windows),
        "measured": sum(w["measured"] for w in windows),
        "completed": len(latencies),
        "errors": errors,
        "throughput": sum(w["images"] for w in windows) / sum(w["seconds"] for w in windows),
        "steady_throughput": (
            sum(w["steady_images"] for w in windows) / spans
            if (spans := sum(w["steady_seconds"] for w in windows))
            else None
        ),
        # Each window's own steady rate, in round order: rounds pair the systems a few seconds apart.
        "window_rates": [w["steady_images"] / w["steady_seconds"] if w["steady_seconds"] else None for w in windows],
        # Each window's own p50 and p99 (from its few dozen requests: p99 is near its worst), in round order.
        "window_p50_ms": [percentile(w["latencies_ms"], 50) for w in windows],
        "window_p99_ms": [percentile(w["latencies_ms"], 99) for w in windows],
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else None,
    }


def round_ratios(values: list[float | None], units: list[float | None]) -> list[float]:
    """Each round's figure over the unit system's in the same round (skipping rounds where either is missing)."""
    return [a / b for a, b in zip(values, units, strict=True) if a and b]


def pair_latencies(row: dict[str, Any], unit: dict[str, Any]) -> None:
    """Add to `row` its p50 and p99, window by window, over the unit system's in the same round, and their
    medians: pooled percentiles mix windows the machine ran at different speeds (it drifts by tens of percent
    over minutes here), and one slow window's queue decides a pooled p99; a ratio within a round does not."""
    for key in ("p50", "p99"):
        ratios = round_ratios(row[f"window_{key}_ms"], unit[f"window_{key}_ms"])
        row[f"{key}_round_ratios"] = ratios
        row[f"{key}_median_round_ratio"] = statistics.median(ratios) if ratios else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument(
        "--rates",
        default=None,
        help="fractions of the direct batch-8 capacity (with --mix, for the mix's mean steps); default "
        "0.3,0.6,0.8,0.9, with --mix 0.2,0.3,0.4,0.6,0.8,1.0",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each measured window")
    parser.add_argument("--rounds", type=int, default=3, help="windows per system per rate (--duration split)")
    parser.add_argument("--direct-window", type=float, default=8.0, help="seconds per direct throughput run")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--systems", default="muse,muse-request,litserve")
    parser.add_argument("--mix", action="store_true", help="half 25 and half 50 steps, guidance 2-7")
    parser.add_argument("--quick", action="store_true", help="rates 0.3 and 0.9, 12 s windows (< 5 minutes)")
    parser.add_argument(
        "--saturate",
        type=float,
        default=0.0,
        help="first run every system at this fraction of the direct capacity (e.g. 1.5) to read its saturated "
        "throughput, reported beside the direct loop's",
    )
    parser.add_argument(
        "--unit",
        default="direct",
        help="what --rates are fractions of: 'direct' (the direct loop's capacity) or a system's saturated "
        "throughput (needs --saturate), e.g. litserve",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start every system anew for each of its windows instead of once for the run: one server "
        "instance was measured up to ~20%% slower than its identical twin for its whole life here",
    )
    parser.add_argument("--out", default=str(RESULTS / "openloop"), help="path without extension")
    args = parser.parse_args()
    # Killed (SIGTERM), unwind like Ctrl-C, so the paused servers are resumed and stopped, not left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if args.quick:
        args.rates, args.duration, args.rounds = args.rates or "0.3,0.9", 12.0, 2
    # With --mix, whole-call servers run one image per call (every request its own guidance): low rates
    # find where they still meet the bound.
    args.rates = args.rates or ("0.2,0.3,0.4,0.6,0.8,1.0" if args.mix else "0.3,0.6,0.8,0.9")
    fractions = [float(r) for r in args.rates.split(",")]
    threads = 2
    direct = DirectPipeline(args.model, threads)
    single_ms = statistics.median(direct.run(1, 50 if args.mix else args.steps) for _ in range(3)) * 1000
    # The faster of two windows: other load on the machine only ever slows a run, and a capacity read in
    # a slow spell would put every rate below the fraction it claims.
    directs = [max(direct.throughput(args.batch, args.steps, args.direct_window) for _ in range(2))]
    print(f"direct: batch {args.batch} {directs[-1]:.2f} img/s; one image {single_ms:.0f} ms", flush=True)
    # A mixed workload averages 37.5 steps an image: its capacity is the 25-step one scaled by 25 / 37.5.
    capacity = directs[0] * args.steps / (MIX_MEAN_STEPS if args.mix else args.steps)

    flags = ["--model", args.model, "--devices", "cpu", "--threads-per-worker", str(threads)]
    names = args.systems.split(",")
    compile_cache = (  # removed when the run ends
        tempfile.TemporaryDirectory(prefix="muse-compile-") if "muse-compile" in names else contextlib.nullcontext()
    )
    servers = {
        "muse": lambda: muse_server(*flags, "--max-batch-size", str(args.batch), "--batching", "step"),
        "muse-request": lambda: muse_server(
            *flags, "--max-batch-size", str(args.batch), "--max-wait-ms", str(args.max_wait_ms), "--batching", "request"
        ),
        "litserve": lambda: litserve_server(args.model, args.batch, args.max_wait_ms / 1000, threads),
        # Step batching with --compile (minutes to start on a CPU: every bucket compiles first).
        "muse-compile": lambda: muse_server(
            *flags,
            "--max-batch-size",
            str(args.batch),
            "--batching",
            "step",
            "--compile",
            "--compile-cache",
            getattr(compile_cache, "name", ""),
            timeout=1800,
        ),
    }
    report: dict[str, Any] = {
        "model": Path(args.model).name,
        "steps": args.steps,
        "mix": args.mix,
        "fresh": args.fresh,
        "capacity_img_s": capacity,
        "rate_unit": "fraction of the direct batch-8 capacity" + (" at the mix's mean 37.5 steps" if args.mix else ""),
        "single_image_ms": single_ms,
        "p99_bound_ms": P99_BOUND * single_ms,
        "systems": {},
    }
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        stack.enter_context(compile_cache)
        # Every system starts once and is paused (SIGSTOP) except during its own windows (or, with --fresh,
        # starts for each window and stops after it): they take turns on the same cores, round by round in
        # rotating order, so the machine's drift (tens of percent over minutes here) falls on all of them
        # alike, and an idle peer's polling takes nothing from the one measured. Each rate's rounds are
        # bracketed by direct runs.
        started = {}
        for name in names if not args.fresh else ():
            started[name] = stack.enter_context(servers[name]())
            pause(started[name])

        def turn_of(name: str) -> contextlib.AbstractContextManager[Any]:
            """The system's server for one window: a new one with --fresh, else its paused one, resumed."""
            return servers[name]() if args.fresh else resumed(started[name])

        def measure(i: int, fraction: float, rate: float) -> dict[str, dict[str, Any]]:
            """Every system at one rate, in rotating turns, bracketed by direct runs: one row each."""
            windows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for round_ in range(args.rounds):
                turn = (i * args.rounds + round_) % len(names)
                for name in names[turn:] + names[:turn]:
                    with turn_of(name) as served:
                        window = open_loop(
                            served.url, PATHS[name], rate, args.duration / args.rounds, args.warmup, args.steps,
                            args.mix, seed=round_,
                        )  # fmt: skip
                        windows[name].append(asyncio.run(window))
            directs.append(direct.throughput(args.batch, args.steps, args.direct_window))
            measured = {}
            for name in names:
                row = summarize(rate, windows[name]) | {
                    "fraction": fraction,
                    "direct_bracket": (directs[-2] + directs[-1]) / 2,
                }
                measured[name] = row
                print(
                    f"{name:<12} {fraction:.2f} x capacity ({rate:.2f}/s): p50 {row['p50_ms'] or 0:.0f} ms, "
                    f"p99 {row['p99_ms'] or 0:.0f} ms, {row['throughput']:.2f} img/s, errors {row['errors']}, "
                    f"mean batch {row['mean_batch'] or 0:.1f}",
                    flush=True,
                )
            print(f"direct: {directs[-1]:.2f} img/s", flush=True)
            return measured

        if args.saturate:
            saturated = measure(0, args.saturate, args.saturate * capacity)
            # Capacity is the steady rate inside the windows; the window-plus-drain figure is kept beside it.
            report["saturated"] = {
                name: {
                    "throughput": rate,
                    "over_direct": rate / row["direct_bracket"],
                    "with_drain": row["throughput"],
                    "mean_batch": row["mean_batch"],
                }
                for name, row in saturated.items()
                for rate in [row["steady_throughput"] or row["throughput"]]
            } | {"direct": {"throughput": saturated[names[0]]["direct_bracket"], "over_direct": 1.0}}
            for name, row in report["saturated"].items():
                drain = f" (with the drain: {row['with_drain']:.2f})" if "with_drain" in row else ""
                print(f"saturated {name:<12} {row['throughput']:.2f} img/s = {row['over_direct']:.3f} x direct{drain}")
            if args.unit != "direct":
                # Round by round against the unit's window of the same round: the machine's drift and one
                # server instance's luck (with --fresh) fall on both sides of each ratio.
                for name in names:
                    ratios = round_ratios(saturated[name]["window_rates"], saturated[args.unit]["window_rates"])
                    report["saturated"][name]["round_ratios"] = ratios
                    if ratios:
                        median = statistics.median(ratios)
                        report["saturated"][name]["median_round_ratio"] = median
                        print(f"saturated {name:<12} {median:.3f} x {args.unit}, median of {len(ratios)} rounds")
                capacity = report["saturated"][args.unit]["throughput"]
                report["capacity_img_s"] = capacity
                report["rate_unit"] = f"fraction of {args.unit}'s saturated throughput, measured in this run"
        for i, fraction in enumerate(fractions, start=1):
            measured = measure(i, fraction, fraction * capacity)
            for name, row in measured.items():
                if args.unit in measured:
                    pair_latencies(row, measured[args.unit])
                    if row["p50_round_ratios"] and row["p99_round_ratios"]:
                        print(
                            f"{name:<12} p50 {row['p50_median_round_ratio']:.2f} x, p99 "
                            f"{row['p99_median_round_ratio']:.2f} x {args.unit}'s, median of "
                            f"{len(row['p50_round_ratios'])} rounds",
                            flush=True,
                        )
                rows[name].append(row)
    for name in names:
        within = [r["rate"] for r in rows[name] if r["p99_ms"] is not None and r["p99_ms"] < report["p99_bound_ms"]]
        report["systems"][name] = {"rows": rows[name], "highest_rate_within_p99_bound": max(within, default=None)}
    report["directs"] = directs
    write_report(report, Path(args.out), plot)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, system in report["systems"].items():
        rates = [r["fraction"] for r in system["rows"]]
        axis.plot(rates, [r["p50_ms"] for r in system["rows"]], marker="o", label=f"{name} p50")
        axis.plot(rates, [r["p99_ms"] for r in system["rows"]], marker="^", linestyle="--", label=f"{name} p99")
    axis.axhline(report["p99_bound_ms"], color="grey", linewidth=0.8, label="4 x one image")
    axis.set_xlabel(f"arrival rate: {report['rate_unit']}", fontsize=9)
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"Open loop, Poisson arrivals{' (mixed steps/guidance)' if report['mix'] else ''}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
