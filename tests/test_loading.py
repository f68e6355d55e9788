"""Loading any diffusers text-to-image pipeline (FLUX, SD3, SD…) and serving it with whole calls; --dtype,
--quantize int8 (torchao, on CPU); broken folders failing at boot in one line."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from muse.messages import Assignment, BatchKey, BootFailure, ImageSpec, Ready
from muse.worker.main import WorkerConfig, batching_and_why, check_compile, serve
from muse.worker.pipeline import LoadedPipeline, LoadError, choose_dtype, load_pipeline, run_batch
from tests.serving import live_server, settings, wait_for

FAMILIES = ["tiny_flux_model", "tiny_sd3_model", "tiny_model"]


def generate(
    loaded: LoadedPipeline, *specs: ImageSpec, steps: int = 2, side: int = 64
) -> tuple[list[Image.Image], list[int]]:
    """Run one whole call; the images and the steps it reported."""
    steps_seen: list[int] = []
    key = BatchKey(side, side, steps, loaded.guidance_scale)
    pngs = run_batch(loaded, Assignment("a", list(specs), key), lambda step: steps_seen.append(step) or True)
    assert pngs is not None
    return [Image.open(io.BytesIO(png)) for png in pngs], steps_seen


@pytest.mark.parametrize("fixture", FAMILIES)
def test_every_family_loads_and_runs_whole_calls(fixture: str, request: pytest.FixtureRequest) -> None:
    loaded = load_pipeline(request.getfixturevalue(fixture), "cpu")
    images, steps = generate(loaded, ImageSpec("a red circle", "blurry", 1), ImageSpec("a blue square", "", 2))
    assert [(im.format, im.size) for im in images] == [("PNG", (64, 64))] * 2
    assert steps == [1, 2], "progress after every step"
    assert loaded.weight_bytes > 0 and loaded.pipe.dtype == torch.float32


def test_flux_uses_its_own_size_and_guidance_and_the_call_gets_only_what_it_names(tiny_flux_model: str) -> None:
    from muse.model_info import inspect

    loaded = load_pipeline(tiny_flux_model, "cpu")
    info = inspect(tiny_flux_model, "")
    assert (loaded.width, loaded.height, loaded.guidance_scale) == (info.width, info.height, info.guidance_scale)
    assert "negative_prompt" in loaded.accepts and "callback_on_step_end" in loaded.accepts
    # A negative prompt changes nothing on FLUX at true_cfg_scale 1: the same seed gives the same pixels.
    with_negative, _ = generate(loaded, ImageSpec("a cat", "blurry", 7))
    without, _ = generate(loaded, ImageSpec("a cat", "", 7))
    assert with_negative[0].tobytes() == without[0].tobytes()


@pytest.mark.parametrize("fixture", FAMILIES)
def test_int8_weight_only_quantization_loads_and_generates_on_cpu(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    plain = load_pipeline(model, "cpu")
    loaded = load_pipeline(model, "cpu", quantize="int8")
    denoiser = getattr(loaded.pipe, "transformer", None) or loaded.pipe.unet
    kinds = {type(p).__name__ for p in denoiser.parameters()}
    assert "Int8Tensor" in kinds or any("Quantized" in k or "Affine" in k for k in kinds), kinds
    assert loaded.weight_bytes < plain.weight_bytes, "int8 weights take less memory"
    text_encoder = loaded.pipe.text_encoder
    assert {type(p).__name__ for p in text_encoder.parameters()} == {"Parameter"}, "only the denoiser is quantized"
    images, _ = generate(loaded, ImageSpec("a red circle", "", 3))
    assert images[0].size == (64, 64)


def test_dtype_auto_is_bfloat16_for_transformers_and_float16_for_unets_on_cuda() -> None:
    assert choose_dtype("auto", "cuda:0", "transformer") == torch.bfloat16
    assert choose_dtype("auto", "cuda:1", "unet") == torch.float16
    assert choose_dtype("auto", "cpu", "transformer") == torch.float32
    assert choose_dtype("bfloat16", "cpu", "unet") == torch.bfloat16


def test_dtype_flag_sets_the_weights_precision(tiny_sd3_model: str) -> None:
    loaded = load_pipeline(tiny_sd3_model, "cpu", dtype="bfloat16")
    assert loaded.pipe.transformer.dtype == torch.bfloat16 and loaded.pipe.vae.dtype == torch.bfloat16
    images, _ = generate(loaded, ImageSpec("x", "", 1))
    assert images[0].size == (64, 64)


@pytest.mark.parametrize(
    ("quantize", "offload", "flag"),
    [("fp8", "none", "--quantize fp8"), ("nf4", "none", "--quantize nf4"), ("none", "model", "--offload model")],
)
def test_cuda_only_choices_are_refused_on_a_cpu_worker(tiny_model: str, quantize: str, offload: str, flag: str) -> None:
    with pytest.raises(LoadError, match=f"^{flag} needs a CUDA device; this worker's is cpu$"):
        load_pipeline(tiny_model, "cpu", quantize=quantize, offload=offload)


# ---- whole calls of any pipeline: only the arguments its __call__ names ---------------------------------------


class Output:
    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images


class Bare:
    """A pipeline that takes a prompt and little else: no negative prompt, no size, no step callback."""

    scheduler = object()

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompt: list[str], num_inference_steps: int = 50, generator: Any = None) -> Output:
        self.calls.append({"prompt": prompt, "num_inference_steps": num_inference_steps, "generator": generator})
        return Output([Image.new("RGB", (8, 8)) for _ in prompt])


class OldStyle(Bare):
    """A pipeline with the old `callback(step, timestep, latents)` (PixArt, Kandinsky…)."""

    def __call__(  # type: ignore[override]
        self, prompt: list[str], num_inference_steps: int = 50, callback: Any = None, callback_steps: int = 1
    ) -> Output:
        for step in range(num_inference_steps):
            callback(step, 999 - step, None)
        return Output([Image.new("RGB", (8, 8)) for _ in prompt])


def bare_loaded(pipe: Any) -> LoadedPipeline:
    return LoadedPipeline(pipe, "bare", "cpu", 8, 8, 1.0, {"": pipe.scheduler})


def test_a_pipeline_without_step_callbacks_runs_with_only_the_arguments_it_names() -> None:
    pipe = Bare()
    images, steps = generate(bare_loaded(pipe), ImageSpec("a", "not this", 1), ImageSpec("b", "", 2), steps=3)
    assert len(images) == 2 and steps == [], "no progress to report"
    (call,) = pipe.calls
    assert call["prompt"] == ["a", "b"] and call["num_inference_steps"] == 3 and len(call["generator"]) == 2


def test_a_worker_whose_calls_report_no_steps_is_kept_alive_by_its_heartbeats() -> None:
    """Its steps cannot move `last_step` (the hang check's clock), so its heartbeats do; others' never do."""
    from muse.messages import Heartbeat, Ready
    from muse.pools.handles import WorkerHandle
    from muse.pools.inbox import WorkerMessages

    assert not bare_loaded(Bare()).reports_steps and bare_loaded(OldStyle()).reports_steps
    for reports, moves in ((False, True), (True, False)):
        worker = WorkerHandle(1, 0, "cpu")
        worker.info = Ready("m", "cpu", 8, 8, 1.0, 0.1, 1, reports_steps=reports)
        worker.last_step = 0.0
        WorkerMessages()._handle(worker, Heartbeat())
        assert (worker.last_step > 0) is moves, reports


def test_an_old_style_callback_reports_steps_and_stops_the_call() -> None:
    loaded = bare_loaded(OldStyle())
    assert generate(loaded, ImageSpec("a", "", 1), steps=4)[1] == [1, 2, 3, 4]
    key = BatchKey(8, 8, 4, 1.0)
    assert run_batch(loaded, Assignment("b", [ImageSpec("a", "", 1)], key), lambda step: step < 2) is None


def test_a_call_without_images_is_no_text_to_image_pipeline() -> None:
    class Sound(Bare):
        def __call__(self, prompt: list[str]) -> Any:  # type: ignore[override]
            return object()

    with pytest.raises(LoadError, match="Sound is not a text-to-image pipeline"):
        generate(bare_loaded(Sound()), ImageSpec("a", "", 1))


# ---- broken folders: one line, naming the part -------------------------------------------------------------


def copy_of(model: str, tmp_path: Path) -> Path:
    folder = tmp_path / Path(model).name
    shutil.copytree(model, folder)
    return folder


def edit_index(folder: Path, **changes: Any) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_a_missing_transformer_is_named(tiny_flux_model: str, tmp_path: Path) -> None:
    folder = copy_of(tiny_flux_model, tmp_path)
    shutil.rmtree(folder / "transformer")
    with pytest.raises(LoadError) as caught:
        load_pipeline(str(folder), "cpu")
    assert str(caught.value) == (
        f"{folder / 'transformer'} is missing (model_index.json names a FluxTransformer2DModel there)"
    )


def test_missing_weights_are_named(tiny_sd3_model: str, tmp_path: Path) -> None:
    folder = copy_of(tiny_sd3_model, tmp_path)
    for weights in (folder / "text_encoder_3").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(LoadError, match=r"text_encoder_3 has no weights \(model_index.json names a T5EncoderModel"):
        load_pipeline(str(folder), "cpu")


def test_a_folder_without_model_index_is_no_pipeline_folder(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"has no model_index\.json: not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path), "cpu")
    with pytest.raises(LoadError, match="is not a folder"):
        load_pipeline(str(tmp_path / "nowhere"), "cpu")


@pytest.mark.parametrize(
    ("pipeline", "why"),
    [
        ("StableDiffusionImg2ImgPipeline", "its __call__ takes an input image"),
        ("StableDiffusionInstructPix2PixPipeline", "its __call__ takes an input image"),
        ("DDPMPipeline", "its __call__ takes no prompt"),
    ],
)
def test_a_pipeline_that_is_not_text_to_image_is_refused_before_loading(
    tiny_model: str, tmp_path: Path, pipeline: str, why: str
) -> None:
    folder = copy_of(tiny_model, tmp_path)
    edit_index(folder, _class_name=pipeline)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not even read")
    with pytest.raises(LoadError, match=f"^{pipeline} is not a text-to-image pipeline \\({why}"):
        load_pipeline(str(folder), "cpu")


class Recorder:
    """A worker's channel that keeps what the worker sends."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.stop_requested = False

    def send(self, message: object) -> None:
        self.sent.append(message)


def boot(model: str, **options: Any) -> object:
    channel = Recorder()
    config = WorkerConfig(worker_id=1, model=model, device="cpu", threads=1, heartbeat_interval=60, **options)
    if serve(channel, config) == 0:  # type: ignore[arg-type]
        raise AssertionError(f"the worker booted: {channel.sent}")
    (failure,) = channel.sent
    return failure


def test_boot_failures_are_one_line_without_a_traceback(tiny_flux_model: str, tmp_path: Path) -> None:
    folder = copy_of(tiny_flux_model, tmp_path)
    (folder / "vae" / "config.json").write_text("{ not json")
    failure = boot(str(folder))
    assert isinstance(failure, BootFailure)
    assert failure.message.startswith(f"cannot load model {str(folder)!r} on cpu: ")
    assert "\n" not in failure.message and "Traceback" not in failure.message


def test_a_lora_folder_for_a_pipeline_diffusers_loads_no_loras_into_fails_at_boot(
    tiny_model: str, tmp_path: Path
) -> None:
    # A pipeline Muse has no family for takes adapters where its diffusers class loads them; SAG's does not.
    folder = copy_of(tiny_model, tmp_path)
    edit_index(folder, _class_name="StableDiffusionSAGPipeline")
    failure = boot(str(folder), lora_dir=str(tmp_path))
    assert isinstance(failure, BootFailure)
    assert "--lora-dir: StableDiffusionSAGPipeline cannot load LoRA adapters" in failure.message


def test_compile_is_refused_for_a_transformer_at_boot(tiny_flux_model: str) -> None:
    failure = boot(tiny_flux_model, compile=True)
    assert isinstance(failure, BootFailure) and "--compile: FluxPipeline has no UNet" in failure.message


def test_whole_calls_say_why(tiny_flux_model: str, tiny_model: str) -> None:
    flux = load_pipeline(tiny_flux_model, "cpu")
    assert batching_and_why("request", flux.pipe) == ("request", "--batching request")
    mode, why = batching_and_why("auto", flux.pipe)
    assert (mode, why) in {("request", "the step engine does not know it"), ("step", "the step engine knows it")}
    check_compile(WorkerConfig(1, tiny_model, "cpu", 1, 1.0, compile=True), load_pipeline(tiny_model, "cpu").pipe)


# ---- a real server -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_flux_model", "tiny_sd3_model"])
def test_a_server_serves_flux_and_sd3_with_whole_calls(fixture: str, request: pytest.FixtureRequest) -> None:
    with live_server(settings(request.getfixturevalue(fixture), batching="request")) as server:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["ready"] is True, ready
        info: Ready = server.read(lambda m: m.pool.info)
        assert info.batching == "request" and info.pipeline in {"FluxPipeline", "StableDiffusion3Pipeline"}
        body = {"prompt": "a red circle", "steps": 2, "n": 2, "width": 64, "height": 64}
        response = httpx.post(server.url + "/api/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        images = [Image.open(io.BytesIO(base64.b64decode(i["png_base64"]))) for i in response.json()["images"]]
        assert [(im.format, im.size) for im in images] == [("PNG", (64, 64))] * 2


def test_a_server_on_a_broken_folder_says_why_and_refuses_requests(tiny_flux_model: str, tmp_path: Path) -> None:
    folder = copy_of(tiny_flux_model, tmp_path)
    shutil.rmtree(folder / "transformer")
    with live_server(settings(str(folder), batching="request"), ready=False) as server:
        ready = wait_for(
            lambda: (r := httpx.get(server.url + "/readyz")).status_code == 503 and "boot" in r.text and r.json(),
            120,
            0.05,
            "the boot failure",
        )
        assert ready["reason"] == (
            f"every worker failed to boot: cannot load model {str(folder)!r} on cpu: "
            f"{folder / 'transformer'} is missing (model_index.json names a FluxTransformer2DModel there)"
        )
        response = httpx.post(server.url + "/api/generate", json={"prompt": "x", "steps": 2}, timeout=30)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "no_workers" and "transformer is missing" in error["message"]


def test_forcing_step_batching_on_a_pipeline_the_engine_does_not_know_fails_at_boot(
    tiny_model: str, tmp_path: Path
) -> None:
    folder = copy_of(tiny_model, tmp_path)
    edit_index(folder, _class_name="StableDiffusionPAGPipeline")  # the same parts, a call the engine does not know
    failure = boot(str(folder), batching="step")
    assert isinstance(failure, BootFailure)
    assert failure.message.endswith(
        "--batching step: StableDiffusionPAGPipeline does not run on the step engine; use --batching request or auto"
    )
