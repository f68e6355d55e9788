"""Faults and scaling with real worker subprocesses: kills, hangs, boot failures, autoscaling, drain."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from muse.pools.local import WorkerHandle, WorkerState
from muse.worker.main import parent_of
from tests.serving import LiveServer, live_server, settings, submit_job, wait_for, wait_job


def busy_worker(server: LiveServer) -> tuple[WorkerHandle, int]:
    """A busy worker's handle (to ask the server about it later) and its pid."""
    return wait_for(
        lambda: server.read(
            lambda m: next(((w, w.pid) for w in m.pool.workers if w.state is WorkerState.BUSY and w.pid), None)
        ),
        60,
        0.01,
        "a busy worker",
    )


def ready_workers(server: LiveServer) -> int:
    return server.read(lambda m: sum(1 for w in m.pool.workers if w.state in (WorkerState.IDLE, WorkerState.BUSY)))


def worker_count(server: LiveServer) -> int:
    return server.read(lambda m: len(m.pool.workers))


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_cpu_workers_fork_from_one_warm_server_and_so_does_a_replacement(tiny_model: str) -> None:
    with live_server(settings(tiny_model, devices="cpu,cpu")) as server:
        wait_for(lambda: ready_workers(server) == 2, 120, what="two workers ready")
        first = server.worker_pids()
        (origin,) = {parent_of(pid) for pid in first}  # both forked by one process...
        assert origin != os.getpid() and parent_of(origin) == os.getpid()  # ...the server's forkserver
        # It imported the worker's modules (torch among them) before forking: a worker starts without them.
        assert "libtorch_cpu" in Path(f"/proc/{origin}/maps").read_text()
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: ready_workers(server) == 2 and first[0] not in server.worker_pids(), 120, what="a replacement")
        assert {parent_of(pid) for pid in server.worker_pids()} == {origin}


def test_killed_worker_batch_is_retried_with_the_same_images_and_the_pool_recovers(tiny_model: str) -> None:
    body = {"prompt": "a blue circle", "steps": 60, "n": 4, "seed": 99}
    with live_server(settings(tiny_model, devices="cpu,cpu")) as server:
        job = submit_job(server, body)
        _, victim = busy_worker(server)
        os.kill(victim, signal.SIGKILL)
        result = wait_job(server, job, {"succeeded", "failed"})
        assert result["status"] == "succeeded", result
        wait_for(lambda: ready_workers(server) == 2, 120, what="the pool back at its target of 2")
        assert victim not in server.worker_pids()
        again = httpx.post(server.url + "/api/generate", json=body, timeout=120).json()
        for retried, fresh in zip(result["result"]["images"], again["images"], strict=True):
            assert np.abs(png_pixels(retried["png_base64"]) - png_pixels(fresh["png_base64"])).max() <= 1


def test_hung_worker_is_killed_and_its_batch_retried(tiny_model: str) -> None:
    config = settings(tiny_model, devices="cpu,cpu", worker_timeout=2.0, scale_interval=0.2)
    with live_server(config) as server:
        job = submit_job(server, {"prompt": "hang", "steps": 60, "n": 4})
        victim, pid = busy_worker(server)
        os.kill(pid, signal.SIGSTOP)
        try:
            result = wait_job(server, job, {"succeeded", "failed"})
        finally:
            if server.read(lambda m: victim.link.alive()):
                os.kill(pid, signal.SIGKILL)
        assert result["status"] == "succeeded", result
        assert server.read(lambda m: victim.state) is WorkerState.DEAD


