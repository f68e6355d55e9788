"""The GPU proof in one command: every CUDA path exercised and measured, in order, within a time budget.

    python benchmarks/gpu_check.py OUT [--device cuda:0] [--budget 480]
    python benchmarks/gpu_check.py OUT --tiny      # the same, end to end on a CPU with tiny models (CI)

Runs each stage in its own process, with what is left of the budget as its limit, so that a stage cut off
(or failing) still leaves every earlier stage's results:
a. tests: every test marked `device` (the step engine vs `pipe()` pixels on every family, bucket padding,
   compiled vs eager, finished images leaving through the PNG thread, one request served by a worker
   subprocess on the device), on `--device`; pass/fail per test -> tests.xml (JUnit);
b. `--compile`: eager vs compiled direct throughput at batch 1/8/16, and served `--compile` vs compiled direct
   (benchmarks/fast.py; SD 1.5's architecture at 512 px, fp16, 25 steps, random weights) -> gpu_fast.json/.png;
c. open loop: Poisson arrivals at 0.8 x the direct capacity at batch 8, step batching vs `--batching request`
   (benchmarks/gpu.py) -> openloop.json;
d. FLUX.1 on the step engine: served vs the direct `pipe()` loop, a short request joining a long one, and open
   loop step vs request batching (benchmarks/families.py, the tiny random FLUX.1-dev shape) -> flux.json/.png.
The SD 1.5 pipeline is built once (random weights from benchmarks/sd15/; no network) and shared by b and c.
Everything lands in OUT, eight files at most: the stages' files, log.txt (every stage's output) and
summary.txt (each stage's status and time, the device, the figures that matter). Exits non-zero when a stage
failed or ran out of time. `--tiny`: CPU, tiny pipelines, 2 steps at 64 px, a few minutes in all; it is run
by CI (.ci/run), so the command is known to work before it first meets a card. A lent machine lacks Muse's
web stack and cannot download it: benchmarks/gpu_wheels.sh fetches the wheels here and says how to install
them there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import child_processes
from pipelines import build_sd15, build_tiny

HERE = Path(__file__).parent
ROOT = HERE.parent
# Shares of the budget: a stage may use what earlier ones left over, never more than what remains.
SHARES = {"tests": 0.25, "compile": 0.4, "openloop": 0.2, "flux": 0.15}
GRACE_S = 20.0  # for a stage cut off to wind down


@dataclass
class Stage:
    name: str
    command: list[str]
    outputs: list[str]  # files the stage must leave in OUT
    status: str = "not run"
    seconds: float = 0.0


def stages(out: Path, model: Path, device: str, tiny: bool, tests_filter: str) -> list[Stage]:
    python = sys.executable
    tests = [python, "-m", "pytest", "-m", "device", "--device", device, "-p", "no:cacheprovider", "-q"]
    # Warnings shown, not failures (the suite's own setting): a card's torch and driver warn of other things.
    tests += ["-o", "addopts=", "-W", "default", "--junitxml", str(out / "tests.xml")]
    if tests_filter:
        tests += ["-k", tests_filter]
    if tiny:
        sizes = ["--steps", "2", "--size", "64", "--reps", "1"]
        fast = ["--batches", "2", "--duration", "4", *sizes]
        loop = ["--batches", "2", "--openloop", "0.5", "--duration", "5", *sizes]
        flux = ["--size", "64", "--batch", "2", "--duration", "3", "--tries", "1"]
    else:
        # Served at 8: warming the buckets of 16 too would double the server's compile time.
        fast = ["--batches", "1,8,16", "--served-batch", "8", "--reps", "2", "--duration", "10"]
        loop = ["--batches", "8", "--openloop", "0.8", "--duration", "10", "--reps", "2"]
        flux = ["--size", "256", "--batch", "8", "--duration", "8", "--tries", "3"]
    model_flags = ["--device", device, "--model", str(model)]
    return [
        Stage("tests", tests, ["tests.xml"]),
        Stage("compile", [python, str(HERE / "fast.py"), *model_flags, *fast, "--out", str(out / "gpu_fast")],
              ["gpu_fast.json"]),
        Stage("openloop", [python, str(HERE / "gpu.py"), *model_flags, *loop, "--out", str(out / "openloop.json")],
              ["openloop.json"]),
        Stage("flux", [python, str(HERE / "families.py"), "--family", "flux", "--device", device, *flux,
                       "--out", str(out / "flux")], ["flux.json"]),
    ]  # fmt: skip


def run_stage(stage: Stage, limit: float, log: Path, out: Path) -> None:
    start = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n==== {stage.name}: {' '.join(stage.command)}\n")
        sink.flush()
        try:
            process = subprocess.Popen(
                stage.command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
            code = process.wait(timeout=max(1.0, limit))
            stage.status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            # Interrupted first, as Ctrl-C would: pytest still writes its report of the tests that ran, and a
            # benchmark stops its servers; killed if that takes too long.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                # The servers a benchmark starts run in sessions of their own: found before their parent dies.
                for pid in [process.pid, *descendants(process.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                process.wait()
            stage.status = f"cut off after {limit:.0f} s"
    stage.seconds = time.monotonic() - start
    missing = [name for name in stage.outputs if not (out / name).exists()]
    if stage.status == "ok" and missing:
        stage.status = f"failed (no {', '.join(missing)})"
    print(f"{stage.name}: {stage.status} in {stage.seconds:.0f} s", flush=True)


def descendants(pid: int) -> list[int]:
    found, parents = [], [pid]
    while parents:
        children = [child for child, _ in child_processes(parents.pop())]
        found += children
        parents += children
    return found


def tests_summary(path: Path) -> list[str]:
    if not path.exists():
        return ["tests: no report"]
    suites = ElementTree.parse(path).getroot()
    cases = list(suites.iter("testcase"))
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in cases
        if c.find("failure") is not None or c.find("error") is not None
    ]
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    lines = [f"tests: {len(cases) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped"]
    return lines + [f"  FAILED {name}" for name in failed]


def figures(out: Path) -> list[str]:
    """The figures the issue's targets are about, from the stages' JSON (those that ran)."""
    lines: list[str] = []

    def read(name: str) -> dict[str, Any] | None:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    if fast := read("gpu_fast.json"):
        ratios = ", ".join(f"batch {b}: {r:.2f}" for b, r in fast["compiled_over_eager"].items())
        lines.append(f"compiled ÷ eager: {ratios} (target ≥ 1.8 at 16)")
        batch1 = fast["compiled"].get("1")
        if batch1:
            lines.append(f"compiled batch-1 latency: {1 / batch1:.3f} s (target ≤ 0.45)")
        served = fast["served_over_direct"]
        measured = "not measured" if served is None else f"at batch {fast.get('served_batch', '?')}: {served:.3f}"
        lines.append(f"served --compile ÷ compiled direct {measured} (target ≥ 0.97)")
    if loop := read("openloop.json"):
        for row in loop["rows"]:
            lines.append(
                f"batch {row['batch']}: direct {row['direct']['images_per_s']:.2f} img/s, "
                f"served ÷ direct {row['ratio']:.3f}"
            )
        if run := loop.get("openloop"):
            for mode in ("step", "request"):
                r = run[mode]
                lines.append(
                    f"open loop {run['rate']:.2f}/s ({run['fraction']} x capacity), {mode}: p50 "
                    f"{r['p50_ms'] or 0:.0f} ms, p99 {r['p99_ms'] or 0:.0f} ms, errors {r['errors']}"
                )
    if flux := read("flux.json"):
        lines.append(
            f"FLUX: served ÷ direct {flux['ratio_served_over_direct']:.3f}, joining ÷ alone "
            f"{flux['ratio_joining_over_alone']:.2f}, open loop p99 step ÷ request "
            f"{flux['open_loop'].get('p99_step_over_request', 'n/a')}"
        )
    return lines


def device_lines(device: str) -> list[str]:
    import torch

    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        lines.append(f"card: {torch.cuda.get_device_name(device)}")
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            lines.append(f"nvidia-smi: {smi.stdout.strip()}")
        except (OSError, subprocess.TimeoutExpired):
            lines.append("nvidia-smi: not available")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for every result (created; at most eight files)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds for all stages (default 480; --tiny 900)")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny pipelines: the command's own smoke test")
    parser.add_argument("--tests", default="", help="only the device tests matching this -k expression")
    args = parser.parse_args()
    if args.tiny:
        args.device = "cpu"
    budget = args.budget or (900.0 if args.tiny else 480.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, begun = out / "log.txt", time.monotonic()
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="muse-gpu-check-") as tmp:
        model = Path(tmp) / "model"
        if args.tiny:
            build_tiny(model)
        else:
            import torch

            build_sd15(model, torch.float16)
        print(f"built the pipeline in {time.monotonic() - begun:.0f} s", flush=True)
        plan = stages(out, model, args.device, args.tiny, args.tests)
        saved = 0.0  # what earlier stages left of their shares
        for stage in plan:
            left = budget - (time.monotonic() - begun)
            if left < 10:
                stage.status = "not run (no time left)"
                continue
            share = SHARES[stage.name] * budget + saved
            run_stage(stage, min(share, left), log, out)
            saved = max(0.0, share - stage.seconds)
    total = time.monotonic() - begun
    summary = [
        f"benchmarks/gpu_check.py on {args.device}{' (--tiny)' if args.tiny else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {total:.0f} s of {budget:.0f}",
        *device_lines(args.device),
    ]
    summary += [f"stage {s.name}: {s.status}, {s.seconds:.0f} s" for s in plan]
    summary += tests_summary(out / "tests.xml") + figures(out)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    sys.exit(0 if all(s.status == "ok" for s in plan) else 1)


if __name__ == "__main__":
    main()
