"""What the parent knows of a model's family from its folder's JSON alone (no worker, no torch), and the
request semantics that follow: per-family defaults, muse.json overrides, samplers, and the refusals every
front end makes before a request is queued (a negative prompt for FLUX, a UNet sampler for a flow model)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import webuiapi
from PIL import Image
from starlette.testclient import TestClient

from muse.app import create_app
from muse.config import EMBEDDED_MODEL
from muse.errors import InvalidRequest
from muse.model_info import GENERIC_PROMPTS, Limits, ModelInfo, inspect
from muse.schedulers import SCHEDULERS
from muse.schema import GenerateBody, validate
from muse.slack.command import SLACK
from muse.slack.replies import usage
from tests.serving import LiveServer, live_server, settings

LOOPBACK = "http://127.0.0.1"
HX = {"HX-Request": "true"}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def info(folder: str) -> ModelInfo:
    return inspect(folder, EMBEDDED_MODEL)


def request_for(model: ModelInfo, **body: Any) -> Any:
    generate: GenerateBody = validate(GenerateBody, {"prompt": "a fox"} | body)
    return generate.to_request(model)


def write_folder(
    folder: Path,
    pipeline: str,
    denoiser: tuple[str, dict[str, Any]],
    *,
    vae_blocks: int = 4,
    scheduler: str = FLOW_SCHEDULER,
    defaults: dict[str, Any] | None = None,
) -> str:
    """A model folder of JSON only, shaped like a real checkpoint's: what the parent reads."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "scheduler": ["diffusers", scheduler], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, config in ((denoiser[0], denoiser[1]), ("vae", {"block_out_channels": [128] * vae_blocks})):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    if defaults is not None:
        (folder / "muse.json").write_text(json.dumps(defaults))
    return str(folder)


# ---- inspect: family, native size, defaults ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "family", "pipeline", "side", "guidance", "steps"),
    [
        ("tiny_model", "sd", "StableDiffusionPipeline", 32, 3.0, 25),  # guidance from its muse.json
        ("tiny_sdxl_model", "sdxl", "StableDiffusionXLPipeline", 32, 7.5, 25),
        # FLUX's transformer has no sample_size: FluxPipeline's default 128 latents x the VAE's scale (2 here).
        ("tiny_flux_model", "flux", "FluxPipeline", 256, 3.5, 28),
        ("tiny_schnell_model", "flux", "FluxPipeline", 256, 0.0, 4),
        ("tiny_sd3_model", "sd3", "StableDiffusion3Pipeline", 64, 7.0, 28),
    ],
)
def test_inspect_knows_the_family_its_size_and_its_defaults(
    request: pytest.FixtureRequest, fixture: str, family: str, pipeline: str, side: int, guidance: float, steps: int
) -> None:
    model = info(request.getfixturevalue(fixture))
    assert (model.family, model.pipeline) == (family, pipeline)
    assert (model.width, model.height) == (side, side)
    assert (model.guidance_scale, model.steps, model.quality_steps) == (guidance, steps, 2 * steps)
    flow = family in ("flux", "sd3")
    assert model.negative_prompt is (family != "flux")
    assert model.samplers == (() if flow else tuple(SCHEDULERS))
    assert model.scheduler == (FLOW_SCHEDULER if flow else "Euler" if family == "sdxl" else "DDIM")
    assert model.uses_guidance is (fixture != "tiny_schnell_model")


def test_the_embedded_model_is_stable_diffusion_with_its_own_prompts() -> None:
    model = info(EMBEDDED_MODEL)
    assert (model.name, model.family, model.label) == ("muse-demo", "sd", "Stable Diffusion")
    assert (model.width, model.guidance_scale, model.steps, model.quality_steps) == (64, 2.5, 25, 50)
    assert model.prompts != GENERIC_PROMPTS and "background" in model.prompts.placeholder
    assert len(model.prompts.examples) >= 3 and all("background" in p for p in model.prompts.examples)


