"""The waiting tickets, in fair order between owners (tenants: API keys, Slack users, addresses).

Start-time fair queuing, counted in images: a ticket's tag is the later of the virtual time (the tag of
the latest ticket handed to a worker) and the end of its owner's previous queued ticket. Tickets run in
tag order (then arrival), so one owner's requests stay oldest first, and an owner with 200 images
queued delays another's single image by at most one batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from muse.core.tickets import Ticket


def _order(t: Ticket) -> tuple[float, float]:
    return t.tag, t.submitted


class FairQueue:
    def __init__(self) -> None:
        self._tickets: list[Ticket] = []
        self.images = 0  # queued images, all tickets together
        self._virtual = 0.0
        self._owner_end: dict[str | None, float] = {}  # where each owner's queued tickets end, in images

    def __iter__(self) -> Iterator[Ticket]:
        return iter(self._tickets)

    def __len__(self) -> int:
        return len(self._tickets)

    def __bool__(self) -> bool:
        return bool(self._tickets)

    @property
    def head(self) -> Ticket:
        return self._tickets[0]

    def add(self, ticket: Ticket) -> None:
        if ticket.owner not in self._owner_end:
            # Owners with nothing queued are forgotten: the table holds only the owners now waiting.
            self._owner_end = {o: end for o, end in self._owner_end.items() if end > self._virtual}
        ticket.tag = max(self._virtual, self._owner_end.get(ticket.owner, 0.0))
        self._owner_end[ticket.owner] = ticket.tag + ticket.request.n
        bisect.insort(self._tickets, ticket, key=_order)
        self.images += ticket.request.n

    def take(self, tickets: list[Ticket]) -> None:
        """These leave for a worker: the virtual time moves on to their tags."""
        self._remove(tickets)
        self._virtual = max(self._virtual, *(t.tag for t in tickets))

    def drop(self, ticket: Ticket) -> None:
        """A queued ticket left without running (cancelled, expired): its owner's queue ends where their
        remaining tickets end, so what they dropped does not count against their next request."""
        self._remove([ticket])
        ends = [t.tag + t.request.n for t in self._tickets if t.owner == ticket.owner]
        if ends:
            self._owner_end[ticket.owner] = max(ends)
        else:
            self._owner_end.pop(ticket.owner, None)

    def put_back(self, tickets: Iterable[Ticket]) -> None:
        """Tickets whose worker died come back with their own tags (mostly at the front: they were among
        the oldest)."""
        back = list(tickets)
        self._tickets = sorted([*back, *self._tickets], key=_order)
        self.images += sum(t.request.n for t in back)

    def position(self, ticket: Ticket) -> int | None:
        """Images queued ahead of this ticket, or None once it left the queue."""
        ahead = 0
        for t in self._tickets:
            if t is ticket:
                return ahead
            ahead += t.request.n
        return None

    def by_owner(self) -> dict[str | None, list[Ticket]]:
        """Each owner's queued tickets, oldest first."""
        owners: dict[str | None, list[Ticket]] = {}
        for t in sorted(self._tickets, key=lambda t: t.submitted):
            owners.setdefault(t.owner, []).append(t)
        return owners

    def through(self, ticket: Ticket) -> list[Ticket]:
        """The queue up to and including this ticket."""
        return self._tickets[: self._tickets.index(ticket) + 1] if ticket in self._tickets else [ticket]

    def _remove(self, tickets: list[Ticket]) -> None:
        gone = set(map(id, tickets))
        self._tickets = [t for t in self._tickets if id(t) not in gone]
        self.images -= sum(t.request.n for t in tickets)
