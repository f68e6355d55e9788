"""The gallery: every generated image as a PNG file plus a row in SQLite, surviving restarts.

Layout under `data_dir`:
    images/<id>.png     the worker's PNG with an AUTOMATIC1111-style `parameters` text chunk
    gallery.sqlite3     one row per image (WAL mode)

Folders are made 0700 and files 0600 whatever the umask: the images and prompts are the tenants', not
the business of the machine's other users.

A save writes the file first (temp file + os.replace) and the row after it, so a row always has its
file; a crash in between leaves only an orphan file, never a row pointing at nothing. `save` runs on
the event loop, so it does no fsync: WAL with synchronous=NORMAL may lose the last commits on power
loss, never corrupt the database.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

from muse.datadir import DataDirError, open_database
from muse.infotext import KEYWORD, Infotext, png_with_text
from muse.messages import GenerateRequest, GenerateResult

ID_PATTERN = re.compile(r"[0-9a-f]{16}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    guidance_scale REAL NOT NULL,
    scheduler TEXT NOT NULL,
    model TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    queued_ms REAL NOT NULL,
    compute_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    bytes INTEGER NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    strength REAL NOT NULL DEFAULT 0,
    loras TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS images_newest ON images (seq DESC);
"""
# Galleries made before images had owners get the column (their images belong to no key: admins see them).
# Galleries made before img2img get the strength column (0: started from text).
MIGRATIONS = {
    "owner": "ALTER TABLE images ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    "strength": "ALTER TABLE images ADD COLUMN strength REAL NOT NULL DEFAULT 0",
    "loras": "ALTER TABLE images ADD COLUMN loras TEXT NOT NULL DEFAULT ''",
}
OWNER_INDEX = "CREATE INDEX IF NOT EXISTS images_by_owner ON images (owner, seq DESC)"

COLUMNS = (
    "id, created, prompt, negative_prompt, seed, steps, width, height, guidance_scale, scheduler, model, "
    "batch_size, queued_ms, compute_ms, total_ms, bytes, owner, strength, loras"
)


@dataclass(frozen=True)
class GalleryImage:
    id: str
    created: float
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    width: int
    height: int
    guidance_scale: float
    scheduler: str  # "" = the model's own
    model: str
    batch_size: int
    queued_ms: float
    compute_ms: float
    total_ms: float
    bytes: int
    owner: str = ""  # who made it: an API key's fingerprint or a client address
    strength: float = 0.0  # started from a picture at this denoising strength (0: from text)
    loras: str = ""  # its LoRAs as A1111 tags: "<lora:name:0.8> …"

    @property
    def parameters(self) -> str:
        """The `parameters` text AUTOMATIC1111 writes, so its PNG Info tab and other tools read our files."""
        return Infotext(
            self.prompt,
            self.negative_prompt,
            self.steps,
            self.scheduler,
            self.guidance_scale,
            self.seed,
            self.width,
            self.height,
            self.model,
            self.strength,
            self.loras,
        ).text()


@dataclass(frozen=True)
class Page:
    """One page of a listing, newest first. Cursors are image ids: pass `older` as `after`, `newer` as `before`."""

    images: list[GalleryImage]
    older: str | None
    newer: str | None
    total: int


def new_id() -> str:
    return secrets.token_hex(8)