@pytest.mark.parametrize(
    ("pipeline", "denoiser", "side"),
    [
        ("StableDiffusionPipeline", ("unet", {"sample_size": 64}), 512),
        ("StableDiffusionXLPipeline", ("unet", {"sample_size": 128}), 1024),
        ("FluxPipeline", ("transformer", {"guidance_embeds": True}), 1024),
        ("StableDiffusion3Pipeline", ("transformer", {"sample_size": 128}), 1024),
    ],
)
def test_real_checkpoints_native_sizes(tmp_path: Path, pipeline: str, denoiser: tuple[str, Any], side: int) -> None:
    model = info(write_folder(tmp_path / "m", pipeline, denoiser))
    assert (model.width, model.height) == (side, side)


@pytest.mark.parametrize(
    ("transformer", "schnell"), [({"guidance_embeds": True}, False), ({"guidance_embeds": False}, True), ({}, True)]
)
def test_flux_without_guidance_embedding_is_schnell_shaped(
    tmp_path: Path, transformer: dict[str, Any], schnell: bool
) -> None:
    # A config without the key gets FluxTransformer2DModel's default: no guidance embedding.
    model = info(write_folder(tmp_path / "flux", "FluxPipeline", ("transformer", transformer)))
    assert (model.uses_guidance, model.steps, model.guidance_scale) == ((False, 4, 0.0) if schnell else (True, 28, 3.5))
    assert model.label == ("FLUX.1 schnell" if schnell else "FLUX.1") and model.family == "flux"


def test_another_pipeline_class_is_its_own_family_with_only_its_own_sampler(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "pixart",
        "PixArtAlphaPipeline",
        ("transformer", {"sample_size": 128}),
        scheduler="DPMSolverMultistepScheduler",
    )
    model = info(folder)
    assert (model.family, model.pipeline, model.label) == ("PixArtAlphaPipeline",) * 3
    assert (model.guidance_scale, model.steps, model.negative_prompt) == (7.5, 25, True)
    assert model.samplers == () and model.scheduler == "DPMSolverMultistepScheduler"
    # Its own scheduler by its class, its A1111 name or "default" all mean the model's own; nothing else does.
    for name in ("default", "DPMSolverMultistepScheduler", "DPM++ 2M"):
        assert request_for(model, scheduler=name).scheduler == ""
    with pytest.raises(InvalidRequest):
        request_for(model, scheduler="DDIM")


def test_a_hub_id_is_served_as_before() -> None:
    model = info("black-forest-labs/FLUX.1-dev")  # no folder here: nothing to read
    assert (model.family, model.pipeline, model.width, model.guidance_scale) == ("sd", "", 512, 7.5)


def test_a_hub_id_a_worker_fetched_is_read_from_the_users_cache(
    tiny_flux_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's cache layout (refs/main names the snapshot), as a worker's download leaves it."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "models--acme--tiny-flux"
    shutil.copytree(tiny_flux_model, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = info("acme/tiny-flux")
    assert (model.family, model.pipeline, model.negative_prompt) == ("flux", "FluxPipeline", False)


# ---- muse.json ----------------------------------------------------------------------------------------


def test_muse_json_overrides_every_default(tmp_path: Path) -> None:
    defaults = {
        "guidance_scale": 1.0,
        "num_inference_steps": 6,
        "max_steps": 10,
        "width": 768,
        "height": 512,
        "negative_prompt": True,
        "prompts": {"placeholder": "a cat", "examples": ["a cat", "a dog"]},
    }
    folder = write_folder(tmp_path / "f", "FluxPipeline", ("transformer", {"guidance_embeds": True}), defaults=defaults)
    model = info(folder)
    assert (model.guidance_scale, model.steps, model.max_steps, model.width, model.height) == (1.0, 6, 10, 768, 512)
    assert model.quality_steps == 10, "twice the steps, but never over the model's max_steps"
    assert (
        model.negative_prompt and model.prompts.placeholder == "a cat" and model.prompts.examples == ("a cat", "a dog")
    )
    assert request_for(model, negative_prompt="blurry").negative_prompt == "blurry"


@pytest.mark.parametrize(
    ("defaults", "key"),
    [
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"max_steps": 0}, "max_steps"),
        ({"negative_prompt": "no"}, "negative_prompt"),
        ({"prompts": ["a cat"]}, "prompts"),
        ({"prompts": {"placeholder": "a cat", "examples": [""]}}, "prompts"),
    ],
)
def test_a_wrong_muse_json_value_is_an_error_naming_it(tmp_path: Path, defaults: dict[str, Any], key: str) -> None:
    folder = write_folder(tmp_path / "f", "FluxPipeline", ("transformer", {}), defaults=defaults)
    with pytest.raises(ValueError, match=f"muse.json: {key}"):
        info(folder)


