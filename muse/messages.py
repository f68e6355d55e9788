"""Value objects: the request, its result, and every message that crosses a worker's pipe.

Pipe protocol (parent ⇄ worker), all pickled dataclasses:
    worker → parent:  Ready (with its batching mode and capacity) | BootFailure (then exit BOOT_FAILURE_EXIT)
                      | Heartbeat | Progress* (or Steps) then exactly one Result or Failure per Assignment
                      | (a Ray actor only) Placed first, Exited last
    parent → worker:  Assignment | Interrupt | Stop
A "request" worker (whole pipeline calls) gets an Assignment only while idle. A "step" worker gets one Assignment
per request whenever it has free slots for it (its images join the running ones at the next step
boundary), all of one StepKey at a time; several of its Assignments run at once, each answered alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A worker whose pipeline cannot load exits with this code so the pool stops respawning it.
BOOT_FAILURE_EXIT = 3


@dataclass(frozen=True)
class StepKey:
    """Which images may share a step worker's model calls: the one place that says so, read by the batcher's
    policy, the pool's views, the step loop and the engine. Today the latent shape; whatever else one call must
    agree on (an input image's kind, a family's conditioning) belongs here too."""

    width: int
    height: int


@dataclass(frozen=True, repr=False)
class SourceImage:
    """A picture a request starts from (img2img), fitted at the edge to the request's width and height: RGB
    PNG bytes, and for inpainting a mask of the same size (grayscale PNG, white = repaint). `strength` is how
    far from the picture the result may go: 1 starts from pure noise, 0.5 runs the last half of the steps."""

    image: bytes
    strength: float
    mask: bytes | None = None
    flow: bool = False  # the model's pipelines are flow matching: they cut the steps their own way

    @property
    def kind(self) -> str:
        return "inpaint" if self.mask is not None else "img2img"

    def __repr__(self) -> str:
        mask = f", mask {len(self.mask):,} B" if self.mask is not None else ""
        return f"SourceImage({len(self.image):,} B, strength {self.strength:g}{mask})"


@dataclass(frozen=True)
class LoraUse:
    """One LoRA adapter a request asks for: a file's name in --lora-dir (without .safetensors), at a scale."""

    name: str
    scale: float = 1.0

    @property
    def tag(self) -> str:
        """As A1111 writes it in a prompt."""
        return f"<lora:{self.name}:{self.scale:g}>"


def denoising_steps(steps: int, strength: float, flow: bool = False) -> int:
    """The steps a request starting from a picture runs, as diffusers' img2img pipelines count them. SD's round
    the steps the strength runs down; the flow-matching ones (FLUX.1, SD3.x: `flow`) round the steps it skips
    down, so they run one more where `steps * strength` is not whole, and at least one for any strength."""
    if flow:
        return steps - int(max(steps - steps * strength, 0))
    return min(int(steps * strength), steps)


