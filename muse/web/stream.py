"""A job card's live stream: server-sent events the page's card listener (htmx's SSE extension) swaps in.

A `card` event is the whole card rendered anew, when the job's state or queue position changes (and at
once on connecting); a `progress` event is only the running card's bar and status line, at every
denoising step, so the rest of the card (its Cancel button) is not replaced under the pointer. Then one
`end` event, on which the listener closes the stream. Nothing polls: the card is rendered when the job
says something changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from muse.core.service import Muse
from muse.core.tickets import Ticket
from muse.http.auth import viewer_of
from muse.http.common import sse
from muse.web.pages import job_view
from muse.web.render import friendly, render_text, service

KEEPALIVE_S = 15.0


async def card_events(request: Request, muse: Muse, ticket: Ticket) -> AsyncIterator[str]:
    changed = asyncio.Event()
    unwatch = muse.watch(ticket, lambda t, e: changed.set()) if not ticket.done else (lambda: None)
    try:
        shown: tuple[object, ...] | None = None
        step = -1
        while True:
            changed.clear()
            view = job_view(muse, ticket)
            where = (view["state"], view["position"])
            if where != shown:
                yield sse("card", render_text(request, "_job.html", {"job": view, "streamed": True}))
                shown, step = where, view["step"]
            elif view["state"] == "running" and view["step"] != step:
                yield sse("progress", render_text(request, "_job_progress.html", {"job": view}))
                step = view["step"]
            if ticket.done:
                yield sse("end", "")
                return
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
    finally:
        unwatch()


@friendly
async def job_stream(request: Request) -> Response:
    muse = service(request)
    ticket = muse.job(request.path_params["id"], viewer_of(request))
    return StreamingResponse(
        card_events(request, muse, ticket),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


routes = [Route("/jobs/{id}/stream", job_stream, methods=["GET"], name="job_stream")]
