"""The step engine: images join and leave a running batch between denoising steps (continuous batching).

Each image is a *slot*: its latents, its text embeddings (negative and positive), its guidance, its own
scheduler instance and timestep index, and its own generator. One `step()` runs the UNet once over every
active slot (rows at different timesteps share the call: the UNet takes one timestep per row), applies
classifier-free guidance per slot, then each slot's scheduler step. Slots of the same latent shape share
steps whatever their steps, guidance, sampler or prompts; a slot whose timesteps are done leaves, and
its VAE decode is batched with the others finishing on the same step. A decode returns once the images
are on their way to the host (`Decoded`): the copy and the conversion to PIL images wait on another thread,
so the next step need not.

Built from the loaded pipeline's own parts (`encode_prompt`, `prepare_latents`'s noise, the scheduler
classes, `unet`, `vae`, `image_processor`), so a slot gives the pixels `pipe(...)` gives for the same
parameters and seed, whether it runs alone, joins mid-way, or shares steps with different requests.
`StableDiffusionPipeline` (SD 1.x/2.x) and `StableDiffusionXLPipeline` (whose UNet also takes the pooled
text embeddings and size conditioning per row); other pipelines run whole calls (muse.worker.pipeline).

Nothing here knows about pipes or asyncio; the step worker's loop (muse.worker.steploop) drives it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from muse.worker.fastpath import CompiledUNet, ShapeCompiled, bucket_for
from muse.worker.pipeline import LoadedPipeline
from muse.worker.samplers import fused_step, linear_steps

# Pipeline class -> the UNet's extra conditioning it needs (addition_embed_type).
STEP_ENGINE_PIPELINES = {"StableDiffusionPipeline": None, "StableDiffusionXLPipeline": "text_time"}


def supports(pipe: Any) -> bool:
    """Whether the step engine knows this pipeline class and its UNet's conditioning."""
    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    return (
        name in STEP_ENGINE_PIPELINES
        and unet is not None
        and unet.config.get("time_cond_proj_dim") is None
        and unet.config.get("addition_embed_type") == STEP_ENGINE_PIPELINES[name]
    )


@dataclass(frozen=True)
class SlotRequest:
    """One image to make: what the parent sends for it. `slot_id` is unique among the engine's slots; `owner`
    and `index` say whose image it is (an Assignment's id, the image's place in it), for the loop above."""

    slot_id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str = ""  # "" = the model's own
    owner: str = ""
    index: int = 0


@dataclass(eq=False)
class Slot:
    request: SlotRequest
    scheduler: Any
    timesteps: list[Any]
    latents: torch.Tensor  # (1, C, h, w)
    embeddings: torch.Tensor  # (2, tokens, dim): negative then positive; (1, …) without guidance
    generator: torch.Generator
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    # SDXL: pooled text embeddings and size conditioning, one row per row of `embeddings`.
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    index: int = 0  # timesteps done
    # The timesteps as the UNet gets them (floats), and where the sampler allows it, its step as two
    # coefficients per timestep (muse.worker.samplers): then its own scheduler instance is not stepped.
    times: list[float] = field(default_factory=list)
    linear: list[tuple[float, float]] | None = None

    @property
    def guided(self) -> bool:
        return self.embeddings.shape[0] == 2

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def progress(self) -> tuple[int, int]:
        """(steps done, steps) as the request counts them, for second-order samplers too."""
        total = len(self.timesteps)
        return (self.index * self.request.steps) // total if total else 0, self.request.steps


