"""`muse serve` as a real subprocess (the CLI, its signals, its limits), for tests that need the whole thing."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.serving import wait_for


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def serve_process(*flags: str, ready: bool = True, data: Path | None = None) -> Iterator[ServeProcess]:
    """`muse serve` on a free port, on `data` (a new folder if None); its log is `server.log` there, appended to
    by each server started on the folder."""
    data = data or Path(tempfile.mkdtemp(prefix="muse-test-data-"))
    log = data / "server.log"
    start = log.stat().st_size if log.exists() else 0
    command = [sys.executable, "-m", "muse", "serve", "--port", "0", "--data-dir", str(data), *flags]
    with log.open("a") as sink:
        process = subprocess.Popen(command, stderr=sink)
    try:
        found = wait_for(
            lambda: re.search(r"serving on (http://\S+)", log.read_text()[start:]) or process.poll() is not None,
            120,
            0.05,
            "the server's address",
        )
        assert process.poll() is None, log.read_text()[-3000:]
        served = ServeProcess(process, found[1], log)  # type: ignore[index]
        if ready:
            wait_for(lambda: httpx.get(served.url + "/readyz").status_code == 200, 120, 0.1, "/readyz 200")
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
