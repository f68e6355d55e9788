"""What the routes cannot say about themselves: each endpoint's request model, response model, status and errors.

`muse.api.openapi` walks the app's routes and looks each endpoint up here. An endpoint missing from `DOCS`
is still documented (its path, method and parameters come from the route, its summary from its docstring),
only without schemas; so this table adds detail and never decides what is listed.

The response models describe what the handlers return (they build plain dicts), so the fuzz tests can
check responses against this document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from muse.api import a1111, a1111_state, native, openai
from muse.api.a1111 import Img2ImgRequest, PngInfoRequest, PngInfoResponse, Txt2ImgRequest, Txt2ImgResponse
from muse.api.openai import EditForm, ImagesRequest, ImagesResponse
from muse.schema import GenerateBody, JobBody

Endpoint = Callable[[Request], Awaitable[Response]]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImageOut(BaseModel):
    png_base64: str
    seed: int


class TimingsOut(BaseModel):
    queued_ms: float
    compute_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    model: str
    steps: int
    width: int
    height: int
    batch_size: int
    timings: TimingsOut


class JobCreated(BaseModel):
    id: str
    status_url: str
    events_url: str
    seed: int


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: int | None
    step: int | None
    steps: int
    eta_s: float | None
    prompt: str
    seed: int
    n: int
    created: float
    result: GenerateResponse | None = None
    error: ErrorDetail | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    reason: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    family: str = Field(description="sd, sdxl, flux, sd3, or the pipeline class for any other")
    pipeline: str = Field(description="The diffusers pipeline class ('' when unknown before a worker loaded it)")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


@dataclass(frozen=True)
class Doc:
    """One endpoint's part of the document. The 401 of a guarded route is added by the generator."""

    summary: str | None = None  # None: the endpoint's docstring says it
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    media: str = "application/json"
    body_media: str = "application/json"  # the request body's media type
    # Other statuses that answer with `response` rather than an error, and what each means.
    also: Mapping[int, str] = field(default_factory=dict)


# Everything a generation can be refused or fail with (401 aside).
GENERATING = (400, 413, 422, 429, 503, 504)

ERROR_WORDS = {
    400: "Body is not JSON",
    401: "Missing or wrong API key",
    404: "Not found",
    413: "Body too large",
    422: "Invalid field (param names it)",
    429: "Rate limited (Retry-After)",
    503: "Overloaded or shutting down (Retry-After)",
    504: "Deadline passed",
}

CANCEL_RUNNING = Doc("Cancel the caller's running jobs (queued ones carry on)")

DOCS: dict[Endpoint, Doc] = {
    native.generate: Doc("Generate images and wait for them", GenerateBody, GenerateResponse, errors=GENERATING),
    native.create_job: Doc(
        "Queue a job (kept on disk; optionally with a webhook)", JobBody, JobCreated, status=202, errors=GENERATING
    ),
    native.get_job: Doc("Job status", response=JobStatus, errors=(404,)),
    native.delete_job: Doc("Cancel a job", response=JobStatus, errors=(404,)),
    native.job_events: Doc(
        "Server-sent events: queued, running, progress (one per step), final state; 8 per job, 16 per client",
        media="text/event-stream",
        errors=(404, 429),
    ),
    native.healthz: Doc("Process alive", response=Health),
    native.readyz: Doc("A worker is ready", response=Readiness, also={503: "Not ready"}),
    native.metrics: Doc("Prometheus metrics", media="text/plain"),
    openai.generations: Doc(
        "OpenAI-compatible image generation", ImagesRequest, ImagesResponse, errors=(400, 404, 413, 429, 503, 504)
    ),
    openai.edits: Doc(
        "OpenAI-compatible image edit: img2img, or inpainting where the mask (or the image) is transparent",
        EditForm,
        ImagesResponse,
        errors=(400, 404, 413, 429, 503, 504),
        body_media="multipart/form-data",
    ),
    openai.list_models: Doc("The served model, as OpenAI's model list", response=ModelList),
    openai.get_model: Doc("The served model's card (404 for any other name)", response=ModelCard, errors=(404,)),
    a1111.txt2img: Doc("AUTOMATIC1111-compatible txt2img", Txt2ImgRequest, Txt2ImgResponse, errors=GENERATING),
    a1111.img2img: Doc(
        "AUTOMATIC1111-compatible img2img and inpainting", Img2ImgRequest, Txt2ImgResponse, errors=GENERATING
    ),
    a1111.png_info: Doc(body=PngInfoRequest, response=PngInfoResponse, errors=(413, 422)),
    a1111_state.progress: Doc("Jobs in progress (only the caller's, with API keys)"),
    a1111_state.interrupt: CANCEL_RUNNING,
    a1111_state.skip: CANCEL_RUNNING,
    a1111_state.sd_models: Doc("The served model"),
    a1111_state.samplers: Doc("The samplers the served model runs (a flow-matching model: only its own)"),
    a1111_state.schedulers: Doc("Noise schedules: each sampler's own, which A1111 calls Automatic"),
    a1111_state.options: Doc("Settings (the served model's name)"),
}

# A1111's fixed answers share one anonymous endpoint function, so they are found by their path.
CONSTANTS = {
    "/sdapi/v1/refresh-checkpoints": Doc("Reload the model list (Muse serves one model: nothing to reload)"),
    **{path: Doc("What A1111 answers with none installed (Muse has none)") for path in a1111_state.NOTHING_INSTALLED},
}
DOCS.update(
    {
        route.endpoint: CONSTANTS[route.path]
        for route in a1111_state.routes
        if isinstance(route, Route) and route.path in CONSTANTS
    }
)
