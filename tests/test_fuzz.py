"""Bounded property-based fuzz of the JSON endpoints: no 500, and every response matches its schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from muse.api.a1111 import Txt2ImgResponse
from muse.api.openai import ImagesResponse
from muse.api.openapi import ErrorBody, GenerateResponse, JobCreated
from tests.serving import LiveServer, live_server
from tests.serving import settings as muse_settings

# Values near every boundary, of every JSON type. Sizes and steps stay small when valid, so the
# fuzz is bounded in time on a CPU.
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
BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": st.sampled_from(["a red circle", ""])},
                          optional={k: v for k, v in FIELDS.items() if k != "prompt"}),
    st.dictionaries(st.sampled_from(sorted(FIELDS)), ANY, max_size=4),
    ANY,
)  # fmt: skip
ENDPOINTS: dict[str, type[BaseModel]] = {
    "/api/generate": GenerateResponse,
    "/api/jobs": JobCreated,
    "/v1/images/generations": ImagesResponse,
    "/sdapi/v1/txt2img": Txt2ImgResponse,
}


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    with live_server(muse_settings(tiny_model, request_timeout=5, max_queue=16, max_batch_size=4)) as s:
        yield s


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_fuzzed_bodies_never_500_and_match_their_schema(server: LiveServer, path: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=BODIES)
    def check(body: Any) -> None:
        response = httpx.post(server.url + path, json=body, timeout=60)
        assert response.status_code < 500 or response.status_code in (503, 504), response.text
        if response.status_code in (200, 202):
            ENDPOINTS[path].model_validate(response.json())
        else:
            ErrorBody.model_validate(response.json())

    check()