def like_pattern(query: str) -> str:
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def prepare(db: sqlite3.Connection) -> None:
    """Check the database is the gallery's (or empty) before anything is written to it, then bring its schema
    up to date."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
    if tables and not {"id", "prompt", "seed"} <= columns:
        raise DataDirError(f"another program's tables: {', '.join(sorted(tables)[:5])}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
    for column, statement in MIGRATIONS.items():
        if column not in columns:
            db.execute(statement)
    db.execute(OWNER_INDEX)


class Gallery:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.images_dir.mkdir(mode=0o700, exist_ok=True)
        for leftover in self.images_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)  # a save interrupted before its rename
        # Built on one thread, used on the server's event loop thread: the lock serialises access.
        self._db = open_database(self.data_dir / "gallery.sqlite3", "a Muse gallery", prepare)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- writing ----------------------------------------------------------------------------------

    def save(self, result: GenerateResult, model_scheduler: str = "", owner: str = "") -> list[str]:
        """Store every image of a finished request; returns their ids in order. `model_scheduler`
        names the model's own scheduler, recorded when the request left the choice to the model;
        `owner` who asked (only they, and admins, see the images when API keys are on)."""
        request = result.request or GenerateRequest("", 0, result.steps, 0.0, result.width, result.height)
        now, t = time.time(), result.timings
        records = []
        for image in result.images:
            record = GalleryImage(
                id=new_id(),
                created=now,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                seed=image.seed,
                steps=result.steps,
                width=result.width,
                height=result.height,
                guidance_scale=request.guidance_scale,
                scheduler=request.scheduler or model_scheduler,
                model=result.model,
                batch_size=result.batch_size,
                queued_ms=t.queued_ms,
                compute_ms=t.compute_ms,
                total_ms=t.total_ms,
                bytes=0,
                owner=owner,
                strength=request.source.strength if request.source is not None else 0.0,
                loras=" ".join(use.tag for use in request.loras),
            )
            data = png_with_text(image.png, KEYWORD, record.parameters)
            self._write_file(record.id, data)
            records.append(astuple(replace(record, bytes=len(data))))
        if not records:
            return []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    f"INSERT INTO images ({COLUMNS}) VALUES ({', '.join('?' * len(records[0]))})", records
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [record[0] for record in records]

    def _write_file(self, image_id: str, data: bytes) -> None:
        final = self.images_dir / f"{image_id}.png"
        temp = self.images_dir / f".{image_id}.png.tmp"
        try:
            with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
                file.write(data)
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def delete(self, image_id: str, owner: str | None = None) -> bool:
        """Row first, then file: a listing never shows an image whose file is gone. With `owner`, only
        that owner's image."""
        if not ID_PATTERN.fullmatch(image_id):
            return False
        conditions, args = owned(owner)
        with self._lock:
            deleted = (
                self._db.execute(f"DELETE FROM images {where(['id = ?', *conditions])}", (image_id, *args)).rowcount > 0
            )
        if deleted:
            (self.images_dir / f"{image_id}.png").unlink(missing_ok=True)
        return deleted

    # ---- reading ----------------------------------------------------------------------------------

    def get(self, image_id: str, owner: str | None = None) -> GalleryImage | None:
        """The image, or None if there is none (or, with `owner`, none of that owner's)."""
        if not ID_PATTERN.fullmatch(image_id):
            return None
        conditions, args = owned(owner)
        with self._lock:
            row = self._db.execute(
                f"SELECT {COLUMNS} FROM images {where(['id = ?', *conditions])}", (image_id, *args)
            ).fetchone()
        return GalleryImage(*row) if row else None

    def png_path(self, image_id: str) -> Path | None:
        if self.get(image_id) is None:
            return None
        path = self.images_dir / f"{image_id}.png"
        return path if path.is_file() else None

    def page(
        self,
        query: str = "",
        *,
        limit: int = 24,
        after: str | None = None,
        before: str | None = None,
        owner: str | None = None,
    ) -> Page:
        """Newest first (with `owner`, only that owner's). `after`: the images older than that id;
        `before`: the page just newer than it.

        Cursors (not offsets) keep pages stable while new images arrive at the top.
        """
        limit = max(1, min(limit, 100))
        matching, matching_args = search(query, owner)
        with self._lock:
            cursor = after or before
            mine, mine_args = owned(owner)  # another owner's id is no cursor: it must not reveal when it was made
            found = (
                self._db.execute(f"SELECT seq FROM images {where(['id = ?', *mine])}", (cursor, *mine_args)).fetchone()
                if cursor
                else None
            )
            # An unknown (e.g. deleted) cursor falls back to the first page rather than failing.
            anchor = found[0] if found else None
            backwards = anchor is not None and after is None
            conditions, args = list(matching), list(matching_args)
            if anchor is not None:
                conditions.append("seq > ?" if backwards else "seq < ?")
                args.append(anchor)
            rows = self._db.execute(
                f"SELECT {COLUMNS}, seq FROM images {where(conditions)} ORDER BY seq {'ASC' if backwards else 'DESC'} "
                "LIMIT ?",
                (*args, limit),
            ).fetchall()
            if backwards:
                rows.reverse()
            older = newer = None
            if rows:
                older = rows[-1][0] if self._any([*matching, "seq < ?"], [*matching_args, rows[-1][-1]]) else None
                newer = rows[0][0] if self._any([*matching, "seq > ?"], [*matching_args, rows[0][-1]]) else None
            total = int(self._db.execute(f"SELECT count(*) FROM images {where(matching)}", matching_args).fetchone()[0])
        return Page([GalleryImage(*row[:-1]) for row in rows], older, newer, total)

    def _any(self, conditions: list[str], args: list[object]) -> bool:
        return self._db.execute(f"SELECT 1 FROM images {where(conditions)} LIMIT 1", args).fetchone() is not None


def owned(owner: str | None) -> tuple[list[str], list[object]]:
    return (["owner = ?"], [owner]) if owner is not None else ([], [])


def search(query: str, owner: str | None = None) -> tuple[list[str], list[object]]:
    """Case-insensitive (ASCII) substring match on the prompt; % and _ in the query match themselves."""
    query = query.strip()
    conditions, args = owned(owner)
    if query:
        conditions.append("prompt LIKE ? ESCAPE '\\'")
        args.append(like_pattern(query))
    return conditions, args


def where(conditions: list[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""
