"""The real AUTOMATIC1111 Python client (`webuiapi`) against /sdapi/v1, unchanged."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi

from tests.serving import LiveServer, live_server, release, run_blocker, submit_job, wait_for, wait_job
from tests.serving import settings as muse_settings


def client_for(server: LiveServer, key: str | None = None) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", steps=2)
    if key is not None:
        api.session.headers["Authorization"] = f"Bearer {key}"
    return api


class InThread:
    """Run a blocking client call on a thread; its result or exception is kept for the test."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result = call()
            except BaseException as exc:
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model)) as s:
        yield s


@pytest.fixture
def api(server: LiveServer) -> webuiapi.WebUIApi:
    return client_for(server)


def test_txt2img_with_the_clients_default_body(api: webuiapi.WebUIApi, server: LiveServer) -> None:
    # Everything else is the client's own default body: hires fix, styles, subseeds, scheduler, scripts…
    result = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, batch_size=2)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [5, 6] and result.info["seed"] == 5
    assert result.info["sampler_name"] == "Euler a" and result.parameters["steps"] == 2
    # The second image again, alone: the same seed gives the same pixels (within 2/255) in or out of a batch.
    again = api.txt2img(prompt="a red circle", seed=6, width=64, height=64)
    difference = np.abs(np.asarray(again.image, np.int16) - np.asarray(result.images[1], np.int16))
    assert difference.max() <= 2


def test_every_png_carries_its_parameters_and_png_info_reads_them_back(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt="a blue square", negative_prompt="blurry", seed=11, width=64, height=64)
    written = result.image.info["parameters"]
    assert written.startswith("a blue square\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a")
    assert "Seed: 11, Size: 64x64" in written

    read = api.png_info(result.image)  # the client re-encodes the image with its text chunks
    assert read.info == written
    parsed = read.json["parameters"]
    assert parsed["Prompt"] == "a blue square" and parsed["Negative prompt"] == "blurry"
    assert parsed["Seed"] == "11" and parsed["Size"] == "64x64" and parsed["Sampler"] == "Euler a"


def test_png_info_refuses_what_is_not_a_png(server: LiveServer) -> None:
    gif = base64.b64encode(b"GIF89a\x01\x00\x01\x00").decode()
    for image in (gif, "not base64 at all!", "data:image/png;base64,AAAA"):
        response = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": image})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "image"
    assert httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": ""}).json()["info"] == ""


def test_listings_the_client_reads(api: webuiapi.WebUIApi, server: LiveServer) -> None:
    assert {"Euler a", "DDIM", "DPM++ 2M"} <= {s["name"] for s in api.get_samplers()}
    assert [s["name"] for s in api.get_schedulers()] == ["automatic"]
    name = server.read(lambda m: m.model.name)
    assert api.util_get_model_names() == [name]
    assert api.util_get_current_model() == name
    assert "Euler a" in api.util_get_sampler_names()
    # What A1111 says when it has none of these installed.
    assert api.get_loras() == [] and api.get_hypernetworks() == [] and api.get_embeddings()["loaded"] == {}
    assert [u["name"] for u in api.get_upscalers()] == ["None"]
    assert api.refresh_checkpoints() is None


def test_progress_is_idle_when_nothing_runs(api: webuiapi.WebUIApi) -> None:
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0 and progress["state"]["job"] == ""
    waited = InThread(api.util_wait_for_ready)
    assert waited.done.wait(10), "util_wait_for_ready must return on an idle server"
    assert waited.error is None


def test_wait_for_ready_returns_once_a_busy_server_is_done(api: webuiapi.WebUIApi, server: LiveServer) -> None:
    blocker = run_blocker(server)
    queued = submit_job(server, {"prompt": "behind the blocker", "steps": 2})
    progress = wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] > 0 and p, 60, what="a step")
    assert progress["state"]["job_count"] == 2 and progress["state"]["job"] == blocker
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    waited = InThread(lambda: api.util_wait_for_ready(check_interval=0.05))
    assert not waited.done.wait(0.3), "returned while the server was busy"
    release(server, blocker)
    assert waited.done.wait(60) and waited.error is None
    assert wait_job(server, queued, {"succeeded"})["status"] == "succeeded"


def test_interrupt_stops_the_callers_running_job_and_leaves_the_queue(
    api: webuiapi.WebUIApi, server: LiveServer
) -> None:
    running = InThread(lambda: api.txt2img(prompt="long", steps=150, batch_size=8, width=64, height=64))
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 0, 60, what="the txt2img to run")
    queued = submit_job(server, {"prompt": "queued behind", "steps": 2})
    assert api.interrupt() == {}
    assert running.done.wait(60)
    assert isinstance(running.error, RuntimeError) and running.error.args[0] == 499
    assert wait_job(server, queued, {"succeeded", "failed", "cancelled"})["status"] == "succeeded"
    wait_for(lambda: api.get_progress()["state"]["job_count"] == 0, 30, what="an idle server")


def test_skip_acts_like_interrupt_on_a_request_whose_images_run_together(
    api: webuiapi.WebUIApi, server: LiveServer
) -> None:
    running = InThread(lambda: api.txt2img(prompt="long", steps=150, batch_size=8, width=64, height=64))
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 0, 60, what="the txt2img to run")
    assert api.skip() == {}
    assert running.done.wait(60) and isinstance(running.error, RuntimeError)


def test_with_keys_progress_and_interrupt_see_only_the_callers_jobs(tiny_model: str) -> None:
    with live_server(muse_settings(tiny_model, api_keys="k1,k2")) as server:
        mine, theirs = client_for(server, "k1"), client_for(server, "k2")
        running = InThread(lambda: mine.txt2img(prompt="k1's", steps=150, batch_size=8, width=64, height=64))
        wait_for(lambda: mine.get_progress()["state"]["sampling_step"] > 0, 60, what="k1's job to run")
        assert theirs.get_progress()["state"]["job_count"] == 0, "k2 must not see k1's job"
        assert theirs.interrupt() == {}
        assert mine.get_progress()["state"]["job_count"] == 1, "k2's interrupt must not touch k1's job"
        assert mine.interrupt() == {}
        assert running.done.wait(60) and isinstance(running.error, RuntimeError)