def test_the_model_max_steps_holds_until_the_flag_says_otherwise() -> None:
    model = Limits.around(64, 64, max_steps=0, model_steps=8)  # --max-steps left at its default
    assert (model.max_steps, model.steps_from_model) == (8, True)
    assert Limits.around(64, 64, max_steps=150, model_steps=8).max_steps == 150, "the flag says otherwise"
    assert Limits.around(64, 64, max_steps=20, model_steps=8) == Limits(128, 2 * 128 * 128, 20, False)
    assert Limits.around(64, 64, max_steps=150).max_steps == 150


def test_steps_over_a_muse_json_limit_are_refused_naming_it_and_the_flag(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "schnell", "FluxPipeline", ("transformer", {"guidance_embeds": False}), defaults={"max_steps": 8}
    )
    client = TestClient(create_app(settings(folder, no_gallery=True)), base_url=LOOPBACK)
    response = client.post("/api/generate", json={"prompt": "a fox", "steps": 9})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("steps", "over_limit")
    assert "limit of 8" in error["message"] and "muse.json" in error["message"] and "--max-steps" in error["message"]
    flagged = TestClient(create_app(settings(folder, no_gallery=True, max_steps=12)), base_url=LOOPBACK)
    assert flagged.app.state.muse.model.cost_limits.max_steps == 12  # type: ignore[attr-defined]


# ---- steps and guidance per family ---------------------------------------------------------------------


def test_quality_presets_follow_the_model(tiny_model: str, tiny_flux_model: str, tiny_schnell_model: str) -> None:
    for folder, fast, quality in ((tiny_model, 25, 50), (tiny_flux_model, 28, 56), (tiny_schnell_model, 4, 8)):
        model = info(folder)
        assert request_for(model).steps == fast
        assert request_for(model, quality="quality").steps == quality
        assert request_for(model, quality="quality", steps=3).steps == 3
    schnell = info(tiny_schnell_model)
    # Guidance is accepted for a model that ignores it (FLUX.1 schnell), and passed on as asked.
    assert request_for(schnell, guidance_scale=5.0).guidance_scale == 5.0
    assert request_for(schnell).guidance_scale == 0.0


# ---- refusals: the validation every front end goes through ------------------------------------------


def test_validation_refuses_what_the_family_cannot_do(tiny_flux_model: str, tiny_sd3_model: str) -> None:
    flux, sd3 = info(tiny_flux_model), info(tiny_sd3_model)
    with pytest.raises(InvalidRequest) as refused:
        request_for(flux, negative_prompt="blurry")
    assert (refused.value.param, refused.value.status) == ("negative_prompt", 422)
    assert request_for(flux, negative_prompt="  ").negative_prompt == "", "blank is no negative prompt"
    assert request_for(sd3, negative_prompt="blurry").negative_prompt == "blurry"
    for model in (flux, sd3):
        for name in ("Euler", "Euler a", "DDIM", "Warp"):
            with pytest.raises(InvalidRequest) as refused:
                request_for(model, scheduler=name)
            assert refused.value.param == "scheduler" and FLOW_SCHEDULER in refused.value.message
        for name in ("", "default", FLOW_SCHEDULER, FLOW_SCHEDULER.lower()):
            assert request_for(model, scheduler=name).scheduler == ""


def red_picture() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_sd_sdxl_flux_and_sd3_start_from_a_picture_other_pipelines_do_not(
    tiny_model: str, tiny_sdxl_model: str, tiny_flux_model: str, tiny_sd3_model: str, tmp_path: Path
) -> None:
    picture = red_picture()
    for model in (tiny_model, tiny_sdxl_model, tiny_flux_model, tiny_sd3_model):
        assert request_for(info(model), init_image=picture).source is not None
    # A pipeline Muse only runs whole calls of: its img2img twin is unknown.
    other = write_folder(tmp_path / "pixart", "PixArtAlphaPipeline", ("transformer", {"sample_size": 128}))
    with pytest.raises(InvalidRequest) as refused:
        request_for(info(other), init_image=picture)
    assert (refused.value.param, refused.value.status) == ("init_image", 422)
    assert "text only" in refused.value.message and "FLUX.1 and SD3.x" in refused.value.message


