"""Bounded property-based fuzz of the JSON endpoints, on a real server with the tiny model.

Two properties per endpoint, sent one request at a time (nothing queues behind anything, so a 503
for a full queue or a 504 for a slow one is never legitimate):

* a body valid by construction (and cheap: 1-4 steps (PNDM: 4), at most 3 images, 64-72 px) succeeds, with
  the images it asked for, in a response that matches the endpoint's schema; a job runs to success;
* an arbitrary body, near every boundary and of every JSON type, gets exactly what the endpoint's
  own request models say: success when they accept it, a 4xx in the error shape when they refuse
  it, and never a 5xx (save a 504 for a valid body that asked for a deadline under a minute).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from muse.api import a1111, openai
from muse.api.openapi import ErrorBody, GenerateResponse, JobCreated, JobStatus
from muse.errors import InvalidRequest
from muse.model_info import ModelInfo
from muse.schedulers import ALIASES, MIN_STEPS, SCHEDULERS, canonical
from muse.schema import MAX_SEED, GenerateBody
from tests.serving import LiveServer, live_server, wait_for
from tests.serving import settings as muse_settings

NATIVE_SIDE = 32  # the tiny model's own size, used when a body names none
PNG = b"\x89PNG\r\n\x1a\n"
# A deadline this short may pass before a valid request is done: then 504 is the right answer.
SHORT_DEADLINE_S = 60.0

# ---- arbitrary bodies: values near every boundary, of every JSON type ------------------------------

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**32, -(2**40), 1e308]),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=5),
    st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)  # fmt: skip
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(st.text(max_size=8), st.just("x" * 2001), ANY),
    "negative_prompt": st.one_of(st.text(max_size=4), ANY),
    "steps": st.one_of(st.sampled_from([-1, 0, 1, 2, 151, "2", 2.5]), ANY),
    "seed": st.one_of(st.sampled_from([-1, 0, 2**32 - 1, 2**32]), ANY),
    "guidance_scale": st.one_of(st.sampled_from([-0.1, 0, 3.5, 30, 30.01]), ANY),
    "cfg_scale": st.one_of(st.sampled_from([-1, 4.0, 31]), ANY),
    "width": st.one_of(st.sampled_from([0, 56, 64, 72, 100, 2049]), ANY),
    "height": st.one_of(st.sampled_from([0, 64, 65, 4096]), ANY),
    "n": st.one_of(st.sampled_from([0, 1, 2, 9]), ANY),
    "batch_size": st.one_of(st.sampled_from([0, 1, 2, 9]), ANY),
    "n_iter": st.one_of(st.sampled_from([1, 3, 9]), ANY),
    "quality": st.one_of(st.sampled_from(["fast", "quality", "hd", "standard", "best"]), ANY),
    "size": st.one_of(st.sampled_from(["64x64", "72x64", "auto", "100x100", "x", "64x", "9999x9999"]), ANY),
    "response_format": st.one_of(st.sampled_from(["b64_json", "url", "jpeg"]), ANY),
    "model": st.one_of(st.sampled_from(["muse-demo", "dall-e-3"]), ANY),
    "scheduler": st.one_of(st.sampled_from(["DDIM", "Euler a", "nope"]), ANY),
    "sampler_name": st.one_of(st.sampled_from(["DDIM", "Euler a", "nope"]), ANY),
    "timeout_s": st.one_of(st.sampled_from([0, 0.001, 5]), ANY),
    "unknown_field": ANY,
}
ARBITRARY = st.one_of(
    st.fixed_dictionaries({"prompt": st.sampled_from(["a red circle", ""])},
                          optional={k: v for k, v in FIELDS.items() if k != "prompt"}),
    st.dictionaries(st.sampled_from(sorted(FIELDS)), ANY, max_size=4),
    # Field names no endpoint knows, beside a good prompt: refused, ignored or listed, never a 500.
    st.builds(lambda extra: {**extra, "prompt": "a red circle", "steps": 1},
              st.dictionaries(st.text(max_size=4), ANY, max_size=2)),
    ANY,
)  # fmt: skip

# ---- valid bodies, by construction ----------------------------------------------------------------

PROMPT = st.text(min_size=1, max_size=12).filter(str.strip)
TEXT = st.text(max_size=8)
STEPS = st.integers(1, 4)  # always given: the defaults (25 or 50 steps) are for the arbitrary bodies
SEED = st.integers(0, MAX_SEED)
GUIDANCE = st.one_of(st.integers(0, 30), st.floats(0, 30))
SIDE = st.sampled_from([64, 72])
IMAGES = st.integers(1, 3)
SCHEDULER = st.sampled_from(sorted(SCHEDULERS) + sorted(ALIASES)[:3] + ["", "default", "euler A"])
LONG_DEADLINE = st.one_of(st.integers(600, 86400), st.floats(600, 86400))


def enough_steps(body: dict[str, Any]) -> dict[str, Any]:
    """At least the steps its sampler needs (PNDM's warm-up takes several); fewer is a 422."""
    scheduler = body.get("scheduler") or body.get("sampler_name") or body.get("sampler_index")
    return body | {"steps": max(body["steps"], MIN_STEPS.get(canonical(scheduler) or "", 1))}


NATIVE_VALID = st.fixed_dictionaries(
    {"prompt": PROMPT, "steps": STEPS},
    optional={
        "negative_prompt": TEXT,
        "quality": st.sampled_from(["fast", "quality"]),
        "seed": st.none() | SEED,
        "guidance_scale": st.none() | GUIDANCE,
        "width": st.none() | SIDE,
        "height": st.none() | SIDE,
        "n": IMAGES,
        "timeout_s": st.none() | LONG_DEADLINE,
        "scheduler": st.none() | SCHEDULER,
    },
).map(enough_steps)


def openai_valid(model_name: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"prompt": PROMPT, "steps": STEPS},
        optional={
            "model": st.sampled_from([None, model_name]),
            "n": st.none() | IMAGES,
            "size": st.sampled_from([None, "auto", "64x64", "72x64", "64X72"]),
            "quality": st.none() | st.sampled_from(["standard", "low", "medium", "auto", "hd", "high", "xhigh", "max"]),
            "response_format": st.sampled_from([None, "b64_json", "url"]),
            "output_format": st.sampled_from([None, "png"]),
            "stream": st.sampled_from([None, False]),
            "user": st.none() | TEXT,
            "negative_prompt": TEXT,
            "seed": st.none() | SEED,
            "guidance_scale": st.none() | GUIDANCE,
            # OpenAI's fields that change nothing here are ignored, whatever they hold.
            "style": ANY,
            "background": ANY,
            "moderation": ANY,
        },
    )


