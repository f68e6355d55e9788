"""Durable jobs: every job accepted with a 202, and every webhook event not yet delivered, as rows of
`<data-dir>/jobs.sqlite3`.

Each write is a transaction committed with `synchronous=FULL` (WAL mode: one fsync of the log per commit), so a
job whose 202 went out survives `kill -9` and a power cut alike. A job's end and its webhook event are one
transaction: after a crash either both are there or neither, and the event keeps the id it was given, so a
receiver can dedupe a delivery repeated because the crash came between sending it and marking it delivered.

Rows are written on the event loop: one small commit costs about a millisecond on a local disk, far less than
a denoising step, and keeping them in order with the loop's own events needs no locking beyond SQLite's.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from muse.core.jobcodec import error_to_json, request_from_json, request_to_json, result_to_json
from muse.core.tickets import Ticket, TicketState
from muse.datadir import DataDirError, open_database
from muse.errors import MuseError
from muse.messages import GenerateRequest

FILE_NAME = "jobs.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    created REAL NOT NULL,
    request TEXT NOT NULL,
    webhook_url TEXT NOT NULL DEFAULT '',
    base_url TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    ended REAL,
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (ended, seq);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    url TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at);
"""
JOB_COLUMNS = "seq, id, owner, created, request, webhook_url, base_url, state, ended, error, result"
EVENT_COLUMNS = "event_id, job_id, type, url, created, attempts, next_at, last_error"


@dataclass(frozen=True)
class StoredJob:
    seq: int
    id: str
    owner: str | None
    created: float
    request_json: str
    webhook_url: str
    base_url: str  # where the job was asked for: its image links in webhooks start here (without --public-url)
    state: str
    ended: float | None
    error_json: str | None
    result_json: str | None

    @property
    def request(self) -> GenerateRequest:
        return request_from_json(self.request_json)


@dataclass(frozen=True)
class Event:
    """One webhook event waiting in the outbox. `id` is its `webhook-id`, the same on every attempt."""

    id: str
    job_id: str
    type: str  # job.succeeded, job.failed, job.cancelled
    url: str
    created: float
    attempts: int
    next_at: float
    last_error: str


def prepare(db: sqlite3.Connection) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables - {"jobs", "outbox", "sqlite_sequence"}:
        raise DataDirError(f"another program's tables: {', '.join(sorted(tables)[:5])}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)


class JobStore:
    def __init__(self, data_dir: Path) -> None:
        Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = open_database(Path(data_dir) / FILE_NAME, "Muse's job store", prepare)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # ---- jobs -------------------------------------------------------------------------------------

    def add(self, ticket: Ticket, *, webhook_url: str = "", base_url: str = "") -> None:
        """Record an accepted job; when this returns, it is on disk."""
        self._write(
            (
                "INSERT INTO jobs (id, owner, created, request, webhook_url, base_url, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    ticket.id,
                    ticket.owner,
                    ticket.created,
                    request_to_json(ticket.request),
                    webhook_url,
                    base_url,
                    TicketState.QUEUED.value,
                ),
            )
        )

    def end(self, ticket: Ticket, webhook_url: str = "") -> Event | None:
        """Record how a job ended, and its webhook event (if it has a `webhook_url`) in the same transaction."""
        assert ticket.done
        now = time.time()
        result = result_to_json(ticket.result, ticket.saved) if ticket.result is not None else None
        update = (
            "UPDATE jobs SET state = ?, ended = ?, error = ?, result = ? WHERE id = ?",
            (ticket.state.value, ticket.finished or now, error_to_json(ticket.error), result, ticket.id),
        )
        url = webhook_url
        if not url:
            self._write(update)
            return None
        event = Event(f"msg_{secrets.token_hex(12)}", ticket.id, f"job.{ticket.state.value}", url, now, 0, now, "")
        self._write(
            update,
            (
                f"INSERT INTO outbox ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (event.id, event.job_id, event.type, event.url, event.created, 0, event.next_at, ""),
            ),
        )
        return event

    def fail(self, job_id: str, error: MuseError) -> None:
        """End a job that cannot run (its row could not be read back), without a ticket."""
        self._write(
            (
                "UPDATE jobs SET state = ?, ended = ?, error = ? WHERE id = ?",
                (TicketState.FAILED.value, time.time(), error_to_json(error), job_id),
            )
        )

    def job(self, job_id: str) -> StoredJob | None:
        with self._lock:
            row = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return StoredJob(*row) if row else None

    def unfinished(self) -> list[StoredJob]:
        """Jobs accepted and not ended, in the order they were accepted."""
        with self._lock:
            rows = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE ended IS NULL ORDER BY seq").fetchall()
        return [StoredJob(*row) for row in rows]

    def ended_since(self, since: float) -> list[StoredJob]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE ended >= ? ORDER BY seq", (since,)
            ).fetchall()
        return [StoredJob(*row) for row in rows]

    def forget(self, job_id: str) -> None:
        """An ended job's time is up; its row goes once no event of it waits in the outbox."""
        self._write(
            (
                "DELETE FROM jobs WHERE id = ? AND ended IS NOT NULL AND id NOT IN (SELECT job_id FROM outbox)",
                (job_id,),
            )
        )

    def prune(self, ended_before: float) -> None:
        self._write(
            (
                "DELETE FROM jobs WHERE ended < ? AND id NOT IN (SELECT job_id FROM outbox)",
                (ended_before,),
            )
        )

    # ---- outbox -----------------------------------------------------------------------------------

    def due(self, now: float, limit: int = 64) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {EVENT_COLUMNS} FROM outbox WHERE next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)
            ).fetchall()
        return [Event(*row) for row in rows]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT min(next_at) FROM outbox").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def settled(self, event: Event, job_ttl_end: float) -> None:
        """The event was delivered, or will never be: out of the outbox, and its job with it if its time is up."""
        self._write(
            ("DELETE FROM outbox WHERE event_id = ?", (event.id,)),
            ("DELETE FROM jobs WHERE id = ? AND ended < ?", (event.job_id, job_ttl_end)),
        )

    def retry(self, event: Event, next_at: float, error: str) -> None:
        self._write(
            (
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE event_id = ?",
                (next_at, error[:500], event.id),
            )
        )
