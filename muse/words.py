"""An error as a person should understand it: what kind of trouble, which field, whether and when to try again.

The one ladder from a MuseError to its `Kind`. Each front end that talks to people (the pages, the Slack
bot) words each kind its own way, and names fields its own way, but none of them sorts errors itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from muse.errors import (
    Cancelled,
    GenerationFailed,
    InvalidRequest,
    MuseError,
    NotFound,
    Overloaded,
    RateLimited,
    ShuttingDown,
    TimedOut,
    Unavailable,
    WorkerDied,
)


class Kind(enum.Enum):
    INVALID = "invalid"  # the request itself: a field to fix
    BUSY = "busy"  # refused before queueing: too much work waiting
    RATE_LIMITED = "rate_limited"
    RESTARTING = "restarting"  # draining: nothing new is accepted
    UNAVAILABLE = "unavailable"  # no worker can load the model: the operator must act
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"  # the worker died, and so did the retry
    FAILED = "failed"  # the pipeline raised
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"
    OTHER = "other"


# Most specific first: the first class the error is an instance of decides.
LADDER: tuple[tuple[type[MuseError], Kind], ...] = (
    (InvalidRequest, Kind.INVALID),
    (Overloaded, Kind.BUSY),
    (RateLimited, Kind.RATE_LIMITED),
    (ShuttingDown, Kind.RESTARTING),
    (Unavailable, Kind.UNAVAILABLE),
    (TimedOut, Kind.TIMED_OUT),
    (WorkerDied, Kind.CRASHED),
    (GenerationFailed, Kind.FAILED),
    (Cancelled, Kind.CANCELLED),
    (NotFound, Kind.NOT_FOUND),
)
# Asking again unchanged cannot help: the request must change first.
FINAL = frozenset({Kind.INVALID, Kind.NOT_FOUND})


@dataclass(frozen=True)
class Words:
    kind: Kind
    message: str  # as raised
    detail: str  # the message without the "field: " the edge puts before a field's problem
    field: str | None  # the field at fault, in the front end's words
    retry_after: int | None  # seconds, when the server said when to try again
    retryable: bool


def kind_of(error: MuseError) -> Kind:
    return next((kind for cls, kind in LADDER if isinstance(error, cls)), Kind.OTHER)


def in_words(error: MuseError, names: Mapping[str, str] | None = None) -> Words:
    """`names`: the front end's word for each field it shows (a field it does not show becomes None).
    Without it, the field keeps the name it was raised with: a front end whose `Dialect` already named it."""
    kind = kind_of(error)
    param = error.param
    field = param if names is None or param is None else names.get(param)
    retry = error.headers().get("Retry-After")
    return Words(
        kind=kind,
        message=error.message,
        detail=error.message.removeprefix(f"{param}: ") if param else error.message,
        field=field,
        retry_after=int(retry) if retry else None,
        retryable=kind not in FINAL,
    )
