"""LoRA adapters served end to end: the folder is listed and watched, requests name adapters by field or by A1111
prompt tag, images with different adapters share a step worker's calls and each is the pipeline's with that
adapter alone; everything wrong about an adapter is a 422 naming `loras`, and the worker goes on serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from muse.config import EMBEDDED_MODEL
from muse.demo_model.loras import make_lora
from muse.errors import InvalidRequest
from muse.messages import LoraUse
from muse.model_info import ModelInfo
from muse.schema import GenerateBody, validate
from tests.loras import alone
from tests.pixels import TOLERANCE, pixels
from tests.serving import LiveServer, live_server, settings, submit_job, wait_job
from tests.test_loras import PROMPT, request

SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Path:
    folder = tmp_path_factory.mktemp("served-loras")
    make_lora(tiny_model, folder / "ink.safetensors", seed=1)
    make_lora(tiny_model, folder / "glow.safetensors", seed=2, kohya=True)
    make_lora(EMBEDDED_MODEL, folder / "other.safetensors", seed=3)  # for another UNet
    return folder


@pytest.fixture(scope="module")
def server(tiny_model: str, folder: Path) -> Iterator[LiveServer]:
    overrides: dict[str, Any] = {"lora_dir": str(folder), "max_loras_per_request": 2, "threads_per_worker": 2}
    with live_server(settings(tiny_model, **overrides)) as s:
        yield s


def generate(server: LiveServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/api/generate", json={"steps": 8, **SIZE} | body, timeout=120)


def test_the_folder_is_listed_and_a_file_added_later_is_usable(server: LiveServer, folder: Path) -> None:
    listed = httpx.get(server.url + "/api/loras").json()
    assert listed["enabled"] and [f["name"] for f in listed["loras"]] == ["glow", "ink", "other"]
    a1111 = httpx.get(server.url + "/sdapi/v1/loras").json()
    assert [(f["name"], f["path"]) for f in a1111][:1] == [("glow", "glow.safetensors")]
    shutil.copy(folder / "ink.safetensors", folder / "late.safetensors")
    try:
        assert "late" in [f["name"] for f in httpx.get(server.url + "/api/loras").json()["loras"]]
        response = generate(server, {"prompt": "a cat", "loras": [{"name": "late", "scale": 0.5}]})
        assert response.status_code == 200, response.text
    finally:
        (folder / "late.safetensors").unlink()
    gone = generate(server, {"prompt": "a cat", "loras": [{"name": "late"}]})
    assert gone.status_code == 422 and gone.json()["error"]["param"] == "loras"


def test_different_adapters_at_once_each_get_their_own_pixels(
    server: LiveServer, tiny_model: str, folder: Path
) -> None:
    bodies = [
        {"prompt": "a red circle on a blue background", "seed": 2, "loras": [{"name": "ink", "scale": 0.8}]},
        {"prompt": "a red circle on a blue background <lora:glow:1>", "seed": 4},
        {"prompt": "a red circle on a blue background", "seed": 1},
    ]
    jobs = [submit_job(server, {"steps": 8, "guidance_scale": 2.5, **SIZE} | body) for body in bodies]
    results = [wait_job(server, job, {"succeeded", "failed"}) for job in jobs]
    expected = [
        request("a", 2, LoraUse("ink", 0.8)),
        request("b", 4, LoraUse("glow", 1.0)),
        request("c", 1),
    ]
    for result, r in zip(results, expected, strict=True):
        assert result["status"] == "succeeded", result
        served = pixels(result["result"]["images"][0]["png_base64"])
        assert np.abs(served - alone(tiny_model, folder, r)).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"loras": [{"name": "nope"}]}, "loras", "no LoRA named 'nope'"),
        ({"prompt": "a cat <lora:nope:0.5>"}, "loras", "no LoRA named 'nope'"),
        ({"loras": [{"name": "ink"}, {"name": "glow"}, {"name": "other"}]}, "loras", "--max-loras-per-request"),
        ({"loras": [{"name": "ink"}, {"name": "ink", "scale": 0.5}]}, "loras", "named twice"),
        ({"loras": [{"name": "ink", "scale": 9}]}, "loras.0.scale", ""),
        ({"prompt": "a cat <lora:ink:9>"}, "loras", "scales go from"),
        ({"prompt": "a cat <lora:ink:lots>"}, "prompt", "no number"),
        ({"prompt": "<lora:ink:0.5>"}, "prompt", "nothing but LoRA tags"),
    ],
)
def test_bad_adapter_requests_are_refused_before_queueing(
    server: LiveServer, body: dict[str, Any], param: str, words: str
) -> None:
    response = generate(server, {"prompt": "a cat"} | body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_an_adapter_for_another_model_is_a_422_and_the_worker_goes_on(server: LiveServer) -> None:
    pids = server.read(lambda m: [w.pid for w in m.pool.workers])
    refused = generate(server, {"prompt": "a cat", "loras": [{"name": "other"}]})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["param"] == "loras" and "cannot be used" in refused.json()["error"]["message"]
    assert generate(server, {"prompt": "a cat", "loras": [{"name": "ink"}]}).status_code == 200
    assert server.read(lambda m: [w.pid for w in m.pool.workers]) == pids, "no worker died"


def test_a_server_without_a_folder_or_a_family_without_loras_refuses_them() -> None:
    body: GenerateBody = validate(GenerateBody, {"prompt": "a cat", "loras": [{"name": "ink"}]})
    for model, words in (
        (ModelInfo("m", 64, 64, 7.5), "--lora-dir"),
        # A family that takes none (every one Muse knows takes them today).
        (ModelInfo("m", 64, 64, 7.5, takes_loras=False, label="Example", loras=None), "Example models"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            body.to_request(model)
        assert refused.value.param == "loras" and words in refused.value.message


def test_the_drop_in_clients_name_adapters_as_their_apis_allow(
    server: LiveServer, tiny_model: str, folder: Path
) -> None:
    """OpenAI's client in extra_body (its edits' form too), A1111's by prompt tag, and the infotext keeps it."""
    import io

    import openai
    import webuiapi
    from PIL import Image

    with openai.OpenAI(base_url=server.url + "/v1", api_key="any", max_retries=0) as client:
        made = client.images.generate(
            prompt=PROMPT,
            size="64x64",
            extra_body={"seed": 2, "steps": 8, "guidance_scale": 2.5, "loras": [{"name": "ink", "scale": 0.8}]},
        )
        assert made.data and made.data[0].b64_json
        served = pixels(made.data[0].b64_json)
        assert np.abs(served - alone(tiny_model, folder, request("a", 2, LoraUse("ink", 0.8)))).max() <= TOLERANCE
        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (30, 60, 200)).save(picture, format="PNG")
        edited = client.images.edit(
            image=("p.png", picture.getvalue(), "image/png"),
            prompt="a cat",
            extra_body={"steps": 4, "loras": '[{"name": "glow"}]'},
        )
        assert edited.data and edited.data[0].b64_json
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(prompt="a cat", size="64x64", extra_body={"loras": [{"name": "nope"}]})
        assert refused.value.body["param"] == "loras"  # type: ignore[index]
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", steps=4)
    result = api.txt2img(prompt="a cat <lora:glow:0.7>", width=64, height=64, seed=3)
    parameters = result.info["infotexts"][0]
    assert parameters.startswith("a cat") and "<lora:glow:0.7>" in parameters
    again = api.img2img(images=[result.image], prompt="a dog <lora:ink>", denoising_strength=0.5, width=64, height=64)
    parameters = again.info["infotexts"][0]
    assert "<lora:ink:1>" in parameters and "Denoising strength: 0.5" in parameters, parameters
