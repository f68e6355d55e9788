"""Worker side: load a diffusers text-to-image pipeline on one device and run whole calls of it.

Any pipeline whose `__call__` takes a prompt and no input image serves: it is called with only the keyword
arguments its signature names. Loading checks the folder first, so a broken one fails in one line that names
the missing part. Precision (--dtype), quantization of the denoiser (--quantize, through diffusers' own
quantization configs) and CPU offload (--offload) are chosen here.

Nothing here knows about asyncio or HTTP; it runs inside a worker subprocess.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline
from PIL import Image

from muse.messages import Assignment, BatchKey, ImageSpec
from muse.model_info import inspect as inspect_model
from muse.schedulers import SCHEDULERS
from muse.worker.families.flow import decode_flow
from muse.worker.loras import LoraError, Plan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Parameters through which a pipeline takes the picture it transforms: img2img, inpainting, ControlNet, edits.
IMAGE_INPUTS = ("image", "mask_image", "control_image", "init_image", "video")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# Values of --quantize and --offload that only work on a CUDA device.
NEEDS_CUDA = {
    "fp8": "--quantize fp8",
    "nf4": "--quantize nf4",
    "model": "--offload model",
    "sequential": "--offload sequential",
}


class LoadError(Exception):
    """The model cannot serve here, said in one line (what the parent's /readyz shows)."""


@dataclass
class LoadedPipeline:
    pipe: Any
    model: str
    device: str
    width: int
    height: int
    guidance_scale: float
    schedulers: dict[str, Any] = field(default_factory=dict)
    # Never-used instances to copy: `from_config` costs ~1 ms (it inspects signatures), a copy ~0.1 ms,
    # and the step engine makes one scheduler per image.
    _pristine: dict[str, Any] = field(default_factory=dict, repr=False)
    accepts: frozenset[str] = frozenset()  # the keyword arguments the pipeline's __call__ names
    # The img2img and inpaint pipelines over the same components (diffusers' AutoPipeline...from_pipe), made
    # when a request first needs one.
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)
    loras: Any = None  # --lora-dir: muse.worker.loras.RowLoras

    def derived(self, kind: str) -> Any:
        """The pipeline of the same components that starts from a picture: "img2img" or "inpaint"."""
        if kind not in self._derived:
            auto = AutoPipelineForInpainting if kind == "inpaint" else AutoPipelineForImage2Image
            derived = auto.from_pipe(self.pipe)
            derived.set_progress_bar_config(disable=True)
            self._derived[kind] = derived
        return self._derived[kind]

    @property
    def reports_steps(self) -> bool:
        """Whether a call can report each step (and be stopped between steps)."""
        accepts = self.accepts or frozenset(inspect.signature(self.pipe.__call__).parameters)
        return "callback_on_step_end" in accepts or {"callback", "callback_steps"} <= accepts

    weight_bytes: int = 0  # parameters and buffers of every module, wherever they sit

    def new_scheduler(self, name: str) -> Any:
        """A new instance of the named scheduler ("" = the model's own) from the model's scheduler config."""
        if name not in self._pristine:
            base = self.schedulers[""]
            cls = type(base) if not name else getattr(diffusers, SCHEDULERS[name])
            self._pristine[name] = cls.from_config(base.config)
        return copy.deepcopy(self._pristine[name])

    def use_scheduler(self, name: str) -> None:
        """Swap in the named scheduler, built once."""
        if name not in self.schedulers:
            self.schedulers[name] = self.new_scheduler(name)
        self.pipe.scheduler = self.schedulers[name]


