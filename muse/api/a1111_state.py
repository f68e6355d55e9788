"""AUTOMATIC1111-compatible server state: progress, interrupt and skip, the model, samplers, options, and
the empty lists A1111 gives for what Muse does not have (LoRAs, upscalers, VAEs, styles…).

A1111 runs one job at a time; Muse shares one queue among every client. So:
- `GET /progress` describes the jobs in progress, running ones first (with API keys: only the caller's).
  Idle, it says what an idle A1111 says (`progress` 0.0, `job_count` 0, an empty `job`), so
  `util_wait_for_ready`-style loops return; busy, `job_count` counts the jobs queued and running and the
  rest describes the oldest running one (an admin key sees everyone's, as everywhere). There are no
  preview images: `current_image` is null.
- `POST /interrupt` and `POST /skip` cancel the caller's *running* jobs (the caller being its API key,
  or its address without keys); queued ones carry on. A request's images run together in one batch, so
  skipping "the current image" stops the request, as interrupt does. The interrupted txt2img call
  answers 499 `cancelled`.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse.core.service import Muse
from muse.core.tickets import Ticket, TicketState
from muse.errors import Cancelled
from muse.http.auth import viewer_of
from muse.http.common import client_of, service
from muse.model_info import ModelInfo
from muse.schedulers import SCHEDULERS


def progress_json(muse: Muse, tickets: list[Ticket]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "skipped": False,
        "interrupted": False,
        "job": "",
        "job_count": len(tickets),
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not tickets:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    current = tickets[0]
    steps = current.request.steps
    running = current.state is TicketState.RUNNING
    state |= {
        "job": current.id,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(current.created)),
        "sampling_step": current.step if running else 0,
        "sampling_steps": steps,
    }
    where = f"step {current.step} of {steps}" if running else f"queued, {muse.position(current) or 0} image(s) ahead"
    return {
        "progress": current.step / steps if running else 0.0,
        "eta_relative": muse.eta(current) or 0.0,
        "state": state,
        "current_image": None,
        "textinfo": where,
    }


async def progress(request: Request) -> Response:
    # `skip_current_image` (a query flag) only spares A1111 a preview render; there are no previews here.
    muse = service(request)
    return JSONResponse(progress_json(muse, muse.active(viewer_of(request).owner_filter)))


def cancel_running(request: Request, why: str) -> Response:
    muse = service(request)
    for ticket in muse.active(client_of(request)):
        if ticket.state is TicketState.RUNNING:
            muse.cancel(ticket, Cancelled(why))
    return JSONResponse({})


async def interrupt(request: Request) -> Response:
    return cancel_running(request, "interrupted by /sdapi/v1/interrupt")


async def skip(request: Request) -> Response:
    return cancel_running(request, "skipped by /sdapi/v1/skip")


async def sd_models(request: Request) -> Response:
    muse = service(request)
    model = muse.model
    card = {
        "title": model.name,
        "model_name": model.name,
        "hash": None,
        "sha256": None,
        "filename": muse.settings.model,
        "config": None,
        # Muse's own: what kind of pipeline it is (A1111 clients read the fields they know).
        "family": model.family,
        "pipeline": model.pipeline,
    }
    return JSONResponse([card])


def sampler_list(model: ModelInfo) -> list[dict[str, Any]]:
    """A1111's sampler list for this model: Muse's samplers for Stable Diffusion; for a family that runs only
    its own scheduler (FLUX, SD3, a pipeline Muse has no step loop for), that one, named by its class."""
    if not model.samplers:
        return [{"name": model.scheduler or "default", "aliases": ["default"], "options": {}}]
    return [{"name": name, "aliases": [SCHEDULERS[name]], "options": {}} for name in model.samplers]


async def samplers(request: Request) -> Response:
    return JSONResponse(sampler_list(service(request).model))


async def schedulers(request: Request) -> Response:
    # A1111's noise schedules (Karras, Exponential…); Muse uses each sampler's own, which A1111 calls Automatic.
    automatic = {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1}
    return JSONResponse([automatic | {"need_inner_model": False}])


async def options(request: Request) -> Response:
    return JSONResponse({"sd_model_checkpoint": service(request).model.name})


async def loras(request: Request) -> Response:
    """The LoRA adapters in --lora-dir, as A1111 lists its own (a prompt names one as <lora:name:scale>)."""
    files = service(request).lora_files()
    return JSONResponse(
        [{"name": f.name, "alias": f.name, "path": f"{f.name}.safetensors", "metadata": {}} for f in files]
    )


def constant(value: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        return JSONResponse(value)

    return endpoint


# What A1111 answers when it has none of these installed; its clients read the lists and move on.
NOTHING_INSTALLED = {
    "/sdapi/v1/upscalers": [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}],
    "/sdapi/v1/latent-upscale-modes": [],
    "/sdapi/v1/sd-vae": [],
    "/sdapi/v1/hypernetworks": [],
    "/sdapi/v1/face-restorers": [],
    "/sdapi/v1/prompt-styles": [],
    "/sdapi/v1/embeddings": {"loaded": {}, "skipped": {}},
    "/sdapi/v1/scripts": {"txt2img": [], "img2img": []},
    "/sdapi/v1/cmd-flags": {},
}

routes = [
    Route("/sdapi/v1/progress", progress, methods=["GET"]),
    Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
    Route("/sdapi/v1/skip", skip, methods=["POST"]),
    Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
    Route("/sdapi/v1/samplers", samplers, methods=["GET"]),
    Route("/sdapi/v1/schedulers", schedulers, methods=["GET"]),
    Route("/sdapi/v1/options", options, methods=["GET"]),
    Route("/sdapi/v1/refresh-checkpoints", constant(None), methods=["POST"]),
    Route("/sdapi/v1/loras", loras, methods=["GET"]),
    # The folder is read whenever it changes: nothing to refresh.
    Route("/sdapi/v1/refresh-loras", constant(None), methods=["POST"]),
    *(Route(path, constant(value), methods=["GET"]) for path, value in NOTHING_INSTALLED.items()),
]
