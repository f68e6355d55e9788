"""The whole request path for real: uvicorn on an ephemeral port, two CPU worker subprocesses, a tiny pipeline."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from muse.pools.local import WorkerState
from tests.serving import LiveServer, live_server, settings, wait_for

STEPS = 4


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(settings(tiny_model, devices="cpu,cpu", max_wait_ms=50)) as s:
        yield s


def pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB"), dtype=np.int16)


def post(server: LiveServer, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + "/api/generate", json=body, timeout=120, **kw)


def test_health_and_readiness(server: LiveServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_generate_returns_png_seed_and_timings(server: LiveServer) -> None:
    response = post(server, {"prompt": "a red circle on a blue background", "steps": STEPS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] and body["steps"] == STEPS
    assert (body["width"], body["height"]) == (32, 32), "defaults to the model's native size"
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))
    assert image.format == "PNG" and image.size == (32, 32)
    assert 0 <= body["images"][0]["seed"] < 2**32
    t = body["timings"]
    assert t["total_ms"] >= t["compute_ms"] > 0 and t["queued_ms"] >= 0
    assert body["batch_size"] >= 1


def test_quality_maps_to_steps_and_explicit_steps_win(server: LiveServer) -> None:
    assert post(server, {"prompt": "x", "quality": "fast", "n": 1, "seed": 1}).json()["steps"] == 25
    assert post(server, {"prompt": "x", "quality": "quality", "steps": 3}).json()["steps"] == 3


def test_sixteen_concurrent_requests_batch_and_use_both_workers(server: LiveServer) -> None:
    # /readyz turns 200 with the first ready worker; a burst sent while the other still loads
    # rightly all goes to that one (seen: [0, 0] -> [0, 3]), so wait for both.
    wait_for(
        lambda: server.read(lambda m: [w.state for w in m.pool.workers]) == [WorkerState.IDLE] * 2,
        what="both workers idle",
    )
    done_before = server.read(lambda m: [w.assignments_done for w in m.pool.workers])

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post("/api/generate", json={"prompt": f"a blue square {i}", "steps": STEPS, "seed": i})
                    for i in range(16)
                )
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["images"][0]["seed"] for r in responses] == list(range(16))
    assert max(r.json()["batch_size"] for r in responses) > 1
    done_after = server.read(lambda m: [w.assignments_done for w in m.pool.workers])
    assert all(after > before for before, after in zip(done_before, done_after, strict=True)), (
        f"both workers should have run batches: {done_before} -> {done_after}"
    )


def test_same_seed_gives_same_pixels_alone_or_in_a_batch(server: LiveServer) -> None:
    prompt = {"prompt": "a green triangle on a white background", "steps": STEPS, "guidance_scale": 4.0}
    alone = post(server, {**prompt, "seed": 42}).json()
    assert alone["batch_size"] == 1
    # Seeds 41, 42, 43 in one pipeline call: the middle image is seed 42's.
    batched = post(server, {**prompt, "seed": 41, "n": 3}).json()
    assert batched["batch_size"] >= 3
    assert [i["seed"] for i in batched["images"]] == [41, 42, 43]
    diff = np.abs(pixels(alone["images"][0]["png_base64"]) - pixels(batched["images"][1]["png_base64"]))
    assert diff.max() <= 1
    other = np.abs(pixels(alone["images"][0]["png_base64"]) - pixels(batched["images"][0]["png_base64"]))
    assert other.max() > 1, "different seeds must give different images"


BAD_INPUTS = [
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({}, 422, "prompt"),
    ({"prompt": "x" * 2001}, 422, "prompt"),
    ({"prompt": "x", "colour": "red"}, 422, "colour"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "x", "steps": "10"}, 422, "steps"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "steps": 151}, 422, "steps"),
    ({"prompt": "x", "steps": 2.5}, 422, "steps"),
    ({"prompt": "x", "width": 100}, 422, "width"),
    ({"prompt": "x", "height": 56}, 422, "height"),
    ({"prompt": "x", "width": 4096}, 422, "width"),
    ({"prompt": "x", "n": 0}, 422, "n"),
    ({"prompt": "x", "n": 9}, 422, "n"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "seed": 2**32}, 422, "seed"),
    ({"prompt": "x", "guidance_scale": 31}, 422, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -0.5}, 422, "guidance_scale"),
    ({"prompt": "x", "quality": "best"}, 422, "quality"),
    ({"prompt": "x", "n": True}, 422, "n"),
    ({"prompt": "x", "negative_prompt": None}, 422, "negative_prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_INPUTS)
def test_bad_input_gets_4xx_naming_the_field(server: LiveServer, body: Any, status: int, param: str) -> None:
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param in error["message"] and error["code"]


@pytest.mark.parametrize("raw", [b"not json", b"{", b"[1, 2]", b'"prompt"', b"\xff\xfe"])
def test_body_that_is_not_a_json_object_is_400(server: LiveServer, raw: bytes) -> None:
    response = httpx.post(server.url + "/api/generate", content=raw, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_unknown_route_and_method_use_the_error_shape(server: LiveServer) -> None:
    missing = httpx.get(server.url + "/api/nothing")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong = httpx.get(server.url + "/api/generate")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_sigkill_of_a_busy_worker_ends_its_requests_with_503_and_others_keep_serving(tiny_model: str) -> None:
    with live_server(settings(tiny_model, devices="cpu,cpu", max_retries=0)) as server:

        async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                slow = asyncio.ensure_future(
                    client.post("/api/generate", json={"prompt": "slow", "steps": 150, "n": 8})
                )
                busy_pid = await asyncio.to_thread(
                    wait_for,
                    lambda: server.read(
                        lambda m: next((w.pid for w in m.pool.workers if w.state is WorkerState.BUSY and w.pid), None)
                    ),
                    30,
                    0.01,
                    "a busy worker",
                )
                killed_at = time.monotonic()
                os.kill(busy_pid, signal.SIGKILL)
                failed = await slow
                elapsed = time.monotonic() - killed_at
                ok = await client.post("/api/generate", json={"prompt": "after", "steps": STEPS})
                return failed, ok, elapsed

        failed, ok, elapsed = asyncio.run(scenario())
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["code"] == "worker_died"
        assert elapsed < 5
        assert ok.status_code == 200