@dataclass(frozen=True)
class BatchKey:
    """Requests can share a pipeline call only when all of these match."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str = ""
    source: str = ""  # "", "img2img" or "inpaint": a whole call takes its pictures or none
    strength: float = 1.0
    loras: tuple[LoraUse, ...] = ()  # a whole call's images share their adapters (a step worker mixes them)

    @property
    def step_key(self) -> StepKey:
        return StepKey(self.width, self.height)


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request; `seed` is already resolved (random ones are drawn at the edge)."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    n: int = 1
    negative_prompt: str = ""
    timeout_s: float | None = None
    scheduler: str = ""  # "" = the model's own
    source: SourceImage | None = None
    loras: tuple[LoraUse, ...] = ()

    @property
    def key(self) -> BatchKey:
        source = self.source
        kind, strength = (source.kind, source.strength) if source is not None else ("", 1.0)
        return BatchKey(
            self.width, self.height, self.steps, self.guidance_scale, self.scheduler, kind, strength, self.loras
        )

    @property
    def denoising_steps(self) -> int:
        """The steps it runs: fewer than `steps` when it starts from a picture at strength < 1."""
        source = self.source
        return self.steps if source is None else denoising_steps(self.steps, source.strength, source.flow)

    @property
    def step_key(self) -> StepKey:
        return self.key.step_key

    def seeds(self) -> list[int]:
        # Image i of a request uses seed + i, so any single image can be reproduced alone.
        return [(self.seed + i) % 2**32 for i in range(self.n)]


@dataclass(frozen=True)
class Timings:
    queued_ms: float
    compute_ms: float
    total_ms: float


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int


@dataclass(frozen=True)
class GenerateResult:
    images: list[GeneratedImage]
    model: str
    steps: int
    width: int
    height: int
    batch_size: int
    timings: Timings
    request: GenerateRequest | None = None


# ---- pipe messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    prompt: str
    negative_prompt: str
    seed: int
    # One request's images share one SourceImage object, which pickling sends once per Assignment.
    source: SourceImage | None = None
    loras: tuple[LoraUse, ...] = ()


@dataclass(frozen=True)
class Assignment:
    """Images a worker is given to make, sharing the key (prompts and seeds vary per image): on a request
    worker, one whole pipeline call's batch of one or more requests; on a step worker, one request's images,
    which join whatever that worker already runs."""

    assignment_id: str
    images: list[ImageSpec]
    key: BatchKey


@dataclass(frozen=True)
class Interrupt:
    """Stop the running batch at the next step boundary (all its requests are gone)."""

    assignment_id: str


@dataclass(frozen=True)
class Stop:
    """Finish nothing new; exit once idle."""


class Batching:
    STEP = "step"  # slots join and leave between denoising steps (muse.worker.engine)
    REQUEST = "request"  # one whole pipeline call per batch (muse.worker.pipeline)


@dataclass(frozen=True)
class Compiling:
    """--compile: the worker compiled `done` of the `total` shapes it warms before Ready."""

    done: int
    total: int


@dataclass(frozen=True)
class Ready:
    model: str
    device: str
    width: int
    height: int
    guidance_scale: float
    load_s: float
    pid: int
    batching: str = Batching.REQUEST
    capacity: int = 1  # images a step worker runs at once
    pipeline: str = ""  # the pipeline's class name
    # False for a pipeline whose call takes no step callback: no progress until it ends, so the pool takes
    # its heartbeats as its sign of life (the requests' deadlines still bound it).
    reports_steps: bool = True


@dataclass(frozen=True)
class BootFailure:
    message: str


@dataclass(frozen=True)
class Heartbeat:
    """The worker process is alive (its Assignments' progress is judged by Progress, not by this)."""


@dataclass(frozen=True)
class Progress:
    assignment_id: str
    step: int
    steps: int


@dataclass(frozen=True)
class Steps:
    """A step worker's progress of every Assignment that moved in one step: one pipe message per step."""

    progress: list[Progress]
    # Since the worker started: UNet calls, and seconds between one call's end and the next one's start
    # while images waited in the engine (admissions, decodes, pipe writes: time the device sat idle).
    unet_calls: int = 0
    gap_s: float = 0.0


@dataclass(frozen=True)
class Result:
    assignment_id: str
    pngs: list[bytes] = field(repr=False)
    compute_ms: float
    # Mean images per UNet call while it ran: a step worker shares steps with other Assignments, so its
    # cost per image is compute time / occupancy, not / its own images. 0 = just this Assignment's images.
    occupancy: float = 0.0


@dataclass(frozen=True)
class Failure:
    assignment_id: str
    message: str
    interrupted: bool = False
    # The request's own fault, found in the worker (a LoRA file for another architecture): the field to name
    # in a 4xx, instead of a failed generation.
    param: str = ""


@dataclass(frozen=True)
class Placed:
    """A Ray actor exists: where Ray put it (before its model loads)."""

    node: str
    pid: int


@dataclass(frozen=True)
class Exited:
    """A Ray actor's engine returned with this exit code; nothing follows."""

    code: int