def test_flow_models_cut_a_pictures_steps_their_own_way(tiny_model: str, tiny_flux_model: str) -> None:
    """0.05 x 10 steps runs none in SD's img2img pipelines (refused), one in the flow-matching ones."""
    body = {"init_image": red_picture(), "strength": 0.05, "steps": 10}
    with pytest.raises(InvalidRequest, match="runs no step"):
        request_for(info(tiny_model), **body)
    assert request_for(info(tiny_flux_model), **body).source.strength == 0.05
    assert request_for(info(tiny_flux_model), **body).denoising_steps == 1, "what the queue's estimates count"
    body["strength"] = 0.55
    runs = [request_for(info(model), **body).denoising_steps for model in (tiny_model, tiny_flux_model)]
    assert runs == [5, 6]


def test_slack_names_its_own_option(tiny_flux_model: str) -> None:
    generate: GenerateBody = validate(GenerateBody, {"prompt": "a fox", "negative_prompt": "blurry"}, SLACK)
    with pytest.raises(InvalidRequest) as refused:
        generate.to_request(info(tiny_flux_model), SLACK)
    assert refused.value.param == "--negative" and refused.value.message.startswith("--negative: ")
    flux_usage = usage("/muse", info(tiny_flux_model))
    assert "--negative" not in flux_usage and "(28 steps, the default)" in flux_usage
    assert '--negative "' in usage("/muse", info(EMBEDDED_MODEL))


def test_stable_diffusion_keeps_every_sampler(tiny_model: str) -> None:
    model = info(tiny_model)
    for name, canonical in (("Euler a", "Euler a"), ("k_euler_a", "Euler a"), ("DDIMScheduler", "DDIM"), ("", "")):
        assert request_for(model, scheduler=name).scheduler == canonical
    with pytest.raises(InvalidRequest, match="unknown scheduler 'Warp'; one of: DDIM, Euler"):
        request_for(model, scheduler="Warp")
    with pytest.raises(InvalidRequest, match="PNDM sampler needs at least 4 steps") as refused:
        request_for(model, scheduler="PNDM", steps=3)
    assert refused.value.param == "steps"


# ---- every front end, over HTTP, with no worker ever started -----------------------------------------------


@pytest.fixture(scope="module")
def flux_server(tiny_flux_model: str) -> Iterator[LiveServer]:
    # No worker: a refusal never queues anything, so nothing ever asks for one.
    with live_server(settings(tiny_flux_model, min_workers=0, no_gallery=True), ready=False) as server:
        yield server


def nothing_reached_a_worker(server: LiveServer) -> bool:
    return server.read(lambda m: (m.batcher.queued_images, m.batcher.inflight_images, len(m.pool.workers))) == (0, 0, 0)


def test_a_negative_prompt_for_flux_is_refused_by_every_api(flux_server: LiveServer) -> None:
    url = flux_server.url
    for path in ("/api/generate", "/api/jobs"):
        response = httpx.post(url + path, json={"prompt": "a fox", "negative_prompt": "blurry"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "negative_prompt"
        assert "no negative conditioning" in response.json()["error"]["message"]
    client = openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0)
    with client, pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a fox", extra_body={"negative_prompt": "blurry"})
    assert bad.value.status_code == 400 and bad.value.body["param"] == "negative_prompt"  # type: ignore[index]
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="default")
    with pytest.raises(RuntimeError) as a1111:
        api.txt2img(prompt="a fox", negative_prompt="blurry")
    status, text = a1111.value.args
    assert status == 422 and json.loads(text)["error"]["param"] == "negative_prompt"
    page = httpx.post(url + "/jobs", data={"prompt": "a fox", "negative_prompt": "blurry"}, headers=HX)
    assert page.status_code == 422 and ">Check the negative prompt</h3>" in page.text
    assert nothing_reached_a_worker(flux_server)


