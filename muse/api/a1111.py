"""AUTOMATIC1111-compatible API: txt2img, progress, models, samplers.

Unsupported fields (hires fix, face restoration, …) are ignored, listed in a `Warning` header, never
a 500. Validation is Muse's own (prompt, sizes, steps, seeds), with errors in Muse's shape.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse.api.common import client_of, service, wait_unless_disconnected
from muse.core.tickets import Ticket, TicketState
from muse.errors import InvalidRequest
from muse.schedulers import SCHEDULERS
from muse.schema import MAX_SEED, Dialect, GenerateBody, parse_json, validate

# Muse's fields under A1111's names, so errors name what the client sent.
A1111 = Dialect(names={"guidance_scale": "cfg_scale", "scheduler": "sampler_name", "n": "batch_size"})


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=8)
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older spelling of sampler_name


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def to_generate_body(body: Txt2ImgRequest) -> GenerateBody:
    n = body.batch_size * body.n_iter
    if n > 8:
        raise InvalidRequest("batch_size * n_iter: at most 8 images per request", param="n_iter")
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": None if body.seed == -1 else body.seed,
        "n": n,
        "scheduler": body.sampler_name or body.sampler_index,
    }
    generate: GenerateBody = validate(GenerateBody, {k: v for k, v in fields.items() if v is not None}, A1111)
    return generate


async def txt2img(request: Request) -> Response:
    muse = service(request)
    body: Txt2ImgRequest = validate(Txt2ImgRequest, parse_json(await request.body()), A1111)
    generate = to_generate_body(body).to_request(muse.model)
    ticket = muse.submit(generate, client=client_of(request))
    request.app.state.a1111_last = ticket
    result = await wait_unless_disconnected(request, ticket, muse)
    seeds = [image.seed for image in result.images]
    sampler = generate.scheduler or "default"
    parameters = body.model_dump(exclude=set(body.model_extra or {})) | {
        "steps": generate.steps,
        "cfg_scale": generate.guidance_scale,
        "width": generate.width,
        "height": generate.height,
        "seed": generate.seed,
        "sampler_name": sampler,
    }
    info = {
        "prompt": generate.prompt,
        "all_prompts": [generate.prompt] * len(seeds),
        "negative_prompt": generate.negative_prompt,
        "all_negative_prompts": [generate.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "steps": generate.steps,
        "cfg_scale": generate.guidance_scale,
        "width": generate.width,
        "height": generate.height,
        "sampler_name": sampler,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "sd_model_name": muse.model.name,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "timings": {"queued_ms": result.timings.queued_ms, "compute_ms": result.timings.compute_ms},
    }
    response = Txt2ImgResponse(
        images=[base64.b64encode(image.png).decode() for image in result.images],
        parameters=parameters,
        info=json.dumps(info),
    )
    headers = {}
    if body.model_extra:
        ignored = ", ".join(sorted(body.model_extra))
        headers["Warning"] = f'299 muse "ignored unsupported fields: {ignored}"'
        headers["X-Muse-Ignored-Fields"] = ignored
    return JSONResponse(response.model_dump(), headers=headers)


def progress_json(muse: Any, ticket: Ticket | None) -> dict[str, Any]:
    state = {
        "skipped": False,
        "interrupted": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if ticket is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    steps = ticket.request.steps
    if ticket.state is TicketState.SUCCEEDED:
        progress = 1.0
    elif ticket.state is TicketState.RUNNING:
        progress = ticket.step / steps
    else:
        progress = 0.0
    state |= {
        "job": ticket.id,
        "job_count": 0 if ticket.done else 1,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(ticket.created)),
        "interrupted": ticket.state is TicketState.CANCELLED,
        "sampling_step": ticket.step,
        "sampling_steps": steps,
    }
    eta = muse.eta(ticket) or 0.0
    return {
        "progress": progress,
        "eta_relative": eta,
        "state": state,
        "current_image": None,
        "textinfo": ticket.state.value,
    }


async def progress(request: Request) -> Response:
    return JSONResponse(progress_json(service(request), getattr(request.app.state, "a1111_last", None)))


async def sd_models(request: Request) -> Response:
    muse = service(request)
    name = muse.model.name
    card = {
        "title": name,
        "model_name": name,
        "hash": None,
        "sha256": None,
        "filename": muse.settings.model,
        "config": None,
    }
    return JSONResponse([card])


async def samplers(request: Request) -> Response:
    return JSONResponse([{"name": name, "aliases": [cls], "options": {}} for name, cls in SCHEDULERS.items()])


async def options(request: Request) -> Response:
    return JSONResponse({"sd_model_checkpoint": service(request).model.name})


routes = [
    Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
    Route("/sdapi/v1/progress", progress, methods=["GET"]),
    Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
    Route("/sdapi/v1/samplers", samplers, methods=["GET"]),
    Route("/sdapi/v1/options", options, methods=["GET"]),
]
