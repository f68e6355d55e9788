"""Read a multiprocessing Connection's messages without ever blocking the event loop.

The event loop makes the pipe's fd non-blocking, and `Connection.recv()` then fails half-way through a
large message (a batch of big PNGs arrives in several chunks). This reader keeps what has arrived and
unpickles each message once its last byte is in. Framing is multiprocessing's own: a signed 4-byte
big-endian length, or -1 followed by an 8-byte length for messages over 2 GiB.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterator

CHUNK = 1 << 20


class FrameReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def read(self) -> Iterator[object]:
        """Yield every complete message readable now; raise EOFError once the writer is gone."""
        while True:
            try:
                chunk = os.read(self.fd, CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                yield from self._messages()
                raise EOFError
            self.buffer += chunk
            if len(chunk) < CHUNK:
                break
        yield from self._messages()

    def _messages(self) -> Iterator[object]:
        while True:
            if len(self.buffer) < 4:
                return
            (size,) = struct.unpack("!i", self.buffer[:4])
            header = 4
            if size == -1:
                if len(self.buffer) < 12:
                    return
                (size,) = struct.unpack("!Q", self.buffer[4:12])
                header = 12
            if len(self.buffer) < header + size:
                return
            payload = bytes(self.buffer[header : header + size])
            del self.buffer[: header + size]
            yield pickle.loads(payload)
