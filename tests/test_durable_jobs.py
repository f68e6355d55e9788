"""Accepted is never lost: `kill -9` the server with jobs queued and running, start it again on the same data dir,
and every job ends with the image its seed gives, each webhook delivered once per event id."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from muse.config import EMBEDDED_MODEL
from muse.core.jobstore import JobStore
from muse.core.tickets import Ticket
from muse.messages import GenerateRequest
from tests.pixels import pixels
from tests.process import ServeProcess, serve_process
from tests.receiver import Delivery, receiving
from tests.serving import job_status, live_server, metric, settings, submit_job, wait_for, wait_job

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
JOBS = 20


def body(i: int, webhook_url: str) -> dict[str, Any]:
    return {"prompt": f"a durable lighthouse {i}", "seed": 7000 + i, "steps": 20, "webhook_url": webhook_url}


def jobs_of(server: ServeProcess, ids: list[str]) -> list[dict[str, Any]]:
    return [httpx.get(f"{server.url}/api/jobs/{job_id}").json() for job_id in ids]


def direct_image(server: ServeProcess, i: int) -> np.ndarray:
    """The same request asked for synchronously: the image its seed gives."""
    request = body(i, "")
    del request["webhook_url"]
    response = httpx.post(f"{server.url}/api/generate", json=request, timeout=120)
    assert response.status_code == 200, response.text
    return pixels(response.json()["images"][0]["png_base64"])


def test_kill_9_with_jobs_in_flight_loses_none_and_restarts_them_with_their_seeds(tmp_path: Path) -> None:
    flags = ("--webhook-secret", SECRET, "--webhook-allow-hosts", "127.0.0.1", "--webhook-first-retry", "0.2")
    with receiving(SECRET) as receiver:
        with serve_process(*flags, data=tmp_path) as first:
            ids = []
            for i in range(JOBS):
                response = httpx.post(f"{first.url}/api/jobs", json=body(i, receiver.url))
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
            first.process.kill()  # SIGKILL: no drain, no last write
            first.process.wait(30)

        with serve_process(*flags, data=tmp_path) as second:
            runs = re.findall(r"jobs from the last run: (\d+) queued again", second.log.read_text())
            assert runs and int(runs[-1]) >= 1, "the kill came after every job had ended"
            states = wait_for(
                lambda: (jobs := jobs_of(second, ids)) and all(j["status"] == "succeeded" for j in jobs) and jobs,
                180,
                0.2,
                "every job to succeed after the restart",
            )
            assert [j["id"] for j in states] == ids and [j["seed"] for j in states] == [7000 + i for i in range(JOBS)]
            with ThreadPoolExecutor(4) as pool:
                expected = list(pool.map(lambda i: direct_image(second, i), range(JOBS)))
            for job, want in zip(states, expected, strict=True):
                got = pixels(job["result"]["images"][0]["png_base64"])
                assert np.abs(got.astype(int) - want.astype(int)).max() <= 2, job["id"]

            def all_told() -> list[Delivery] | None:
                got = receiver.delivered()
                return got if len({d.payload["data"]["id"] for d in got}) == JOBS else None

            delivered = wait_for(all_told, 60, 0.1, "a delivered webhook for every job")
            ids_per_job: dict[str, set[str]] = {}
            for delivery in delivered:
                assert delivery.verified and delivery.payload["type"] == "job.succeeded"
                ids_per_job.setdefault(delivery.payload["data"]["id"], set()).add(delivery.id)
            assert sorted(ids_per_job) == sorted(ids)
            assert all(len(event_ids) == 1 for event_ids in ids_per_job.values()), "an event under two ids"
            link = delivered[0].payload["data"]["images"][0]["url"]
            wait_for(lambda: metric(second, "muse_webhook_outbox") == 0, 30, 0.1, "an empty outbox")
            assert metric(second, "muse_webhook_deliveries_total") >= 1

        with serve_process(*flags, data=tmp_path) as third:
            # A third start: the ended jobs are read back with their images, and the links sent still work.
            again = jobs_of(third, ids)
            assert [j["status"] for j in again] == ["succeeded"] * JOBS
            for job, before in zip(again, states, strict=True):
                # The gallery's file: the same pixels, with the A1111 parameters chunk the worker's PNG lacked.
                image = pixels(job["result"]["images"][0]["png_base64"])
                assert np.array_equal(image, pixels(before["result"]["images"][0]["png_base64"]))
            events = httpx.get(f"{third.url}/api/jobs/{ids[0]}/events", timeout=10)
            assert events.text.startswith("event: succeeded")
            path = link.split("/", 3)[3]
            image = httpx.get(f"{third.url}/{path}")
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            runs = re.findall(r"jobs from the last run: (\d+) queued again, (\d+) ended", third.log.read_text())
            assert runs[-1] == ("0", str(JOBS))


def test_a_stop_that_runs_out_of_drain_time_leaves_its_jobs_for_the_next_start(tmp_path: Path) -> None:
    with serve_process("--drain-timeout", "0.5", data=tmp_path) as first:
        response = httpx.post(f"{first.url}/api/jobs", json={"prompt": "a long one", "steps": 100, "n": 2, "seed": 3})
        job_id = response.json()["id"]
        wait_for(lambda: httpx.get(f"{first.url}/api/jobs/{job_id}").json()["status"] == "running", 60)
        first.process.terminate()
        assert first.process.wait(60) == 0
    with serve_process(data=tmp_path) as second:
        job = wait_for(
            lambda: (
                (j := httpx.get(f"{second.url}/api/jobs/{job_id}").json())["status"] not in ("queued", "running") and j
            ),
            180,
            0.2,
            "the job to end after the restart",
        )
        assert job["status"] == "succeeded" and [i["seed"] for i in job["result"]["images"]] == [3, 4]
        assert re.findall(r"jobs from the last run: (\d+) queued again", second.log.read_text())[-1] == "1"


def test_a_job_row_that_cannot_be_read_back_fails_alone_and_the_others_run(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    loop = asyncio.new_event_loop()
    try:
        ids = []
        for i in range(2):
            request = GenerateRequest(f"a kept fox {i}", seed=40 + i, steps=4, guidance_scale=2.0, width=64, height=64)
            ticket = Ticket(f"{i:016x}", request, loop.create_future(), 0.0, 0.0, None)
            store.add(ticket)
            ids.append(ticket.id)
    finally:
        loop.close()
        store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET request = ? WHERE id = ?", ('{"prompt": 7, "from": "a later version"}', ids[0]))
    with live_server(settings(EMBEDDED_MODEL, data_dir=str(tmp_path))) as server:
        broken = wait_job(server, ids[0], {"failed"})
        assert "read back" in broken["error"]["message"]
        kept = wait_job(server, ids[1], {"succeeded", "failed"})
        assert kept["status"] == "succeeded" and kept["seed"] == 41


def test_a_drain_that_runs_out_of_time_tells_a_kept_job_it_runs_again_and_a_waiting_client_it_is_lost(
    tmp_path: Path,
) -> None:
    configured = settings(EMBEDDED_MODEL, data_dir=str(tmp_path), drain_timeout=0.3)
    with live_server(configured) as server:
        job_id = submit_job(server, {"prompt": "a long one", "steps": 40, "n": 8, "seed": 5})
        wait_job(server, job_id, {"running"})
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, f"{server.url}/api/generate", json={"prompt": "a short one"}, timeout=60)
            wait_for(lambda: server.read(lambda m: m.batcher.queued_images) >= 1, 30, what="the request queued")
            asyncio.run_coroutine_threadsafe(server.read(lambda m: m.drain()), server.loop).result(30)
            answer = waiting.result(30)
        job = job_status(server, job_id)
        assert job["status"] == "failed" and "runs again, with the same id" in job["error"]["message"]
        assert answer.status_code == 503 and "shut down before" in answer.json()["error"]["message"]
    with live_server(configured) as again:
        assert wait_job(again, job_id, {"succeeded", "failed"}, timeout=180)["status"] == "succeeded"
