"""Signed, expiring links to stored images: whoever holds one may fetch that one image, key or not, until
it expires, and nothing else. The secret lives in the data folder, so links survive a restart."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

SECRET_FILE = "link-secret"


def load_secret(data_dir: Path) -> bytes:
    """The data folder's link secret, made (readable by its owner only) on first use."""
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secret)
        return secret


class LinkSigner:
    def __init__(self, secret: bytes, ttl: float = 3600.0) -> None:
        self.secret = secret
        self.ttl = ttl

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, path: str, now: float | None = None) -> str:
        """`path` with `expires` and `sig` query parameters."""
        expires = int((time.time() if now is None else now) + self.ttl)
        return f"{path}?{urlencode({'expires': expires, 'sig': self._signature(path, expires)})}"

    def valid(self, path: str, expires: str, signature: str, now: float | None = None) -> bool:
        if not expires.isascii() or not expires.isdigit() or len(expires) > 12:
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._signature(path, int(expires)), signature)
