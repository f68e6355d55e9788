"""Jobs, progress events, cancellation, deadlines, backpressure and metrics over real HTTP, one CPU worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from muse.client import iter_events
from tests.serving import (
    LiveServer,
    job_status,
    live_server,
    metric,
    release,
    run_blocker,
    settings,
    submit_job,
    wait_for,
    wait_idle,
    wait_job,
)


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    # Progress at every step: these tests follow the events step by step.
    with live_server(settings(tiny_model, max_queue=4, job_ttl=30, max_wait_ms=1, progress_interval=0)) as s:
        yield s


def test_job_lifecycle_with_progress_events_in_order(server: LiveServer) -> None:
    job = submit_job(server, {"prompt": "a red square", "steps": 6, "seed": 3})
    with httpx.stream("GET", f"{server.url}/api/jobs/{job}/events", timeout=60) as stream:
        events = list(iter_events(stream.iter_lines()))
    assert [name for name, _ in events][-1] == "succeeded"
    # The job may start before the stream opens; what arrives is consecutive and ends at the last step.
    progress = [data["step"] for name, data in events if name == "progress"]
    assert progress == list(range(progress[0], 7)) if progress else events[0][0] == "succeeded"
    status = job_status(server, job)
    assert status["status"] == "succeeded" and status["result"]["images"][0]["seed"] == 3
    assert status["step"] == 6 and status["steps"] == 6


def test_events_report_every_step_of_a_job_that_waits_in_the_queue(server: LiveServer) -> None:
    blocker = run_blocker(server)
    job = submit_job(server, {"prompt": "after the blocker", "steps": 5})
    queued = job_status(server, job)
    assert queued["status"] == "queued" and queued["position"] == 0
    events: list[tuple[str, dict]] = []
    with httpx.stream("GET", f"{server.url}/api/jobs/{job}/events", timeout=120) as stream:
        for event, data in iter_events(stream.iter_lines()):
            events.append((event, data))
            if event == "queued":
                httpx.delete(f"{server.url}/api/jobs/{blocker}")  # let it through
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "succeeded"
    assert [d["step"] for n, d in events if n == "progress"] == [1, 2, 3, 4, 5]
    assert names.index("running") < names.index("progress")


def test_cancelled_queued_job_never_reaches_a_worker(server: LiveServer) -> None:
    blocker = run_blocker(server)
    images_before = metric(server, "muse_batch_size_sum")
    job = submit_job(server, {"prompt": "never", "steps": 2, "n": 3})
    cancelled = httpx.delete(f"{server.url}/api/jobs/{job}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    release(server, blocker)
    assert metric(server, "muse_batch_size_sum") == images_before, "the cancelled job must not be computed"
    assert job_status(server, job)["error"]["code"] == "cancelled"


def test_cancelling_a_running_job_interrupts_its_batch(server: LiveServer) -> None:
    before = metric(server, "muse_batches_interrupted_total")
    job = submit_job(server, {"prompt": "long", "steps": 150, "n": 8})
    wait_for(lambda: (job_status(server, job).get("step") or 0) >= 1, 60, what="the first step")
    httpx.delete(f"{server.url}/api/jobs/{job}")
    wait_for(lambda: metric(server, "muse_batches_interrupted_total") == before + 1, 60, what="the interrupt")
    status = job_status(server, job)
    assert status["status"] == "cancelled" and status["step"] < 150


def test_unknown_job_is_404_in_the_standard_shape(server: LiveServer) -> None:
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{server.url}/api/jobs/nope")
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "id"
    assert httpx.get(f"{server.url}/api/jobs/nope/events").status_code == 404


def test_deadline_while_queued_is_504_and_never_computed(server: LiveServer) -> None:
    blocker = run_blocker(server)
    images_before = metric(server, "muse_batch_size_sum")
    response = httpx.post(server.url + "/api/generate", json={"prompt": "late", "steps": 2, "timeout_s": 0.3})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    release(server, blocker)
    assert metric(server, "muse_batch_size_sum") == images_before


def test_deadline_while_running_is_504(server: LiveServer) -> None:
    response = httpx.post(
        server.url + "/api/generate", json={"prompt": "slow", "steps": 150, "n": 8, "timeout_s": 0.5}, timeout=60
    )
    assert response.status_code == 504
    assert "while running" in response.json()["error"]["message"]
    wait_idle(server)  # the interrupted batch ends


def test_disconnected_client_request_is_never_computed(server: LiveServer) -> None:
    blocker = run_blocker(server)
    images_before = metric(server, "muse_batch_size_sum")
    cancelled_before = metric(server, 'muse_requests_total{outcome="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/api/generate", json={"prompt": "gone", "steps": 2}, timeout=0.5)
    wait_for(
        lambda: metric(server, 'muse_requests_total{outcome="cancelled"}') == cancelled_before + 1,
        30,
        what="the server to notice the disconnect",
    )
    release(server, blocker)
    assert metric(server, "muse_batch_size_sum") == images_before


def test_overload_burst_gets_503_with_retry_after_and_every_accepted_request_succeeds(server: LiveServer) -> None:
    blocker = run_blocker(server)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            calls = [client.post("/api/generate", json={"prompt": f"b{i}", "steps": 2}) for i in range(10)]
            return await asyncio.gather(*calls)

    async def scenario() -> list[httpx.Response]:
        task = asyncio.ensure_future(burst())
        full = lambda: server.read(lambda m: m.batcher.queued_images) >= 4  # noqa: E731
        await asyncio.to_thread(wait_for, full, 30, 0.01, "a full queue")
        await asyncio.to_thread(httpx.delete, f"{server.url}/api/jobs/{blocker}")
        return await task

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 4 and statuses.count(503) == 6, statuses
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"


def test_metrics_expose_the_service(server: LiveServer) -> None:
    httpx.post(server.url + "/api/generate", json={"prompt": "m", "steps": 2}, timeout=60)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "muse_queue_images",
        "muse_inflight_images",
        'muse_workers{state="idle"}',
        "muse_batch_size_bucket",
        "muse_queue_seconds_bucket",
        "muse_compute_seconds_bucket",
        "muse_total_seconds_bucket",
        'muse_requests_total{outcome="succeeded"}',
        "muse_images_generated_total",
        "muse_autoscaler_target",
    ):
        assert name in text, name
    assert metric(server, "muse_images_generated_total") >= 1


def test_ended_jobs_kept_for_their_ttl_are_capped_oldest_first(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import muse.core.service

    monkeypatch.setattr(muse.core.service, "MAX_KEPT_JOBS", 3)
    jobs = [submit_job(server, {"prompt": f"kept {i}", "steps": 1}) for i in range(2)]
    for job in jobs:
        wait_job(server, job, {"succeeded"})
    later = [submit_job(server, {"prompt": f"later {i}", "steps": 1}) for i in range(2)]
    assert httpx.get(f"{server.url}/api/jobs/{jobs[0]}").status_code == 404, "the oldest ended job made room"
    for job in [jobs[1], *later]:
        assert httpx.get(f"{server.url}/api/jobs/{job}").status_code == 200
    assert server.read(lambda m: len(m.jobs)) <= 3
