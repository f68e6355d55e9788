"""A job card's live stream: server-sent events the page's card listener (htmx's SSE extension) swaps in.

A `card` event is the whole card rendered anew, when the job's state or queue position changes (and at
once on connecting); a `progress` event is only the running card's bar and status line, at every
denoising step, so the rest of the card (its Cancel button) is not replaced under the pointer. Then one
`end` event, on which the listener closes the stream. Nothing polls: the card is rendered when the job
says something changed.

The loop that follows the job, and the limits on how many streams may, are muse.http.sse's; this module
only turns the job into its card. Every stream of a job shows the same card, so `Cards` renders it once
per change for all of them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from secrets import token_hex
from weakref import WeakKeyDictionary

from markupsafe import escape
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from muse.core.service import Muse
from muse.core.tickets import Ticket, TicketState
from muse.http.auth import viewer_of
from muse.http.sse import Change, TooManyStreams, event_stream, sse
from muse.web.pages import job_view
from muse.web.render import friendly, problem_response, render_text, service

# A card's forms carry the viewer's CSRF token, the only part of it that depends on who watches. Cards are
# rendered with this stand-in, which each stream swaps for its own viewer's token; it is random so that
# no prompt can contain it.
TOKEN_STAND_IN = token_hex(16)


class Cards:
    """The latest card and bar of each job, rendered once for all the streams that follow it."""

    def __init__(self) -> None:
        # Weak: an entry goes with its job, once the job has expired and its last stream has ended.
        self.latest: WeakKeyDictionary[Ticket, dict[str, tuple[Hashable, str]]] = WeakKeyDictionary()

    def event(self, request: Request, muse: Muse, ticket: Ticket, event: str, template: str, key: Hashable) -> str:
        """`event` showing `template`, rendered anew only when the job's `key` differs from the last render's."""
        rendered = self.latest.setdefault(ticket, {})
        last = rendered.get(event)
        if last is None or last[0] != key:
            context = {"job": job_view(muse, ticket), "streamed": True, "csrf_token": TOKEN_STAND_IN}
            last = rendered[event] = (key, sse(event, render_text(request, template, context)))
        token = getattr(request.state, "csrf_token", "")
        return last[1].replace(TOKEN_STAND_IN, str(escape(token)))  # escaped as the template would have


def cards_of(request: Request) -> Cards:
    """The app's cards, made on first use (one per app, like its other state)."""
    state = request.app.state
    cards: Cards | None = getattr(state, "stream_cards", None)
    if cards is None:
        cards = state.stream_cards = Cards()
    return cards


class CardEvents:
    """One stream's events: what its page was last sent decides whether a change is a card, a bar or nothing."""

    def __init__(self, request: Request, muse: Muse, ticket: Ticket, cards: Cards) -> None:
        self.request, self.muse, self.ticket, self.cards = request, muse, ticket, cards
        self.shown: tuple[TicketState, int | None] | None = None
        self.step = -1

    def opening(self) -> list[str]:
        return self.now()

    def changed(self, changes: Sequence[Change]) -> list[str]:
        return self.now()  # the page shows the job as it is, however many changes led there

    def now(self) -> list[str]:
        ticket = self.ticket
        where = (ticket.state, self.muse.position(ticket))
        events = []
        if where != self.shown:
            events.append(self.event("card", "_job.html", (*where, ticket.step)))
            self.shown, self.step = where, ticket.step
        elif ticket.state is TicketState.RUNNING and ticket.step != self.step:
            events.append(self.event("progress", "_job_progress.html", ticket.step))
            self.step = ticket.step
        if ticket.done:
            events.append(sse("end", ""))
        return events

    def event(self, event: str, template: str, key: Hashable) -> str:
        return self.cards.event(self.request, self.muse, self.ticket, event, template, key)


@friendly
async def job_stream(request: Request) -> Response:
    muse = service(request)
    ticket = muse.job(request.path_params["id"], viewer_of(request))
    try:
        return event_stream(request, ticket, CardEvents(request, muse, ticket, cards_of(request)))
    except TooManyStreams as refused:
        # A card, as for any error, with the headers the JSON answer carries (Retry-After, Connection: close).
        response = problem_response(request, refused)
        response.headers.update(refused.headers())
        return response


routes = [Route("/jobs/{id}/stream", job_stream, methods=["GET"], name="job_stream")]