@st.composite
def a1111_valid(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(
        st.fixed_dictionaries(
            {"prompt": PROMPT, "steps": STEPS},
            optional={
                "negative_prompt": TEXT,
                "cfg_scale": st.none() | GUIDANCE,
                "width": st.none() | SIDE,
                "height": st.none() | SIDE,
                "seed": st.integers(-1, MAX_SEED),
                "sampler_name": st.none() | SCHEDULER,
                "sampler_index": st.none() | SCHEDULER,
                # A1111's fields Muse does not support are ignored (and listed in a header).
                "restore_faces": ANY,
                "enable_hr": ANY,
                "tiling": ANY,
            },
        )
    )
    batch_size, n_iter = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (3, 1), (1, 3)]))
    if draw(st.booleans()):
        body |= {"batch_size": batch_size, "n_iter": n_iter}
    return enough_steps(body)


@dataclass(frozen=True)
class Expected:
    """What a successful answer must hold."""

    n: int
    steps: int
    width: int
    height: int
    seed: int | None  # the first image's, when the body fixed it
    url: bool = False  # OpenAI's response_format "url"


def expected_of_valid(path: str, body: dict[str, Any]) -> Expected:
    """Read straight off a body from the valid strategies (every value of its proper type)."""
    seed = body.get("seed")
    if path == "/sdapi/v1/txt2img":
        n = body.get("batch_size", 1) * body.get("n_iter", 1)
        return Expected(n, body["steps"], body.get("width") or NATIVE_SIDE, body.get("height") or NATIVE_SIDE,
                        None if seed == -1 else seed)  # fmt: skip
    if path == "/v1/images/generations":
        size = (body.get("size") or "auto").lower()
        width, height = (NATIVE_SIDE, NATIVE_SIDE) if size == "auto" else map(int, size.split("x"))
        return Expected(body.get("n") or 1, body["steps"], width, height, seed, body.get("response_format") == "url")
    return Expected(body.get("n", 1), body["steps"], body.get("width") or NATIVE_SIDE,
                    body.get("height") or NATIVE_SIDE, seed)  # fmt: skip


def expected_by_the_models(path: str, body: Any, model: ModelInfo) -> Expected | None:
    """What the endpoint's own request models (those its handler validates with) and the served
    model's defaults and cost limits make of `body`; None when they refuse it."""
    body = json.loads(json.dumps(body))  # exactly what the server parses
    if not isinstance(body, dict):
        return None
    url = False
    try:
        if path in ("/api/generate", "/api/jobs"):
            generate = GenerateBody.model_validate(body)
        elif path == "/v1/images/generations":
            images = openai.ImagesRequest.model_validate(body)
            generate = openai.to_generate_body(images)
            if images.model not in (None, model.name):
                return None
            url = images.response_format == "url"
        else:
            generate = a1111.to_generate_body(a1111.Txt2ImgRequest.model_validate(body))
        request = generate.to_request(model)
    except (ValidationError, InvalidRequest):
        return None
    return Expected(request.n, request.steps, request.width, request.height, generate.seed, url)


def short_deadline(path: str, body: Any) -> bool:
    timeout = body.get("timeout_s") if isinstance(body, dict) and path.startswith("/api/") else None
    return isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout < SHORT_DEADLINE_S


