"""JSON routes: /api/generate, /api/jobs (with server-sent progress events), /healthz, /readyz, /metrics."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from muse.core.service import Muse
from muse.core.tickets import Ticket, TicketState
from muse.http.auth import viewer_of
from muse.http.common import client_of, service, wait_unless_disconnected
from muse.http.sse import Change, event_stream, sse
from muse.messages import GenerateRequest, GenerateResult
from muse.model_info import ModelInfo
from muse.schema import GenerateBody, JobBody, parse_json, validate


def result_json(result: GenerateResult) -> dict[str, Any]:
    return {
        "images": [{"png_base64": base64.b64encode(i.png).decode(), "seed": i.seed} for i in result.images],
        "model": result.model,
        "steps": result.steps,
        "width": result.width,
        "height": result.height,
        "batch_size": result.batch_size,
        "timings": {
            "queued_ms": round(result.timings.queued_ms, 2),
            "compute_ms": round(result.timings.compute_ms, 2),
            "total_ms": round(result.timings.total_ms, 2),
        },
    }


async def read_body(request: Request) -> GenerateBody:
    body: GenerateBody = validate(GenerateBody, parse_json(await request.body()))
    return body


async def to_request(body: GenerateBody, model: ModelInfo) -> GenerateRequest:
    """The request; a picture's decoding and fitting (tens of milliseconds for a large one) off the event loop."""
    if body.init_image is None:
        return body.to_request(model)
    return await anyio.to_thread.run_sync(body.to_request, model)


async def generate(request: Request) -> Response:
    muse = service(request)
    body = await read_body(request)
    ticket = muse.submit(await to_request(body, muse.model), client=client_of(request))
    result = await wait_unless_disconnected(request, ticket, muse)
    return JSONResponse(result_json(result))


def job_json(muse: Muse, ticket: Ticket) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": ticket.id,
        "status": ticket.state.value,
        "position": muse.position(ticket),
        "step": ticket.step if ticket.state is not TicketState.QUEUED else None,
        "steps": ticket.request.steps,
        "eta_s": _round(muse.eta(ticket)),
        "prompt": ticket.request.prompt,
        "seed": ticket.request.seed,
        "n": ticket.request.n,
        "loras": [{"name": use.name, "scale": use.scale} for use in ticket.request.loras],
        "created": ticket.created,
    }
    if ticket.result is not None:
        data["result"] = result_json(ticket.result)
    if ticket.error is not None:
        data["error"] = ticket.error.to_dict()["error"]
    return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def create_job(request: Request) -> Response:
    muse = service(request)
    body: JobBody = validate(JobBody, parse_json(await request.body()))
    webhook_url = body.webhook_url or ""
    if webhook_url:
        await muse.check_webhook(webhook_url)
    ticket = muse.submit(
        await to_request(body, muse.model),
        keep=True,
        client=client_of(request),
        webhook_url=webhook_url,
        base_url=str(request.base_url),
    )
    base = f"/api/jobs/{ticket.id}"
    return JSONResponse(
        {"id": ticket.id, "status_url": base, "events_url": f"{base}/events", "seed": ticket.request.seed},
        status_code=202,
        headers={"Location": base},
    )


async def get_job(request: Request) -> Response:
    muse = service(request)
    return JSONResponse(job_json(muse, muse.job(request.path_params["id"], viewer_of(request))))


async def delete_job(request: Request) -> Response:
    muse = service(request)
    ticket = muse.cancel(request.path_params["id"], viewer=viewer_of(request))
    return JSONResponse(job_json(muse, ticket))


async def job_events(request: Request) -> Response:
    muse = service(request)
    ticket = muse.job(request.path_params["id"], viewer_of(request))
    return event_stream(request, ticket, JobEvents(muse, ticket))


class JobEvents:
    """A job's events as JSON: `queued` when its position changes, `running`, one `progress` per step (its
    step, steps and ETA), then the final state; every event but `progress` carries the whole job."""

    def __init__(self, muse: Muse, ticket: Ticket) -> None:
        self.muse, self.ticket = muse, ticket
        self.position: int | None = None

    def opening(self) -> list[str]:
        if self.ticket.done:
            return [self.job_event(self.ticket.state.value)]
        if self.ticket.state is TicketState.QUEUED:
            self.position = self.muse.position(self.ticket)
            return [self.job_event("queued")]
        return []

    def changed(self, changes: Sequence[Change]) -> list[str]:
        events = []
        for change in changes:
            if change.event == "progress":
                progress = {"id": self.ticket.id, "step": change.step, "steps": self.ticket.request.steps}
                events.append(sse("progress", json.dumps(progress | {"eta_s": _round(self.muse.eta(self.ticket))})))
                continue
            if change.event == "queued":
                position = self.muse.position(self.ticket)
                if position == self.position:
                    continue  # every queued job hears of every dispatch; only a move is news
                self.position = position
            events.append(self.job_event(change.event))
        return events

    def job_event(self, event: str) -> str:
        return sse(event, json.dumps(job_json(self.muse, self.ticket)))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ready, reason = service(request).readiness()
    return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.render(), media_type="text/plain; version=0.0.4")


async def list_loras(request: Request) -> Response:
    """The LoRA adapters requests may name (--lora-dir), as the folder is now."""
    muse = service(request)
    files = muse.lora_files()
    return JSONResponse(
        {
            "enabled": muse.model.loras is not None,
            "loras": [{"name": f.name, "bytes": f.bytes, "modified": f.modified} for f in files],
        }
    )


routes = [
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/loras", list_loras, methods=["GET"]),
    Route("/api/jobs", create_job, methods=["POST"]),
    Route("/api/jobs/{id}", get_job, methods=["GET"]),
    Route("/api/jobs/{id}", delete_job, methods=["DELETE"]),
    Route("/api/jobs/{id}/events", job_events, methods=["GET"]),
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
]