def test_a_flow_model_refuses_unet_samplers_naming_the_field(flux_server: LiveServer) -> None:
    url = flux_server.url
    response = httpx.post(url + "/api/generate", json={"prompt": "a fox", "scheduler": "Euler"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "scheduler"
    assert f"'{FLOW_SCHEDULER}'" in response.json()["error"]["message"]
    # The A1111 client sends "Euler a" unless told otherwise: refused, naming its field.
    with pytest.raises(RuntimeError) as a1111:
        webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1").txt2img(prompt="a fox")
    assert a1111.value.args[0] == 422 and json.loads(a1111.value.args[1])["error"]["param"] == "sampler_name"
    page = httpx.post(url + "/jobs", data={"prompt": "a fox", "scheduler": "DDIM"}, headers=HX)
    assert page.status_code == 422 and ">Check the sampler</h3>" in page.text
    assert nothing_reached_a_worker(flux_server)


def test_listings_name_the_family_and_its_samplers(flux_server: LiveServer) -> None:
    url = flux_server.url
    models = httpx.get(url + "/v1/models").json()["data"]
    assert [(m["id"], m["family"], m["pipeline"], m["object"]) for m in models] == [
        (models[0]["id"], "flux", "FluxPipeline", "model")
    ]
    card = httpx.get(f"{url}/v1/models/{models[0]['id']}").json()
    assert card["family"] == "flux"
    sd_models = httpx.get(url + "/sdapi/v1/sd-models").json()
    assert sd_models[0]["family"] == "flux" and sd_models[0]["model_name"] == models[0]["id"]
    assert httpx.get(url + "/sdapi/v1/samplers").json() == [
        {"name": FLOW_SCHEDULER, "aliases": ["default"], "options": {}}
    ]
    page = httpx.get(url + "/").text
    assert 'class="family">FLUX.1</small>' in page
    options = page[page.index('<select id="scheduler"') : page.index("</select>", page.index('<select id="scheduler"'))]
    assert options.count("<option") == 1 and f"{FLOW_SCHEDULER} (the model&#39;s own)" in options
    assert '<textarea id="negative_prompt" name="negative_prompt" rows="2" disabled' in page
    assert "Fast <small>28 steps</small>" in page and "Quality <small>56 steps</small>" in page


def app_client(folder: str) -> TestClient:
    return TestClient(create_app(settings(folder, no_gallery=True)), base_url=LOOPBACK)


def test_stable_diffusion_listings_are_as_before(tiny_model: str) -> None:
    client = app_client(tiny_model)
    samplers = client.get("/sdapi/v1/samplers").json()
    assert [(s["name"], s["aliases"]) for s in samplers] == [(name, [cls]) for name, cls in SCHEDULERS.items()]
    assert client.get("/v1/models").json()["data"][0]["family"] == "sd"
    assert client.get("/sdapi/v1/sd-models").json()[0]["pipeline"] == "StableDiffusionPipeline"
    page = client.get("/").text
    assert '<option value="" selected>Model default</option>' in page
    assert all(f'<option value="{name}" >{name}</option>' in page for name in SCHEDULERS)
    assert "Fast <small>25 steps</small>" in page


def test_the_page_suggests_the_models_own_prompts(tiny_model: str, tiny_schnell_model: str) -> None:
    embedded = app_client(EMBEDDED_MODEL).get("/").text
    own = info(EMBEDDED_MODEL).prompts
    assert f'placeholder="{own.placeholder}"' in embedded and "lighthouse" not in embedded
    for example in own.examples:
        assert f">{example}</a>" in embedded
    assert 'href="/?prompt=a%20red%20circle%20on%20a%20blue%20background"' in embedded
    generic = app_client(tiny_model).get("/").text
    assert f'placeholder="{GENERIC_PROMPTS.placeholder}"' in generic
    schnell = app_client(tiny_schnell_model).get("/").text
    assert 'placeholder="not used"' in schnell and "FLUX.1 schnell takes no guidance" in schnell


def test_sd3_takes_a_negative_prompt_but_only_its_own_sampler(tiny_sd3_model: str) -> None:
    client = app_client(tiny_sd3_model)
    body = {"prompt": "a fox", "negative_prompt": "x", "sampler_name": "DDIM"}
    refused = client.post("/sdapi/v1/txt2img", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "sampler_name"
    assert client.get("/sdapi/v1/sd-models").json()[0]["family"] == "sd3"
    page = client.get("/").text
    assert 'placeholder="what to steer away from"' in page and "Stable Diffusion 3" in page
    assert client.app.state.muse.batcher.queued_images == 0  # type: ignore[attr-defined]