# ---- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    # One request at a time and small valid bodies: the queue never fills, and no valid request
    # comes near the deadline even on a busy 2-core machine.
    with live_server(muse_settings(tiny_model, request_timeout=60, max_queue=16, max_batch_size=4)) as s:
        yield s


@pytest.fixture(scope="module")
def model(server: LiveServer) -> ModelInfo:
    """The served model's name, defaults and limits, as the server knows them."""
    info = server.read(lambda m: m.model)
    assert (info.width, info.height) == (NATIVE_SIDE, NATIVE_SIDE)
    return info


def post(server: LiveServer, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def finished_job(server: LiveServer, job_id: str) -> dict[str, Any]:
    """Wait for the job to end, so the next example finds an idle server; its final status."""

    def ended() -> dict[str, Any] | None:
        status = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
        return status if status["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(ended, 120, 0.02, f"job {job_id} to end")


def check_success(server: LiveServer, path: str, expected: Expected, response: httpx.Response) -> None:
    """A 200 (202 for a job, which then succeeds) matching the endpoint's schema, with the images asked for."""
    if path == "/api/jobs":
        assert response.status_code == 202, response.text
        created = JobCreated.model_validate(response.json())
        status = finished_job(server, created.id)
        job = JobStatus.model_validate(status)
        assert job.status == "succeeded" and job.result is not None, status
        assert (job.n, job.steps) == (expected.n, expected.steps), status
        assert expected.seed is None or job.seed == expected.seed, status
        check_images(job.result, expected)
        return
    assert response.status_code == 200, response.text
    data = response.json()
    if path == "/api/generate":
        check_images(GenerateResponse.model_validate(data), expected)
    elif path == "/v1/images/generations":
        images = openai.ImagesResponse.model_validate(data).data
        assert len(images) == expected.n, data
        for image in images:
            if expected.url:
                assert image.url is not None and image.url.startswith(server.url + "/gallery/"), image
                assert httpx.get(image.url).content.startswith(PNG)
            else:
                assert image.b64_json is not None and base64.b64decode(image.b64_json).startswith(PNG)
    else:
        result = a1111.Txt2ImgResponse.model_validate(data)
        assert len(result.images) == expected.n
        assert all(base64.b64decode(image).startswith(PNG) for image in result.images)
        info = json.loads(result.info)
        assert (info["steps"], info["width"], info["height"]) == (expected.steps, expected.width, expected.height)
        if expected.seed is not None:
            assert info["all_seeds"] == seeds(expected), info


def seeds(expected: Expected) -> list[int]:
    assert expected.seed is not None
    return [(expected.seed + i) % 2**32 for i in range(expected.n)]


def check_images(result: GenerateResponse, expected: Expected) -> None:
    assert len(result.images) == expected.n
    assert all(base64.b64decode(image.png_base64).startswith(PNG) for image in result.images)
    assert (result.steps, result.width, result.height) == (expected.steps, expected.width, expected.height)
    if expected.seed is not None:
        assert [image.seed for image in result.images] == seeds(expected)


def check_error(response: httpx.Response, statuses: Callable[[int], bool]) -> None:
    assert statuses(response.status_code), (response.status_code, response.text)
    ErrorBody.model_validate(response.json())


PATHS = ["/api/generate", "/api/jobs", "/v1/images/generations", "/sdapi/v1/txt2img"]
# Derandomized: the same examples every run, so a failure reproduces and the run time is steady.
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("path", PATHS)
def test_valid_bodies_succeed_and_match_their_schema(server: LiveServer, model: ModelInfo, path: str) -> None:
    valid = {
        "/api/generate": NATIVE_VALID,
        "/api/jobs": NATIVE_VALID,
        "/v1/images/generations": openai_valid(model.name),
        "/sdapi/v1/txt2img": a1111_valid(),
    }[path]

    @settings(FUZZ, max_examples=30)
    @given(body=valid)
    def check(body: dict[str, Any]) -> None:
        expected = expected_of_valid(path, body)
        assert expected_by_the_models(path, body, model) == expected, f"the strategy made a bad body: {body}"
        check_success(server, path, expected, post(server, path, body))

    check()


@pytest.mark.parametrize("path", PATHS)
def test_arbitrary_bodies_get_what_the_models_say_and_never_a_5xx(
    server: LiveServer, model: ModelInfo, path: str
) -> None:
    @settings(FUZZ, max_examples=100)
    @given(body=ARBITRARY)
    def check(body: Any) -> None:
        response = post(server, path, body)
        expected = expected_by_the_models(path, body, model)
        if expected is None:
            check_error(response, lambda status: 400 <= status < 500)
        elif short_deadline(path, body) and response.status_code == 504:
            check_error(response, lambda status: True)
            assert response.json()["error"]["code"] == "deadline_exceeded", response.text
        elif path == "/api/jobs" and short_deadline(path, body):
            assert response.status_code == 202, response.text
            status = finished_job(server, JobCreated.model_validate(response.json()).id)
            JobStatus.model_validate(status)
            assert status["status"] == "succeeded" or status["error"]["code"] == "deadline_exceeded", status
        else:
            check_success(server, path, expected, response)

    check()
