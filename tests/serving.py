"""Test helpers: a real uvicorn server on an ephemeral port in a background thread, and waits with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TypeVar

import httpx
import uvicorn

from muse.app import create_app
from muse.config import Settings
from muse.core.service import Muse

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | Literal[False] | None], timeout: float = 60.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy (and return that), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling another thread when it is up and which event loop it runs on."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # not when the lifespan or the bind failed (uvicorn then exits)
            self.loop = asyncio.get_running_loop()
            self.port = self.servers[0].sockets[0].getsockname()[1]
            self.up.set()


class LiveServer:
    """The app under uvicorn in a background thread.

    Its state (the service, batcher, pool, workers) belongs to that thread's event loop: a test looks
    at it only through `read`, which runs on the loop, never by reaching into it from the test thread.
    """

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self._muse: Muse = self.app.state.muse
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = _Uvicorn(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.up.is_set() or not self.thread.is_alive(), 60, what="uvicorn to start")
        assert self.server.up.is_set(), "uvicorn exited during start-up"
        self.url = f"http://127.0.0.1:{self.server.port}"
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self.server.loop is not None, "the server is not started"
        return self.server.loop

    def read(self, what: Callable[[Muse], T], timeout: float = 30.0) -> T:
        """`what(muse)` evaluated on the server's event loop, between two of its callbacks."""

        async def on_the_loop() -> T:
            return what(self._muse)

        return asyncio.run_coroutine_threadsafe(on_the_loop(), self.loop).result(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_for(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout, 0.1, "/readyz 200")

    def worker_pids(self) -> list[int]:
        return self.read(lambda m: [w.pid for w in m.pool.workers if w.pid is not None])

    def stop(self) -> None:
        if self.server.loop is None:
            self.server.should_exit = True  # it never came up: no loop to ask
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: it has stopped already
                self.server.loop.call_soon_threadsafe(setattr, self.server, "should_exit", True)
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "server did not stop"


@contextmanager
def live_server(settings: Settings, ready: bool = True) -> Iterator[LiveServer]:
    server = LiveServer(settings).start()
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        server.stop()


def settings(model: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model": model,
        "devices": "cpu",
        "threads_per_worker": 1,
        "log_level": "warning",
        "data_dir": tempfile.mkdtemp(prefix="muse-test-data-"),
    }
    base.update(overrides)
    return Settings(**base)


class Served(Protocol):
    url: str


def metric(server: Served, name: str) -> float:
    """One sample from /metrics, e.g. `muse_requests_total{outcome="cancelled"}`; 0 when absent."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def job_status(server: LiveServer, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/api/jobs/{job_id}").json())


def submit_job(server: LiveServer, body: dict[str, Any]) -> str:
    response = httpx.post(server.url + "/api/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_job(server: LiveServer, job_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (s := job_status(server, job_id))["status"] in states and s, timeout, 0.02, f"job in {states}"
    )


# A job long enough (150 steps of 8 images) to keep the one worker busy until it is released.
BLOCKER = {"prompt": "blocker", "steps": 150, "n": 8}


def run_blocker(server: LiveServer) -> str:
    job = submit_job(server, BLOCKER)
    wait_job(server, job, {"running"})
    return job


def release(server: LiveServer, *jobs: str) -> None:
    """Cancel the blocker (and any other jobs) and wait until nothing runs."""
    for job in jobs:
        httpx.delete(f"{server.url}/api/jobs/{job}")
    wait_idle(server)


def wait_idle(server: LiveServer, timeout: float = 60.0) -> None:
    wait_for(lambda: server.read(lambda m: m.batcher.idle), timeout, what="the batcher to be idle")