def test_model_that_fails_to_load_is_reported_and_not_respawned(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with live_server(settings(str(broken), scale_interval=0.1), ready=False) as server:
        ready = wait_for(
            lambda: (r := httpx.get(server.url + "/readyz")).status_code == 503 and "boot" in r.text and r, 120
        )
        assert "broken" in ready.json()["reason"]
        ticks = server.read(lambda m: m.autoscaler.ticks)
        wait_for(lambda: server.read(lambda m: m.autoscaler.ticks) >= ticks + 5, 30, what="five reconcile passes")
        assert server.read(lambda m: m.pool.spawned) == 1, "a worker that cannot load must not be respawned"
        refused = httpx.post(server.url + "/api/generate", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_workers"


def test_autoscaler_adds_a_worker_under_load_and_drains_it_when_idle(tiny_model: str) -> None:
    config = settings(
        tiny_model,
        devices="cpu,cpu",
        min_workers=1,
        max_batch_size=2,
        scale_interval=0.1,
        downscale_delay=1.0,
    )
    with live_server(config) as server:
        assert worker_count(server) == 1

        stop = threading.Event()
        statuses: list[int] = []

        async def client(http: httpx.AsyncClient, i: int) -> None:
            while not stop.is_set():
                response = await http.post("/api/generate", json={"prompt": f"l{i}", "steps": 50})
                statuses.append(response.status_code)

        async def load() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
                await asyncio.gather(*(client(http, i) for i in range(4)))

        loader = threading.Thread(target=lambda: asyncio.run(load()))
        loader.start()
        try:
            wait_for(lambda: ready_workers(server) == 2, 120, what="a second worker under load")
        finally:
            stop.set()
            loader.join(300)
        assert statuses and set(statuses) == {200}
        wait_for(lambda: worker_count(server) == 1, 60, what="the surplus worker to drain")
        assert server.read(lambda m: m.pool.target) == 1
        decisions = server.read(lambda m: list(m.autoscaler.decisions))
        assert any(d.startswith("1->2") for d in decisions) and any(d.startswith("2->1") for d in decisions)


def test_scale_to_zero_and_cold_start(tiny_model: str) -> None:
    config = settings(tiny_model, min_workers=0, scale_interval=0.1, downscale_delay=0.5)
    with live_server(config, ready=False) as server:
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 200 and "zero" in ready.json()["reason"]
        assert worker_count(server) == 0
        response = httpx.post(server.url + "/api/generate", json={"prompt": "cold", "steps": 2}, timeout=120)
        assert response.status_code == 200
        wait_for(lambda: worker_count(server) == 0, 60, what="scaling back to zero")


def test_sigterm_to_the_whole_process_group_drains_accepted_requests_and_exits_zero(
    tiny_model: str, tmp_path: Path
) -> None:
    env = os.environ | {"MUSE_MODEL": tiny_model, "MUSE_DEVICES": "cpu", "MUSE_THREADS_PER_WORKER": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "muse", "serve", "--port", "0", "--log-level", "info", "--data-dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group, as a service manager stops it: server, forkserver, workers
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        url = wait_for(
            lambda: next((line.split("serving on ")[1].strip() for line in lines if "serving on" in line), None), 120
        )
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, 120)
        results: list[int] = []

        async def accepted() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                calls = [client.post("/api/generate", json={"prompt": f"d{i}", "steps": 80}) for i in range(3)]
                results.extend(r.status_code for r in await asyncio.gather(*calls))

        clients = threading.Thread(target=lambda: asyncio.run(accepted()))
        clients.start()
        wait_for(lambda: "muse_inflight_images 0.0" not in httpx.get(url + "/metrics").text, 60, 0.02)
        os.killpg(process.pid, signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 503, 30, 0.02, "/readyz 503 while draining")
        late = httpx.post(url + "/api/generate", json={"prompt": "late", "steps": 2})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        clients.join(300)
        assert results == [200, 200, 200]
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
        process.stdout.close()  # type: ignore[union-attr]
    log = "".join(lines)
    assert "model" in log and "devices cpu" in log and "serving on http://" in log
    # The signal reached every process of the group; the worker running the requests finished them.
    assert " died" not in log and "exited with code" not in log, log[-3000:]


def test_cli_generate_writes_png_and_reports_errors(tiny_model: str, tmp_path: Path) -> None:
    with live_server(settings(tiny_model)) as server:
        out = tmp_path / "out.png"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "muse",
                "generate",
                "a red circle",
                "-o",
                str(out),
                "--url",
                server.url,
                "--steps",
                "3",
                "--seed",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert "seed=5" in run.stdout
        with Image.open(out) as image:
            assert image.format == "PNG"
        bad = subprocess.run(
            [sys.executable, "-m", "muse", "generate", "x", "--url", server.url, "--steps", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and "steps" in bad.stderr


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["generate", "--help"]])
def test_help(args: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "muse", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    if args[0] == "serve":
        for flag in ("--model", "--devices", "--port", "--max-batch-size", "--max-wait-ms", "MUSE_DEVICES"):
            assert flag in run.stdout
