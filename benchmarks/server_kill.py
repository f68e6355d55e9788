"""Chaos's server-kill round: jobs with webhooks sent to a server that is SIGKILLed (its whole process group, as
an OOM kill or a lost machine would) while they are queued and running, then started again on the same data dir.

Reports jobs accepted (202), succeeded, lost (never ended, or unknown after the restarts: must be 0), webhook
events missing (a job that ended without a delivered event: must be 0), and jobs whose end was delivered under
two event ids (must be 0; the same id twice is at-least-once delivery working, counted as `redelivered`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from common import free_port, served_process


class Receiver:
    """Webhook deliveries, recorded as (webhook-id, job id, event type)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, str]] = []

    def record(self, event_id: str, body: bytes) -> None:
        payload = json.loads(body)
        with self.lock:
            self.seen.append((event_id, payload["data"]["id"], payload["type"]))


@contextmanager
def receiving() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            receiver.record(self.headers.get("webhook-id", ""), body)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def kill_group(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def ended(url: str, job_ids: list[str]) -> dict[str, str]:
    states = {}
    for job_id in job_ids:
        response = httpx.get(f"{url}/api/jobs/{job_id}", timeout=10)
        states[job_id] = response.json()["status"] if response.status_code == 200 else f"http {response.status_code}"
    return states


def server_kill_round(model: str, devices: str, jobs: int, kills: int, steps: int, wait_s: float = 300.0) -> dict:
    data = tempfile.mkdtemp(prefix="muse-chaos-data-")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    port = free_port()  # one address across restarts: the links a job's webhook carries stay good
    flags = ["--model", model, "--devices", devices, "--data-dir", data, "--log-level", "warning"]
    flags += ["--webhook-secret", secret, "--webhook-allow-hosts", "127.0.0.1", "--webhook-first-retry", "0.2"]
    command = [sys.executable, "-m", "muse", "serve", "--port", str(port), *flags]
    rng = random.Random(0)
    accepted: list[str] = []
    start = time.perf_counter()
    with receiving() as (receiver, hook):
        for round_ in range(kills + 1):
            with served_process(command, port, "/readyz") as served:
                for i in range(jobs // (kills + 1)):
                    body = {"prompt": f"a lighthouse {round_}.{i}", "steps": steps, "webhook_url": hook}
                    response = httpx.post(f"{served.url}/api/jobs", json=body, timeout=30)
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                if round_ < kills:
                    time.sleep(rng.uniform(0.0, 1.5))  # the kill lands at a random moment of the work
                    kill_group(served.process)
                    continue
                deadline = time.monotonic() + wait_s
                states = ended(served.url, accepted)
                while any(s in ("queued", "running") for s in states.values()) and time.monotonic() < deadline:
                    time.sleep(0.5)  # polling another process's jobs over HTTP
                    states = ended(served.url, accepted)
                told = lambda: {job for _, job, _ in receiver.seen}  # noqa: E731
                while len(told() & set(accepted)) < len(accepted) and time.monotonic() < deadline:
                    time.sleep(0.2)
    outcomes = Counter(states.values())
    per_job: dict[str, set[str]] = {}
    for event_id, job, _ in receiver.seen:
        per_job.setdefault(job, set()).add(event_id)
    finished = [job for job, state in states.items() if state in ("succeeded", "failed", "cancelled")]
    return {
        "jobs_accepted": len(accepted),
        "server_kills": kills,
        "outcomes": dict(outcomes),
        "succeeded": outcomes["succeeded"],
        "lost": len(accepted) - len(finished),
        "webhooks_missing": sum(1 for job in finished if job not in per_job),
        "events_under_two_ids": sum(1 for ids in per_job.values() if len(ids) > 1),
        "redelivered": len(receiver.seen) - len({event_id for event_id, _, _ in receiver.seen}),
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
