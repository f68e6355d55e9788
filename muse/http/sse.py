"""Server-sent event streams that follow one job: the one loop every front end's stream runs, and the limits
that keep streams from holding every connection.

A stream watches its ticket through the service and sleeps until the job says something changed. What
changed since its last send goes to its `Feed`, the front end's only part (the API's JSON, the page's
rendered card), which answers the events to send. A stream that falls behind its job (a slow reader)
keeps only the latest of a run of the same change, so it costs a few pending entries, never a growing
queue. A comment every KEEPALIVE_S keeps a quiet stream open through proxies. The stream ends with the
job, when the client hangs up, or when one send has not completed for SEND_TIMEOUT_S: a client that
stopped reading.

uvicorn's --max-connections counts open connections and a stream holds one until it ends, so at most
STREAMS_PER_JOB streams follow one job and STREAMS_PER_CLIENT belong to one client (`client_of`). One over
either limit gets a 429 whose connection closes with the answer, so a refused client holds no slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from muse.core.service import Muse
from muse.core.tickets import Ticket
from muse.errors import RateLimited
from muse.http.common import client_of, service

log = logging.getLogger("muse.streams")

KEEPALIVE_S = 15.0
SEND_TIMEOUT_S = 30.0
STREAMS_PER_JOB = 8
STREAMS_PER_CLIENT = 16
RETRY_AFTER_S = 5  # a guess: a slot frees when some stream's job ends, which may take any time
BEHIND = 16  # pending changes past which a run of the same change keeps only its latest

KEEPALIVE = ": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str, data: str) -> str:
    """One server-sent event; each line of `data` on its own `data:` line, so no text can end the event."""
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in data.splitlines() or [""]) + "\n"


@dataclass(frozen=True)
class Change:
    """What a job said: "queued" (its position may have moved), "running", "progress" or its final state,
    with the step it had reached then."""

    event: str
    step: int


class Feed(Protocol):
    """A front end's part of a stream: its events (formatted by `sse`) on connecting and after changes."""

    def opening(self) -> Sequence[str]: ...

    def changed(self, changes: Sequence[Change]) -> Sequence[str]: ...


class TooManyStreams(RateLimited):
    """429: the job or the client already has its most streams. The connection closes with the answer."""

    code = "too_many_streams"

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, limit=limit, remaining=0, reset_s=RETRY_AFTER_S)

    def headers(self) -> dict[str, str]:
        # Not RateLimited's x-ratelimit-* headers: those count requests a minute, not open streams.
        return {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}


class StreamLimits:
    """Open streams by job and by client; `open` refuses one over either limit."""

    def __init__(self, per_job: int = STREAMS_PER_JOB, per_client: int = STREAMS_PER_CLIENT) -> None:
        self.per_job = per_job
        self.per_client = per_client
        self.jobs: dict[Hashable, int] = {}
        self.clients: dict[Hashable, int] = {}

    def open(self, job: str, client: str | None) -> Callable[[], None]:
        """Count one more stream (or raise TooManyStreams); returns the function that counts it closed."""
        if self.jobs.get(job, 0) >= self.per_job:
            raise TooManyStreams(f"{self.per_job} streams already follow this job; try again later", limit=self.per_job)
        if self.clients.get(client, 0) >= self.per_client:
            message = f"this client already has {self.per_client} open streams; close one or try again later"
            raise TooManyStreams(message, limit=self.per_client)
        self.jobs[job] = self.jobs.get(job, 0) + 1
        self.clients[client] = self.clients.get(client, 0) + 1
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                forget(self.jobs, job)
                forget(self.clients, client)

        return close


def forget(counts: dict[Hashable, int], key: Hashable) -> None:
    if counts[key] > 1:
        counts[key] -= 1
    else:
        del counts[key]  # no entry outlives the last stream of its job or client


def limits_of(request: Request) -> StreamLimits:
    """The app's stream counts, made on first use (one per app: tests run several apps in one process)."""
    state = request.app.state
    limits: StreamLimits | None = getattr(state, "stream_limits", None)
    if limits is None:
        limits = state.stream_limits = StreamLimits()
    return limits


def event_stream(request: Request, ticket: Ticket, feed: Feed) -> EventStream:
    """The response that streams `feed`'s events for `ticket`; 429 when its job or client is at its limit."""
    release = limits_of(request).open(ticket.id, client_of(request))
    return EventStream(service(request), ticket, feed, release)


class EventStream(Response):
    """The stream itself, an ASGI response: its slot is given back however it ends."""

    media_type = "text/event-stream"

    def __init__(self, muse: Muse, ticket: Ticket, feed: Feed, release: Callable[[], None]) -> None:
        self.muse, self.ticket, self.feed, self.release = muse, ticket, feed, release
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            following = asyncio.ensure_future(self.follow(send))
            gone = asyncio.ensure_future(hung_up(receive))
            try:
                await asyncio.wait((following, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                following.cancel()
                gone.cancel()
                await asyncio.wait((following, gone))
            if not following.cancelled():
                following.result()  # its errors reach the server's log
        finally:
            self.release()

    async def follow(self, send: Send) -> None:
        pending: list[Change] = []
        woken = asyncio.Event()

        def heard(ticket: Ticket, event: str) -> None:
            change = Change(event, ticket.step)
            if len(pending) >= BEHIND and pending[-1].event == event:
                pending[-1] = change
            else:
                pending.append(change)
            woken.set()

        # Watched and opened with no await between: every change after the opening is heard.
        unwatch = self.muse.watch(self.ticket, heard) if not self.ticket.done else (lambda: None)
        try:
            events = self.feed.opening()
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            if not await self.send(send, start):
                return
            while True:
                if events and not await self.send(send, body("".join(events), more=True)):
                    return
                if self.ticket.done and not pending:
                    break
                if not pending:
                    woken.clear()
                    try:
                        async with asyncio.timeout(KEEPALIVE_S):
                            await woken.wait()
                    except TimeoutError:
                        events = [KEEPALIVE]
                        continue
                changes, pending[:] = pending[:], []
                events = self.feed.changed(changes)
            await self.send(send, body("", more=False))
        finally:
            unwatch()

    async def send(self, send: Send, message: Message) -> bool:
        """Whether `message` went out within SEND_TIMEOUT_S. When it did not, the stream ends unfinished and
        uvicorn closes the connection; but a close waits for the unread bytes to drain, so the connection's
        slot comes back only when the peer reads or hangs up, unless its protocol (muse.server) aborts it."""
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await send(message)
        except TimeoutError:
            log.warning("dropped a stream of job %s: its client read nothing for %g s", self.ticket.id, SEND_TIMEOUT_S)
            return False
        return True


def body(text: str, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": text.encode(), "more_body": more}


async def hung_up(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
