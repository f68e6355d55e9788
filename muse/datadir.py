"""One server per data directory: `muse serve` holds a lock on `--data-dir` for as long as it runs, so a second
server started on the same folder refuses at once, naming the lock and its holder, instead of two processes
writing one gallery. The lock is the kernel's (flock): it goes with the process, however that ends, so a crash
never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import IO

LOCK_NAME = "muse.lock"


class DataDirError(Exception):
    """The data directory cannot be used as it is: said in one line, and nothing in it is changed."""


def open_database(path: Path, what: str, prepare: Callable[[sqlite3.Connection], None]) -> sqlite3.Connection:
    """The SQLite database at `path` (autocommit; usable from another thread than this one), made if missing.
    `prepare` checks it is `what` (empty, or with our tables) before it writes anything, then brings its schema up
    to date; a corrupt or foreign file is refused in one line and left as it is."""
    # SQLite makes its files 0644 (less the umask), and its -wal and -shm files as the database's: made 0600
    # first, all three stay so.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        prepare(db)
    except (sqlite3.DatabaseError, DataDirError) as exc:
        db.close()
        raise DataDirError(
            f"{path} is not {what} ({str(exc).splitlines()[0]}); it is left as it is: move it away or choose "
            "another --data-dir"
        ) from None
    return db


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Opened without truncating: the holder's pid stays readable until the lock is ours.
        handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataDirError(
                f"{self.path.parent} is in use by another Muse server (pid {holder} holds {self.path}); "
                "give each server its own --data-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None