@dataclass(eq=False)
class Decoded:
    """Decoded images on their way to the host: `(n, H, W, C)` float32 in [0, 1], as the pipeline's
    image processor would turn them into PIL images. On a GPU the copy lands in pinned host memory
    without blocking the device's queue, and `picture` waits for it (`copied`)."""

    images: torch.Tensor
    processor: Any
    copied: Any = None  # a CUDA event recorded after the copy

    @classmethod
    def start(cls, image: torch.Tensor, processor: Any) -> Decoded:
        """`image`: the processor's denormalised `(n, C, H, W)` tensor, on the device."""
        image = image.permute(0, 2, 3, 1).float()
        if not image.is_cuda:
            return cls(image.cpu(), processor)  # a CPU tensor as it is; MPS copies here
        image = image.contiguous()  # one plain device-to-host copy, not a strided one
        host = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
        host.copy_(image, non_blocking=True)
        # On the stream of the image's own card: the worker's card need not be the current device.
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(image.device))
        return cls(host, processor, copied)

    def picture(self, index: int) -> Any:
        """The `index`th image as a PIL image, as `pipe(...)` returns it (numpy only: safe off the step thread)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.processor.numpy_to_pil(self.images.numpy()[index : index + 1])[0]


@dataclass(eq=False)
class Layout:
    """How the running slots lie in a UNet call: guided slots first (their unconditional rows, then their
    conditional rows), then the unguided ones; with what stays the same while they run (text embeddings,
    SDXL's added conditioning, guidance scales), built once when slots join or leave rather than each step."""

    slots: list[Slot]  # as the engine lists them
    order: list[Slot]  # as the rows lie
    guided: int
    embeddings: torch.Tensor
    added: dict[str, torch.Tensor] | None
    scales: torch.Tensor  # (guided, 1, 1, 1)
    fused: list[int]  # places in `order` of the slots stepped by their per-row twin
    scaling: bool  # whether any slot's sampler scales its model input (DDIM's does not)

    @classmethod
    def of(cls, slots: list[Slot], xl: bool) -> Layout:
        guided = [s for s in slots if s.guided]
        order = guided + [s for s in slots if not s.guided]

        def rows(parts: list[torch.Tensor], guided_parts: int) -> torch.Tensor:
            # parts[i]: slot i's rows (negative then positive for a guided slot).
            negatives = [p[0:1] for p in parts[:guided_parts]]
            positives = [p[1:2] for p in parts[:guided_parts]]
            return torch.cat([*negatives, *positives, *parts[guided_parts:]])

        g = len(guided)
        added = None
        if xl:
            added = {key: rows([s.added[key] for s in order], g) for key in ("text_embeds", "time_ids")}
        embeddings = rows([s.embeddings for s in order], g)
        scales = torch.tensor(
            [s.request.guidance_scale for s in guided], dtype=embeddings.dtype, device=embeddings.device
        ).view(-1, 1, 1, 1)
        fused = [i for i, s in enumerate(order) if s.linear is not None]
        return cls(list(slots), order, g, embeddings, added, scales, fused, len(fused) < len(order))


class StepEngine:
    def __init__(
        self,
        loaded: LoadedPipeline,
        buckets: Sequence[int] = (),
        compiled: CompiledUNet | None = None,
        decoder: ShapeCompiled | None = None,
    ) -> None:
        """`buckets`: UNet batch sizes to pad each call to; `compiled`: the UNet's compiled twin, used for
        the shapes it was warmed at; `decoder`: the VAE decode's, which then decodes images one by one
        (muse.worker.fastpath). None of them: plain eager calls."""
        assert supports(loaded.pipe), f"{type(loaded.pipe).__name__} runs whole calls, not steps"
        self.loaded = loaded
        self.buckets = sorted(buckets)
        self.compiled = compiled
        self.decoder = decoder
        self.pipe = loaded.pipe
        self.slots: list[Slot] = []
        self.xl = type(self.pipe).__name__ == "StableDiffusionXLPipeline"
        # Read once: the pipeline's `_execution_device` walks every module (~5 ms on the embedded model,
        # as long as its text encoding), and the pipeline never moves.
        self.device = self.pipe._execution_device
        self._schedules: dict[tuple[str, int], tuple[list[float], list[tuple[float, float]] | None]] = {}
        self._layout: Layout | None = None

    @property
    def shape(self) -> tuple[int, int] | None:
        """(width, height) of the running slots; new slots must match it."""
        return (self.slots[0].request.width, self.slots[0].request.height) if self.slots else None

    # ---- joining --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, requests: list[SlotRequest]) -> list[Slot]:
        """Prepare and add slots (their text encoded together); they take their first step at the next `step()`."""
        if not requests:
            return []
        shapes = {(r.width, r.height) for r in requests} | ({self.shape} if self.shape else set())
        assert len(shapes) == 1, f"one latent shape at a time, not {sorted(shapes)}"
        pipe = self.pipe
        device = self.device
        prompts, negatives = [r.prompt for r in requests], [r.negative_prompt for r in requests]
        pooled = negative_pooled = None
        if self.xl:
            positive, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negatives,
            )  # fmt: skip
        else:
            positive, negative = pipe.encode_prompt(prompts, device, 1, True, negatives)
        admitted = []
        for i, request in enumerate(requests):
            # One instance per image: multistep samplers (DPM++ 2M, UniPC) keep history inside it.
            scheduler = self.loaded.new_scheduler(request.scheduler)
            scheduler.set_timesteps(request.steps, device=device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            generator = torch.Generator(device="cpu").manual_seed(request.seed)
            guided = request.guidance_scale > 1
            embeddings = torch.cat([negative[i : i + 1], positive[i : i + 1]]) if guided else positive[i : i + 1]
            added = {}
            if pooled is not None and negative_pooled is not None:
                added = self._size_conditioning(request, pooled[i : i + 1], negative_pooled[i : i + 1], guided)
            times, linear = self._schedule(request, scheduler)
            slot = Slot(
                request=request,
                scheduler=scheduler,
                timesteps=list(scheduler.timesteps),
                times=times,
                linear=linear,
                latents=self._noise(request, scheduler, generator, positive.dtype, device),
                embeddings=embeddings,
                generator=generator,
                step_kwargs=_step_kwargs(scheduler, generator),
                added=added,
            )
            admitted.append(slot)
        self.slots.extend(admitted)
        return admitted

    def _schedule(self, request: SlotRequest, scheduler: Any) -> tuple[list[float], list[tuple[float, float]] | None]:
        """The slot's timesteps as floats, and its sampler's per-row twin if it has one; the same for every
        image of one sampler and step count, so computed once for each."""
        key = (request.scheduler, request.steps)
        if key not in self._schedules:
            self._schedules[key] = ([float(t) for t in scheduler.timesteps.tolist()], linear_steps(scheduler))
        return self._schedules[key]

    def _size_conditioning(
        self, request: SlotRequest, pooled: torch.Tensor, negative_pooled: torch.Tensor, guided: bool
    ) -> dict[str, torch.Tensor]:
        """SDXL's added conditioning for one image: pooled text embeddings and the size ids the pipeline
        makes by default (original and target size = the image's, no crop)."""
        pipe = self.pipe
        size = (request.height, request.width)
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=projection
        ).to(pooled.device)
        if guided:
            return {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        return {"text_embeds": pooled, "time_ids": time_ids}

    def _noise(self, request: SlotRequest, scheduler: Any, generator: torch.Generator, dtype: Any, device: Any) -> Any:
        """The latents `prepare_latents` draws for this image: the same generator draws, scaled by the
        image's own scheduler (the pipeline's would scale by its own scheduler's init_noise_sigma)."""
        pipe = self.pipe
        shape = (
            1,
            pipe.unet.config.in_channels,
            request.height // pipe.vae_scale_factor,
            request.width // pipe.vae_scale_factor,
        )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma

    # ---- stepping -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Slot]:
        """One UNet call over every active slot, then the scheduler steps: fused over every slot whose sampler
        has a per-row twin (muse.worker.samplers), each slot's own instance for the rest. Returns the slots
        that finished with this step (removed from the engine; decode them)."""
        active = [s for s in self.slots if not s.done]
        if not active:
            return []
        layout = self._layout_for(active)
        order, g = layout.order, layout.guided
        latents = torch.cat([s.latents for s in order])
        scaled = latents
        if layout.scaling:
            scaled = torch.cat(
                [s.scheduler.scale_model_input(latents[i : i + 1], s.timesteps[s.index]) for i, s in enumerate(order)]
            )
        # Rows: the guided slots' unconditional rows, their conditional rows, then the unguided slots.
        sample = torch.cat([scaled[:g], scaled]) if g else scaled
        times = [s.times[s.index] for s in order]
        # float32 whatever the samplers: integer (DDIM, PNDM, DPM++) and float (Euler) timesteps would each
        # need their own compiled graph, and the UNet's time embedding casts them to float anyway.
        timestep = torch.tensor(times[:g] + times, dtype=torch.float32, device=sample.device)
        noise = self._unet(sample, timestep, layout.embeddings, layout.added)
        uncond, text = noise[:g], noise[g : 2 * g]
        prediction = torch.cat([uncond + layout.scales * (text - uncond), noise[2 * g :]]) if g else noise
        stepped = self._scheduler_steps(order, latents, prediction, layout.fused)
        for slot, latent in zip(order, stepped, strict=True):
            slot.latents = latent
            slot.index += 1
        finished = [s for s in self.slots if s.done]
        self.slots = [s for s in self.slots if not s.done]
        return finished

    @staticmethod
    def _scheduler_steps(
        order: list[Slot], latents: torch.Tensor, prediction: torch.Tensor, fused: list[int]
    ) -> list[torch.Tensor]:
        """Each slot's next latents: one fused step over the rows in `fused`, its own scheduler for the others."""
        stepped: list[torch.Tensor | None] = [None] * len(order)
        if fused:
            every = len(fused) == len(order)
            rows = latents if every else latents[fused]
            outputs = prediction if every else prediction[fused]
            coefficients = [order[i].linear[order[i].index] for i in fused]  # type: ignore[index]
            result = fused_step(rows, outputs, coefficients)
            for k, i in enumerate(fused):
                stepped[i] = result[k : k + 1]
        for i, slot in enumerate(order):
            if stepped[i] is None:
                t, output, sample = slot.timesteps[slot.index], prediction[i : i + 1], latents[i : i + 1]
                stepped[i] = slot.scheduler.step(output, t, sample, **slot.step_kwargs, return_dict=False)[0]
        return [s for s in stepped if s is not None]

    def _layout_for(self, active: list[Slot]) -> Layout:
        """The rows of a UNet call for these slots; kept while the same slots run (most steps)."""
        if self._layout is None or self._layout.slots != active:
            self._layout = Layout.of(active, self.xl)
        return self._layout

    def _unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor, added: dict[str, Any] | None
    ) -> torch.Tensor:
        """The UNet's noise prediction, its batch padded up to the next bucket (the padding rows repeat the
        last real row, and are dropped from the result: each row is computed on its own)."""
        rows = sample.shape[0]
        size = bucket_for(rows, self.buckets) if self.buckets else rows
        if size > rows:

            def pad(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([x, x[-1:].expand(size - rows, *x.shape[1:])])

            sample, timestep, embeddings = pad(sample), pad(timestep), pad(embeddings)
            added = {key: pad(value) for key, value in added.items()} if added else added
        unet = self.compiled or self.pipe.unet
        noise = unet(sample, timestep, encoder_hidden_states=embeddings, added_cond_kwargs=added, return_dict=False)[0]
        return noise[:rows]

    def remove(self, slot_ids: Iterable[str]) -> list[Slot]:
        """Cancelled or expired images leave at once (between steps); returns those removed."""
        gone = set(slot_ids)
        removed = [s for s in self.slots if s.request.slot_id in gone]
        self.slots = [s for s in self.slots if s.request.slot_id not in gone]
        return removed

    # ---- leaving --------------------------------------------------------------------------------------

    def decode(self, slots: list[Slot]) -> list[Any]:
        """PIL images of finished slots, decoded together, as `pipe(...)` would return them."""
        if not slots:
            return []
        decoded = self.decode_start(slots)
        return [decoded.picture(i) for i in range(len(slots))]

    @torch.inference_mode()
    def decode_start(self, slots: list[Slot]) -> Decoded:
        """Decode finished slots together on the device (and run the safety checker), and start their
        copy to the host; `Decoded.picture` finishes the job on any thread."""
        latents = torch.cat([s.latents for s in slots])
        pipe = self.pipe
        if self.xl:
            image = self._decode_xl(latents)
        else:
            image = self._vae_decode(latents / pipe.vae.config.scaling_factor)
            image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
            denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
            image = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=denormalize)
        return Decoded.start(image, pipe.image_processor)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return self.pipe.vae.decode(latents, return_dict=False)[0]
        return torch.cat([self.decoder(z) for z in latents.split(1)])  # the compiled decoder's one shape

    def _decode_xl(self, latents: torch.Tensor) -> torch.Tensor:
        """As StableDiffusionXLPipeline decodes: the VAE upcast in fp16 when it asks, its latent statistics
        when it has them, the watermark when one is installed."""
        pipe, vae = self.pipe, self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = self._vae_decode(latents)
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pt")


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """What the pipeline passes to this scheduler's step: eta 0 (DDIM), and the image's own generator for
    samplers that add noise (Euler a), as `prepare_extra_step_kwargs` does."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
