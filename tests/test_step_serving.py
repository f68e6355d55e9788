"""Step batching end to end: real worker subprocesses running the step engine, real HTTP through uvicorn.

Requests of other step counts, guidance scales, samplers and negative prompts join a running worker
between steps, and each image is still what the plain diffusers pipeline call gives for its seed."""

from __future__ import annotations

import logging
import os
import signal

import httpx
import pytest

from muse.config import EMBEDDED_MODEL
from muse.messages import Batching
from muse.pools.local import WorkerState
from muse.worker.pipeline import LoadedPipeline, load_pipeline
from tests.pixels import assert_plain
from tests.serving import LiveServer, live_server, metric, settings, submit_job, wait_for, wait_job

LONG = {"prompt": "a long one", "steps": 150, "seed": 5}


@pytest.fixture(scope="module")
def direct(tiny_model: str) -> LoadedPipeline:
    return load_pipeline(tiny_model, "cpu")


def running_step(server: LiveServer, job: str, at_least: int) -> None:
    wait_for(lambda: (job_step := httpx.get(f"{server.url}/api/jobs/{job}").json()).get("step") is not None
             and job_step["step"] >= at_least, 60, 0.01, f"job at step {at_least}")  # fmt: skip


def worker_pid(server: LiveServer) -> int:
    return wait_for(
        lambda: server.read(lambda m: next((w.pid for w in m.pool.workers if w.state is WorkerState.BUSY), None)),
        60,
        0.01,
        "a busy worker",
    )


def test_requests_join_a_running_batch_and_each_gets_the_pipelines_pixels(
    tiny_model: str, direct: LoadedPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muse.pools")
    others = [
        {"prompt": "a blue square", "steps": 12, "seed": 2, "guidance_scale": 6.0, "negative_prompt": "green",
         "scheduler": "Euler a"},
        {"prompt": "a green star", "steps": 20, "seed": 3, "guidance_scale": 1.0, "scheduler": "DPM++ 2M", "n": 2},
        {"prompt": "a red circle", "steps": 9, "seed": 4, "guidance_scale": 3.5, "scheduler": "Heun"},
    ]  # fmt: skip
    with live_server(settings(tiny_model)) as server:
        assert server.read(lambda m: m.pool.batching) == Batching.STEP
        first = submit_job(server, LONG)
        running_step(server, first, 3)
        jobs = [submit_job(server, body) for body in others]
        results = [wait_job(server, job, {"succeeded", "failed"}) for job in jobs]
        long = wait_job(server, first, {"succeeded", "failed"})
        # Each joined the long request's running batch rather than waiting for it to end.
        assert metric(server, 'muse_admissions_total{into="running"}') >= len(others)
        # The long request alone made 150 UNet calls; admitting the others (text encoding) took time between calls.
        assert metric(server, "muse_unet_calls_total") >= LONG["steps"]
        assert metric(server, "muse_step_gap_seconds_total") > 0
        assert all(r["result"]["batch_size"] > r["n"] for r in results), [r["result"]["batch_size"] for r in results]
    assert any("batching: step (StableDiffusionPipeline" in r.getMessage() for r in caplog.records)
    for body, result in zip(others, results, strict=True):
        assert_plain(direct, body, result)
    assert_plain(direct, LONG, long)


def test_request_batching_when_forced_gives_the_same_pixels(
    tiny_model: str, direct: LoadedPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muse.pools")
    body = {"prompt": "a yellow moon", "steps": 15, "seed": 11, "n": 2, "scheduler": "Euler"}
    with live_server(settings(tiny_model, batching="request")) as server:
        assert server.read(lambda m: m.pool.batching) == Batching.REQUEST
        assert_plain(direct, body, wait_job(server, submit_job(server, body), {"succeeded", "failed"}))
    assert any("batching: request (StableDiffusionPipeline" in r.getMessage() for r in caplog.records)


def test_a_dead_step_worker_restarts_every_request_on_it_from_step_zero(
    tiny_model: str, direct: LoadedPipeline
) -> None:
    with live_server(settings(tiny_model)) as server:
        first = submit_job(server, LONG)
        running_step(server, first, 2)
        second_body = {"prompt": "joined", "steps": 150, "seed": 8}
        second = submit_job(server, second_body)
        running_step(server, second, 1)
        os.kill(worker_pid(server), signal.SIGKILL)
        results = [wait_job(server, job, {"succeeded", "failed"}) for job in (first, second)]
        assert metric(server, "muse_batches_retried_total") == 2
    assert_plain(direct, LONG, results[0])
    assert_plain(direct, second_body, results[1])


def test_an_expired_request_leaves_its_slot_and_the_others_run_on_in_the_same_worker(tiny_model: str) -> None:
    with live_server(settings(tiny_model)) as server:
        stays = submit_job(server, LONG)
        running_step(server, stays, 1)
        pid = worker_pid(server)
        expires = submit_job(server, {"prompt": "short-lived", "steps": 150, "timeout_s": 0.3})
        ended = wait_job(server, expires, {"succeeded", "failed", "cancelled"})
        assert ended["status"] == "failed" and ended["error"]["code"] == "deadline_exceeded", ended
        wait_for(lambda: metric(server, "muse_batches_interrupted_total") == 1, 30, what="the slot to be freed")
        assert wait_job(server, stays, {"succeeded", "failed"})["status"] == "succeeded"
        assert server.worker_pids() == [pid]


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def test_a_step_worker_reuses_the_memory_its_steps_free_instead_of_faulting_it_back_in() -> None:
    # The embedded model, images joining and leaving at different steps: under glibc's own thresholds this
    # worker took thousands of page faults per image (muse.worker.heap).
    with live_server(settings(EMBEDDED_MODEL, threads_per_worker=2)) as server:
        bodies = [{"prompt": f"a red circle, number {i}", "seed": i, "steps": 6 + i % 9} for i in range(24)]
        for job in [submit_job(server, body) for body in bodies[:8]]:  # warm: the first batch's own allocations
            wait_job(server, job, {"succeeded"})
        (pid,) = server.worker_pids()
        before = minor_faults(pid)
        for job in [submit_job(server, body) for body in bodies[8:]]:
            wait_job(server, job, {"succeeded"})
        per_image = (minor_faults(pid) - before) / 16
    assert per_image < 300, f"{per_image:.0f} page faults per image"
