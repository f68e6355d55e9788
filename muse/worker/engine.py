"""The step engine: images join and leave a running batch between denoising steps (continuous batching).

Each image is a *slot*: its latents, its conditioning rows (negative and positive when guided), its guidance,
its own scheduler instance and timestep index, and its own generator. One `step()` runs the denoiser once
over every active slot (rows at different timesteps share the call: UNets and the FLUX/SD3 transformers take
one timestep per row), applies classifier-free guidance per slot, then each slot's scheduler step. Slots of
the same latent shape share steps whatever their steps, guidance, sampler or prompts; a slot whose timesteps
are done leaves, and its VAE decode is batched with the others finishing on the same step. A decode returns
once the images are on their way to the host (`Decoded`): the copy and the conversion to PIL images wait on
another thread, so the next step need not.

What differs between pipelines (how prompts are encoded, the starting noise, the scheduler's set-up, the
denoiser's call, the decode) lives in a family (muse.worker.families: SD 1.x/2.x, SDXL, FLUX.1, SD3.x),
each written from its pipeline's own `__call__`, so a slot gives the pixels `pipe(...)` gives for the same
parameters and seed, whether it runs alone, joins mid-way, or shares steps with different requests. Other
pipelines run whole calls (muse.worker.pipeline).

Nothing here knows about pipes or asyncio; the step worker's loop (muse.worker.steploop) drives it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from muse.messages import StepKey
from muse.worker.families import family_for, supports
from muse.worker.families.base import Blend, Conditioning, Family, guided_rows
from muse.worker.fastpath import CompiledUNet, ShapeCompiled, bucket_for
from muse.worker.loras import Plan, RowLoras
from muse.worker.pipeline import LoadedPipeline
from muse.worker.samplers import fused_step, linear_steps
from muse.worker.slots import SlotRequest

__all__ = ["Decoded", "Slot", "SlotRequest", "StepEngine", "supports"]


@dataclass(eq=False)
class Slot:
    request: SlotRequest
    scheduler: Any
    timesteps: list[Any]
    latents: torch.Tensor  # (1, …): the family's latent layout
    conditioning: Conditioning
    generator: torch.Generator
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # timesteps done
    # The timesteps as the denoiser gets them (floats), and where the sampler allows it, its step as two
    # coefficients per timestep (muse.worker.samplers): then its own scheduler instance is not stepped.
    times: list[float] = field(default_factory=list)
    linear: list[tuple[float, float]] | None = None
    skipped: int = 0  # timesteps a picture's strength skips (img2img): the schedule's first ones
    adapters: tuple[tuple[str, float], ...] = ()  # its LoRAs: the model's adapter names, and scales
    blend: Blend | None = None  # inpainting: the picture kept outside the mask after each step

    @property
    def guided(self) -> bool:
        return self.conditioning.guided

    @property
    def scales_input(self) -> bool:
        """Whether its sampler scales the model input (stepped on its own; DDIM's and flow matching's do not)."""
        return self.linear is None and hasattr(self.scheduler, "scale_model_input")

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def progress(self) -> tuple[int, int]:
        """(steps done, steps) as the request counts them, for second-order samplers too; an image started
        from a picture counts the steps its strength skips as done."""
        total = self.skipped + len(self.timesteps)
        return ((self.skipped + self.index) * self.request.steps) // total if total else 0, self.request.steps


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
    """How the running slots lie in a denoiser call: guided slots first (their unconditional rows, then their
    conditional rows), then the unguided ones; with what stays the same while they run (conditioning rows,
    guidance scales), built once when slots join or leave rather than each step."""

    slots: list[Slot]  # as the engine lists them
    order: list[Slot]  # as the rows lie
    guided: int
    rows: dict[str, torch.Tensor]
    scales: torch.Tensor  # (guided, 1, …)
    fused: list[int]  # places in `order` of the slots stepped by their per-row twin
    scaling: bool  # whether any slot's sampler scales its model input
    adapters: list[tuple[tuple[str, float], ...]]  # each row's LoRAs
    plans: dict[int, Plan | None] = field(default_factory=dict)  # by the call's rows (padding included)

    def plan(self, rows: int, device: Any) -> Plan | None:
        if rows not in self.plans:
            self.plans[rows] = Plan.of(self.adapters, rows, device)
        return self.plans[rows]

    @classmethod
    def of(cls, slots: list[Slot]) -> Layout:
        guided = [s for s in slots if s.guided]
        order = guided + [s for s in slots if not s.guided]

        def rows(parts: list[torch.Tensor], guided_parts: int) -> torch.Tensor:
            # parts[i]: slot i's rows (negative then positive for a guided slot).
            negatives = [p[0:1] for p in parts[:guided_parts]]
            positives = [p[1:2] for p in parts[:guided_parts]]
            return torch.cat([*negatives, *positives, *parts[guided_parts:]])

        g = len(guided)
        keys = order[0].conditioning.rows
        laid = {key: rows([s.conditioning.rows[key] for s in order], g) for key in keys}
        latents = order[0].latents
        scales = torch.tensor([s.request.guidance_scale for s in guided], dtype=latents.dtype, device=latents.device)
        scales = scales.view(-1, *([1] * (latents.dim() - 1)))
        fused = [i for i, s in enumerate(order) if s.linear is not None]
        adapters = [s.adapters for s in guided] + [s.adapters for s in order]
        return cls(list(slots), order, g, laid, scales, fused, any(s.scales_input for s in order), adapters)


class StepEngine:
    def __init__(
        self,
        loaded: LoadedPipeline,
        buckets: Sequence[int] = (),
        compiled: CompiledUNet | None = None,
        decoder: ShapeCompiled | None = None,
        loras: RowLoras | None = None,
    ) -> None:
        """`buckets`: denoiser batch sizes to pad each call to; `compiled`: the UNet's compiled twin, used for
        the shapes it was warmed at; `decoder`: the VAE decode's, which then decodes images one by one
        (muse.worker.fastpath). None of them: plain eager calls. `loras`: the adapters requests may name
        (muse.worker.loras), each already loaded when its request is admitted."""
        family = family_for(loaded.pipe)
        assert family is not None, f"{type(loaded.pipe).__name__} runs whole calls, not steps"
        self.family: Family = family
        self.loaded = loaded
        self.buckets = sorted(buckets)
        self.compiled = compiled
        self.decoder = decoder
        self.loras = loras
        self.pipe = loaded.pipe
        self.slots: list[Slot] = []
        # Read once: the pipeline's `_execution_device` walks every module (~5 ms on the embedded model,
        # as long as its text encoding), and the pipeline never moves.
        self.device = self.pipe._execution_device
        self._schedules: dict[tuple[str, int, int, int], tuple[list[float], list[tuple[float, float]] | None]] = {}
        self._layout: Layout | None = None

    @property
    def step_key(self) -> StepKey | None:
        """What the running slots share (muse.messages.StepKey); new slots must match it."""
        return self.slots[0].request.step_key if self.slots else None

    # ---- joining --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, requests: Sequence[SlotRequest]) -> list[Conditioning]:
        """The requests' text conditioning, their prompts encoded together (each row under its LoRAs, which
        must be loaded)."""
        if not requests:
            return []
        adapters = [self._adapters(r) for r in requests]
        with self._rows(Plan.of(adapters, len(requests), self.device)):
            return self.family.encode(list(requests))

    def _adapters(self, request: SlotRequest) -> tuple[tuple[str, float], ...]:
        return self.loras.adapters(request.loras) if self.loras and request.loras else ()

    @torch.inference_mode()
    def admit(self, requests: list[SlotRequest], encoded: Sequence[Conditioning | None] = ()) -> list[Slot]:
        """Prepare and add slots; they take their first step at the next `step()`. `encoded`: conditioning
        already made for some of them (`encode`, earlier), None for the others, whose text is encoded here
        together."""
        if not requests:
            return []
        keys = {r.step_key for r in requests} | ({self.step_key} if self.step_key else set())
        assert len(keys) == 1, f"one StepKey at a time, not {keys}"
        adapters = [self._adapters(r) for r in requests]
        given = list(encoded) or [None] * len(requests)
        fresh = iter(self.encode([r for r, c in zip(requests, given, strict=True) if c is None]))
        conditioning = [c if c is not None else next(fresh) for c in given]
        dtype = next(iter(conditioning[0].rows.values())).dtype
        admitted = []
        for request, rows, rows_adapters in zip(requests, conditioning, adapters, strict=True):
            # One instance per image: multistep samplers (DPM++ 2M, UniPC) keep history inside it.
            scheduler = self.loaded.new_scheduler(request.scheduler)
            self.family.schedule(scheduler, request)
            generator = torch.Generator(device="cpu").manual_seed(request.seed)
            times, linear = self._schedule(request, scheduler)
            timesteps, skip, blend = list(scheduler.timesteps), 0, None
            if request.source is None:
                latents = self.family.noise(request, scheduler, generator, dtype)
            else:
                skip = self._skip(scheduler, request)
                start = self.family.start(request, scheduler, scheduler.timesteps[skip : skip + 1], generator, dtype)
                latents, blend = start.latents, start.blend
                timesteps, times = timesteps[skip:], times[skip:]
                linear = linear[skip:] if linear is not None else None
            extra = self.family.extra_inputs(request, generator, dtype)
            if extra:
                rows = Conditioning(
                    rows.rows | {k: guided_rows(v, v, rows.guided) for k, v in extra.items()}, rows.guided
                )
            slot = Slot(
                request=request,
                scheduler=scheduler,
                timesteps=timesteps,
                times=times,
                linear=linear,
                latents=latents,
                conditioning=rows,
                generator=generator,
                step_kwargs=_step_kwargs(scheduler, generator),
                skipped=skip,
                blend=blend,
                adapters=rows_adapters,
            )
            admitted.append(slot)
        self.slots.extend(admitted)
        return admitted

    def _skip(self, scheduler: Any, request: SlotRequest) -> int:
        """The timesteps a picture's strength skips, as diffusers' img2img pipelines cut them (their
        `get_timesteps`), with the scheduler told where it begins."""
        assert request.source is not None
        runs = self.family.denoising_steps(request.steps, request.source.strength)
        skip = (request.steps - runs) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skip)
        return skip

    def _schedule(self, request: SlotRequest, scheduler: Any) -> tuple[list[float], list[tuple[float, float]] | None]:
        """The slot's timesteps as floats, and its sampler's per-row twin if it has one; the same for every
        image of one sampler, step count and size (flow matching shifts its schedule with the size), so
        computed once for each."""
        key = (request.scheduler, request.steps, request.width, request.height)
        if key not in self._schedules:
            self._schedules[key] = ([float(t) for t in scheduler.timesteps.tolist()], linear_steps(scheduler))
        return self._schedules[key]

    # ---- stepping -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Slot]:
        """One denoiser call over every active slot, then the scheduler steps: fused over every slot whose
        sampler has a per-row twin (muse.worker.samplers), each slot's own instance for the rest. Returns the
        slots that finished with this step (removed from the engine; decode them)."""
        active = [s for s in self.slots if not s.done]
        if not active:
            return []
        layout = self._layout_for(active)
        order, g = layout.order, layout.guided
        latents = torch.cat([s.latents for s in order])
        scaled = latents
        if layout.scaling:
            scaled = torch.cat(
                [
                    s.scheduler.scale_model_input(latents[i : i + 1], s.timesteps[s.index])
                    if s.scales_input
                    else latents[i : i + 1]
                    for i, s in enumerate(order)
                ]
            )
        # Rows: the guided slots' unconditional rows, their conditional rows, then the unguided slots.
        sample = torch.cat([scaled[:g], scaled]) if g else scaled
        times = [s.times[s.index] for s in order]
        # float32 whatever the samplers: integer (DDIM, PNDM, DPM++) and float (Euler) timesteps would each
        # need their own compiled graph, and the denoisers' time embeddings cast them to float anyway.
        timestep = torch.tensor(times[:g] + times, dtype=torch.float32, device=sample.device)
        noise = self._predict(sample, timestep, layout.rows)
        uncond, text = noise[:g], noise[g : 2 * g]
        prediction = torch.cat([uncond + layout.scales * (text - uncond), noise[2 * g :]]) if g else noise
        stepped = self._scheduler_steps(order, latents, prediction, layout.fused)
        for slot, latent in zip(order, stepped, strict=True):
            if slot.blend is not None:
                following = slot.timesteps[slot.index + 1] if slot.index + 1 < len(slot.timesteps) else None
                latent = slot.blend.apply(slot.scheduler, latent, following)
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
        """The rows of a denoiser call for these slots; kept while the same slots run (most steps)."""
        if self._layout is None or self._layout.slots != active:
            self._layout = Layout.of(active)
        return self._layout

    def _predict(self, sample: torch.Tensor, timestep: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output, its batch padded up to the next bucket (the padding rows repeat the last
        real row, and are dropped from the result: each row is computed on its own)."""
        real = sample.shape[0]
        size = bucket_for(real, self.buckets) if self.buckets else real
        if size > real:

            def pad(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([x, x[-1:].expand(size - real, *x.shape[1:])])

            sample, timestep = pad(sample), pad(timestep)
            rows = {key: pad(value) for key, value in rows.items()}
        model = self.compiled or self.family.denoiser
        first = self.slots[0].request
        plan = self._layout.plan(size, self.device) if self._layout is not None else None
        with self._rows(plan):
            return self.family.predict(model, sample, timestep, rows, (first.width, first.height))[:real]

    def _rows(self, plan: Plan | None) -> contextlib.AbstractContextManager[None]:
        """The LoRAs of the next model call's rows (none without a LoRA folder)."""
        return self.loras.rows(plan) if self.loras is not None else contextlib.nullcontext()

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
        size = (slots[0].request.width, slots[0].request.height)
        image = self.family.decode(latents, size, self._vae_decode)
        return Decoded.start(image, self.pipe.image_processor)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return self.pipe.vae.decode(latents, return_dict=False)[0]
        return torch.cat([self.decoder(z) for z in latents.split(1)])  # the compiled decoder's one shape


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