def load_pipeline(
    model: str, device: str, *, dtype: str = "auto", quantize: str = "none", offload: str = "none"
) -> LoadedPipeline:
    """The pipeline in `model` (a folder or a hub id) on `device`; LoadError when it cannot serve there."""
    check_device(device, quantize, offload)
    if device.startswith("cuda:"):
        # This worker's GPU is the current one: parts that quantizers place on "the" GPU land on it, and no
        # CUDA context is made on cuda:0 for nothing.
        torch.cuda.set_device(device)
    folder = local_folder(model)
    index = check_folder(folder)
    name = str(index.get("_class_name"))
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type):
        check_text_to_image(cls)  # before minutes of loading weights
    denoiser = denoiser_name(index)
    precision = choose_dtype(dtype, device, denoiser)
    kwargs: dict[str, Any] = {dtype_keyword(): precision}
    if quantize != "none":
        kwargs["quantization_config"] = quantization(quantize, denoiser, precision, name)
    pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    check_text_to_image(type(pipe))
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    info = inspect_model(str(folder), "")  # the name is the parent's business; sizes and defaults are ours
    accepts = frozenset(inspect.signature(pipe.__call__).parameters)
    return LoadedPipeline(
        pipe,
        model,
        device,
        info.width,
        info.height,
        info.guidance_scale,
        {"": pipe.scheduler},
        accepts=accepts,
        weight_bytes=weight_bytes(pipe),
    )


def check_device(device: str, quantize: str, offload: str) -> None:
    for value in (quantize, offload):
        if value in NEEDS_CUDA and not device.startswith("cuda"):
            raise LoadError(f"{NEEDS_CUDA[value]} needs a CUDA device; this worker's is {device}")
    if offload != "none" and importlib.util.find_spec("accelerate") is None:
        raise LoadError(f"--offload {offload} needs accelerate: pip install 'muse[quant]'")


