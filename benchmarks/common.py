"""Shared pieces of the benchmarks: a served `muse serve` subprocess, its metrics, and the direct pipeline loop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]


@contextmanager
def served_process(cmd: list[str], port: int, ready_path: str, timeout: float = 240.0) -> Iterator[Served]:
    """Run a server command; yield once `ready_path` answers 200; stop it (TERM, then KILL) after."""
    # Its own process group, so the servers' children (LitServe's workers) are stopped with it.
    process = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {process.returncode}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not become ready")
            time.sleep(0.2)  # polling an external process's readiness; nothing to wait on instead
        yield Served(url, process)
    finally:
        stop_group(process)


def pause(served: Served) -> None:
    """Freeze a server's whole process group (its workers too) until `resumed`."""
    os.killpg(served.process.pid, signal.SIGSTOP)


@contextlib.contextmanager
def resumed(served: Served) -> Iterator[Served]:
    """Let a paused server run for one measurement, then freeze it again: servers take turns on the
    same cores without restarts."""
    os.killpg(served.process.pid, signal.SIGCONT)
    try:
        yield served
    finally:
        pause(served)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (LitServe's clean stop; Muse drains on it), then SIGKILL whatever is left of the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGCONT)  # a paused server handles nothing, SIGINT included
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def muse_server(*flags: str, timeout: float = 240.0) -> Any:
    """`muse serve` in a subprocess on a free loopback port; `timeout`: seconds it may take to be ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "muse", "serve", "--port", str(port), "--log-level", "warning", "--no-gallery"]
    return served_process([*cmd, *flags], port, "/readyz", timeout)


def litserve_server(model: str, max_batch_size: int, batch_timeout: float, threads: int) -> Any:
    port = free_port()
    script = Path(__file__).parent / "peers" / "litserve_server.py"
    cmd = [
        sys.executable,
        str(script),
        "--model",
        model,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--max-batch-size",
        str(max_batch_size),
        "--batch-timeout",
        str(batch_timeout),
    ]
    return served_process(cmd, port, "/health")


class DirectPipeline:
    """The ceiling: the same pipeline called in a loop in this process, no server in between."""

    def __init__(self, model: str, threads: int, device: str = "cpu") -> None:
        import torch

        from muse.worker.heap import keep_freed_memory
        from muse.worker.pipeline import load_pipeline, warm_up

        torch.set_num_threads(threads)
        keep_freed_memory()  # as a Muse worker does: the ceiling pays no page faults a worker does not
        self.loaded = load_pipeline(model, device)
        warm_up(self.loaded)

    def run(self, batch: int, steps: int, seed: int = 0, size: int | None = None) -> float:
        """One batch (of `size`-pixel squares, else the model's native size); returns seconds."""
        from muse.messages import Assignment, BatchKey, ImageSpec

        images = [ImageSpec("a red circle on a blue background", "", seed + i) for i in range(batch)]
        width, height = (size, size) if size else (self.loaded.width, self.loaded.height)
        key = BatchKey(width, height, steps, self.loaded.guidance_scale)
        job = Assignment("direct", images, key)
        from muse.worker.pipeline import run_batch

        start = time.perf_counter()
        run_batch(self.loaded, job, lambda step: True)
        return time.perf_counter() - start

    def throughput(self, batch: int, steps: int, duration: float, size: int | None = None) -> float:
        """Images per second over at least `duration` seconds (whole batches)."""
        images, spent = 0, 0.0
        while spent < duration:
            spent += self.run(batch, steps, seed=images, size=size)
            images += batch
        return images / spent


def child_processes(parent: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of each direct child of `parent`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent:
            found.append((int(entry.name), cmdline))
    return found


def metric(text: str, name: str) -> float:
    """An unlabelled sample's value in a /metrics (Prometheus text) page; 0 when absent, as a counter starts."""
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def write_report(report: dict[str, Any], out: Path, plot: Callable[[dict[str, Any], Path], None]) -> None:
    """`out` without extension: the report as JSON beside its plot as PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
