"""A deadline frees the worker, and a dead server leaves no worker behind, even when one step lasts many seconds.

Both run the embedded model at 1024 px (its limits raised by flags), where one denoising step takes
several seconds on this CPU: longer than the bounds asserted, so only killing mid-step can pass.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from muse.config import EMBEDDED_MODEL
from muse.worker.main import parent_of
from tests.process import serve_process
from tests.serving import live_server, submit_job, wait_for, wait_job
from tests.serving import settings as muse_settings

HUGE = {"prompt": "a red circle on a blue background", "width": 1024, "height": 1024, "steps": 150}
SMALL = {"prompt": "a red circle on a blue background", "steps": 2, "seed": 1}
RAISED = {"max_side": 1024, "max_pixels": 1024 * 1024}


def test_an_expired_batch_frees_its_worker_within_seconds() -> None:
    options = RAISED | {"interrupt_grace": 0.5, "request_timeout": 600, "threads_per_worker": 2}
    with live_server(muse_settings(EMBEDDED_MODEL, **options)) as server:
        (before,) = server.worker_pids()
        started = time.monotonic()
        expired = httpx.post(server.url + "/api/generate", json=HUGE | {"timeout_s": 2}, timeout=120)
        deadline = time.monotonic()
        assert expired.status_code == 504, expired.text
        assert deadline - started < 10, "the 504 itself must come at the deadline"
        served = httpx.post(server.url + "/api/generate", json=SMALL, timeout=120)
        assert served.status_code == 200, served.text
        # One step of the expired batch lasts longer than this: only a kill mid-step frees the worker in time.
        assert time.monotonic() - deadline < 15, "the small request waited for the abandoned batch"
        (after,) = server.worker_pids()
        assert after != before, "the worker running the abandoned batch was not replaced"


def descendants_of(pid: int) -> set[int]:
    """Children, their children and so on (a CPU worker is the child of the server's forkserver)."""
    parents = {int(entry.name): parent_of(int(entry.name)) for entry in Path("/proc").glob("[0-9]*")}
    found: set[int] = set()
    while more := {child for child, parent in parents.items() if (parent == pid or parent in found)} - found:
        found |= more
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_server_leaves_no_worker_even_mid_step() -> None:
    flags = ["--max-side", "1024", "--max-pixels", str(1024 * 1024), "--threads-per-worker", "2"]
    workers: set[int] = set()
    with serve_process(*flags) as server:
        try:
            workers = descendants_of(server.pid)
            assert workers, "no worker process found"
            job = httpx.post(server.url + "/api/jobs", json=HUGE, timeout=30).json()["id"]
            status = f"{server.url}/api/jobs/{job}"
            wait_for(lambda: httpx.get(status).json()["status"] == "running", 60, 0.05, "running")
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(30)
            killed_at = time.monotonic()
            wait_for(lambda: not any(alive(p) for p in workers), 5, 0.05, "the orphaned worker to die")
            assert time.monotonic() - killed_at < 5
        finally:
            for pid in workers:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_a_hung_worker_is_found_by_its_step_counter_not_its_heartbeats() -> None:
    # Heartbeats keep coming from a worker stuck in one long step: --worker-timeout looks at steps.
    options = RAISED | {"worker_timeout": 1.0, "max_retries": 0, "threads_per_worker": 2}
    with live_server(muse_settings(EMBEDDED_MODEL, **options)) as server:
        (before,) = server.worker_pids()
        job = submit_job(server, HUGE)
        failed = wait_job(server, job, {"succeeded", "failed"}, timeout=60)
        assert failed["status"] == "failed" and failed["error"]["code"] == "worker_died", failed
        assert "no step" in failed["error"]["message"]
        wait_for(lambda: server.worker_pids() and server.worker_pids() != [before], 60, what="a replacement")
