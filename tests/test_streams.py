"""Event streams cannot starve the server: limits per job and per client, clients that never read, one card
render for every stream of a job, and a stream whose client stopped reading ends."""

from __future__ import annotations

import asyncio
import math
import select
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from muse.config import Settings
from muse.core.tickets import Ticket
from muse.http import sse
from muse.http.sse import STREAMS_PER_CLIENT, STREAMS_PER_JOB, Change, EventStream
from muse.messages import GenerateRequest
from muse.server import uvicorn_config
from muse.web import stream
from muse.web.render import render_text
from tests.serving import LiveServer, _Uvicorn, job_status, release, run_blocker, settings, submit_job, wait_for

MAX_CONNECTIONS = STREAMS_PER_CLIENT + 8  # room for one client's streams and a few requests, not for 40 streams


class ServedLikeMuse(LiveServer):
    """The app under uvicorn configured as `muse serve` does (its connection limit, its read deadlines)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        config = uvicorn_config(self.app, settings, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = _Uvicorn(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@pytest.fixture(scope="module")
def server(tiny_model: str) -> Iterator[LiveServer]:
    # Progress at every step: a card changes at each one.
    options = settings(tiny_model, max_connections=MAX_CONNECTIONS, max_wait_ms=1, progress_interval=0, job_ttl=30)
    served = ServedLikeMuse(options).start()
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def open_streams(server: LiveServer) -> int:
    def count(_: object) -> int:
        limits = getattr(server.app.state, "stream_limits", None)
        return 0 if limits is None else sum(limits.jobs.values())

    return server.read(count)


def healthz(server: LiveServer) -> int:
    return httpx.get(server.url + "/healthz", timeout=10).status_code


def test_a_job_and_a_client_each_have_a_stream_limit_beyond_which_streams_get_429(server: LiveServer) -> None:
    blocker = run_blocker(server)
    waiting = [submit_job(server, {"prompt": f"waits {i}", "steps": 2}) for i in range(2)]
    with ExitStack() as held, httpx.Client(base_url=server.url, timeout=10) as client:
        # Both kinds of stream count against the job's limit.
        for i in range(STREAMS_PER_JOB):
            path = f"/api/jobs/{blocker}/events" if i % 2 else f"/jobs/{blocker}/stream"
            assert held.enter_context(client.stream("GET", path)).status_code == 200
        refused = client.get(f"/api/jobs/{blocker}/events")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams", refused.text
        assert refused.headers["Retry-After"].isdigit() and refused.headers["Connection"] == "close"
        card = client.get(f"/jobs/{blocker}/stream")
        assert card.status_code == 429 and card.headers["Retry-After"].isdigit() and "Slow down" in card.text
        assert healthz(server) == 200

        # The client's limit spans its jobs.
        for i in range(STREAMS_PER_CLIENT - STREAMS_PER_JOB):
            path = f"/api/jobs/{waiting[i // STREAMS_PER_JOB]}/events"
            assert held.enter_context(client.stream("GET", path)).status_code == 200
        over = client.get(f"/api/jobs/{waiting[-1]}/events")
        assert over.status_code == 429 and "client" in over.json()["error"]["message"], over.text
        assert healthz(server) == 200
    # Hanging up ends a stream while its job goes on, and frees its place.
    wait_for(lambda: open_streams(server) == 0, 10, what="the closed streams to end")
    assert job_status(server, blocker)["status"] == "running"
    with httpx.stream("GET", f"{server.url}/api/jobs/{waiting[-1]}/events", timeout=10) as again:
        assert again.status_code == 200
    release(server, blocker, *waiting)


def test_clients_that_open_streams_and_never_read_leave_room_for_others(server: LiveServer) -> None:
    blocker = run_blocker(server)
    host, port = server.url.removeprefix("http://").split(":")
    sockets = []
    try:
        for i in range(40):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sockets.append(sock)
            path = f"/api/jobs/{blocker}/events" if i % 2 else f"/jobs/{blocker}/stream"
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            # Never read, only waited on until the server has answered (so it sees one request at a time).
            assert select.select([sock], [], [], 10)[0], "no answer"
        # The streams over the limits are refused on connections that close; the rest hold a few slots.
        wait_for(lambda: healthz(server) == 200, 10, 0.1, "/healthz to answer beside the unread streams")
        assert job_status(server, blocker)["status"] == "running", "the streams must be following a live job"
        assert open_streams(server) == STREAMS_PER_JOB
        assert httpx.post(server.url + "/api/jobs", json={"prompt": "x", "steps": 1}).status_code == 202
    finally:
        for sock in sockets:
            sock.close()
    wait_for(lambda: open_streams(server) == 0, 10, what="the unread streams to end")
    release(server, blocker)


def card_stream_events(response: httpx.Response) -> list[tuple[str, str]]:
    events, name, data = [], "", []
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and name:
            events.append((name, "\n".join(data)))
            name, data = "", []
            if events[-1][0] == "end":
                break
    return events


def test_a_card_is_rendered_once_per_change_for_all_the_streams_of_its_job(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = run_blocker(server)
    job = submit_job(server, {"prompt": "watched by many", "steps": 8})
    renders: list[str] = []

    def counting(request: Any, name: str, context: dict[str, Any]) -> str:
        if context["job"]["id"] == job:
            renders.append(name)
        return render_text(request, name, context)

    monkeypatch.setattr(stream, "render_text", counting)
    with ExitStack() as held:
        # Separate clients: separate CSRF cookies, so each card must come back with its own viewer's token.
        clients = [held.enter_context(httpx.Client(base_url=server.url, timeout=60)) for _ in range(6)]
        responses = [held.enter_context(c.stream("GET", f"/jobs/{job}/stream")) for c in clients]
        httpx.delete(f"{server.url}/api/jobs/{blocker}")
        seen = [card_stream_events(r) for r in responses]
        tokens = [r.cookies["muse_csrf"] for r in responses]
    assert len(set(tokens)) == len(tokens)
    distinct: set[tuple[str, str]] = set()
    for events, token in zip(seen, tokens, strict=True):
        assert [name for name, _ in events][-2:] == ["card", "end"] and len(events) >= 4, events
        cards = [html for name, html in events if name == "card"]
        assert all(f'name="csrf_token" value="{token}"' in html for html in cards if "<form" in html)
        distinct |= {(name, html.replace(token, "TOKEN")) for name, html in events if name != "end"}
    assert len(renders) == len(distinct), f"{len(renders)} renders for {len(distinct)} different events"
    release(server)


class Silent:
    """A stream feed with something to say at once and never again."""

    def opening(self) -> list[str]:
        return [sse.sse("queued", "{}")]

    def changed(self, changes: Sequence[Change]) -> list[str]:
        return []


def test_a_stream_whose_client_stopped_reading_ends_and_stops_watching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "SEND_TIMEOUT_S", 0.2)

    async def scenario() -> tuple[bool, int]:
        request = GenerateRequest("x", seed=1, steps=2, guidance_scale=7.5, width=32, height=32)
        ticket = Ticket("job", request, asyncio.get_running_loop().create_future(), 0.0, math.inf)
        released: list[bool] = []

        class Service:
            def watch(self, ticket: Ticket, listener: Any) -> Any:
                return ticket.watch(listener)

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # connected, and sending nothing
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # its buffers are full: the body never leaves

        response = EventStream(Service(), ticket, Silent(), lambda: released.append(True))  # type: ignore[arg-type]
        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)
        return bool(released), len(ticket.listeners)

    released, listeners = asyncio.run(scenario())
    assert released and listeners == 0