def local_folder(model: str) -> Path:
    """The folder to load: `model` itself, or a hub id's snapshot in the user's cache (downloaded once)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LoadError(f"{model} is not a folder (a diffusers pipeline folder, with model_index.json, or a hub id)")
    return Path(DiffusionPipeline.download(model))


def check_folder(folder: Path) -> dict[str, Any]:
    """`model_index.json`, after checking that every part it names is there: one line naming the first
    missing one (diffusers itself says "no file named config.json found in directory <the pipeline's>")."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise LoadError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
    try:
        index = dict(json.loads(index_file.read_text()))
    except ValueError as exc:
        raise LoadError(f"{index_file} is not valid JSON ({exc})") from None
    for name, entry in index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            continue  # metadata, or an optional part the pipeline does without
        part = folder / name
        what = f"model_index.json names a {entry[1]} there"
        if not part.is_dir():
            raise LoadError(f"{part} is missing ({what})")
        files = [p for p in part.iterdir() if p.is_file()]
        if not files:
            raise LoadError(f"{part} is empty ({what})")
        # A model (config.json; tokenizers and schedulers have their own *_config.json) needs its weights.
        weights = any(p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json") for p in files)
        if (part / "config.json").is_file() and not weights:
            raise LoadError(f"{part} has no weights ({what}; no {' or '.join(WEIGHT_SUFFIXES[:2])} file)")
    return index


# Pipelines that take a picture but draw from text too: an inpainting checkpoint given a white mask repaints all.
DRAW_FROM_TEXT = ("StableDiffusionInpaintPipeline",)


def check_text_to_image(cls: type) -> None:
    """A pipeline serves if its `__call__` takes a prompt and no picture to start from (or is an inpainting
    checkpoint's)."""
    if cls.__name__ in DRAW_FROM_TEXT:
        return
    params = inspect.signature(cls.__call__).parameters
    images = [p for p in IMAGE_INPUTS if p in params]
    if "prompt" not in params:
        raise LoadError(f"{cls.__name__} is not a text-to-image pipeline (its __call__ takes no prompt)")
    if images:
        raise LoadError(
            f"{cls.__name__} is not a text-to-image pipeline (its __call__ takes an input {', '.join(images)}); "
            "serve the text-to-image pipeline of the same checkpoint"
        )


def denoiser_name(index: dict[str, Any]) -> str | None:
    """The pipeline's denoiser: a transformer (FLUX, SD3, PixArt, …) or a UNet (SD, SDXL, …)."""
    for name in ("transformer", "unet"):
        if isinstance(index.get(name), list) and all(index[name]):
            return name
    return None


def choose_dtype(wanted: str, device: str, denoiser: str | None) -> torch.dtype:
    """--dtype auto: on CUDA, bfloat16 for transformer families (trained in it; float16 overflows) and
    float16 for UNets; elsewhere the checkpoints' float32."""
    if wanted != "auto":
        return DTYPES[wanted]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if denoiser == "transformer" else torch.float16


def dtype_keyword() -> str:
    """diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns)."""
    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


def quantization(quantize: str, denoiser: str | None, dtype: torch.dtype, pipeline: str) -> Any:
    """--quantize: diffusers' quantization config for the denoiser alone (the text encoders and VAE keep
    --dtype: they run once per image, the denoiser once per step)."""
    if denoiser is None:
        raise LoadError(f"--quantize {quantize}: {pipeline} has neither a unet nor a transformer to quantize")
    library = "bitsandbytes" if quantize == "nf4" else "torchao"
    for needed in (library, "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise LoadError(f"--quantize {quantize} needs {needed}: pip install 'muse[quant]'")
    try:
        from diffusers import PipelineQuantizationConfig
    except ImportError:
        raise LoadError(f"--quantize {quantize} needs diffusers >= 0.34 (PipelineQuantizationConfig)") from None
    config: Any
    if quantize == "nf4":
        from diffusers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        from diffusers import TorchAoConfig

        torchao = importlib.import_module("torchao.quantization")  # an optional library, and untyped
        weights = torchao.Int8WeightOnlyConfig() if quantize == "int8" else torchao.Float8WeightOnlyConfig()
        config = TorchAoConfig(weights)  # a config object: this diffusers refuses a name ("int8wo")
    return PipelineQuantizationConfig(quant_mapping={denoiser: config})


def weight_bytes(pipe: Any) -> int:
    """The bytes of every module's parameters and buffers (a quantized tensor counts its packed data)."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(tensor_bytes(t) for t in tensors)
    return total


def tensor_bytes(tensor: Any) -> int:
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:  # a tensor subclass (torchao): the tensors it holds
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel() * tensor.element_size())


def warm_up(loaded: LoadedPipeline) -> None:
    """One tiny call so the first real request does not pay for lazy initialisation."""
    key = BatchKey(loaded.width, loaded.height, 1, loaded.guidance_scale)
    run_batch(loaded, Assignment("warm-up", [ImageSpec("warm up", "", 0)], key), lambda step: True)


# Pipelines whose own decode is wrong, decoded here from their latents instead, as the step engine decodes
# them: diffusers' SD3 inpaint pipeline drops the VAE's shift factor that it subtracts when it encodes and that
# every other SD3 pipeline adds back (huggingface/diffusers#13611).
DECODED_HERE = ("StableDiffusion3InpaintPipeline",)


class _Interrupted(Exception):
    """Raised from an old-style `callback` to stop a pipeline that has no `callback_on_step_end`."""


def run_batch(loaded: LoadedPipeline, batch: Assignment, on_step: Callable[[int], bool]) -> list[bytes] | None:
    """Run one batch; `on_step(step)` is called after each denoising step and returns False to stop.
    A pipeline with neither `callback_on_step_end` nor `callback` runs to the end without reporting steps.

    Returns PNG bytes per image, or None when interrupted.
    """
    key = batch.key
    loaded.use_scheduler(key.scheduler)
    # An inpainting checkpoint's own pipeline takes pictures (and masks) itself.
    own = type(loaded.pipe).__name__ in DRAW_FROM_TEXT
    pipe = loaded.derived(key.source) if key.source and not own else loaded.pipe
    if pipe is not loaded.pipe:
        pipe.scheduler = loaded.pipe.scheduler  # from_pipe shares components, but not a swapped-in scheduler
    accepts = (
        loaded.accepts
        if pipe is loaded.pipe and loaded.accepts
        else frozenset(inspect.signature(pipe.__call__).parameters)
    )
    decode_here = type(pipe).__name__ in DECODED_HERE
    interrupted = False

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal interrupted
        if not on_step(step + 1):
            interrupted = True
            pipe._interrupt = True
        return kwargs

    def old_callback(step: int, timestep: Any, latents: Any) -> None:
        if not on_step(step + 1):
            raise _Interrupted

    # CPU generators, one per image: the same seed gives the same latents on any device and
    # whatever else shares the batch.
    wanted: dict[str, Any] = {
        "prompt": [spec.prompt for spec in batch.images],
        "num_inference_steps": key.steps,
        "guidance_scale": key.guidance_scale,
        "width": key.width,
        "height": key.height,
        "generator": [torch.Generator(device="cpu").manual_seed(spec.seed) for spec in batch.images],
        "output_type": "latent" if decode_here else "pil",
    }
    if any(spec.negative_prompt for spec in batch.images):
        wanted["negative_prompt"] = [spec.negative_prompt for spec in batch.images]
    if key.source:
        sources = [spec.source for spec in batch.images]
        wanted["image"] = [picture(source.image) for source in sources if source is not None]
        wanted["strength"] = key.strength
        if key.source == "inpaint":
            wanted["mask_image"] = [picture(source.mask) for source in sources if source and source.mask]
    if "mask_image" in accepts and "mask_image" not in wanted:
        # An inpainting checkpoint drawing from text, or from a whole picture: everything is repainted.
        count, size = len(batch.images), (key.width, key.height)
        wanted.setdefault("image", [Image.new("RGB", size) for _ in range(count)])
        wanted["mask_image"] = [Image.new("L", size, 255) for _ in range(count)]
    if "callback_on_step_end" in accepts:
        wanted["callback_on_step_end"] = callback
    elif "callback" in accepts and "callback_steps" in accepts:
        wanted.update(callback=old_callback, callback_steps=1)
    arguments = {name: value for name, value in wanted.items() if name in accepts}
    rows: Any = contextlib.nullcontext()
    if key.loras:
        if loaded.loras is None:
            raise LoraError("loras: this server has no LoRA folder (--lora-dir)")
        loaded.loras.load_now(key.loras)
        rows = loaded.loras.rows(Plan.every_row(loaded.loras.adapters(key.loras)))
    try:
        with torch.inference_mode(), rows:
            output = pipe(**zeros_for_empty_negatives(pipe, loaded.pipe, arguments))
            images = getattr(output, "images", None)
            if decode_here and images is not None and not interrupted:
                images = decoded(pipe, images)
    except _Interrupted:
        return None
    if interrupted:
        return None
    if images is None:
        raise LoadError(
            f"{type(loaded.pipe).__name__} is not a text-to-image pipeline (it returned {type(output).__name__})"
        )
    return [encode_png(image) for image in images]


def zeros_for_empty_negatives(pipe: Any, own: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint that makes "no negative prompt" zeros (SDXL's `force_zeros_for_empty_prompt`) gets them
    only when a call's negative prompts are all absent: in a batch where some image has one, diffusers encodes
    the others' empty text instead, and an image would change with its batch-mates. Such a batch's embeddings
    are made here, with zeros in those rows, as each image alone (and the step engine) gets them. `own`: the
    loaded pipeline, whose config says (a picture's pipeline is derived from it)."""
    negatives = arguments.get("negative_prompt")
    if (
        not negatives
        or all(negatives)
        or not getattr(own.config, "force_zeros_for_empty_prompt", False)
        or float(arguments.get("guidance_scale", 0)) <= 1
        or not hasattr(pipe, "encode_prompt")
    ):
        return arguments
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=arguments["prompt"], device=pipe._execution_device, num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=negatives,
    )  # fmt: skip
    empty = torch.tensor([not text for text in negatives], device=negative.device)
    given = {name: value for name, value in arguments.items() if name not in ("prompt", "negative_prompt")}
    return given | {
        "prompt_embeds": positive,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": torch.where(empty[:, None, None], 0, negative),
        "negative_pooled_prompt_embeds": torch.where(empty[:, None], 0, negative_pooled),
    }


def decoded(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """A flow-matching pipeline's finished latents as PIL images, decoded as its own pipelines should."""
    image = decode_flow(pipe, latents, lambda z: pipe.vae.decode(z, return_dict=False)[0])
    processor = pipe.image_processor
    return list(processor.numpy_to_pil(processor.pt_to_numpy(image)))


def picture(data: bytes) -> Any:
    """A PIL image from the PNG bytes the parent sent (fitted to the request's size there)."""
    return Image.open(io.BytesIO(data))


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
