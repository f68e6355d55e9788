"""What every HTTP front end shares: the one error renderer, the service behind the app, who a client
is, and awaiting a job while watching for the client to hang up."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from muse.core.service import Muse
from muse.core.tickets import Ticket
from muse.errors import Cancelled, MuseError
from muse.messages import GenerateResult


def error_response(error: MuseError, headers: Mapping[str, str] | None = None) -> Response:
    """Every JSON error, in OpenAI's shape, with the status and headers its class carries."""
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers() | dict(headers or {}))


def service(request: Request) -> Muse:
    muse: Muse = request.app.state.muse
    return muse


def client_of(request: Request) -> str | None:
    """Who to charge against --rate-limit (set by muse.http.auth for every request)."""
    identity: str | None = getattr(request.state, "identity", None)
    return identity


async def wait_unless_disconnected(request: Request, ticket: Ticket, muse: Muse) -> GenerateResult:
    """Await the ticket; if the client goes away first, cancel it so it is never computed."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher: asyncio.Future[Any] = asyncio.ensure_future(disconnected())
    waits: list[asyncio.Future[Any]] = [ticket.future, watcher]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not ticket.future.done():
        muse.cancel(ticket, Cancelled("client disconnected"))
    return ticket.future.result()
