"""JSON routes: /api/generate, /api/jobs (with server-sent progress events), /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from muse.core.service import Muse
from muse.core.tickets import Ticket, TicketState
from muse.http.auth import viewer_of
from muse.http.common import client_of, service, sse, wait_unless_disconnected
from muse.messages import GenerateResult
from muse.schema import GenerateBody, parse_json, validate

SSE_KEEPALIVE_S = 15.0


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


async def generate(request: Request) -> Response:
    muse = service(request)
    body = await read_body(request)
    ticket = muse.submit(body.to_request(muse.model), client=client_of(request))
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
    body = await read_body(request)
    ticket = muse.submit(body.to_request(muse.model), keep=True, client=client_of(request))
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
    return StreamingResponse(
        event_stream(muse, ticket),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def event_stream(muse: Muse, ticket: Ticket) -> AsyncIterator[str]:
    """`queued` when the position changes, `running`, one `progress` per step, then the final state."""
    events: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    last_position: list[int | None] = [None]

    def listener(t: Ticket, event: str) -> None:
        if event == "queued":
            position = muse.position(t)
            if position == last_position[0]:
                return
            last_position[0] = position
        events.put_nowait((event, t.step))

    unwatch = muse.watch(ticket, listener) if not ticket.done else (lambda: None)
    try:
        if ticket.done:
            yield sse(ticket.state.value, json.dumps(job_json(muse, ticket)))
            return
        if ticket.state is TicketState.QUEUED:
            last_position[0] = muse.position(ticket)
            yield sse("queued", json.dumps(job_json(muse, ticket)))
        while True:
            try:
                event, step = await asyncio.wait_for(events.get(), SSE_KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event == "progress":
                progress = {"id": ticket.id, "step": step, "steps": ticket.request.steps}
                yield sse("progress", json.dumps(progress | {"eta_s": _round(muse.eta(ticket))}))
            else:
                yield sse(event, json.dumps(job_json(muse, ticket)))
            if event in ("succeeded", "failed", "cancelled"):
                return
    finally:
        unwatch()


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ready, reason = service(request).readiness()
    return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.render(), media_type="text/plain; version=0.0.4")


routes = [
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/jobs", create_job, methods=["POST"]),
    Route("/api/jobs/{id}", get_job, methods=["GET"]),
    Route("/api/jobs/{id}", delete_job, methods=["DELETE"]),
    Route("/api/jobs/{id}/events", job_events, methods=["GET"]),
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
]
