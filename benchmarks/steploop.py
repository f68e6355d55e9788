"""The step worker's loop alone under open-loop arrivals: what batching admissions and decodes buys.

    python benchmarks/steploop.py [--rate 14] [--images 160] [--rounds 3] [--model DIR] [--steps 25]

No server, no client, no pipe: the loop (muse.worker.steploop) runs in this process against a stand-in
parent that releases one-image requests on a Poisson clock (a rate above capacity: saturated, images start
and finish one at a time) and keeps at most capacity + `--ahead` (1, as the service asks) of them in the
worker, as the batcher does.
Each round runs, in rotating order, the direct `pipe()` loop at batch 8 and the loop twice: `batched` as it
ships (negative prompts' embeddings kept, the text of images waiting behind an admission encoded with it,
finished images held up to two steps under load to be decoded together), and `plain` with those three off
(`--ahead` images taken ahead in both); `--variants` may add `unheld` (as shipped, but no image's decode held).
The machine drifts by tens of percent over minutes, so compare within a round. Per run: images/s, ÷ the
round's direct loop, the share of the worker's time outside its UNet calls (admissions, decodes, PNGs,
messages), images per decode, text-encoder calls per image, and p50/p99 latency from each request's arrival
on the clock to its answer (at a `--rate` below capacity, what holding decodes costs a request).
Prints a table, writes benchmarks/results/steploop.json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, write_report
from load import percentile, poisson

from muse.config import EMBEDDED_MODEL
from muse.messages import Assignment, BatchKey, Failure, ImageSpec, Result, Stop
from muse.worker import steploop
from muse.worker.channel import Channel
from muse.worker.heap import keep_freed_memory
from muse.worker.pipeline import LoadedPipeline, load_pipeline, run_batch, warm_up

CAPACITY = 8
FIELDS = ("over_direct", "outside_unet", "images_per_decode", "encoder_calls_per_image", "p50_ms", "p99_ms")


class Arrivals(Channel):
    """The parent, reduced to a Poisson clock: request i is sent once it has arrived and fewer than
    capacity + `ahead` are in the worker; the loop is told to stop once every answer is back."""

    def __init__(self, key: BatchKey, images: int, rate: float, ahead: int, seed: int) -> None:
        super().__init__()
        self.key, self.images, self.ahead = key, images, ahead
        self.arrivals = poisson(rate, images, seed)
        self.begin = time.perf_counter()
        self.inbox: list[object] = []
        self.sent = self.answered = 0
        self.stopped = False
        self.latencies_ms: list[float] = []  # each answer's, from its request's arrival on the clock

    def release(self) -> None:
        now = time.perf_counter() - self.begin
        while (
            self.sent < self.images
            and self.arrivals[self.sent] <= now
            and self.sent - self.answered < CAPACITY + self.ahead
        ):
            spec = ImageSpec(f"a red circle on a blue background, number {self.sent}", "", self.sent)
            self.inbox.append(Assignment(f"r{self.sent}", [spec], self.key))
            self.sent += 1
        if self.answered == self.images and not self.stopped:
            self.stopped = True
            self.inbox.append(Stop())

    def _send(self, message: object) -> None:
        if isinstance(message, Failure):
            raise RuntimeError(message.message)
        if isinstance(message, Result):
            self.answered += 1
            arrived = self.arrivals[int(message.assignment_id.removeprefix("r"))]
            self.latencies_ms.append((time.perf_counter() - self.begin - arrived) * 1000)

    def _recv(self) -> object:
        while True:
            self.release()
            if self.inbox:
                return self.inbox.pop(0)
            time.sleep(0.001)  # the stand-in parent's clock: nothing else to wait on in one thread

    def _poll(self) -> bool:
        self.release()
        return bool(self.inbox)


@contextmanager
def batched(loop: steploop.StepLoop) -> Iterator[None]:
    """The loop as it ships."""
    yield


@contextmanager
def unheld(loop: steploop.StepLoop) -> Iterator[None]:
    """The loop with finished images decoded at once, never held for others."""
    hold = steploop.HOLD_STEPS
    steploop.HOLD_STEPS = 0
    try:
        yield
    finally:
        steploop.HOLD_STEPS = hold


@contextmanager
def plain(loop: steploop.StepLoop) -> Iterator[None]:
    """The loop without its batching of admissions and decodes: no decode held, no negative prompt's embeddings
    kept, no waiting image's text encoded with an admission's (no spare budget)."""
    ahead = loop.encode_ahead
    loop.encode_ahead = lambda joining, key, spare: ahead(joining, key, 0)  # type: ignore[method-assign]
    loop.engine.family.negatives.size = 0  # type: ignore[attr-defined]
    with unheld(loop):
        yield


VARIANTS: dict[str, Callable[[steploop.StepLoop], contextlib.AbstractContextManager[None]]] = {
    "batched": batched,
    "plain": plain,
    "unheld": unheld,
}


def run_loop(loaded: LoadedPipeline, args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    key = BatchKey(loaded.width, loaded.height, args.steps, loaded.guidance_scale)
    channel = Arrivals(key, args.images, args.rate, args.ahead, seed)
    loop = steploop.StepLoop(channel, loaded, CAPACITY)
    unet = [0.0]
    decodes: list[int] = []
    encodes = [0]
    step, decode_start = loop.engine.step, loop.engine.decode_start

    def timed_step() -> Any:
        started = time.perf_counter()
        try:
            return step()
        finally:
            unet[0] += time.perf_counter() - started

    def counted_decode(slots: list[Any]) -> Any:
        decodes.append(len(slots))
        return decode_start(slots)

    loop.engine.step = timed_step  # type: ignore[method-assign]
    loop.engine.decode_start = counted_decode  # type: ignore[method-assign]
    hook = loaded.pipe.text_encoder.register_forward_hook(lambda *_: encodes.__setitem__(0, encodes[0] + 1))
    started = time.perf_counter()
    try:
        with VARIANTS[variant](loop):
            loop.run()
    finally:
        hook.remove()
    seconds = time.perf_counter() - started
    if channel.answered != args.images:
        raise RuntimeError(f"{channel.answered} of {args.images} answered")
    return {
        "img_s": args.images / seconds,
        "outside_unet": (seconds - unet[0]) / unet[0],
        "images_per_decode": statistics.fmean(decodes),
        "encoder_calls_per_image": encodes[0] / args.images,
        "p50_ms": percentile(channel.latencies_ms, 50),
        "p99_ms": percentile(channel.latencies_ms, 99),
    }


def direct(loaded: LoadedPipeline, images: int, steps: int) -> float:
    """The direct `pipe()` loop's images/s over `images` images in batches of 8."""
    key = BatchKey(loaded.width, loaded.height, steps, loaded.guidance_scale)
    started, done = time.perf_counter(), 0
    while done < images:
        specs = [ImageSpec(f"a red circle on a blue background, number {done + i}", "", done + i) for i in range(8)]
        run_batch(loaded, Assignment("direct", specs, key), lambda step: True)
        done += len(specs)
    return done / (time.perf_counter() - started)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = report["rounds"]
    x = range(1, len(rounds) + 1)
    for name in report["median"]:
        ax.plot(x, [r[name]["over_direct"] for r in rounds], marker="o", label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("images/s ÷ direct batch 8")
    ax.set_title(f"step loop alone, Poisson {report['rate']}/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--rate", type=float, default=14.0, help="arrivals per second (above capacity)")
    parser.add_argument("--images", type=int, default=160, help="images per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--ahead", type=int, default=1, help="images the worker holds beyond its capacity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="plain,batched",
        help=f"the loops to run beside the direct one, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--out", default=str(RESULTS / "steploop"), help="path without extension")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a Muse worker does
    loaded = load_pipeline(args.model, "cpu")
    warm_up(loaded)
    rounds = []
    for i in range(args.rounds):
        order = ["direct", *variants]
        order = order[i % len(order) :] + order[: i % len(order)]
        row: dict[str, Any] = {}
        for name in order:
            if name == "direct":
                row[name] = direct(loaded, args.images, args.steps)
            else:
                row[name] = run_loop(loaded, args, name, i)
        for name in variants:
            row[name]["over_direct"] = row[name]["img_s"] / row["direct"]
        rounds.append(row)
        print(
            f"round {i + 1}: direct {row['direct']:.2f} img/s | "
            + " | ".join(
                f"{name} {row[name]['img_s']:.2f} img/s ({row[name]['over_direct']:.3f} x), outside UNet "
                f"{row[name]['outside_unet'] * 100:.1f} %, {row[name]['images_per_decode']:.2f} per decode, "
                f"{row[name]['encoder_calls_per_image']:.2f} encoder calls/image, p50/p99 "
                f"{row[name]['p50_ms']:.0f}/{row[name]['p99_ms']:.0f} ms"
                for name in variants
            ),
            flush=True,
        )
    summary = {
        name: {field: statistics.median(r[name][field] for r in rounds) for field in FIELDS} for name in variants
    }
    print(
        f"\n{'median':<8} {'÷ direct':>9} {'outside UNet':>13} {'per decode':>11} {'encoder calls':>14} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    for name, s in summary.items():
        print(
            f"{name:<8} {s['over_direct']:>9.3f} {s['outside_unet'] * 100:>12.1f}% "
            f"{s['images_per_decode']:>11.2f} {s['encoder_calls_per_image']:>14.2f} {s['p50_ms']:>8.0f} "
            f"{s['p99_ms']:>8.0f}"
        )
    report = {
        "model": Path(args.model).name,
        "rate": args.rate,
        "images": args.images,
        "steps": args.steps,
        "ahead": args.ahead,
        "rounds": rounds,
        "median": summary,
    }
    write_report(report, Path(args.out), plot)


if __name__ == "__main__":
    main()
